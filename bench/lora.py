"""Full fine-tuning against LoRA adapters (``lora=default``): training step time and memory, in one run.

Two worker processes, one per arm, both alive for the whole comparison; the driver hands out one optimizer step
at a time and alternates which arm goes first, so load on the machine hits both alike. Each arm builds its
policy with the trainer's own ``mipo.stages.train.build_step_model`` (LoRA: peft adapters on the frozen base,
AdamW over the trainable parameters) and runs the trainer's own ``mipo.training.step.optimizer_step``
(collate, prompt-shared forward and DPO loss, backward, clipping, AdamW and scheduler steps) on the same pairs in
the same order. The reference log-probs are zeros: their values change neither the work nor the memory of a
step (the real reference pass is the policy's own forward, with adapters off under LoRA: no second copy).

Memory, per arm: the peak RSS of its process (``ru_maxrss``), the RSS once the model is built and before the
first step, and the bytes of the training state counted tensor by tensor: weights, gradients after a backward
(the trainable parameters' only) and the optimizer's states.

    .venv/bin/python -m bench.lora                                  # SmolLM2-135M-Instruct, the demo's pairs
    .venv/bin/python -m bench.lora --pairs path/to/pairs.jsonl --steps 12 --rank 16 --out bench/LORA_RESULTS.md
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.train_step import alternate_steps, peak_rss_gib

ARMS = ("full", "lora")


@dataclass(frozen=True)
class Settings:
    pairs: str | None = None  # a pairs file; None: the demo's (bench.workloads "anchor", sampled once)
    steps: int = 12
    skip: int = 2  # steps left out of the median (warm-up)
    pairs_per_step: int = 2
    rank: int = 16
    lr: float = 5e-7
    threads: int = 0  # torch threads per worker; 0: all cores


def rss_gib() -> float:
    """The process's resident set now (``peak_rss_gib``: its peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def state_bytes(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the weights, of the gradients the trainable parameters hold, and of the optimizer's states."""
    weights = sum(p.numel() * p.element_size() for p in policy.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in policy.parameters() if p.grad is not None)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor))
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return {"weights": weights, "gradients": grads, "optimizer": states, "trainable_params": trainable}


def arm_config(arm: str, settings: Settings):
    from bench.workloads import workload_config

    lora = ["lora=default", f"lora.rank={settings.rank}", f"lora.alpha={2 * settings.rank}"] if arm == "lora" else []
    return workload_config("anchor", *lora, f"trainer.lr={settings.lr}", "trainer.warmup_ratio=0",
                           f"trainer.batch_size={settings.pairs_per_step}",
                           f"trainer.micro_batch_size={settings.pairs_per_step}")


def _build(arm: str, settings: Settings):
    """The arm's policy, forward and optimizer (``build_step_model``) and the step's data, zeros as log pi_ref."""
    from bench.workloads import pairs_file
    from mipo.data.pairs import read_pairs
    from mipo.model.loading import run_tokenizer
    from mipo.model.precision import training_precision
    from mipo.stages.train import build_step_model
    from mipo.training.forward import ReferenceLogps, encode_training_rows
    from mipo.training.step import LoopState, StepData, StepSettings

    cfg = arm_config(arm, settings)
    pairs = read_pairs(settings.pairs or pairs_file("anchor", cfg))
    tokenizer = run_tokenizer(cfg)
    rows = encode_training_rows(tokenizer, pairs, "sigmoid", cfg.data.max_length, cfg.data.max_prompt_length)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_step_model(cfg, len(tokenizer), device, training_precision(cfg, device), "single", settings.steps)
    zeros = torch.zeros(len(pairs))
    reference = ReferenceLogps(zeros, zeros, path=None, cache_hit=False)
    data = StepData(pairs, Path(settings.pairs or "anchor"), rows, reference, tokenizer.pad_token_id, device)
    step_settings = StepSettings(cfg.loss, settings.pairs_per_step, 1, cfg.trainer.max_grad_norm, False, 1, 0)
    n = settings.pairs_per_step
    order = [[(i * n + j) % len(pairs) for j in range(n)] for i in range(settings.steps)]
    return model, data, step_settings, LoopState(order, history=[], skipped=[])


def worker(conn, arm: str, settings: Settings) -> None:
    from mipo.training.step import optimizer_step

    if settings.threads:
        torch.set_num_threads(settings.threads)
    model, data, step_settings, state = _build(arm, settings)
    built_rss = rss_gib()
    conn.send("ready")
    step, counted = 0, {}
    while conn.recv() == "step":
        step += 1
        start = time.perf_counter()
        optimizer_step(step, model, data, step_settings, state)
        conn.send(time.perf_counter() - start)
        if step == 1:  # the gradients are freed by zero_grad: count them by one more backward's worth
            counted = state_bytes(model.policy, model.optimizer)
            counted["gradients"] = sum(p.numel() * p.element_size() for p in model.policy.parameters()
                                       if p.requires_grad)
    conn.send({"peak_rss_gib": peak_rss_gib(), "built_rss_gib": built_rss, **counted,
               "loss": state.history[-1]["loss"] if state.history else None})


def compare(settings: Settings) -> dict[str, Any]:
    """Both arms interleaved step by step; the medians, the step times and the memory of each."""
    context = mp.get_context("spawn")
    pipes, processes = {}, {}
    for arm in ARMS:
        parent, child = context.Pipe()
        processes[arm] = context.Process(target=worker, args=(child, arm, settings))
        processes[arm].start()
        pipes[arm] = parent
    for arm in ARMS:
        assert pipes[arm].recv() == "ready"
    times = alternate_steps(pipes, list(ARMS), settings.steps)
    memory = {}
    for arm in ARMS:
        pipes[arm].send("stop")
        memory[arm] = pipes[arm].recv()
        processes[arm].join()
    medians = {arm: statistics.median(times[arm][settings.skip:]) for arm in ARMS}
    return {"times": times, "median_s": medians, "memory": memory}


def report(settings: Settings, result: dict[str, Any]) -> str:
    gib = 2**30
    median, memory = result["median_s"], result["memory"]
    threads = settings.threads or torch.get_num_threads()
    lines = [(f"SmolLM2-135M-Instruct, fp32 on CPU ({threads} torch thread(s) per arm), DPO, "
             f"{settings.pairs_per_step} pairs per step, {settings.steps} steps (median of the last "
             f"{settings.steps - settings.skip}), LoRA rank {settings.rank} alpha {2 * settings.rank} on every linear "
             "layer of the decoder"), "",
             "| | full fine-tuning | LoRA | full / LoRA |", "|---|---:|---:|---:|"]

    def row(name: str, full: float, lora: float, fmt: str) -> None:
        ratio = f"{full / lora:.2f}x" if lora else "-"
        lines.append(f"| {name} | {full:{fmt}} | {lora:{fmt}} | {ratio} |")

    row("step time (s, median)", median["full"], median["lora"], ".3f")
    fastest = {arm: min(result["times"][arm][settings.skip:]) for arm in ARMS}  # load on the machine only adds
    row("step time (s, fastest)", fastest["full"], fastest["lora"], ".3f")
    row("peak RSS (GiB)", memory["full"]["peak_rss_gib"], memory["lora"]["peak_rss_gib"], ".2f")
    row("peak RSS - RSS once built (GiB)", memory["full"]["peak_rss_gib"] - memory["full"]["built_rss_gib"],
        memory["lora"]["peak_rss_gib"] - memory["lora"]["built_rss_gib"], ".2f")
    for key in ("weights", "gradients", "optimizer"):
        row(f"{key} (GiB)", memory["full"][key] / gib, memory["lora"][key] / gib, ".3f")
    state = {arm: sum(memory[arm][k] for k in ("weights", "gradients", "optimizer")) / gib for arm in ARMS}
    row("weights + gradients + AdamW (GiB)", state["full"], state["lora"], ".3f")
    row("trainable parameters (M)", memory["full"]["trainable_params"] / 1e6, memory["lora"]["trainable_params"] / 1e6,
        ".2f")
    lines += ["", "step times (s): " + "; ".join(f"{arm} " + ", ".join(f"{t:.2f}" for t in result["times"][arm])
                                                for arm in ARMS),
              "", f"pairs: {settings.pairs or 'the demo (bench.workloads anchor)'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=None, help="pairs file (default: the demo's, sampled once)")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--rank", type=int, default=Settings.rank)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    settings = Settings(pairs=args.pairs, steps=args.steps, rank=args.rank, threads=args.threads)
    text = report(settings, compare(settings))
    print(text)
    if args.out:
        Path(args.out).write_text(f"# LoRA against full fine-tuning (`make bench-lora`)\n\n{text}\n")


if __name__ == "__main__":
    main()
