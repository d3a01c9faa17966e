"""``make bench``: every ratio of mipo against its baselines in one run, as a markdown report.

1. Training step and reference pass against TRL's DPOTrainer (``bench.train_step``), on the
   anchor workload (the demo's 64 ARC-Challenge pairs) and on GSM8K-shaped pairs
   (``bench.workloads``), with each framework's peak RSS.
2. Sampling against the one-prompt loop of ``model.generate``: ``bench.sampling.report``
   (also ``make bench-sampling`` alone).
3. The log-prob kernels (``python -m mipo.kernels.bench_logprob``, CPU-sized).

Beside every ratio, each framework's model FLOP utilisation: the fraction of this machine's fp32
matrix rate, measured at the start of the run (``bench.mfu.matmul_rate``), that the training step
(6 x params x tokens), the reference pass and sampling (2 x params x tokens) reach; tokens are
each (prompt, response) row's in full, the same count for both frameworks (``bench/mfu.py``).

Run it with the benchmark environment (``.venv-bench``: torch 2.13.0, TRL 1.16.0), which the
Makefile creates; the ``mipo`` package itself never imports TRL::

    .venv-bench/bin/python -m bench.run --out bench/results-latest.md
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.mfu import flops_rate, matmul_params, matmul_rate, model_flops, percent
from bench.train_step import Settings, compare
from bench.workloads import pairs_file, workload_config
from mipo.data.encoding import encode_pairs
from mipo.data.pairs import read_pairs
from mipo.model.loading import load_model, load_tokenizer, run_tokenizer

MATMUL_SIZE = 2048  # the fp32 product that measures the machine's matrix rate


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{load}; torch {torch.__version__}, Python {platform.python_version()}"


@dataclass(frozen=True)
class Work:
    """What model FLOPs count on a workload: the model's parameters in matrix products and, for every pair,
    the tokens of its two rows (x, y+) and (x, y-) as mipo encodes them (``bench.mfu``)."""

    params: int
    pair_tokens: list[int]


def workload_work(cfg: Any, path: Path) -> Work:
    tokenizer = run_tokenizer(cfg)
    chosen, rejected = encode_pairs(tokenizer, read_pairs(path), cfg.data.max_length, cfg.data.max_prompt_length)
    model = load_model(cfg.model, device="cpu", dtype=torch.float32, cache_dir=cfg.paths.cache_dir,
                       vocab_size=len(tokenizer))
    tokens = [len(c.input_ids) + len(r.input_ids) for c, r in zip(chosen, rejected, strict=True)]
    return Work(matmul_params(model), tokens)


def training_mfu(result: dict[str, Any], settings: Settings, work: Work, rate: float) -> dict[str, float]:
    """Each framework's training-step MFU over the steps the median takes (step k: pairs k*b .. k*b + b - 1)."""
    b, first = settings.pairs_per_step, min(settings.skip, settings.steps - 1)
    mfu = {}
    for name, times in result["step_s"].items():
        flops = sum(model_flops(work.params, sum(work.pair_tokens[k * b:(k + 1) * b]), backward=True)
                    for k in range(first, len(times)))
        mfu[name] = flops / sum(times[first:]) / rate
    return mfu


def reference_mfu(result: dict[str, Any], work: Work, rate: float) -> dict[str, float]:
    """Each framework's reference-pass MFU: one forward of every pair's two rows."""
    flops = model_flops(work.params, sum(work.pair_tokens), backward=False)
    return {name: flops / seconds / rate for name, seconds in result["reference_s"].items()}


def training_section(name: str, settings: Settings, work: Work, rate: float) -> str:
    result = compare(settings)
    mipo, trl = "mipo", "trl"
    median, reference, peak = result["median_step_s"], result["reference_s"], result["peak_rss_gib"]
    step_mfu, reference_mfu_ = training_mfu(result, settings, work, rate), reference_mfu(result, work, rate)
    lines = [
        f"### {name}: {settings.pairs_per_step} pairs per step, {settings.steps} steps, lr {settings.lr}, beta "
        f"{settings.beta}, gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}",
        "",
        "| measure | mipo | TRL 1.16.0 | TRL / mipo |",
        "|---|---|---|---|",
        f"| training step, median of steps {min(settings.skip, settings.steps - 1) + 1}-{settings.steps} (s) | {median[mipo]:.2f} | "
        f"{median[trl]:.2f} | **{median[trl] / median[mipo]:.2f}x** |",
        f"| reference pass, {len(work.pair_tokens)} pairs (s) | {reference[mipo]:.1f} | {reference[trl]:.1f} | "
        f"**{reference[trl] / reference[mipo]:.2f}x** |",
        f"| peak RSS of the process (GiB) | {peak[mipo]:.2f} | {peak[trl]:.2f} | {peak[trl] / peak[mipo]:.2f}x |",
        f"| training step: model FLOP utilisation | {percent(step_mfu[mipo])} | {percent(step_mfu[trl])} | "
        f"{step_mfu[trl] / step_mfu[mipo]:.2f}x |",
        f"| reference pass: model FLOP utilisation | {percent(reference_mfu_[mipo])} | "
        f"{percent(reference_mfu_[trl])} | {reference_mfu_[trl] / reference_mfu_[mipo]:.2f}x |",
        "",
        f"MFU: of the fp32 matrix rate measured at the start ({flops_rate(rate)}); {work.params / 1e6:.1f} M "
        f"parameters in matrix products, {sum(work.pair_tokens) / len(work.pair_tokens):.0f} tokens a pair (its two "
        "rows in full)",
        "",
        "reference passes (s): mipo " + " ".join(f"{t:.1f}" for t in result["reference_passes_s"][mipo])
        + f"; TRL {reference[trl]:.1f}",
        "",
        "every step (s): mipo " + " ".join(f"{t:.2f}" for t in result["step_s"][mipo]) + "; TRL "
        + " ".join(f"{t:.2f}" for t in result["step_s"][trl]),
        "",
    ]
    return "\n".join(lines)


