"""The paper's identity, measured (mipo.metrics.identity): hand-computed values, a policy that learned
the identity exactly, and the candidates gathered from the MI estimator's scores.

MIPO (arXiv 2603.19294, Sec. 3): DPO's optimal implicit reward on MIPO pairs is the pointwise MI up to
a per-prompt constant, r*(x, y) = pmi(x; y) + c(x): slope 1 and rank correlation 1 within a prompt.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pytest
import torch
from scipy import stats

from mipo.metrics.identity import (
    candidate_pmi,
    demean_within_prompts,
    demeaned_slope,
    heldout_pair_accuracy,
    identity_candidates,
    identity_metrics,
    implicit_reward,
    rows_log_marginal,
    score_candidates,
    within_prompt_spearman,
)
from mipo.mi import Marginal, estimate_pmi, pointwise_mi

# -- the equations on hand-computed values ----------------------------------------------------------------
# Two prompts of three candidates each. Prompt 0: pmi ranks 1, 2, 3 and r ranks 1, 3, 2, so
# rho = 1 - 6 (0 + 1 + 1) / (3 (9 - 1)) = 0.5; prompt 1: r falls as pmi rises, rho = -1.
GROUPS = [0, 0, 0, 1, 1, 1]
PMI = [1.0, 2.0, 3.0, 0.0, 1.0, 2.0]
REWARD = [0.1, 0.3, 0.2, 3.0, 2.0, 1.0]
ANSWERS = [False, True, False, False, True, False]  # the response to x: the 2nd candidate of each prompt


def test_spearman_within_prompt_by_hand():
    result = within_prompt_spearman(REWARD, PMI, GROUPS)
    assert result["spearman_within_prompt"] == pytest.approx((0.5 - 1.0) / 2)
    # std (ddof=1) of {0.5, -1} is 1.5 / sqrt(2); over sqrt(2) prompts: 0.75
    assert result["spearman_within_prompt_stderr"] == pytest.approx(0.75)
    assert (result["spearman_prompts"], result["spearman_undefined"], result["spearman_too_few"]) == (2, 0, 0)


def test_slope_after_removing_prompt_means_by_hand():
    # demeaned pmi: [-1, 0, 1] in both prompts; demeaned r: [-0.1, 0.1, 0] and [1, 0, -1]
    # b = (0.1 + 0 - 1 - 1) / 4 = -0.475
    result = demeaned_slope(REWARD, PMI, GROUPS)
    assert result["slope_demeaned"] == pytest.approx(-0.475)
    # residuals [-0.575, 0.1, 0.475] and [0.525, 0, -0.525]: per-prompt scores sum p~ e = 1.05 and -1.05;
    # V = 2/(2-1) * (1.05^2 + 1.05^2) / 4^2 = 0.275625, SE = 0.525
    assert result["slope_demeaned_stderr"] == pytest.approx(0.525)
    assert result["slope_prompts"] == 2
    assert demean_within_prompts(REWARD, GROUPS) == pytest.approx([-0.1, 0.1, 0.0, 1.0, 0.0, -1.0])


def test_heldout_pair_accuracy_by_hand():
    # prompt 0: 0.3 beats 0.1 and 0.2 (2 of 2); prompt 1: 2.0 beats 1.0, loses to 3.0 (1 of 2): 3 / 4
    result = heldout_pair_accuracy(REWARD, ANSWERS, GROUPS)
    assert result["heldout_pair_accuracy"] == pytest.approx(0.75)
    # wins [2, 1] of [2, 2]: sqrt(2/1 * ((2 - 1.5)^2 + (1 - 1.5)^2)) / 4 = 0.25
    assert result["heldout_pair_accuracy_stderr"] == pytest.approx(0.25)
    assert (result["pair_comparisons"], result["pair_ties"], result["pair_prompts"]) == (4, 0, 2)


def test_ties_count_half_and_undefined_correlations_are_counted():
    reward = [0.0] * 6  # a policy equal to its reference: r = 0 everywhere
    assert heldout_pair_accuracy(reward, ANSWERS, GROUPS)["heldout_pair_accuracy"] == 0.5
    assert heldout_pair_accuracy(reward, ANSWERS, GROUPS)["pair_ties"] == 4
    spearman = within_prompt_spearman(reward, PMI, GROUPS)
    assert spearman["spearman_within_prompt"] is None and spearman["spearman_undefined"] == 2
    assert demeaned_slope(reward, PMI, GROUPS)["slope_demeaned"] == 0.0
    # a prompt with two candidates is not correlated, and counted
    small = within_prompt_spearman([1.0, 2.0, *REWARD[:3]], [1.0, 3.0, *PMI[:3]], [7, 7, 0, 0, 0])
    assert (small["spearman_prompts"], small["spearman_too_few"]) == (1, 1)
    assert small["spearman_within_prompt_stderr"] is None  # one prompt: no standard error


def test_implicit_reward_and_candidate_pmi():
    assert implicit_reward([-3.0, -5.0], [-4.0, -4.0], beta=0.1) == pytest.approx([0.1, -0.1])
    assert candidate_pmi([-3.0, -5.0], [-4.0, -6.0]) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("include_positive", [False, True])
def test_rows_log_marginal_is_the_marginal_pointwise_mi_uses(include_positive):
    logp_x = torch.tensor([-3.0, -10.0, -7.5], dtype=torch.float64)
    logp_others = torch.tensor([[-4.0, -6.0], [-9.0, -12.0], [-7.0, -8.0]], dtype=torch.float64)
    marginal = rows_log_marginal(logp_x.tolist(), logp_others.tolist(), include_positive)
    pmi = pointwise_mi(logp_x, logp_others, include_positive=include_positive).numpy()
    assert logp_x.numpy() - marginal == pytest.approx(pmi, abs=1e-12)
    if not include_positive:
        assert marginal == pytest.approx([math.log((math.exp(-4) + math.exp(-6)) / 2),
                                          math.log((math.exp(-9) + math.exp(-12)) / 2),
                                          math.log((math.exp(-7) + math.exp(-8)) / 2)])


# -- the whole path with scorers that return known log-probs ---------------------------------------------

N = 5  # prompts, each answered by one response; K = N - 1: every row draws every other prompt
PROMPTS = [[{"role": "user", "content": f"question {i}"}] for i in range(N)]
RESPONSES = [f"answer {j}" for j in range(N)]
REFERENCE = np.random.default_rng(0).normal(-20.0, 4.0, size=(N, N))  # [i, j] = log pi_ref(y_j | x_i)
np.fill_diagonal(REFERENCE, REFERENCE.diagonal() + 6.0)  # each response is likelier under its own prompt


class TableScorer:
    """log pi(y_j | x_i) from a known (N, N) table: a stand-in for ``mipo.model.logprobs.Scorer``."""

    def __init__(self, table: np.ndarray) -> None:
        self.table, self.calls = table, []

    def score(self, prompts: Sequence, responses: Sequence[str], desc: str | None = None,
              finished: Sequence[bool] | None = None) -> torch.Tensor:
        self.calls.append(finished)
        rows = [int(p[0]["content"].split()[-1]) for p in prompts]
        columns = [int(r.split()[-1]) for r in responses]
        return torch.tensor([self.table[i, j] for i, j in zip(rows, columns)], dtype=torch.float32)


def _pmi_table() -> np.ndarray:
    """[i, j] = pmi(x_i; y_j) with row j's marginal: the mean of pi_ref(y_j | x_k) over the K = N-1 other prompts."""
    reference = REFERENCE.astype(np.float32).astype(np.float64)  # as the float32 scorer returns it
    marginal = [np.log(np.mean(np.exp([reference[k, j] for k in range(N) if k != j]))) for j in range(N)]
    return reference - np.asarray(marginal)[None, :]


