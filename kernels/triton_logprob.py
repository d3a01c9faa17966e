"""Triton kernels for per-token log-probabilities, their launchers, and an on-device check.

The math (equations (1)-(3): logp = z[y] - logsumexp(z) and its gradient) is in the docstring
of ``mipo.kernels.logprob``, which holds the autograd functions and the public API. The layout
follows Liger-Kernel's cross-entropy kernel: one program per row, an online softmax over
vocabulary blocks accumulated in fp32 whatever the logits dtype, and the backward kernel
written next to the forward. The logits are read through two row strides (B and T) so a
sliced ``logits[:, :-1]`` is read in place.

This module imports triton at top level. ``mipo.kernels.logprob`` imports it inside a
``try: ... except ImportError``, so without triton the pure-PyTorch implementations
(``mipo.kernels.torch_logprob``) still work.

``triton_verified(device, dtype)`` is what ``impl="auto"`` consults before choosing these
kernels: the first time it is asked about a (device, dtype) it runs both kernels on a small
probe and compares them with the PyTorch implementation; on a mismatch or a compile / launch
error it warns once and answers False for that (device, dtype) from then on.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from mipo.kernels.torch_logprob import _torch_backward, _torch_forward

# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr,  # (B, T, V) any float dtype, last dim contiguous
    logits_stride_outer,  # stride of B in elements
    logits_stride_inner,  # stride of T in elements
    rows_inner,  # T
    targets_ptr,  # (N,) int64, N = B * T
    logp_ptr,  # (N,) fp32 out
    lse_ptr,  # (N,) fp32 out, saved for backward
    n_cols,  # V
    ignore_index,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row: logp = z[y] - logsumexp(z), streaming over V.

    The logsumexp is computed online over vocabulary blocks (Milakov & Gimelshein,
    "Online normalizer calculation for softmax", 2018). After the blocks b_1..b_k,

        m_k = max(m_{k-1}, max(z[b_k]))
        d_k = d_{k-1} * exp(m_{k-1} - m_k) + sum(exp(z[b_k] - m_k))

    so that d_k = sum_{v in b_1..b_k} exp(z_v - m_k) and lse = m_K + log(d_K).
    Everything is accumulated in fp32 whatever the logits dtype. Each logit is read
    exactly once (plus one extra scalar read for z[y]).

    Rows with target == ignore_index get logp = 0 (their lse is still written).
    A target outside [0, V) gives logp = NaN instead of an out-of-bounds read.
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can exceed 2**31
    row_outer = row // rows_inner
    row_inner = row % rows_inner
    row_ptr = logits_ptr + row_outer * logits_stride_outer + row_inner * logits_stride_inner

    target = tl.load(targets_ptr + row)

    m = float("-inf")  # running max, fp32
    d = 0.0  # running sum of exp(z - m), fp32
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        z = tl.load(row_ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # If every logit seen so far is -inf then m_new = -inf and exp(-inf - -inf) = NaN;
        # shifting by 0 instead keeps d = 0, which is the correct partial sum.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - m_shift) + tl.sum(tl.exp(z - m_shift), axis=0)
        m = m_new
    lse = m + tl.log(d)

    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_cols)
    safe_target = tl.where(valid, target, 0)
    target_logit = tl.load(row_ptr + safe_target).to(tl.float32)
    logp = tl.where(valid, target_logit - lse, float("nan"))
    logp = tl.where(ignored, 0.0, logp)

    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)

@triton.jit
def _logprob_bwd_kernel(
    grad_logp_ptr,  # (N,) fp32, upstream gradient g
    logits_ptr,  # (B, T, V) any float dtype, last dim contiguous
    logits_stride_outer,
    logits_stride_inner,
    grad_logits_ptr,  # (B, T, V) same dtype as logits; may alias logits_ptr (in place)
    grad_stride_outer,
    grad_stride_inner,
    rows_inner,  # T
    targets_ptr,  # (N,) int64
    lse_ptr,  # (N,) fp32 saved by the forward
    n_cols,  # V
    ignore_index,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row: grad_z = g * (onehot(y) - exp(z - lse)).

    This is d(logp)/dz = onehot(y) - softmax(z) scaled by the upstream gradient, with
    softmax recomputed in fp32 from the saved lse rather than stored. Each logit is
    read once and each gradient element written once (in the logits dtype), so the
    kernel may overwrite the logits in place: block k is fully read before it is
    written and no other block is touched.

    Rows with target == ignore_index get an all-zero gradient.
    """
    row = tl.program_id(0).to(tl.int64)
    row_outer = row // rows_inner
    row_inner = row % rows_inner
    row_ptr = logits_ptr + row_outer * logits_stride_outer + row_inner * logits_stride_inner
    grad_row_ptr = grad_logits_ptr + row_outer * grad_stride_outer + row_inner * grad_stride_inner

    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_logp_ptr + row)
    ignored = target == ignore_index

    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + tl.arange(0, BLOCK_SIZE)
        col_mask = cols < n_cols
        z = tl.load(row_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        softmax = tl.exp(z - lse)  # (BLOCK_SIZE,) fp32
        onehot = tl.where(cols == target, 1.0, 0.0)
        grad = g * (onehot - softmax)
        grad = tl.where(ignored, 0.0, grad)
        tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _triton_block_size(n_cols: int, device: torch.device) -> int:
    """Vocabulary block per loop iteration.

    On GPU 4096 elements with 8 warps keeps 16 elements per thread in flight (not tuned on
    hardware yet). The interpreter pays a fixed Python cost per block, so it gets larger ones.
    """
    cap = 4096 if device.type == "cuda" else 32768
    return min(cap, triton.next_power_of_2(n_cols))


def kernels_are_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_logprob_fwd_kernel).__name__ == "InterpretedFunction"


