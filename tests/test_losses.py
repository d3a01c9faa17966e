"""Tests of the DPO family of losses (mipo/losses.py).

Expected values are computed independently in float64 with ``math`` from the formulas of
Rafailov et al. (2023, Eq. 7), cDPO (Mitchell, 2023), IPO (Azar et al., 2023) and SLiC hinge.
"""

from __future__ import annotations

import math

import pytest
import torch

from mipo.losses import dpo_loss

B = 7


def _logps(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # four (B,) tensors of negative "sequence log-probs" with varied magnitudes
    return [-(torch.rand(B, generator=g, dtype=torch.float64) * 40 + 1).to(dtype) for _ in range(4)]


def _h(pc, pr, rc, rr, i):
    """The log-ratio difference (pc - rc) - (pr - rr) of row i, as a Python float."""
    return (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))


def _log_sigmoid(z: float) -> float:
    # numerically stable: log sigma(z) = -log(1 + e^-z)
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_sigmoid_matches_hand_computation(beta):
    pc, pr, rc, rr = _logps(1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=beta)
    for i in range(B):
        h = _h(pc, pr, rc, rr, i)
        assert float(losses[i]) == pytest.approx(-_log_sigmoid(beta * h), rel=1e-12, abs=1e-12)
        assert float(chosen_rewards[i]) == pytest.approx(beta * (float(pc[i]) - float(rc[i])), rel=1e-12)
        assert float(rejected_rewards[i]) == pytest.approx(beta * (float(pr[i]) - float(rr[i])), rel=1e-12)


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    pc, pr, _, _ = _logps(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((B,), math.log(2.0), dtype=torch.float64))
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)


def test_increasing_chosen_logp_lowers_the_loss():
    pc, pr, rc, rr = _logps(3)
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    losses.sum().backward()
    assert torch.all(pc.grad < 0), "raising log pi(y+|x) must lower the DPO loss"
    assert torch.all(pr.grad > 0), "raising log pi(y-|x) must raise the DPO loss"
    # and a finite step in that direction indeed lowers every row's loss
    with torch.no_grad():
        stepped, _, _ = dpo_loss(pc + 1.0, pr, rc, rr, beta=0.1)
    assert torch.all(stepped < losses.detach())


def test_label_smoothing_zero_is_plain_sigmoid():
    pc, pr, rc, rr = _logps(4)
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=0.0, loss_type="sigmoid")
    torch.testing.assert_close(plain, smoothed, rtol=0, atol=0)


@pytest.mark.parametrize("eps", [0.1, 0.25, 0.49])
def test_label_smoothing_is_conservative_dpo(eps):
    pc, pr, rc, rr = _logps(5)
    beta = 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    for i in range(B):
        h = beta * _h(pc, pr, rc, rr, i)
        expected = -(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h)
        assert float(losses[i]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo(beta):
    pc, pr, rc, rr = _logps(6)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    for i in range(B):
        expected = (_h(pc, pr, rc, rr, i) - 1 / (2 * beta)) ** 2
        assert float(losses[i]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_hinge(beta):
    pc, pr, rc, rr = _logps(7)
    # make some rows clear the margin (loss 0) and some not
    pc = pc.clone()
    pc[:3] += 200.0
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    for i in range(B):
        expected = max(0.0, 1 - beta * _h(pc, pr, rc, rr, i))
        assert float(losses[i]) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(losses[0]) == 0.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_shapes_and_detached_rewards(loss_type):
    pc, pr, rc, rr = (t.float().requires_grad_(True) for t in _logps(8))
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type)
    assert len(out) == 3
    losses, chosen_rewards, rejected_rewards = out
    for t in out:
        assert t.shape == (B,)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and chosen_rewards.grad_fn is None
    assert not rejected_rewards.requires_grad and rejected_rewards.grad_fn is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(beta=0.1, loss_type="kto"), "loss_type"),
        (dict(beta=0.1, loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (dict(beta=0.1, loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(beta=0.1, label_smoothing=0.5), "label_smoothing"),
        (dict(beta=0.1, label_smoothing=-0.1), "label_smoothing"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    pc, pr, rc, rr = _logps(9)
    with pytest.raises(ValueError, match=match):
        dpo_loss(pc, pr, rc, rr, **kwargs)