def _measure(policy_table: np.ndarray, beta: float) -> dict:
    reference = TableScorer(REFERENCE)
    estimate = estimate_pmi(reference, PROMPTS, RESPONSES, Marginal(k=N - 1, seed=3), desc=None,
                            finished=[True] * N)
    candidates = identity_candidates(PROMPTS, estimate)
    policy = TableScorer(policy_table)
    logp_policy = score_candidates(policy, candidates, RESPONSES, finished=[True, False, True, True, True])
    assert policy.calls[0] == [j != 1 for j in candidates.rows]  # each row's flag, as the estimator scored it
    return identity_metrics({**candidates.record(), "logp_policy": logp_policy}, beta)


def test_candidates_reuse_the_estimators_scores():
    estimate = estimate_pmi(TableScorer(REFERENCE), PROMPTS, RESPONSES, Marginal(k=N - 1, seed=3), desc=None)
    candidates = identity_candidates(PROMPTS, estimate)
    assert len(candidates.rows) == N * N and sorted(set(candidates.groups)) == list(range(N))
    pmi = _pmi_table()
    for group, row, answers, logp, log_marginal in zip(candidates.groups, candidates.rows, candidates.answers,
                                                      candidates.logp_reference, candidates.log_marginal):
        assert answers == (group == row)  # a held-out prompt is named by its row
        assert logp == pytest.approx(REFERENCE[group, row], abs=1e-4)
        assert logp - log_marginal == pytest.approx(pmi[group, row], abs=1e-6)
    # the pmi of each row's own pair is the estimator's value
    own = [lg - lm for lg, lm, a in zip(candidates.logp_reference, candidates.log_marginal, candidates.answers) if a]
    assert own == pytest.approx(estimate.values, abs=1e-9)