def _triton_forward(logits3: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """logits3 (B, T, V), targets (B*T,) int64 -> logp (B*T,) fp32, lse (B*T,) fp32."""
    B, T, V = logits3.shape
    N = B * T
    logp = torch.empty(N, dtype=torch.float32, device=logits3.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits3.device)
    if N == 0:
        return logp, lse
    _logprob_fwd_kernel[(N,)](
        logits3,
        logits3.stride(0),
        logits3.stride(1),
        T,
        targets,
        logp,
        lse,
        V,
        ignore_index,
        BLOCK_SIZE=_triton_block_size(V, logits3.device),
        num_warps=8,
    )
    return logp, lse


def _triton_backward(
    grad_logp: torch.Tensor,
    logits3: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    inplace: bool,
) -> torch.Tensor:
    """grad_logp (N,) fp32 -> grad_logits3 (B, T, V) in the logits dtype (aliasing logits3 if inplace)."""
    B, T, V = logits3.shape
    grad3 = logits3 if inplace else torch.empty((B, T, V), dtype=logits3.dtype, device=logits3.device)
    if B * T == 0:
        return grad3
    _logprob_bwd_kernel[(B * T,)](
        grad_logp,
        logits3,
        logits3.stride(0),
        logits3.stride(1),
        grad3,
        grad3.stride(0),
        grad3.stride(1),
        T,
        targets,
        lse,
        V,
        ignore_index,
        BLOCK_SIZE=_triton_block_size(V, logits3.device),
        num_warps=8,
    )
    return grad3


# ---------------------------------------------------------------------------------------
# On-device check: may impl="auto" use these kernels on this (device, dtype)?
# ---------------------------------------------------------------------------------------

# Probe vocabularies: both span two GPU blocks (4096) with a partial second one; 5001 is odd
# and 5120 a multiple of 16, because Triton compiles a separate specialisation for integer
# arguments divisible by 16 (real vocabularies come in both kinds: 50257, 128256).
_PROBE_VOCABS = (5001, 5120)
_PROBE_B, _PROBE_T = 2, 3  # rows, read as the strided slice [:, :T] of a (B, T + 1, V) buffer
_PROBE_IGNORE = -100
# (rtol, atol) for the gradient, per logits dtype: both paths compute it in fp32 and round it
# to the logits dtype, so they may differ by one unit in the last place of that dtype (plus
# fp32-level differences, e.g. from a fast exp on GPU). A real bug is orders of magnitude off.
_PROBE_GRAD_TOL = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (2**-6, 1e-6), torch.float16: (2**-9, 1e-6)}
_PROBE_FWD_TOL = (1e-4, 1e-4)  # logp is fp32 in both paths, computed from the same input values

_verdicts: dict[tuple[str, torch.dtype], bool] = {}  # (device, dtype) -> kernels verified there


