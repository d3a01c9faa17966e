"""Per-token log-probabilities without materialising a (N, V) log-softmax.

DPO (and MIPO) need, for every response token t,

    logp_t = log p(y_t | y_<t, x) = z_t[y_t] - logsumexp_v z_t[v]          (1)

where z_t = logits of shape (V,). The textbook code

    logits.float().log_softmax(-1).gather(-1, targets[..., None])

materialises an fp32 (N, V) copy of the logits, an fp32 (N, V) log-softmax that autograd
keeps alive for the backward, and an fp32 (N, V) gradient: with Llama-3's V = 128,256 and
N = 16,384 tokens each of those is 8 GiB. This module computes (1) and its gradient while
keeping only one fp32 scalar per row (the logsumexp) between forward and backward.

Gradient. With lse = logsumexp(z) and softmax(z)_v = exp(z_v - lse),

    d logp / d z_v = 1[v == y] - softmax(z)_v                              (2)

so for an upstream gradient g (one scalar per row)

    grad_z = g * (onehot(y) - exp(z - lse))                               (3)

which the backward recomputes from the saved lse in one streaming pass over the logits.

Three implementations with the same semantics (rows whose target equals ``ignore_index``
give logp = 0 and a zero gradient; the result is fp32, or fp64 for fp64 inputs with the
torch / naive implementations):

* ``"triton"`` -- one Triton program per row; the forward is a single streaming pass with
  an online logsumexp (fp32), the backward a single streaming pass writing (3) in the
  logits dtype, optionally in place into the logits buffer (``mipo.kernels.triton_logprob``).
* ``"torch"``  -- pure PyTorch, chunked over rows: at most ``chunk_size x V`` fp32
  temporaries are alive at any time, in forward and backward (``mipo.kernels.torch_logprob``).
* ``"naive"``  -- the textbook baseline above, for tests and benchmarks (``mipo.kernels.torch_logprob``).

``linear_logprob`` goes one step further and fuses the lm-head projection: it never holds
the full (N, V) logits at all, only ``chunk_size`` rows of them at a time.

This module holds the autograd functions, the public API, argument checks and the choice of
implementation. ``impl="auto"`` picks Triton only on CUDA, and only for a (device, dtype)
on which the kernels first reproduced the PyTorch implementation on a small probe
(``mipo.kernels.triton_logprob.triton_verified``); elsewhere it picks "torch".
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from mipo.kernels.torch_logprob import (
    _compute_dtype,
    _naive_logprob,
    _torch_backward,
    _torch_forward,
)

try:  # Triton is optional: without it the "torch" and "naive" implementations still work.
    from mipo.kernels import triton_logprob as _tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by test_module_works_without_triton in a subprocess
    _tl = None
    HAS_TRITON = False

__all__ = [
    "logprob_gather",
    "linear_logprob",
    "available_impls",
    "default_impl",
    "HAS_TRITON",
]

IMPLS = ("triton", "torch", "naive")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_TORCH_CHUNK_SIZE = 1024  # rows per chunk for the pure-PyTorch fallback
DEFAULT_LINEAR_CHUNK_SIZE = 1024  # tokens per chunk for linear_logprob


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _kernels_are_interpreted() -> bool:
    return HAS_TRITON and _tl.kernels_are_interpreted()


def _check_triton_usable(x: torch.Tensor) -> None:
    """Raise a ValueError the user can act on if impl='triton' cannot run on ``x``."""
    if not HAS_TRITON:
        raise ValueError("impl='triton' requested but `import triton` failed; use impl='torch'.")
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(
            f"impl='triton' supports logits of dtype float32/bfloat16/float16, got {x.dtype}; "
            "use impl='torch' (which also computes in float64 for float64 inputs)."
        )
    if x.device.type != "cuda":
        if not _interpret_requested():
            raise ValueError(
                f"impl='triton' needs a CUDA tensor, got a tensor on {x.device}. Set "
                "TRITON_INTERPRET=1 in the environment (before importing kernels) to run the "
                "Triton interpreter on CPU, or use impl='torch'."
            )
        if not _kernels_are_interpreted():
            raise ValueError(
                "TRITON_INTERPRET=1 is set but the Triton kernels were compiled for GPU because "
                "kernels was imported before the variable was set. Set TRITON_INTERPRET=1 "
                "before importing kernels, or use impl='torch'."
            )


# ---------------------------------------------------------------------------------------
# Shape handling shared by all implementations
# ---------------------------------------------------------------------------------------


def _as_rows3d(logits: torch.Tensor) -> torch.Tensor:
    """View logits (..., V) as (B, T, V) with a unit last-dim stride, copying only if needed.

    Two row strides (B and T) instead of one let the kernels read a sliced tensor such as
    ``logits[:, :-1, :]`` (the usual next-token shift) in place: such a slice cannot be
    flattened to (N, V) without a copy, but it is a perfectly regular (B, T, V) view.
    """
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    V = logits.shape[-1]
    if logits.dim() == 2:
        return logits.unsqueeze(0)  # (1, N, V)
    B, T = math.prod(logits.shape[:-2]), logits.shape[-2]
    try:
        return logits.view(B, T, V)
    except RuntimeError:  # leading dims not collapsible into one stride
        return logits.contiguous().view(B, T, V)


def _check_logits_targets(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Validate shapes / dtypes; return targets as int64 with the logits' leading shape."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be torch.Tensor")
    if logits.dim() < 2:
        raise ValueError(
            f"expected logits of shape (..., V) with at least 2 dims, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"expected floating-point logits, got dtype {logits.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"expected integer targets (int64), got dtype {targets.dtype}")
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits are on {logits.device}")
    targets = targets.long()
    _check_target_range(targets, logits.shape[-1], ignore_index)
    return targets


def _check_target_range(targets: torch.Tensor, n_cols: int, ignore_index: int) -> None:
    """On CPU, reject out-of-range targets (cheap). On GPU this would force a host sync, so it
    is skipped: the Triton kernel then returns NaN for such rows and torch raises a device assert."""
    if targets.device.type != "cpu" or targets.numel() == 0:
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= n_cols))
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(
            f"target {first} is outside the vocabulary [0, {n_cols}) and is not ignore_index={ignore_index}"
        )


# ---------------------------------------------------------------------------------------
# Row-level forward / backward primitives (used by logprob_gather and linear_logprob)
# ---------------------------------------------------------------------------------------


def _rows_forward(logits3, targets, ignore_index, impl, chunk_size):
    if impl == "triton":
        return _tl._triton_forward(logits3, targets, ignore_index)
    return _torch_forward(logits3, targets, ignore_index, chunk_size)


def _rows_backward(grad_logp, logits3, targets, lse, ignore_index, impl, chunk_size, inplace):
    if impl == "triton":
        grad_logp = grad_logp.to(torch.float32).contiguous()
        return _tl._triton_backward(grad_logp, logits3, targets, lse, ignore_index, inplace)
    return _torch_backward(grad_logp, logits3, targets, lse, ignore_index, chunk_size, inplace)


# ---------------------------------------------------------------------------------------
# autograd.Functions
# ---------------------------------------------------------------------------------------


class _LogProbGather(torch.autograd.Function):
    """logp = gather(log_softmax(logits), targets), saving only lse (N,) for the backward.

    Shared by the "triton" and "torch" implementations (``impl`` picks the primitives).
    The logits themselves are saved by reference (no copy): autograd needs them anyway.
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, impl, chunk_size, inplace_backward):
        lead_shape = logits.shape[:-1]
        logits3 = _as_rows3d(logits)  # (B, T, V), a view unless a copy was unavoidable
        flat_targets = targets.reshape(-1).contiguous()  # (N,); the kernels index it by row
        logp, lse = _rows_forward(logits3, flat_targets, ignore_index, impl, chunk_size)
        ctx.save_for_backward(logits3, flat_targets, lse)
        ctx.ignore_index = ignore_index
        ctx.impl = impl
        ctx.chunk_size = chunk_size
        ctx.inplace_backward = inplace_backward
        ctx.logits_shape = logits.shape
        return logp.view(lead_shape)

    @staticmethod
    def backward(ctx, grad_logp):
        logits3, flat_targets, lse = ctx.saved_tensors
        grad3 = _rows_backward(
            grad_logp.reshape(-1),
            logits3,
            flat_targets,
            lse,
            ctx.ignore_index,
            ctx.impl,
            ctx.chunk_size,
            ctx.inplace_backward,
        )
        # grad3 is (B, T, V) with the same element order as the logits, so this reshape is a view
        return grad3.reshape(ctx.logits_shape), None, None, None, None, None


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def available_impls() -> list[str]:
    """Implementations that can run in this process, fastest first.

    "triton" is listed when triton imports and either a CUDA device is present or the
    Triton interpreter is active (TRITON_INTERPRET=1 set before importing this module).
    """
    impls = []
    if HAS_TRITON and (torch.cuda.is_available() or (_interpret_requested() and _kernels_are_interpreted())):
        impls.append("triton")
    impls += ["torch", "naive"]
    return impls


