"""Benchmark the sampling stage against sampling one prompt at a time with ``model.generate``.

    python -m bench.sampling                      # the issue's workload (make bench-sampling)
    python -m bench.sampling --prompts 64 --max-new-tokens 128 --threads 1

Workload (issue #14): SmolLM2-135M-Instruct (the bundled GGUF, fp32 on CPU), the first
``--prompts`` ARC-Challenge prompts of the offline split (``data.num_train`` of the default
config), ``--max-new-tokens`` new tokens, temperature 0.1, top_p 0.9.

Methods, all in one process on the same model and prompts:

  one-prompt loop   ``model.generate(do_sample=True)`` on each prompt alone (the paper's code)
  hf batched        ``model.generate`` on left-padded batches of ``--hf-batch-size`` prompts sorted
                    by length (this project's sampling before ``mipo.model.generation`` had its own loop)
  mipo.model.generation   ``generate`` (batch_size auto): finished rows leave, waiting prompts refill,
                    the prompts' common prefix is run once

Throughput counts useful tokens only: the tokens of the returned responses (up to, not
including, the end-of-turn token), divided by the wall-clock time of the whole call, prompt
processing included. Each method runs ``--repeats`` times, round-robin so that drifting machine
load hits all alike, and the median is reported; ratios are against the one-prompt loop (by
wall-clock time). The CPU seconds column helps on a shared machine (see the note it prints).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from mipo.data.chat import stop_token_ids
from mipo.data.encoding import encode_prompt
from mipo.data.tasks import get_task, load_splits
from mipo.model.generation import DecodeSettings, PlanSettings, generate
from mipo.model.loading import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def useful_tokens(new_ids: torch.Tensor, eos_token_id: int) -> int:
    """Tokens of a ``generate`` output row before its first end-of-turn token (the response's tokens)."""
    ids = new_ids.tolist()
    return ids.index(eos_token_id) if eos_token_id in ids else len(ids)


def hf_generate(model, tokenizer, prompt_ids: list[list[int]], batch_size: int, max_new_tokens: int,
                temperature: float, top_p: float) -> int:
    """``model.generate`` on left-padded, length-sorted batches; returns the useful tokens."""
    from mipo.data.encoding import left_pad

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), reverse=True)
    total = 0
    for start in range(0, len(order), batch_size):
        input_ids, attention_mask = left_pad([prompt_ids[i] for i in order[start : start + batch_size]],
                                             tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=True, temperature=temperature, top_p=top_p,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=list(stop_token_ids(tokenizer)))
        total += sum(useful_tokens(row[input_ids.shape[1]:], tokenizer.eos_token_id) for row in output)
    return total


def report(argv: list[str] | None = None) -> str:
    """Run the comparison and return it as a Markdown section (``make bench`` includes it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--batch-size", default="auto", help="rows in flight for mipo.model.generation (int or auto)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--skip-hf-batched", action="store_true")
    parser.add_argument("--cache-dir", default=os.environ.get("MIPO_CACHE_DIR", str(ROOT / ".cache" / "mipo")))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m-instruct.yaml")
    tokenizer = load_tokenizer(model_cfg, args.cache_dir)
    model = load_model(model_cfg, device="cpu", cache_dir=args.cache_dir, vocab_size=len(tokenizer)).eval()
    task = get_task("arc_challenge")
    examples, _ = load_splits(task, "offline", args.prompts, 0, 0)
    prompts = [task.messages(e) for e in examples]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)

    def one_prompt_loop() -> int:
        return hf_generate(model, tokenizer, prompt_ids, 1, args.max_new_tokens, args.temperature, args.top_p)

    def hf_batched() -> int:
        return hf_generate(model, tokenizer, prompt_ids, args.hf_batch_size, args.max_new_tokens, args.temperature,
                           args.top_p)

    def mipo_generation() -> int:
        settings = DecodeSettings(args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
        out = generate(model, tokenizer, prompts, settings, PlanSettings(batch_size=batch_size), desc=None)
        return out.summary()["new_tokens"]

    methods: dict[str, Callable[[], int]] = {"one-prompt loop": one_prompt_loop}
    if not args.skip_hf_batched:
        methods[f"hf batched ({args.hf_batch_size})"] = hf_batched
    methods[f"mipo.model.generation ({args.batch_size})"] = mipo_generation

    # warm-up: one short call of each kind (oneDNN primitive creation, lazy imports)
    generate(model, tokenizer, prompts[:2], DecodeSettings(4, temperature=args.temperature, top_p=args.top_p), desc=None)
    hf_generate(model, tokenizer, prompt_ids[:2], 2, 4, args.temperature, args.top_p)

    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    tokens: dict[str, list[int]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, method in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens[name].append(method())
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    lines = [f"Sampling throughput, {args.prompts} ARC-Challenge prompts (mean prompt "
             f"{sum(map(len, prompt_ids)) / len(prompt_ids):.0f} tokens), {args.max_new_tokens} new tokens, "
             f"temperature {args.temperature}, top_p {args.top_p}; SmolLM2-135M-Instruct fp32 on CPU "
             f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
             f"median of {args.repeats}", "",
             "| method | seconds | CPU seconds | useful tokens | tokens/s | x one-prompt loop |",
             "|---|---|---|---|---|---|"]
    base = None
    for name in methods:
        seconds = statistics.median(times[name])
        count = statistics.median(tokens[name])
        rate = count / seconds
        base = base or rate
        lines.append(f"| {name} | {seconds:.1f} | {statistics.median(cpu[name]):.1f} | {count:.0f} | {rate:.1f} | "
                     f"{rate / base:.2f} |")
    lines += ["", "CPU seconds: process time of all threads; on a machine shared with other jobs, with --threads 1, "
              "it is close to the wall-clock time the run would take alone.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    print(report(argv))


if __name__ == "__main__":
    main()
