"""``make gpu-check``: one prepared self-test that proves on a GPU what the CPU tests prove, inside a time budget.

    python3 -m bench.gpu_check                  # on the GPU node: writes bench/GPU_RESULTS.md, 8 minutes at most
    python3 -m bench.gpu_check --dry            # CPU, tiny sizes, seconds: the same code paths (the suite runs it)
    python3 -m bench.gpu_check --only 2,3 --budget 300 --out /tmp/r.md

Six checks, most important first. Each runs under what is left of the budget (``--budget``,
480 s by default) and is cut off when it runs out; the results file is rewritten after every
check, so a run cut short still reports the top of the list. Models are randomly initialised
from the real architectures' configs (``bench/gpu_setup.py``: Llama-3.2-1B, Qwen2.5-1.5B); no
weights, tokenizer files or data reach the node.

1. the compiled Triton log-prob kernels' tests (``make test-gpu``, in a pytest subprocess) and
   the on-device probe through which ``kernel=auto`` chooses them (``default_impl``);
2. step-0 exactness in the trainer's numerics (fp32 weights, bf16 autocast): each forward's own ``ReferencePass``
   against the policy's training forward, loss log 2 and rewards 0, for the prompt tree (sdpa
   per segment, flex attention), plain rows, and FSDP2 on one rank (with one backward through it);
3. the prompt-tree forward equal to the plain rows: loss and every gradient, fp32 and bf16;
4. training throughput of the 1B model (``optimizer_step``, the trainer's step): tokens/s, peak
   memory, model FLOP utilisation against the bf16 matrix rate measured in the run;
5. the log-prob kernels against torch and Liger's cross-entropy at V = 128,256 (time, memory,
   bandwidth against the copy bandwidth measured in the run: ``mipo.kernels.bench_logprob``);
6. sampling: mipo's decode loop against batched ``model.generate`` and a one-prompt loop.

``--dry`` runs all six on CPU with tiny configs in seconds (Triton interpreted; flex attention
left out: PyTorch has no flex backward on CPU and compiles its forward to C++ there, 10-20 s) and
writes ``bench/GPU_RESULTS.dry.md``. docs/running.md says what each check claims and its tolerance.
"""

from __future__ import annotations

import os
import sys
import time

STARTED = time.monotonic()  # the budget counts from here: the imports below take seconds on a GPU node too

if __name__ == "__main__":  # before the kernels are imported: Triton reads TRITON_INTERPRET when they are decorated
    os.environ["TRITON_INTERPRET"] = "1" if "--dry" in sys.argv else "0"

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench import gpu_setup  # noqa: E402
from bench.gpu_report import Report, Result, fmt, one_line  # noqa: E402
from bench.gpu_setup import (  # noqa: E402
    LOSS,
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    ROWS,
    SEGMENTS,
    Context,
    Workload,
    micro_batches,
    prepared,
    release,
)
from bench.gpu_speed import check_kernel_bench, check_sampling, check_training_throughput  # noqa: E402
from mipo.kernels.logprob import default_impl, logprob_gather  # noqa: E402
from mipo.model.logprobs import Scorer, ScoringSettings  # noqa: E402
from mipo.stages.reference import ReferencePass  # noqa: E402
from mipo.training import parallel  # noqa: E402
from mipo.training.forward import ReferenceLogps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_OUT, DRY_OUT = ROOT / "bench" / "GPU_RESULTS.md", ROOT / "bench" / "GPU_RESULTS.dry.md"
# tolerances, stated in the results file
STEP0_LOSS, STEP0_REWARD = 0.01, 0.02  # |loss - log 2|; |reward| = beta |log pi - log pi_ref| (0.2 nats)
FSDP_GRAD_NORM = 0.05  # relative difference of FSDP2's gradient norm from one process's
FP32_LOSS, FP32_GRAD = 1e-4, 1e-3  # tree vs rows in fp32: |loss difference|, relative L2 error of the gradient
BF16_LOSS, BF16_GRAD_SLACK = 1e-2, 1e-2  # in bf16: the gradient within 2 x (bf16 rows vs fp32 rows) + slack
MIN_LEFT_S = 5.0  # a check does not start with less of the budget left