def _triton_preferred(device: torch.device) -> bool:
    """Whether "auto" considers Triton on ``device`` at all: CUDA, triton imports, kernels compiled."""
    return device.type == "cuda" and HAS_TRITON and not _kernels_are_interpreted()


def default_impl(device, dtype: torch.dtype = torch.float32) -> str:
    """Fastest implementation that runs correctly on ``device`` for ``dtype`` logits.

    "triton" on CUDA when triton is importable, the kernels are compiled (not interpreted),
    ``dtype`` is float32/bfloat16/float16 and the kernels passed their check on this
    (device, dtype) (``triton_verified``: run on first use, then cached; a failure warns once);
    otherwise "torch". The interpreter is for testing only and is never the default.
    """
    device = torch.device(device)
    if _triton_preferred(device) and dtype in TRITON_DTYPES and _tl.triton_verified(device, dtype):
        return "triton"
    return "torch"


def _resolve_impl(impl: str, x: torch.Tensor) -> str:
    if impl not in IMPLS + ("auto",):
        raise ValueError(f"impl must be one of 'auto', 'triton', 'torch', 'naive'; got {impl!r}")
    if impl == "auto":
        impl = default_impl(x.device, x.dtype)
    if impl == "triton":
        _check_triton_usable(x)
    return impl


