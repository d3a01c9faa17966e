"""Pure-PyTorch per-token log-probabilities: the row-chunked implementation and the naive baseline.

The math (equations (1)-(3)) is in the docstring of ``mipo.kernels.logprob``, which holds the
autograd functions and the public API; this module holds the row-level primitives behind
``impl="torch"`` and the textbook ``impl="naive"`` baseline. Both run on any device and
dtype (fp64 inputs are computed in fp64, so ``gradcheck`` can run on them).

``_torch_forward`` / ``_torch_backward`` mirror the Triton kernels of
``mipo.kernels.triton_logprob`` (same arguments, same saved ``lse``), processing ``chunk_size`` rows
at a time so that at most a (chunk_size, V) fp32 temporary is alive, whatever N.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16, fp64 for fp64 (so gradcheck can run on the torch paths)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_chunks(logits3: torch.Tensor, chunk_size: int):
    """Yield (flat_start, flat_end, b, t0, t1) covering the B*T rows, at most chunk_size rows each."""
    B, T, _ = logits3.shape
    for b in range(B):
        for t0 in range(0, T, chunk_size):
            t1 = min(t0 + chunk_size, T)
            yield b * T + t0, b * T + t1, b, t0, t1


def _torch_forward(logits3: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_size: int):
    """Pure-PyTorch forward: logp, lse (N,) in the compute dtype, chunk_size rows at a time.

    Per chunk ``lse = torch.logsumexp(z)`` in the compute dtype and ``logp = z[y] - lse``: equation (1) as
    written. Not ``log_softmax(z)[y]``: torch's CPU log_softmax is off in one direction on logits shaped
    like a language model's (a few large values far above a wide bulk), by +5e-6 nats per token at
    V = 49,152, so a 300-token response's sum drifts by 1.5e-3; logsumexp's error is ~1e-8 and not
    one-signed (tests/kernels/test_kernels.py, ``test_no_drift_on_peaked_logits``). The chunked
    forward + backward takes the same time as with log_softmax (kernels/BENCH_RESULTS.md). A row whose z[y] = -inf gets logp = -inf, as (1) says.
    Peak extra memory: one (chunk_size, V) compute-dtype temporary inside logsumexp (plus the
    upcast copy of a bf16/fp16 chunk), independent of N.
    """
    B, T, V = logits3.shape
    cdtype = _compute_dtype(logits3.dtype)
    logp = torch.empty(B * T, dtype=cdtype, device=logits3.device)
    lse = torch.empty(B * T, dtype=cdtype, device=logits3.device)
    for s, e, b, t0, t1 in _row_chunks(logits3, chunk_size):
        z = logits3[b, t0:t1].to(cdtype)  # (c, V): a view when the logits are in the compute dtype
        tgt = targets[s:e]  # (c,)
        ignored = tgt == ignore_index
        safe_tgt = torch.where(ignored, 0, tgt)
        lse[s:e] = torch.logsumexp(z, dim=-1)  # (c,)
        target_logits = z.gather(-1, safe_tgt.unsqueeze(-1)).squeeze(-1)  # (c,)
        logp[s:e] = torch.where(ignored, 0.0, target_logits - lse[s:e])
        del z
    return logp, lse


def _torch_backward(
    grad_logp: torch.Tensor,
    logits3: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    inplace: bool,
) -> torch.Tensor:
    """Pure-PyTorch backward: grad_logits3 = g * (onehot(y) - exp(z - lse)), chunk by chunk.

    Ignored rows use g = 0 and lse = +inf, so exp(z - lse) = 0 and their gradient is exactly
    zero without an extra masking pass. When the logits are already in the compute dtype the
    chunk is computed directly in the output buffer; otherwise in one reused (chunk_size, V)
    compute-dtype buffer that is then cast into the output.
    """
    cdtype = _compute_dtype(logits3.dtype)
    grad3 = logits3 if inplace else torch.empty(logits3.shape, dtype=logits3.dtype, device=logits3.device)
    work = None  # (chunk_size, V) compute-dtype buffer, allocated once and reused by every chunk
    if grad3.dtype != cdtype and grad3.numel() > 0:
        B, T, V = logits3.shape
        work = torch.empty((min(chunk_size, T), V), dtype=cdtype, device=logits3.device)
    for s, e, b, t0, t1 in _row_chunks(logits3, chunk_size):
        tgt = targets[s:e]
        ignored = tgt == ignore_index
        safe_tgt = torch.where(ignored, 0, tgt).unsqueeze(-1)  # (c, 1)
        g = torch.where(ignored, 0.0, grad_logp[s:e].to(cdtype)).unsqueeze(-1)  # (c, 1)
        row_lse = torch.where(ignored, float("inf"), lse[s:e].to(cdtype)).unsqueeze(-1)  # (c, 1)
        out = grad3[b, t0:t1]  # (c, V) view of the output
        if work is None:
            buf = torch.sub(logits3[b, t0:t1], row_lse, out=out)  # z - lse (elementwise: out may alias z)
        else:  # upcast into the work buffer (a mixed-dtype sub would allocate another temporary)
            buf = work[: t1 - t0].copy_(logits3[b, t0:t1]).sub_(row_lse)
        buf.exp_().mul_(-g)  # -g * softmax
        buf.scatter_add_(-1, safe_tgt, g)  # + g * onehot(y)
        if buf is not out:
            out.copy_(buf)  # cast to the logits dtype
    return grad3


def _naive_logprob(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The textbook baseline: (..., V) fp32 logits, their logsumexp, a gather: equation (1). Autograd keeps
    the (..., V) fp32 copy alive. (Not ``log_softmax(-1).gather``: see ``_torch_forward`` on its CPU bias.)"""
    ignored = targets == ignore_index
    safe_targets = torch.where(ignored, 0, targets)
    z = logits.to(_compute_dtype(logits.dtype))  # (..., V)
    logp = z.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)  # (...)
    return logp.masked_fill(ignored, 0.0)