def sampling_work() -> tuple[int, int]:
    """(parameters, prompt tokens) of ``bench.sampling.report``'s default workload: SmolLM2-135M-Instruct and the
    first 32 ARC-Challenge prompts of the offline split, each prompt once."""
    from omegaconf import OmegaConf

    from bench.sampling import ROOT
    from mipo.data.encoding import encode_prompt
    from mipo.data.tasks import get_task, load_splits

    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m-instruct.yaml")
    cache_dir = os.environ.get("MIPO_CACHE_DIR", str(ROOT / ".cache" / "mipo"))
    tokenizer = load_tokenizer(model_cfg, cache_dir)
    task = get_task("arc_challenge")
    examples, _ = load_splits(task, "offline", 32, 0, 0)
    model = load_model(model_cfg, device="cpu", cache_dir=cache_dir, vocab_size=len(tokenizer))
    return matmul_params(model), sum(len(encode_prompt(tokenizer, task.messages(e))) for e in examples)


def sampling_mfu(table: str, params: int, prompt_tokens: int, rate: float) -> list[str]:
    """One line per method of ``bench.sampling.report``'s table (method | seconds | CPU seconds | useful tokens | ...):
    its MFU, 2 x params x (prompt tokens + useful tokens) / seconds / rate."""
    lines = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[0] == "method" or set(cells[0]) <= {"-"}:
            continue
        flops = model_flops(params, prompt_tokens + int(float(cells[3])), backward=False)
        lines.append(f"| {cells[0]} | {percent(flops / float(cells[1]) / rate)} |")
    return lines


def sampling_section(argv: list[str], rate: float) -> str:
    from bench import sampling as bench_sampling  # `make bench-sampling` alone

    table = bench_sampling.report(argv)
    params, prompt_tokens = sampling_work()
    lines = ["| method | model FLOP utilisation |", "|---|---|", *sampling_mfu(table, params, prompt_tokens, rate), "",
             f"MFU: 2 x {params / 1e6:.1f} M parameters x ({prompt_tokens} prompt tokens + the useful tokens) / "
             f"seconds, of the fp32 matrix rate measured at the start ({flops_rate(rate)})", ""]
    return "## Sampling against the one-prompt loop\n\n" + table + "\n" + "\n".join(lines)


def machine_rate(threads: int) -> float:
    """The fp32 matrix rate of this machine with the workers' threads (``--threads``; 0: torch's default)."""
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        return matmul_rate(torch.device("cpu"), torch.float32, MATMUL_SIZE)
    finally:
        torch.set_num_threads(default)


def kernel_section(argv: list[str]) -> str:
    command = [sys.executable, "-m", "mipo.kernels.bench_logprob", *argv]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return f"## Log-prob kernels\n\n`python -m mipo.kernels.bench_logprob {' '.join(argv)}`\n\n```\n{out.strip()}\n```\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["anchor", "gsm8k"], choices=["anchor", "gsm8k"])
    parser.add_argument("--anchor-steps", type=int, default=12)
    parser.add_argument("--gsm8k-steps", type=int, default=8)
    parser.add_argument("--gsm8k-pairs", type=int, default=16, help="GSM8K-shaped pairs (reference pass and steps)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: all cores)")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--kernel-args", default="--device cpu --dtype fp32 --n 1024 --v 49152 --h 576 --repeats 3")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    started = time.time()
    rate = machine_rate(args.threads)
    sections = [f"# mipo benchmark\n\nMachine: {machine()}\n\nCommand: `python -m bench.run {' '.join(argv or sys.argv[1:])}`\n",
                f"fp32 matrix rate at the start ({MATMUL_SIZE}^3 product, {args.threads or torch.get_num_threads()} "
                f"threads): {flops_rate(rate)}; every MFU below is a fraction of it\n",
                "## Training step and reference pass against TRL's DPOTrainer\n"]
    for name in args.workloads:
        overrides = ("data.num_train=64",) if name == "anchor" else (f"data.num_train={args.gsm8k_pairs}",)
        cfg = workload_config(name, *overrides)
        path = pairs_file(name, cfg)  # sampled or built once, before the workers start
        steps = args.anchor_steps if name == "anchor" else args.gsm8k_steps
        settings = Settings(name, overrides, steps=steps, gradient_checkpointing=args.gradient_checkpointing,
                            threads=args.threads)
        sections.append(training_section(name, settings, workload_work(cfg, path), rate))
        print(sections[-1], flush=True)
    if not args.skip_sampling:
        sections.append(sampling_section([], rate))
        print(sections[-1], flush=True)
    if not args.skip_kernels:
        sections.append(kernel_section(args.kernel_args.split()))
        print(sections[-1], flush=True)
    sections.append(f"Total wall-clock: {time.time() - started:.0f} s; finished with load average "
                    + " ".join(f"{x:.1f}" for x in os.getloadavg()) + "\n")
    report = "\n".join(sections)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    print(sections[-1])


if __name__ == "__main__":
    main()