def logprob_gather(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    impl: str = "auto",
    *,
    chunk_size: Optional[int] = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Per-token log-probabilities ``log_softmax(logits, -1)[..., targets]`` without the (N, V) log-softmax.

    Args:
        logits: (..., V) float32 / bfloat16 / float16 (float64 with impl "torch"/"naive").
            The last dimension must be the vocabulary; any leading shape and row strides are
            accepted (e.g. ``logits[:, :-1]`` is read in place, not copied).
        targets: (...) integer token ids, same leading shape as logits.
        ignore_index: rows whose target equals this give logp = 0 and zero gradient.
        impl: "auto" (triton on CUDA once verified there, else torch; see ``default_impl``),
            "triton", "torch" or "naive".
            "triton" on a CPU tensor requires TRITON_INTERPRET=1 (slow, for tests).
        chunk_size: rows per chunk for impl="torch" (peak extra memory ~ a few
            chunk_size x V fp32 buffers); ignored by the other implementations.
        inplace_backward: let the backward overwrite ``logits`` with its gradient (saves one
            (N, V) buffer). Only safe when nothing else reads ``logits`` after this call's
            backward (e.g. logits produced by an lm-head and used only here). Not for "naive".

    Returns:
        (...) float32 log-probabilities (float64 for float64 inputs with torch/naive).
    """
    targets = _check_logits_targets(logits, targets, ignore_index)
    impl = _resolve_impl(impl, logits)
    if impl == "naive":
        return _naive_logprob(logits, targets, ignore_index)
    if chunk_size is None:
        chunk_size = DEFAULT_TORCH_CHUNK_SIZE
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}")
    return _LogProbGather.apply(logits, targets, ignore_index, impl, chunk_size, inplace_backward)


class _LinearLogProb(torch.autograd.Function):
    """logp = gather(log_softmax(hidden @ W^T + b), targets), chunked over tokens.

    Forward, for each chunk of c tokens:  z_c = h_c W^T + b  (c, V) -> logp_c, lse_c; only
    lse (N,) is kept. Backward recomputes z_c, forms grad_z_c = g_c * (onehot - softmax(z_c))
    with the same row primitives (in place in the recomputed chunk), then

        grad_h_c  = grad_z_c @ W            (c, H)
        grad_W   += grad_z_c^T @ h_c        (V, H)
        grad_b   += sum_rows(grad_z_c)      (V,)

    so at most one (c, V) logits chunk (plus the row primitive's temporaries) is alive.
    grad_W / grad_b are accumulated in fp32 (for low-precision weights this costs a (V, H)
    fp32 buffer plus one (V, H) temporary per chunk) unless ``grad_weight_fp32=False``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk_size, impl, grad_weight_fp32):
        with torch.autocast(hidden.device.type, enabled=False):  # see linear_logprob: inputs are pre-cast
            return _LinearLogProb._forward(ctx, hidden, weight, bias, targets, ignore_index, chunk_size, impl, grad_weight_fp32)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, ignore_index, chunk_size, impl, grad_weight_fp32):
        N = hidden.shape[0]
        cdtype = _compute_dtype(hidden.dtype)
        logp = torch.empty(N, dtype=cdtype, device=hidden.device)
        lse = torch.empty(N, dtype=cdtype, device=hidden.device)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            logits_c = F.linear(hidden[s:e], weight, bias)  # (c, V) in the hidden dtype
            logp[s:e], lse[s:e] = _rows_forward(logits_c.unsqueeze(0), targets[s:e], ignore_index, impl, chunk_size)
            del logits_c
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.ignore_index = ignore_index
        ctx.chunk_size = chunk_size
        ctx.impl = impl
        ctx.grad_weight_fp32 = grad_weight_fp32
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        with torch.autocast(hidden.device.type, enabled=False):
            return _LinearLogProb._backward(ctx, grad_logp, hidden, weight, bias, targets, lse)

    @staticmethod
    def _backward(ctx, grad_logp, hidden, weight, bias, targets, lse):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, chunk_size = hidden.shape[0], ctx.chunk_size
        grad_logp = grad_logp.reshape(-1)
        acc_dtype = torch.float32 if ctx.grad_weight_fp32 and weight.dtype != torch.float64 else weight.dtype

        grad_hidden = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None  # (V, H)
        grad_bias = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None  # (V,)

        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            h_c = hidden[s:e]  # (c, H)
            with torch.no_grad():
                logits_c = F.linear(h_c, weight, bias).unsqueeze(0)  # (1, c, V), recomputed
            grad_z = _rows_backward(
                grad_logp[s:e], logits_c, targets[s:e], lse[s:e], ctx.ignore_index, ctx.impl, chunk_size, inplace=True
            )[0]  # (c, V), overwrote logits_c
            if need_h:
                torch.mm(grad_z, weight, out=grad_hidden[s:e])
            if need_w:
                if grad_weight.dtype == grad_z.dtype:
                    grad_weight.addmm_(grad_z.t(), h_c)
                else:
                    grad_weight.add_(torch.mm(grad_z.t(), h_c))
            if need_b:
                grad_bias.add_(grad_z.sum(0, dtype=acc_dtype))
            del logits_c, grad_z

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_LINEAR_CHUNK_SIZE,
    impl: str = "auto",
    bias: Optional[torch.Tensor] = None,
    *,
    grad_weight_fp32: bool = True,
) -> torch.Tensor:
    """Per-token log-probs of an lm-head, ``log_softmax(hidden @ weight.T + bias)[targets]``,
    never holding more than ``chunk_size`` rows of the (N, V) logits, in forward or backward.

    Args:
        hidden: (..., H) final hidden states (N = prod of leading dims tokens).
        weight: (V, H) lm-head weight, same dtype and device as hidden.
        targets: (...) integer token ids, same leading shape as hidden.
        ignore_index: rows whose target equals this give logp = 0 and zero gradient.
        chunk_size: tokens per chunk; peak extra memory ~ chunk_size x V x (logits dtype
            + fp32 temporaries for impl="torch").
        impl: "auto", "triton", "torch" (row primitive applied to each chunk), or "naive"
            (unchunked ``F.linear`` + naive log-softmax; a baseline for tests/benchmarks).
        bias: optional (V,) lm-head bias.
        grad_weight_fp32: accumulate grad_weight / grad_bias over chunks in fp32 (default)
            rather than in the weight dtype.

    Returns:
        (...) float32 log-probabilities (float64 for float64 inputs).
    """
    if hidden.dim() < 2:
        raise ValueError(f"expected hidden of shape (..., H), got shape {tuple(hidden.shape)}")
    if torch.is_autocast_enabled(hidden.device.type):
        # Do what autocast does for F.linear (cast inputs to the autocast dtype) once, up front;
        # the chunked forward and the recomputing backward then run with autocast off, so both
        # see identical logits. autograd takes the gradients back through the casts.
        amp_dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(amp_dtype), weight.to(amp_dtype)
        bias = bias.to(amp_dtype) if bias is not None else None
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"expected weight of shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) "
            "must have the same dtype and device"
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(
            f"expected bias of shape ({weight.shape[0]},) and dtype {weight.dtype}, "
            f"got {tuple(bias.shape)} {bias.dtype}"
        )
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"expected integer targets (int64), got dtype {targets.dtype}")
    lead_shape = hidden.shape[:-1]
    flat_targets = targets.reshape(-1).long().contiguous()  # (N,)
    _check_target_range(flat_targets, weight.shape[0], ignore_index)

    impl = _resolve_impl(impl, hidden)
    if impl == "naive":
        return _naive_logprob(F.linear(hidden, weight, bias), targets.long(), ignore_index)
    hidden2 = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    logp = _LinearLogProb.apply(hidden2, weight, bias, flat_targets, ignore_index, chunk_size, impl, grad_weight_fp32)
    return logp.view(lead_shape)
