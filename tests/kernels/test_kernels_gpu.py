"""The Triton kernels compiled for a CUDA GPU (not interpreted), against a float64 reference.

Every test here is marked ``gpu`` and is skipped without a CUDA device. It is also skipped
when the kernels are interpreted: tests/conftest.py sets TRITON_INTERPRET=1 unless the
variable is already set, so the default suite runs the kernels in the interpreter. Run these
with the variable set to 0, which keeps the kernels compiled:

    make test-gpu          # TRITON_INTERPRET=0 python -m pytest -q -m gpu

(``-m gpu`` deselects the CPU tests of tests/kernels/test_kernels.py, which need the interpreter.)
The reference and the tolerances are those of tests/kernels/test_kernels.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mipo.kernels import logprob as lp
from mipo.kernels.logprob import default_impl, linear_logprob, logprob_gather
from tests.kernels.test_kernels import (
    FWD_TOL,
    GRAD_TOL,
    IGNORE,
    LINEAR_TOL,
    linear_reference,
    make_inputs,
    make_linear_inputs,
    reference,
    rel_err,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not lp.HAS_TRITON, reason="triton does not import"),
    pytest.mark.skipif(
        lp._kernels_are_interpreted(),
        reason="the Triton kernels are interpreted (TRITON_INTERPRET=1); run `make test-gpu`",
    ),
]

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]


def run_cuda(impl, logits, targets, grad_out, **kwargs):
    """Forward + backward on CUDA copies of CPU inputs; results back on CPU."""
    x = logits.cuda().requires_grad_()
    out = logprob_gather(x, targets.cuda(), impl=impl, **kwargs)
    out.backward(grad_out.cuda())
    return out.detach().cpu(), x.grad.cpu()


def assert_matches_reference(out, grad, ref_out, ref_grad, dtype):
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert rel_err(out, ref_out) < FWD_TOL
    assert rel_err(grad, ref_grad) < GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=GRAD_TOL[dtype] * 4, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("N,V", [(64, 32001), (16, 128256), (33, 37), (8, 3 * 4096)])
def test_compiled_triton_matches_float64_reference(dtype, N, V):
    """V = 3 * 4096 is an exact number of GPU blocks; the others end in a partial block."""
    logits, targets, grad_out = make_inputs((N,), V, dtype, seed=N + V)
    out, grad = run_cuda("triton", logits, targets, grad_out)
    ref_out, ref_grad = reference(logits, targets, grad_out)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_matches_reference(out, grad, ref_out, ref_grad, dtype)
    ignored = targets == IGNORE
    assert (out[ignored] == 0).all() and (grad[ignored] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compiled_triton_strided_inplace_and_masked(dtype):
    B, T, V = 3, 9, 50257
    base, targets, grad_out = make_inputs((B, T + 1), V, dtype, seed=31)
    base[0, :, : 2 * 4096] = float("-inf")  # the first two GPU blocks of some rows fully masked
    targets[0] = torch.where(targets[0] == IGNORE, IGNORE, 2 * 4096 + targets[0] % 1000)
    ref_out, ref_grad = reference(base[:, :-1], targets[:, 1:], grad_out[:, 1:])

    logits, targets, grad_out = base.cuda(), targets[:, 1:].cuda(), grad_out[:, 1:].cuda()
    x = logits.clone().requires_grad_()
    out = logprob_gather(x[:, :-1], targets, impl="triton")  # next-token shift, read in place
    out.backward(grad_out)
    assert_matches_reference(out.detach().cpu(), x.grad[:, :-1].cpu(), ref_out, ref_grad, dtype)
    assert (x.grad[:, -1] == 0).all()

    leaf = logits.clone().requires_grad_()
    produced = leaf * 1  # non-leaf, used only here: its buffer may be overwritten
    out_inplace = logprob_gather(produced[:, :-1], targets, impl="triton", inplace_backward=True)
    out_inplace.backward(grad_out)
    assert torch.equal(out_inplace.detach(), out.detach())
    assert torch.equal(leaf.grad, x.grad)
    assert torch.equal(produced.detach()[:, :-1], x.grad[:, :-1])  # the gradient was written in place


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_compiled_linear_logprob_matches_reference(dtype):
    N, H, V = 40, 64, 32001
    hidden, weight, targets, bias = make_linear_inputs(N, H, V, dtype, seed=32, with_bias=True)
    grad_out = torch.randn(N, generator=torch.Generator().manual_seed(33))
    h, w, b = (t.cuda().requires_grad_() for t in (hidden, weight, bias))
    out = linear_logprob(h, w, targets.cuda(), chunk_size=16, impl="triton", bias=b)
    out.backward(grad_out.cuda())
    refs = linear_reference(hidden, weight, targets, bias, grad_out)
    for got, ref in zip((out.detach(), h.grad, w.grad, b.grad), refs):
        assert torch.isfinite(got).all()
        assert rel_err(got.cpu(), ref) < LINEAR_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_auto_picks_verified_triton_on_cuda(dtype):
    """The on-device check passes on this GPU, silently, and auto then runs the Triton kernels."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert default_impl("cuda", dtype) == "triton"
    logits, targets, grad_out = make_inputs((24,), 5003, dtype, seed=34)
    auto, triton_ = run_cuda("auto", logits, targets, grad_out), run_cuda("triton", logits, targets, grad_out)
    assert torch.equal(auto[0], triton_[0]) and torch.equal(auto[1], triton_[1])
