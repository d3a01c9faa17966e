"""``make bench``: every ratio of mipo against its baselines in one run, as a markdown report.

1. Training step and reference pass against TRL's DPOTrainer (``bench.train_step``), on the
   anchor workload (the demo's 64 ARC-Challenge pairs) and on GSM8K-shaped pairs
   (``bench.workloads``), with each framework's peak RSS.
2. Sampling against the one-prompt loop of ``model.generate``: ``bench.sampling.report``
   (also ``make bench-sampling`` alone).
3. The log-prob kernels (``python -m mipo.kernels.bench_logprob``, CPU-sized).

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

import torch

from bench.train_step import Settings, compare
from bench.workloads import pairs_file, workload_config
from mipo.data.pairs import read_pairs


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{load}; torch {torch.__version__}, Python {platform.python_version()}"


def training_section(name: str, settings: Settings, num_pairs: int) -> str:
    result = compare(settings)
    mipo, trl = "mipo", "trl"
    median, reference, peak = result["median_step_s"], result["reference_s"], result["peak_rss_gib"]
    lines = [
        f"### {name}: {settings.pairs_per_step} pairs per step, {settings.steps} steps, lr {settings.lr}, beta "
        f"{settings.beta}, gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}",
        "",
        "| measure | mipo | TRL 1.16.0 | TRL / mipo |",
        "|---|---|---|---|",
        f"| training step, median of steps {min(settings.skip, settings.steps - 1) + 1}-{settings.steps} (s) | {median[mipo]:.2f} | "
        f"{median[trl]:.2f} | **{median[trl] / median[mipo]:.2f}x** |",
        f"| reference pass, {num_pairs} pairs (s) | {reference[mipo]:.1f} | {reference[trl]:.1f} | "
        f"**{reference[trl] / reference[mipo]:.2f}x** |",
        f"| peak RSS of the process (GiB) | {peak[mipo]:.2f} | {peak[trl]:.2f} | {peak[trl] / peak[mipo]:.2f}x |",
        "",
        "reference passes (s): mipo " + " ".join(f"{t:.1f}" for t in result["reference_passes_s"][mipo])
        + f"; TRL {reference[trl]:.1f}",
        "",
        "every step (s): mipo " + " ".join(f"{t:.2f}" for t in result["step_s"][mipo]) + "; TRL "
        + " ".join(f"{t:.2f}" for t in result["step_s"][trl]),
        "",
    ]
    return "\n".join(lines)


def sampling_section(argv: list[str]) -> str:
    from bench import sampling as bench_sampling  # `make bench-sampling` alone

    return "## Sampling against the one-prompt loop\n\n" + bench_sampling.report(argv)


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
    sections = [f"# mipo benchmark\n\nMachine: {machine()}\n\nCommand: `python -m bench.run {' '.join(argv or sys.argv[1:])}`\n",
                "## Training step and reference pass against TRL's DPOTrainer\n"]
    for name in args.workloads:
        overrides = ("data.num_train=64",) if name == "anchor" else (f"data.num_train={args.gsm8k_pairs}",)
        path = pairs_file(name, workload_config(name, *overrides))  # sampled or built once, before the workers start
        steps = args.anchor_steps if name == "anchor" else args.gsm8k_steps
        settings = Settings(name, overrides, steps=steps, gradient_checkpointing=args.gradient_checkpointing,
                            threads=args.threads)
        sections.append(training_section(name, settings, len(read_pairs(path))))
        print(sections[-1], flush=True)
    if not args.skip_sampling:
        sections.append(sampling_section([]))
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
