"""Benchmark per-token log-prob implementations: time and peak extra memory of forward+backward.

    python -m mipo.kernels.bench_logprob --device cuda --dtype bf16 --n 4096 16384 --v 32000 128256 \
        --h 4096 --repeats 10 --out results.md

Methods, per (N, V):

  gather  (input: logits (N, V) that require grad)
    log_softmax       logits.float().log_softmax(-1).gather(...)   (the usual code; biased on CPU, see
                      mipo.kernels.torch_logprob: mipo used it until the bias was found)
    naive             logprob_gather(impl="naive"): z[y] - logsumexp(z) in fp32, unchunked
    torch-chunked     logprob_gather(impl="torch"), row-chunked pure PyTorch
    triton            logprob_gather(impl="triton")                 (CUDA only)
    liger-ce          -LigerCrossEntropyLoss(reduction="none")      (CUDA, if liger_kernel imports;
                      note Liger writes its gradient into the logits buffer during the forward)
  linear  (input: hidden (N, H) and lm-head weight (V, H) that require grad)
    lm_head+naive     F.linear(hidden, W) then naive
    linear_logprob    linear_logprob(impl="auto"), chunked over tokens; the report says what
                      "auto" ran as (on GPU "triton" once the kernels passed their on-device check)

Time: median over --repeats of one forward + backward (after --warmup untimed runs); CUDA events
with synchronisation on GPU, time.perf_counter on CPU. The methods of one (N, V) are timed
round-robin (one run of each per repeat), so drifting machine load hits all of them alike.

Peak extra memory: the highest number of bytes allocated during one forward + backward minus
what was allocated before it (so it includes the (N, V) logits gradient that every gather
method has to return, and grad_hidden / grad_weight for the linear methods).
  GPU: torch.cuda.max_memory_allocated() - memory_allocated() before the step.
  CPU: measured from the CPU allocator's allocation/free events recorded by torch.profiler
       (profile_memory=True), replayed in time order.

On GPU the script also measures device-to-device copy bandwidth (a large tensor copy_, bytes
read + written) and reports, for the gather methods, the minimal bytes a fused fwd+bwd must move
(read logits twice, write the gradient once, plus the per-row vectors) divided by the measured
time, as a fraction of that bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mipo.kernels.logprob import (
    HAS_TRITON,
    default_impl,
    linear_logprob,
    logprob_gather,
)

IGNORE_INDEX = -100
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    family: str  # "gather" or "linear"
    method: str
    dtype: str
    n: int
    v: int
    h: Optional[int] = None
    time_ms: Optional[float] = None
    peak_extra_bytes: Optional[int] = None
    bandwidth_fraction: Optional[float] = None
    time_vs_naive: Optional[float] = None
    mem_vs_naive: Optional[float] = None
    note: str = ""


@dataclass
class Setup:
    device: torch.device
    repeats: int
    warmup: int
    chunk_size: int
    linear_chunk_size: int
    copy_bandwidth: Optional[float] = None  # bytes / s
    results: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(step: Callable[[], None], device: torch.device) -> float:
    """Wall time of one step() in milliseconds."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one step() minus bytes allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_extra_bytes(step)


def _cpu_peak_extra_bytes(step: Callable[[], None]) -> int:
    """Replay the CPU allocator's allocation (+) / free (-) events recorded by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def gather_min_bytes(n: int, v: int, dtype: torch.dtype) -> int:
    """Bytes a fused gather fwd+bwd must move: logits read in fwd and bwd, gradient written once,
    plus targets (int64, read twice), logp (write), lse (write + read), grad_out (read)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 3 * n * v * elem + n * (8 * 2 + 4 + 4 * 2 + 4)


# ---------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------


def naive_gather(logits, targets):
    return logprob_gather(logits, targets, IGNORE_INDEX, impl="naive")


