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


# --------------------------------------------------------------------------------------------
# The baselines and variants: hand-computed values on small tensors (float64, math only)
# --------------------------------------------------------------------------------------------

from mipo.losses import (
    LOSS_FAMILIES,
    dpo_plackett_luce_loss,
    infonce_loss,
    loss_config_problems,
    sami_loss,
    sft_loss,
    simpo_loss,
)


def _ce(logits: list[float], target: int, eps: float = 0.0) -> float:
    """Cross-entropy with F.cross_entropy's label smoothing, written out."""
    log_z = math.log(sum(math.exp(v) for v in logits))
    nll = [log_z - v for v in logits]
    return (1 - eps) * nll[target] + eps * sum(nll) / len(logits)


def test_sft_loss_sum_and_mean_by_hand():
    logps = torch.tensor([-12.0, -3.5], dtype=torch.float64)
    lengths = torch.tensor([4, 7])
    assert sft_loss(logps, lengths, "sum").tolist() == [12.0, 3.5]
    torch.testing.assert_close(sft_loss(logps, lengths, "mean"), torch.tensor([3.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="sft_reduction"):
        sft_loss(logps, lengths, "max")


@pytest.mark.parametrize("length_normalize", [True, False])
def test_simpo_loss_by_hand(length_normalize):
    pc = torch.tensor([-10.0, -40.0], dtype=torch.float64)
    pr = torch.tensor([-30.0, -12.0], dtype=torch.float64)
    lc, lr = torch.tensor([5, 20]), torch.tensor([10, 3])
    beta, gamma = 2.0, 0.5
    losses, rc, rr = simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma, length_normalize=length_normalize)
    # row 0 normalised: 2*(-2) - 2*(-3) - 0.5 = 1.5; row 1: 2*(-2) - 2*(-4) - 0.5 = 3.5
    margins = [1.5, 3.5] if length_normalize else [2 * 20 - 0.5, 2 * -28 - 0.5]
    for i, z in enumerate(margins):
        assert float(losses[i]) == pytest.approx(-_log_sigmoid(z), rel=1e-12)
    assert float(rc[0] - rr[0]) == pytest.approx(margins[0] + gamma)


def test_sami_loss_by_hand():
    # one pair: G = [[log pi(y+|x), log pi(y-|x)], [log pi(y+|x'), log pi(y-|x')]] = [[-10, -14], [-13, -9]]
    a, b, c, d = -10.0, -14.0, -13.0, -9.0
    rows = (_ce([a, b], 0) + _ce([c, d], 1)) / 2  # each context picks its response
    cols = (_ce([a, c], 0) + _ce([b, d], 1)) / 2  # each response picks its context
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = sami_loss(t(a), t(b), t(c), t(d))
    assert float(got[0]) == pytest.approx((rows + cols) / 2, rel=1e-12)
    smoothed = sami_loss(t(a), t(b), t(c), t(d), label_smoothing=0.1)
    want = ((_ce([a, b], 0, 0.1) + _ce([c, d], 1, 0.1)) / 2 + (_ce([a, c], 0, 0.1) + _ce([b, d], 1, 0.1)) / 2) / 2
    assert float(smoothed[0]) == pytest.approx(want, rel=1e-12)


def test_sami_loss_is_per_pair_and_matches_the_released_batch_mean():
    """The released code's SAMILoss averages over the batch; the mean of ours is its value."""
    pp, pn, xp, xn = _logps(5)[0], _logps(6)[0], _logps(7)[0], _logps(8)[0]
    losses = sami_loss(pp, pn, xp, xn)
    assert losses.shape == (B,)
    grid = torch.stack([torch.stack([pp, pn], 1), torch.stack([xp, xn], 1)], 1)  # (B, 2, 2)
    labels = torch.arange(2).repeat(B)
    row = torch.nn.functional.cross_entropy(grid.reshape(-1, 2), labels)
    col = torch.nn.functional.cross_entropy(grid.transpose(1, 2).reshape(-1, 2), labels)
    torch.testing.assert_close(losses.mean(), (row + col) / 2)


@pytest.mark.parametrize("temperature", [1.0, 100.0])
def test_infonce_loss_by_hand(temperature):
    a, b, c, d = -100.0, -140.0, -130.0, -90.0  # log pi(y+|x), log pi(y-|x), log pi(y+|x'), log pi(y-|x')
    want = (_ce([a / temperature, c / temperature], 0) + _ce([d / temperature, b / temperature], 0)) / 2
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = infonce_loss(t(a), t(b), t(c), t(d), temperature=temperature)
    assert float(got[0]) == pytest.approx(want, rel=1e-12)
    # the released code subtracts a logsumexp of all four before the softmax: a shift that changes nothing
    shift = math.log(sum(math.exp(v) for v in (a, b, c, d)))
    shifted = (_ce([(a - shift) / temperature, (c - shift) / temperature], 0)
               + _ce([(d - shift) / temperature, (b - shift) / temperature], 0)) / 2
    assert float(got[0]) == pytest.approx(shifted, rel=1e-9)


def test_plackett_luce_by_hand_and_equal_to_dpo_for_one_negative():
    pc = torch.tensor([-10.0], dtype=torch.float64)
    rc = torch.tensor([-12.0], dtype=torch.float64)
    pr = torch.tensor([[-20.0, -15.0, -30.0]], dtype=torch.float64)
    rr = torch.tensor([[-19.0, -15.0, -25.0]], dtype=torch.float64)
    beta = 0.5
    r0 = beta * 2.0
    rk = [beta * -1.0, 0.0, beta * -5.0]
    want = math.log(math.exp(r0) + sum(math.exp(r) for r in rk)) - r0
    losses, chosen_rewards, rejected_rewards = dpo_plackett_luce_loss(pc, pr, rc, rr, beta=beta)
    assert float(losses[0]) == pytest.approx(want, rel=1e-12)
    assert rejected_rewards.shape == (1, 3) and float(chosen_rewards[0]) == pytest.approx(r0)
    a, b, c, d = _logps(9)
    pl, _, _ = dpo_plackett_luce_loss(a, b[:, None], c, d[:, None], beta=0.1)
    dpo, _, _ = dpo_loss(a, b, c, d, beta=0.1)
    torch.testing.assert_close(pl, dpo)


def test_loss_families_and_config_problems():
    assert LOSS_FAMILIES["sigmoid"].needs_reference and not LOSS_FAMILIES["sami"].needs_reference
    assert LOSS_FAMILIES["sami"].needs_negative_prompt and LOSS_FAMILIES["infonce"].needs_negative_prompt
    assert not LOSS_FAMILIES["sft"].uses_rejected and not LOSS_FAMILIES["simpo"].needs_reference
    assert loss_config_problems({"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0,
                                 "multi_negative": "mean"}) == []
    assert "multi_negative" in loss_config_problems({"loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0,
                                                     "multi_negative": "max"})[0]
    assert "plackett_luce" in loss_config_problems({"loss_type": "ipo", "beta": 0.1, "label_smoothing": 0.0,
                                                    "multi_negative": "plackett_luce"})[0]
    assert "loss.temperature" in loss_config_problems({"loss_type": "infonce", "temperature": 0})[0]
    assert "loss.gamma" in loss_config_problems({"loss_type": "simpo", "beta": 2.0, "gamma": -1,
                                                 "length_normalize": True})[0]
    assert "unknown loss_type" in loss_config_problems({"loss_type": "kto"})[0]


def test_an_impossible_rejected_response_gives_a_finite_loss_and_gradients_without_smoothing():
    # log pi(y-|x) = -inf: the margin is +inf, so -log sigmoid is 0; the cDPO term is left out at eps = 0
    # (it was -log sigmoid(-inf) * 0 = inf * 0 = nan)
    pc = torch.tensor([-10.0, -10.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-math.inf, -20.0], dtype=torch.float64, requires_grad=True)
    rc, rr = torch.tensor([-12.0, -12.0], dtype=torch.float64), torch.tensor([-18.0, -18.0], dtype=torch.float64)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert float(losses[0].detach()) == 0.0
    assert float(losses[1].detach()) == pytest.approx(-_log_sigmoid(0.1 * ((-10 + 12) - (-20 + 18))), rel=1e-12)
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert float(pr.grad[0]) == 0.0 and float(pr.grad[1]) > 0
    smoothed, _, _ = dpo_loss(pc.detach(), pr.detach(), rc, rr, beta=0.1, label_smoothing=0.1)
    assert math.isinf(float(smoothed[0])) and smoothed[0] > 0  # eps * -log sigmoid(-inf): cDPO's own value


def _objective_inputs(policy, reference, lengths):
    from mipo.training.objectives import ObjectiveInputs

    return ObjectiveInputs(torch.tensor(policy, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64),
                           torch.tensor(lengths))


IPO = {"loss_type": "ipo", "beta": 0.1, "label_smoothing": 0.0, "multi_negative": "mean"}


@pytest.mark.parametrize("length_normalize", [False, True, None])
def test_ipo_on_summed_or_per_token_log_ratios_by_hand(length_normalize):
    from mipo.training.objectives import objective

    # two pairs: log pi(y+|x), log pi(y-|x) | the reference's | |y+|, |y-|
    inputs = _objective_inputs([[-10.0, -30.0], [-4.0, -9.0]], [[-12.0, -27.0], [-5.0, -6.0]], [[5, 10], [2, 3]])
    cfg = IPO if length_normalize is None else {**IPO, "length_normalize": length_normalize}
    result = objective("ipo")(inputs, cfg)
    if length_normalize:  # per token (TRL): h / beta = (-10/5 + 12/5) - (-30/10 + 27/10) = 0.4 + 0.3
        margins, chosen_ratios = [0.4 + 0.3, (-4 / 2 + 5 / 2) - (-9 / 3 + 6 / 3)], [0.4, 0.5]
    else:  # summed (the IPO paper, Eq. 17): (-10 + 12) - (-30 + 27) = 5
        margins, chosen_ratios = [2 + 3, 1 + 3], [2.0, 1.0]
    expected = [(m - 1 / (2 * 0.1)) ** 2 for m in margins]  # (h / beta - 1 / (2 beta))^2, 1 / (2 beta) = 5
    assert result.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert result.losses.tolist() == pytest.approx([18.49, 12.25] if length_normalize else [0.0, 1.0], rel=1e-12)
    assert result.chosen_rewards.tolist() == pytest.approx([0.1 * r for r in chosen_ratios], rel=1e-12)
    assert result.policy_chosen_logps.tolist() == [-10.0, -4.0]  # the metrics keep the sums


def test_ipo_per_token_with_k_negatives_is_the_mean_of_the_pairwise_losses():
    from mipo.training.objectives import objective

    inputs = _objective_inputs([[-10.0, -30.0, -8.0]], [[-12.0, -27.0, -9.0]], [[5, 10, 4]])
    result = objective("ipo")(inputs, {**IPO, "length_normalize": True})
    # per-token log-ratios: y+ 0.4, y-_1 -0.3, y-_2 0.25; margins 0.7 and 0.15
    assert float(result.losses[0]) == pytest.approx(((0.7 - 5) ** 2 + (0.15 - 5) ** 2) / 2, rel=1e-12)


def test_length_normalize_is_refused_where_the_loss_ignores_it():
    from mipo.losses import loss_config_problems

    assert loss_config_problems({**IPO, "length_normalize": True}) == []
    assert "expected true or false" in loss_config_problems({**IPO, "length_normalize": "yes"})[0]
    for loss in ({**IPO, "loss_type": "sigmoid", "length_normalize": False},
                 {**IPO, "loss_type": "hinge", "length_normalize": True},
                 {"loss_type": "sft", "sft_reduction": "mean", "length_normalize": True},
                 {"loss_type": "sami", "label_smoothing": 0.0, "length_normalize": True}):
        (problem,) = loss_config_problems(loss)
        assert f"loss.loss_type={loss['loss_type']} ignores it" in problem
    assert loss_config_problems({"loss_type": "simpo", "beta": 2.0, "gamma": 1.0, "length_normalize": False}) == []