class OutOfBudget(BaseException):
    """Raised in the running check when the budget is spent (a BaseException: no ``except Exception`` eats it)."""


# --------------------------------------------------------------------------------------------
# 1. The compiled Triton kernels and the probe that chooses them
# --------------------------------------------------------------------------------------------

GPU_TESTS = "tests/kernels/test_kernels_gpu.py"


def pytest_run(ctx: Context, args: list[str]) -> subprocess.CompletedProcess:
    """``python -m pytest -q`` in a subprocess, the kernels compiled (``make test-gpu``) or, dry, interpreted."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if ctx.dry else "0"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=max(1.0, ctx.left()))


def count(word: str, text: str) -> int:
    found = re.findall(rf"(\d+) {word}", text)
    return int(found[-1]) if found else 0


def interpreted_kernel_error(vocab: int) -> float:
    """Largest difference of the Triton kernels (interpreted, on CPU) from the PyTorch ones: logp and gradient."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=generator) * 3
    targets = torch.randint(0, vocab, (4,), generator=generator)
    targets[1] = -100

    def run(impl: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.clone().requires_grad_()
        out = logprob_gather(x, targets, impl=impl)
        out.backward(torch.linspace(-1, 1, 4))
        return out.detach(), x.grad

    (logp, grad), (want_logp, want_grad) = run("triton"), run("torch")
    return max(float((logp - want_logp).abs().max()), float((grad - want_grad).abs().max()))


def check_kernels(ctx: Context, r: Result) -> None:
    if ctx.dry:  # the GPU tests import and collect; the kernels run interpreted, at a tiny size
        out = pytest_run(ctx, ["--collect-only", "-m", "gpu", GPU_TESTS])
        collected = count("tests? collected", out.stdout)
        r.figures[f"{GPU_TESTS}: tests collected (they run on a GPU)"] = collected
        error = interpreted_kernel_error(ctx.sizes.kernel_vocab)
        r.figures[f"interpreted Triton vs torch, V = {ctx.sizes.kernel_vocab}: max \\|difference\\|"] = fmt(error)
        auto = default_impl(ctx.device, torch.float32)
        r.figures["kernel=auto on CPU"] = auto
        r.passed = out.returncode == 0 and collected > 0 and error < 1e-5 and auto == "torch"
        return
    out = pytest_run(ctx, ["-m", "gpu", GPU_TESTS])
    tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr.strip()[-300:]
    counts = {word: count(word, tail) for word in ("passed", "failed", "skipped", "errors?")}
    r.figures[f"`make test-gpu` ({GPU_TESTS})"] = tail
    if out.returncode != 0:
        r.tables = ["```", *(out.stdout + out.stderr).strip().splitlines()[-60:], "```"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        start = time.perf_counter()
        verdicts = {name: default_impl(ctx.device, dtype) for name, dtype in
                    (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
    r.figures["kernel=auto after the on-device probe (fp32, bf16, fp16)"] = \
        f"{', '.join(verdicts.values())} (probe {time.perf_counter() - start:.1f} s)"
    for warning in caught:
        r.figures.setdefault("probe warnings", "")
        r.figures["probe warnings"] += str(warning.message)[:200] + " "
    r.passed = (out.returncode == 0 and counts["passed"] > 0 and not (counts["failed"] or counts["skipped"]
                or counts["errors?"]) and set(verdicts.values()) == {"triton"} and not caught)


# --------------------------------------------------------------------------------------------
# 2. Step 0: the policy's training forward equals the reference pass
# --------------------------------------------------------------------------------------------

def step0_worst(forward: Any, policy: torch.nn.Module, work: Workload, reference: ReferenceLogps,
                ctx: Context) -> tuple[float, float]:
    """Over the workload's micro-batches: the largest |loss - log 2| and |reward| the trainer's forward logs."""
    worst_loss = worst_reward = 0.0
    for index in micro_batches(len(work.pairs), ctx.sizes.micro_batch):
        batch = forward.collate_rows(work.rows, index, reference, work.pad, "sigmoid").to(ctx.device)
        with torch.no_grad():
            loss, metrics = forward(policy, batch, LOSS)
        worst_loss = max(worst_loss, abs(float(loss) - math.log(2)))
        worst_reward = max(worst_reward, abs(float(metrics["reward_chosen"])), abs(float(metrics["reward_rejected"])))
    return worst_loss, worst_reward


def own_reference(ctx: Context, shape: gpu_setup.Shape, work: Workload, forward: Any, tag: str) -> ReferenceLogps:
    """log pi_ref as the trainer computes it: ``forward`` itself (a ``parallel.wrap``), no gradients, in the
    micro-batches the check then trains (``ReferencePass``, cached under ``tag``)."""
    reference_pass = ReferencePass(forward, shape.model_cfg(), ctx.tokenizer(shape), (MAX_LENGTH, MAX_PROMPT_LENGTH),
                                   micro_batches(len(work.pairs), ctx.sizes.micro_batch), ctx.device,
                                   ctx.workdir / "cache" / tag)
    return reference_pass.logps(work.file, (work.rows.chosen, work.rows.rejected))


def step0_in_layout(ctx: Context, shape: gpu_setup.Shape, policy: torch.nn.Module, layout: str,
                    work: Workload) -> tuple[float, float]:
    forward = parallel.wrap(policy, prepared(policy, layout, True, ctx.autocast), "single", ctx.device)
    reference = own_reference(ctx, shape, work, forward, layout)
    return step0_worst(forward, policy, work, reference, ctx)


def record_step0(r: Result, label: str, worst: tuple[float, float]) -> bool:
    r.figures[f"{label}: max \\|loss − log 2\\|, max \\|reward\\|"] = f"{fmt(worst[0])}, {fmt(worst[1])}"
    return worst[0] <= STEP0_LOSS and worst[1] <= STEP0_REWARD


def grad_norm(forward: Any, policy: torch.nn.Module, work: Workload, reference: ReferenceLogps,
              ctx: Context) -> float:
    """The gradient norm of the first micro-batch's loss (``clip_grad_norm_``'s, as the trainer logs it); the
    gradients are cleared after."""
    batch = forward.collate_rows(work.rows, micro_batches(len(work.pairs), ctx.sizes.micro_batch)[0], reference,
                                 work.pad, "sigmoid").to(ctx.device)
    if hasattr(forward, "sync_gradients"):
        forward.sync_gradients(last=True)
    loss, _ = forward(policy, batch, LOSS)
    loss.backward()
    norm = parallel.grad_norm_value(torch.nn.utils.clip_grad_norm_(policy.parameters(), float("inf")))
    policy.zero_grad(set_to_none=True)
    return norm


def step0_fsdp(ctx: Context, shape: gpu_setup.Shape, work: Workload, r: Result) -> bool:
    """FSDP2 on one rank (bf16 mixed precision, fp32 reduction), on a copy of the policy: its own reference pass
    and step 0, then one backward, whose gradient norm must be one process's (fp32 weights, bf16 autocast)."""
    policy = ctx.policy(shape)
    single = parallel.wrap(policy, prepared(policy, SEGMENTS, True, ctx.autocast), "single", ctx.device)
    one_process = grad_norm(single, policy, work, own_reference(ctx, shape, work, single, SEGMENTS), ctx)
    with gpu_setup.one_rank_group(ctx.device) as backend:
        sharded = copy.deepcopy(policy)
        forward = parallel.wrap(sharded, prepared(sharded, SEGMENTS, True, ctx.autocast), "fsdp", ctx.device,
                                mixed_precision=ctx.autocast)
        reference = own_reference(ctx, shape, work, forward, "fsdp")
        ok = record_step0(r, f"{shape.name}, {SEGMENTS}, FSDP2 on one rank ({backend})",
                          step0_worst(forward, sharded, work, reference, ctx))
        norm = grad_norm(forward, sharded, work, reference, ctx)
        probe = torch.ones(1, device=ctx.device)
        dist.all_reduce(probe)
        del sharded, forward
    difference = abs(norm - one_process) / one_process
    r.figures[f"{shape.name}: gradient norm, FSDP2 vs one process (relative difference); all_reduce over {backend}"] = \
        f"{norm:.5g} vs {one_process:.5g} ({fmt(difference)}); {probe.item():g}"
    logps = torch.cat([reference.chosen, reference.rejected])
    r.figures[f"{shape.name}: max \\|log π_ref − its bf16 rounding\\| (nats): what a cast of the forward's inputs to "
              "bf16 would do to it"] = fmt(float((logps - logps.bfloat16().float()).abs().max()))
    return ok and math.isfinite(norm) and difference <= FSDP_GRAD_NORM and probe.item() == 1.0


def step0_of_shape(ctx: Context, shape: gpu_setup.Shape, r: Result, first: bool) -> bool:
    """Each layout's reference pass (the trainer's: its own forward, ``ReferencePass``) against that forward's
    step 0 (``ctx.layouts``), and under FSDP2 for the ``first`` shape."""
    work = ctx.workload(shape, "exact", ctx.sizes.exact_pairs)
    policy = ctx.policy(shape)
    scoring = ScoringSettings(MAX_LENGTH, MAX_PROMPT_LENGTH, batch_size=2 * ctx.sizes.micro_batch, kernel="auto",
                              fused_lm_head=True)
    fp32 = Scorer(policy, ctx.tokenizer(shape), scoring).score_rows(work.rows.chosen + work.rows.rejected, desc=None)
    ok = True
    for layout in ctx.layouts():
        label = f"{shape.name}, {layout}, one process"
        worst = r.attempt(label, partial(step0_in_layout, ctx, shape, policy, layout, work))
        ok &= worst is not None and record_step0(r, label, worst)
    bf16 = own_reference(ctx, shape, work, parallel.wrap(policy, prepared(policy, SEGMENTS, True, ctx.autocast),
                                                         "single", ctx.device), SEGMENTS)
    scale = float((torch.cat([bf16.chosen, bf16.rejected]) - fp32).abs().max())
    r.figures[f"{shape.name}: max \\|log π_ref in bf16 − in fp32\\| (nats): what a precision mismatch gives"] = \
        fmt(scale)
    if first:
        ok &= bool(r.attempt(f"{shape.name}, FSDP2 on one rank", partial(step0_fsdp, ctx, shape, work, r)))
    return ok


def check_step0(ctx: Context, r: Result) -> None:
    r.note = (f"tolerance: \\|loss − log 2\\| ≤ {STEP0_LOSS}, \\|reward\\| ≤ {STEP0_REWARD}; FSDP2's gradient norm "
              f"within {FSDP_GRAD_NORM:.0%} of one process's")
    passed = True
    for i, shape in enumerate(ctx.sizes.shapes):
        passed &= bool(r.attempt(shape.name, partial(step0_of_shape, ctx, shape, r, first=i == 0)))
        if i > 0:
            ctx.drop(shape)  # the first shape's model stays for the checks below
    r.passed = passed


# --------------------------------------------------------------------------------------------
# 3. The prompt tree equals the plain rows: loss and gradients
# --------------------------------------------------------------------------------------------

def offset_reference(ctx: Context, shape: gpu_setup.Shape, work: Workload) -> ReferenceLogps:
    """The policy's own log-probs moved by a few nats per row, so that the loss sits where its gradient is not flat."""
    scoring = ScoringSettings(MAX_LENGTH, MAX_PROMPT_LENGTH, batch_size=2 * ctx.sizes.micro_batch)
    logps = Scorer(ctx.policy(shape), ctx.tokenizer(shape), scoring).score_rows(work.rows.chosen + work.rows.rejected,
                                                                                 desc=None)
    offsets = 2.0 * torch.randn(len(logps), generator=torch.Generator().manual_seed(0))
    n = len(work.rows.chosen)
    return ReferenceLogps((logps + offsets)[:n], (logps + offsets)[n:], Path("-"), cache_hit=True)


def layout_gradients(ctx: Context, policy: torch.nn.Module, work: Workload, reference: ReferenceLogps,
                     layout: str, autocast: torch.dtype | None) -> tuple[float, dict[str, torch.Tensor]]:
    """The DPO loss of the first micro-batch in ``layout`` and every parameter's gradient (fp32 copies)."""
    forward = prepared(policy, layout, True, autocast)
    policy.zero_grad(set_to_none=True)
    index = micro_batches(len(work.pairs), ctx.sizes.micro_batch)[0]
    loss, _ = forward(policy, forward.collate_rows(work.rows, index, reference, work.pad, "sigmoid").to(ctx.device),
                      LOSS)
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def gradient_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Relative L2 error of the whole gradient, and the parameter whose own relative error is largest (with it)."""
    if got.keys() != want.keys():
        raise AssertionError(f"gradients of different parameters: {sorted(got.keys() ^ want.keys())[:5]}")
    squared = sum(float((got[n] - want[n]).double().pow(2).sum()) for n in want)
    total = sum(float(want[n].double().pow(2).sum()) for n in want)
    worst = max(want, key=lambda n: float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)))
    worst_error = float((got[worst] - want[worst]).norm() / want[worst].norm().clamp_min(1e-30))
    return math.sqrt(squared / total), f"{worst} {fmt(worst_error)}"


def compare_layouts(ctx: Context, r: Result, reference: ReferenceLogps, precision: str,
                    rows: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Every tree layout against the rows in ``precision`` (fp32: no autocast; bf16: the trainer's autocast);
    ``rows`` keeps each precision's rows gradients (bf16's tolerance is measured against fp32's)."""
    shape = ctx.sizes.shapes[0]
    policy, work = ctx.policy(shape), ctx.workload(shape, "exact", ctx.sizes.exact_pairs)
    autocast = None if precision == "fp32" else ctx.autocast
    rows_loss, rows[precision] = layout_gradients(ctx, policy, work, reference, ROWS, autocast)
    loss_tol, grad_tol = FP32_LOSS, FP32_GRAD
    if precision == "bf16":
        floor = gradient_error(rows["bf16"], rows["fp32"])[0]
        r.figures["bf16 rows against fp32 rows: gradient relative L2 error (bf16's own noise)"] = fmt(floor)
        loss_tol, grad_tol = BF16_LOSS, 2 * floor + BF16_GRAD_SLACK
    ok = True
    for layout in (layout for layout in ctx.layouts() if layout != ROWS):
        label = f"{precision}, {layout} vs {ROWS}: loss (rows), \\|Δ loss\\|, gradient error, worst parameter"
        got = r.attempt(label, partial(layout_gradients, ctx, policy, work, reference, layout, autocast))
        if got is None:
            ok = False
            continue
        error, worst = gradient_error(got[1], rows[precision])
        ok &= abs(got[0] - rows_loss) <= loss_tol and error <= grad_tol
        r.figures[label] = f"{got[0]:.6g} ({rows_loss:.6g}), {fmt(abs(got[0] - rows_loss))}, {fmt(error)}, {worst}"
    return ok


def check_tree_equals_rows(ctx: Context, r: Result) -> None:
    shape = ctx.sizes.shapes[0]
    reference = offset_reference(ctx, shape, ctx.workload(shape, "exact", ctx.sizes.exact_pairs))
    r.note = (f"{shape.name}, {ctx.sizes.micro_batch} pairs, DPO; tolerance: fp32 \\|Δ loss\\| ≤ {FP32_LOSS}, "
              f"gradient relative L2 error ≤ {FP32_GRAD}; bf16 \\|Δ loss\\| ≤ {BF16_LOSS}, gradient error ≤ 2 × "
              f"that of bf16 rows against fp32 rows + {BF16_GRAD_SLACK}")
    rows: dict[str, dict[str, torch.Tensor]] = {}
    passed = True
    for precision in ("fp32", "bf16"):
        passed &= bool(r.attempt(f"{precision}: {ROWS}", partial(compare_layouts, ctx, r, reference, precision, rows)))
    r.passed = passed


# --------------------------------------------------------------------------------------------
# The run: each check under what is left of the budget, the results file after each
# --------------------------------------------------------------------------------------------

CHECKS: list[tuple[str, Callable[[Context, Result], None]]] = [
    ("1. Triton kernels compiled (make test-gpu) and the auto probe", check_kernels),
    ("2. Step-0 exactness in bf16: loss log 2, rewards 0", check_step0),
    ("3. Prompt tree equals plain rows: loss and gradients, fp32 and bf16", check_tree_equals_rows),
    ("4. Training throughput, peak memory and MFU", check_training_throughput),
    ("5. Log-prob kernels against torch and Liger", check_kernel_bench),
    ("6. Sampling: mipo's decode loop against model.generate", check_sampling),
]


def run_check(ctx: Context, title: str, check: Callable[[Context, Result], None]) -> Result:
    """Run ``check`` until it returns, fails or the budget runs out (SIGALRM); then rewrite the results file."""
    result = Result(title)
    ctx.report.results.append(result)
    if ctx.left() < MIN_LEFT_S:
        result.note = f"not run: {max(ctx.left(), 0):.0f} s of the budget left"
    else:
        armed = [True]  # disarmed first thing after the check, so that a late alarm cannot fire in the clean-up

        def expire(signum: int, frame: Any) -> None:
            if armed[0]:
                raise OutOfBudget()

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, ctx.left())
        start = time.monotonic()
        try:
            check(ctx, result)
        except OutOfBudget:
            result.passed, result.cut_off = False, True
            result.note = "cut off: the budget ran out (the figures above are those measured before)"
        except Exception as error:  # a failing check is a result; the next check still runs
            traceback.print_exc()
            result.passed = False
            result.note = one_line(error)
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            result.seconds = time.monotonic() - start
            release(ctx.device)
    ctx.report.write()
    print(f"{result.status:>8}  {result.seconds:6.1f} s  {title}" + ("" if result.passed else f"  ({result.note})"),
          flush=True)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes on CPU: the same code paths, in seconds")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all checks (default 480; dry 120)")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (default {GPU_OUT.relative_to(ROOT)}; "
                        f"dry {DRY_OUT.relative_to(ROOT)})")
    parser.add_argument("--only", default=None, help="comma-separated check numbers, e.g. 1,2")
    args = parser.parse_args(argv)
    args.budget = args.budget if args.budget is not None else 120.0 if args.dry else 480.0
    args.out = args.out or (DRY_OUT if args.dry else GPU_OUT)
    args.only = {int(n) for n in args.only.split(",")} if args.only else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check: no CUDA device here; `make gpu-check DRY=1` (--dry) runs the CPU dry run")
    if args.dry:
        torch.set_num_threads(1)  # tiny models gain nothing from threads, and on busy shared cores lose a lot
    device = torch.device("cpu") if args.dry else torch.device("cuda", torch.cuda.current_device())
    command = "python -m bench.gpu_check " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = Report(args.out, command.strip(), device, args.budget, started=STARTED)
    with tempfile.TemporaryDirectory(prefix="mipo-gpu-check-") as workdir:
        ctx = Context(device, gpu_setup.DRY if args.dry else gpu_setup.GPU, STARTED + args.budget, Path(workdir),
                      report)
        for number, (title, check) in enumerate(CHECKS, 1):
            if args.only is None or number in args.only:
                run_check(ctx, title, check)
    report.write()
    passed = sum(bool(r.passed) for r in report.results)
    print(f"{passed} of {len(report.results)} checks passed in {time.monotonic() - report.started:.0f} s; "
          f"wrote {args.out}")
    return 0 if passed == len(report.results) else 1


if __name__ == "__main__":
    sys.exit(main())
