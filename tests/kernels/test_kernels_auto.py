"""impl="auto" uses the Triton kernels only where they passed their on-device check.

On CPU the kernels run in the Triton interpreter (tests/conftest.py), and "auto" never
considers them for CPU tensors; these tests let it (``auto_considers_cpu``) so that
``triton_logprob.triton_verified`` and the fallback to "torch" can be exercised here, with the
Triton forward / backward patched to return wrong numbers or to raise. On a GPU the same check
runs for real (tests/kernels/test_kernels_gpu.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mipo.kernels import logprob as lp
from mipo.kernels import triton_logprob as tk
from mipo.kernels.logprob import default_impl, linear_logprob
from tests.kernels.test_kernels import make_inputs, make_linear_inputs, run


@pytest.fixture
def auto_considers_cpu(monkeypatch):
    """Let impl="auto" consider the (interpreted) Triton kernels for CPU tensors, as it does for
    CUDA tensors with compiled kernels, and start from an empty verdict cache."""
    monkeypatch.setattr(lp, "_triton_preferred", lambda device: True)
    monkeypatch.setattr(tk, "_verdicts", {})


def test_auto_on_cpu_never_probes(monkeypatch):
    monkeypatch.setattr(tk, "_verdicts", {})
    logits, targets, grad_out = make_inputs((10,), 101, torch.float32, seed=24)
    run("auto", logits, targets, grad_out)
    assert default_impl("cpu", torch.bfloat16) == "torch"
    assert tk._verdicts == {}


def test_triton_verified_on_working_kernels(auto_considers_cpu):
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passing probe warns about nothing
        for dtype in dtypes:
            assert tk.triton_verified(torch.device("cpu"), dtype)
            assert default_impl("cpu", dtype) == "triton"
        assert default_impl("cpu", torch.float64) == "torch"  # not a Triton dtype: no probe
    assert tk._verdicts == {("cpu", dtype): True for dtype in dtypes}
    # auto now runs the (verified) Triton kernels on CPU tensors: same numbers as impl="triton"
    logits, targets, grad_out = make_inputs((10,), 101, torch.float32, seed=25)
    auto, triton_ = run("auto", logits, targets, grad_out), run("triton", logits, targets, grad_out)
    assert torch.equal(auto[0], triton_[0]) and torch.equal(auto[1], triton_[1])


def kernel_warnings(caught) -> list:
    return [w for w in caught if str(w.message).startswith("kernels: the Triton log-prob kernels")]


@pytest.mark.parametrize(
    "broken,reason",
    [
        ("forward_wrong", "forward (V=5001) differs from the PyTorch implementation"),
        ("backward_wrong", "backward (V=5001) differs from the PyTorch implementation"),
        ("forward_raises", "RuntimeError: PTX assembly aborted (simulated)"),
    ],
)
def test_auto_falls_back_to_torch_with_one_warning(broken, reason, auto_considers_cpu, monkeypatch):
    calls = []
    real_forward, real_backward = tk._triton_forward, tk._triton_backward

    def forward(*args, **kwargs):
        calls.append("forward")
        if broken == "forward_raises":
            raise RuntimeError("PTX assembly aborted (simulated)\nmore detail")
        logp, lse = real_forward(*args, **kwargs)
        return (logp + 0.25 if broken == "forward_wrong" else logp), lse

    def backward(*args, **kwargs):
        calls.append("backward")
        grad = real_backward(*args, **kwargs)
        return grad * 1.5 if broken == "backward_wrong" else grad

    monkeypatch.setattr(tk, "_triton_forward", forward)
    monkeypatch.setattr(tk, "_triton_backward", backward)
    logits, targets, grad_out = make_inputs((10,), 101, torch.float32, seed=26)
    hidden, weight, lin_targets, _ = make_linear_inputs(12, 8, 97, torch.float32, seed=27)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = run("auto", logits, targets, grad_out)
        probe_calls = len(calls)
        second = run("auto", logits, targets, grad_out)
        lin_auto = linear_logprob(hidden, weight, lin_targets, chunk_size=5)
        assert default_impl("cpu") == "torch"

    assert probe_calls > 0 and len(calls) == probe_calls  # probed once; then never used
    expected = run("torch", logits, targets, grad_out)
    for got in (first, second):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(lin_auto, linear_logprob(hidden, weight, lin_targets, chunk_size=5, impl="torch"))
    caught = kernel_warnings(caught)
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "cpu" in message and "torch.float32" in message and reason in message
    assert "more detail" not in message  # one line
    assert tk._verdicts == {("cpu", torch.float32): False}


def test_verdict_is_cached_per_device_and_dtype(auto_considers_cpu, monkeypatch):
    real_forward = tk._triton_forward

    def forward(logits3, *args, **kwargs):
        if logits3.dtype == torch.bfloat16:
            raise RuntimeError("no bf16 on this device (simulated)")
        return real_forward(logits3, *args, **kwargs)

    monkeypatch.setattr(tk, "_triton_forward", forward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert default_impl("cpu", torch.bfloat16) == "torch"
            assert default_impl(torch.device("cpu"), torch.float32) == "triton"
    caught = kernel_warnings(caught)
    assert len(caught) == 1 and "torch.bfloat16" in str(caught[0].message)
    assert tk._verdicts == {("cpu", torch.bfloat16): False, ("cpu", torch.float32): True}
