"""Triton kernels for per-token log-probabilities (forward and backward) and their launchers.

The math (equations (1)-(3): logp = z[y] - logsumexp(z) and its gradient) is in the docstring
of ``kernels.logprob``, which holds the autograd functions and the public API. The layout
follows Liger-Kernel's cross-entropy kernel: one program per row, an online softmax over
vocabulary blocks accumulated in fp32 whatever the logits dtype, and the backward kernel
written next to the forward. The logits are read through two row strides (B and T) so a
sliced ``logits[:, :-1]`` is read in place.

This module imports triton at top level. ``kernels.logprob`` imports it inside a
``try: ... except ImportError``, so without triton the pure-PyTorch implementations
(``kernels.torch_logprob``) still work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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