def test_known_policy_gives_hand_computed_measures():
    beta = 0.1
    policy_table = REFERENCE + np.random.default_rng(1).normal(0.0, 5.0, size=(N, N))  # [i, j] = log pi_theta(y_j|x_i)
    result = _measure(policy_table, beta)
    reward = beta * (policy_table.astype(np.float32).astype(np.float64) - REFERENCE.astype(np.float32))  # (N, N)
    pmi = _pmi_table()
    rhos = [stats.spearmanr(reward[i], pmi[i]).statistic for i in range(N)]
    assert result["spearman_within_prompt"] == pytest.approx(np.mean(rhos))
    assert result["spearman_within_prompt_stderr"] == pytest.approx(np.std(rhos, ddof=1) / math.sqrt(N))
    # the within estimator equals OLS with one dummy per prompt (numpy's least squares)
    design = np.concatenate([pmi.reshape(-1, 1), np.kron(np.eye(N), np.ones((N, 1)))], axis=1)  # (N*N, 1+N)
    coefficients = np.linalg.lstsq(design, reward.reshape(-1), rcond=None)[0]
    assert result["slope_demeaned"] == pytest.approx(coefficients[0], rel=1e-6)
    wins = sum(float(reward[i, i] > reward[i, j]) for i in range(N) for j in range(N) if j != i)
    assert result["heldout_pair_accuracy"] == pytest.approx(wins / (N * (N - 1)))
    assert (result["candidates"], result["prompts"], result["pair_comparisons"]) == (N * N, N, N * (N - 1))
    assert result["per_candidate"]["reward"] == pytest.approx(
        [reward[g, j] for g, j in zip(result["per_candidate"]["prompt"], result["per_candidate"]["response"])])


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
def test_a_policy_that_learned_pmi_plus_a_prompt_constant_has_slope_and_correlation_one(beta):
    # r(x_i, y_j) = pmi(x_i; y_j) + c(x_i): log pi_theta = log pi_ref + (pmi + c) / beta
    constants = np.array([3.0, -1.0, 0.5, 7.0, -4.0])[:, None]  # (N, 1) c(x_i)
    policy_table = REFERENCE + (_pmi_table() + constants) / beta
    result = _measure(policy_table.astype(np.float64), beta)
    assert result["slope_demeaned"] == pytest.approx(1.0, abs=1e-4)
    assert result["spearman_within_prompt"] == pytest.approx(1.0)
    assert result["spearman_undefined"] == 0 and result["spearman_prompts"] == N
    pmi = _pmi_table()  # the pair accuracy is pmi's own: how often pmi(x; y_x) > pmi(x; y_other)
    expected = sum(float(pmi[i, i] > pmi[i, j]) for i in range(N) for j in range(N) if j != i) / (N * (N - 1))
    assert result["heldout_pair_accuracy"] == pytest.approx(expected)


def test_policy_equal_to_reference_gives_zero_reward():
    result = _measure(REFERENCE, beta=0.1)
    assert result["slope_demeaned"] == 0.0 and result["heldout_pair_accuracy"] == 0.5
    assert result["spearman_within_prompt"] is None and result["spearman_undefined"] == N


def test_conditional_candidates_group_by_the_context_swapped_prompts():
    # two users, one query each; each row's alternative is its own query under the other user's context
    prompts = [[{"role": "user", "content": "c0 q0"}], [{"role": "user", "content": "c1 q1"}]]
    alternatives = [[[{"role": "user", "content": "c1 q0"}]], [[{"role": "user", "content": "c0 q1"}]]]

    class Constant:
        def score(self, prompts, responses, desc=None, finished=None):
            return torch.full((len(prompts),), -5.0)

    estimate = estimate_pmi(Constant(), prompts, ["a", "b"], Marginal(k=1), alternatives=alternatives, desc=None)
    candidates = identity_candidates(prompts, estimate, alternatives)
    assert candidates.groups == [0, 2, 1, 3] and candidates.rows == [0, 0, 1, 1]  # held-out prompts by their row
    assert candidates.answers == [True, False, True, False]
    assert candidates.prompts[1] == alternatives[0][0]