def log_softmax_gather(logits, targets):
    """The usual code, and mipo's CPU path before: a (N, V) fp32 log_softmax, then the gather."""
    ignored = targets == IGNORE_INDEX
    logp = logits.float().log_softmax(-1).gather(-1, torch.where(ignored, 0, targets).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(ignored, 0.0)


def gather_methods(setup: Setup) -> dict[str, Callable]:
    methods = {
        "log_softmax": log_softmax_gather,
        "naive": naive_gather,
        "torch-chunked": lambda x, t: logprob_gather(x, t, IGNORE_INDEX, impl="torch", chunk_size=setup.chunk_size),
    }
    if setup.device.type == "cuda" and HAS_TRITON:
        methods["triton"] = lambda x, t: logprob_gather(x, t, IGNORE_INDEX, impl="triton")
    if setup.device.type == "cuda":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            liger = LigerCrossEntropyLoss(reduction="none", ignore_index=IGNORE_INDEX)
            methods["liger-ce"] = lambda x, t: -liger(x, t)
        except Exception:  # not installed or incompatible: skip the column
            pass
    return methods


def linear_methods(setup: Setup) -> dict[str, Callable]:
    return {
        "lm_head+naive": lambda h, w, t: naive_gather(F.linear(h, w), t),
        "linear_logprob": lambda h, w, t: linear_logprob(h, w, t, IGNORE_INDEX, chunk_size=setup.linear_chunk_size),
    }


def make_targets(n: int, v: int, device, gen) -> torch.Tensor:
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    targets[torch.rand(n, generator=gen).to(device) < 0.05] = IGNORE_INDEX
    return targets


def run_methods(
    setup: Setup,
    steps: dict[str, Callable[[], None]],
    reset: Callable[[], None],
    make_result: Callable[[str], Result],
) -> list[Result]:
    """Warm up every method, then time them round-robin (one run of each per repeat) so that a
    change in machine load affects all methods alike; then measure peak memory of each.
    reset() (dropping the previous run's gradients) runs before every step, outside the timing."""
    results = {name: make_result(name) for name in steps}
    ok = []
    for name, step in steps.items():
        try:
            for _ in range(setup.warmup):
                reset()
                step()
            sync(setup.device)
            ok.append(name)
        except torch.OutOfMemoryError:
            results[name].note = "OOM"
        except Exception as e:  # e.g. an optional third-party kernel failing: record, keep going
            results[name].note = f"error: {type(e).__name__}: {str(e)[:80]}"
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
    times = {name: [] for name in ok}
    for _ in range(setup.repeats):
        for name in ok:
            reset()
            times[name].append(time_once(steps[name], setup.device))
    for name in ok:
        results[name].time_ms = statistics.median(times[name])
        reset()
        results[name].peak_extra_bytes = peak_extra_bytes(steps[name], setup.device)
    reset()
    return list(results.values())


def bench_gather(setup: Setup, dtype_name: str, n: int, v: int) -> list[Result]:
    dtype, device = DTYPES[dtype_name], setup.device
    gen = torch.Generator().manual_seed(n * 7 + v)
    try:
        logits = (torch.randn(n, v, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_()
    except torch.OutOfMemoryError:
        return [Result("gather", "inputs", dtype_name, n, v, note="OOM allocating inputs")]
    targets = make_targets(n, v, device, gen)
    grad_out = torch.randn(n, generator=gen).to(device)

    def reset():
        logits.grad = None

    def make_step(fn):
        return lambda: fn(logits, targets).backward(grad_out)

    steps = {name: make_step(fn) for name, fn in gather_methods(setup).items()}
    results = run_methods(setup, steps, reset, lambda name: Result("gather", name, dtype_name, n, v))
    for r in results:
        if r.time_ms is not None and setup.copy_bandwidth:
            r.bandwidth_fraction = gather_min_bytes(n, v, dtype) / (r.time_ms / 1e3) / setup.copy_bandwidth
    return results


def bench_linear(setup: Setup, dtype_name: str, n: int, v: int, h: int) -> list[Result]:
    dtype, device = DTYPES[dtype_name], setup.device
    gen = torch.Generator().manual_seed(n * 11 + v)
    hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = make_targets(n, v, device, gen)
    grad_out = torch.randn(n, generator=gen).to(device)

    def reset():
        hidden.grad = weight.grad = None

    def make_step(fn):
        return lambda: fn(hidden, weight, targets).backward(grad_out)

    steps = {name: make_step(fn) for name, fn in linear_methods(setup).items()}
    results = run_methods(setup, steps, reset, lambda name: Result("linear", name, dtype_name, n, v, h))
    return results


def add_ratios(results: list[Result]) -> None:
    """time_vs_naive / mem_vs_naive against the naive method of the same family and size."""
    baselines = {"gather": "naive", "linear": "lm_head+naive"}
    for r in results:
        base = next(
            (b for b in results if (b.family, b.dtype, b.n, b.v, b.h) == (r.family, r.dtype, r.n, r.v, r.h)
             and b.method == baselines[r.family]),
            None,
        )
        if base is None:
            continue
        if r.time_ms is not None and base.time_ms:
            r.time_vs_naive = r.time_ms / base.time_ms
        if r.peak_extra_bytes is not None and base.peak_extra_bytes:
            r.mem_vs_naive = r.peak_extra_bytes / base.peak_extra_bytes


# ---------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return f"{name}, torch {torch.__version__}"


def fmt(x, spec, suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown_table(results: list[Result], show_bandwidth: bool) -> str:
    header = ["family", "method", "dtype", "N", "V", "H", "fwd+bwd ms", "time vs naive", "peak extra MiB", "mem vs naive"]
    if show_bandwidth:
        header.append("% of copy BW")
    header.append("note")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [
            r.family, r.method, r.dtype, str(r.n), str(r.v), "-" if r.h is None else str(r.h),
            fmt(r.time_ms, ".2f"), fmt(r.time_vs_naive, ".2f", "x"),
            fmt(None if r.peak_extra_bytes is None else r.peak_extra_bytes / 2**20, ".1f"),
            fmt(r.mem_vs_naive, ".3f", "x"),
        ]
        if show_bandwidth:
            row.append(fmt(None if r.bandwidth_fraction is None else 100 * r.bandwidth_fraction, ".1f", "%"))
        row.append(r.note)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(setup: Setup, argv: list[str]) -> str:
    mem_method = (
        "torch.cuda.max_memory_allocated() - memory_allocated() before the step"
        if setup.device.type == "cuda"
        else "measured: CPU allocator alloc/free events from torch.profiler(profile_memory=True), replayed in order"
    )
    lines = [
        f"Device: {device_description(setup.device)}",
        f"Command: python -m mipo.kernels.bench_logprob {' '.join(argv)}",
        f"Time: median of {setup.repeats} fwd+bwd runs (methods interleaved) after {setup.warmup} warm-up runs "
        f"({'CUDA events' if setup.device.type == 'cuda' else 'time.perf_counter'})",
        f"Peak extra memory: {mem_method}; includes the returned gradients",
        f"torch-chunked chunk_size={setup.chunk_size} rows; linear_logprob chunk_size={setup.linear_chunk_size} tokens",
    ]
    auto = {d: default_impl(setup.device, DTYPES[d]) for d in sorted({r.dtype for r in setup.results})}
    lines.append("linear_logprob impl='auto' ran as: " + ", ".join(f"{d} -> {impl}" for d, impl in auto.items()))
    if setup.copy_bandwidth:
        lines.append(
            f"Device-to-device copy bandwidth (read+write): {setup.copy_bandwidth / 1e9:.0f} GB/s; "
            "'% of copy BW' = (3*N*V*elem + per-row vectors) / time / copy BW"
        )
    if setup.device.type != "cuda":
        lines.append("triton / liger-ce rows are skipped on CPU (GPU kernels).")
    return "\n".join(lines) + "\n\n" + markdown_table(setup.results, setup.copy_bandwidth is not None) + "\n"


def main(argv: Optional[list[str]] = None) -> Setup:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES),
                   help="default: bf16 on GPU; fp32 bf16 on CPU")
    p.add_argument("--n", nargs="+", type=int, default=None,
                   help="tokens (rows); default 4096 16384 on GPU, 1024 4096 on CPU (the GPU sizes need ~30 GB)")
    p.add_argument("--v", nargs="+", type=int, default=None, help="vocabulary sizes; default 32000 128256 on GPU, 32000 on CPU")
    p.add_argument("--h", type=int, default=None,
                   help="hidden size for the linear (lm-head) methods, 0 skips them; default 4096 on GPU, 256 on CPU")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk for torch-chunked")
    p.add_argument("--linear-chunk-size", type=int, default=1024, help="tokens per chunk for linear_logprob")
    p.add_argument("--out", default=None, help="write results to this .md or .json file")
    args = p.parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    for name, gpu_default, cpu_default in (("dtype", ["bf16"], ["fp32", "bf16"]), ("n", [4096, 16384], [1024, 4096]),
                                           ("v", [32000, 128256], [32000]), ("h", 4096, 256)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if on_gpu else cpu_default)

    device = torch.device(args.device)
    setup = Setup(device, args.repeats, args.warmup, args.chunk_size, args.linear_chunk_size)
    if device.type == "cuda":
        setup.copy_bandwidth = measure_copy_bandwidth(device)

    for dtype_name in args.dtype:
        for v in args.v:
            for n in args.n:
                setup.results += bench_gather(setup, dtype_name, n, v)
                if args.h > 0:
                    setup.results += bench_linear(setup, dtype_name, n, v, args.h)
                print(f"done dtype={dtype_name} N={n} V={v}", file=sys.stderr, flush=True)
    add_ratios(setup.results)

    text = report(setup, argv)
    print(text)
    if args.out:
        if args.out.endswith(".json"):
            payload = {
                "device": device_description(device),
                "argv": argv,
                "copy_bandwidth_bytes_per_s": setup.copy_bandwidth,
                "results": [asdict(r) for r in setup.results],
            }
            with open(args.out, "w") as f:
                json.dump(payload, f, indent=2)
        else:
            with open(args.out, "w") as f:
                f.write(text)
    return setup


if __name__ == "__main__":
    main()