def triton_verified(device, dtype: torch.dtype) -> bool:
    """Whether the kernels reproduce the PyTorch implementation on ``device`` for ``dtype`` logits.

    Decided once per (device, dtype) and process by ``_probe_problem``: 6 rows of two small
    vocabularies, forward and backward, so on a GPU the cost is one compile of each kernel
    per vocabulary specialisation (cached on disk by Triton) plus a few tiny launches.
    On a mismatch or an exception it warns once, with the reason, and the answer stays False.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key not in _verdicts:
        problem = _probe_problem(device, dtype)
        if problem is not None:
            warnings.warn(
                f"kernels: the Triton log-prob kernels failed their check on {device} with {dtype} "
                f"logits ({problem}); impl='auto' uses the PyTorch implementation there from now on.",
                RuntimeWarning,
                stacklevel=2,
            )
        _verdicts[key] = problem is None
    return _verdicts[key]


def _probe_problem(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Run the Triton forward and backward on probe inputs; None if they match torch, else why not."""
    try:
        for V in _PROBE_VOCABS:
            logits3, targets, grad_logp = _probe_inputs(V, device, dtype)
            with torch.no_grad(), torch.autocast(device.type, enabled=False):  # whatever the caller's context
                logp, lse = _triton_forward(logits3, targets, _PROBE_IGNORE)
                grad = _triton_backward(grad_logp, logits3, targets, lse, _PROBE_IGNORE, inplace=False)
                ref_logp, ref_lse = _torch_forward(logits3, targets, _PROBE_IGNORE, chunk_size=targets.numel())
                ref_grad = _torch_backward(
                    grad_logp, logits3, targets, ref_lse, _PROBE_IGNORE, chunk_size=targets.numel(), inplace=False
                )
            problem = _mismatch(f"forward (V={V})", logp, ref_logp, *_PROBE_FWD_TOL) or _mismatch(
                f"backward (V={V})", grad, ref_grad, *_PROBE_GRAD_TOL[dtype]
            )
            if problem is not None:
                return problem
    except Exception as e:  # compile errors, out-of-resources, launch failures, ...
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        return f"{type(e).__name__}: {first_line}"
    return None


def _probe_inputs(V: int, device: torch.device, dtype: torch.dtype):
    """Strided (B, T, V) logits, targets with two ignored rows and one in the last column, grad (B*T,).

    Row scales 0.25 to 8: small logits make every column count in the logsumexp (a wrongly
    padded or skipped column shows), large ones need the running max to avoid overflow. One
    row starts with a whole GPU block of -inf (a masked vocabulary: the running max is -inf),
    one has its maximum in the last block (the running sum must be rescaled).
    """
    gen = torch.Generator().manual_seed(V)
    scale = torch.tensor([[0.25, 1.0, 8.0, 1.0], [4.0, 1.0, 0.5, 1.0]])  # (B, T + 1); rows 1, 4 are ignored
    base = torch.randn(_PROBE_B, _PROBE_T + 1, V, generator=gen) * scale.unsqueeze(-1)
    base[1, 0, :4096] = float("-inf")  # flat row 3
    base[0, 2, -1] = base[0, 2].max() + 1  # flat row 2: the maximum is in the last block (rescaling)
    targets = torch.randint(0, V, (_PROBE_B * _PROBE_T,), generator=gen)
    targets[0] = V - 1  # inside the partial last block
    targets[3] = 4096 + targets[3] % (V - 4096)
    targets[1] = targets[4] = _PROBE_IGNORE
    grad_logp = torch.randn(_PROBE_B * _PROBE_T, generator=gen)
    logits3 = base.to(device=device, dtype=dtype)[:, :_PROBE_T]  # row strides (T + 1) * V and V
    return logits3, targets.to(device), grad_logp.to(device)


def _mismatch(what: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> Optional[str]:
    """None if got matches ref elementwise (NaN never matches), else a one-line description."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        return f"{what} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    close = torch.isclose(got, ref, rtol=rtol, atol=atol)
    if bool(close.all()):
        return None
    diff = (got - ref).abs().nan_to_num(nan=float("inf"))
    return (
        f"{what} differs from the PyTorch implementation at {int((~close).sum())} of {close.numel()} "
        f"entries, max abs difference {diff.max().item():.3g}"
    )
