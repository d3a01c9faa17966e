"""The paper's identity, measured: does the implicit reward learn the pointwise MI?

MIPO (Nam, Li & Jaques, arXiv 2603.19294, Sec. 3) trains DPO on pairs (x, y+ ~ pi_ref(.|x),
y- ~ pi_ref(.|x')) with x' another prompt, so y- is a sample of the marginal pi_ref(y). DPO's
logistic loss is then a classifier of "which response came from x", and its population optimum
is the log density ratio of the two samples: the implicit reward

    r(x, y) = beta * log pi_theta(y|x) / pi_ref(y|x)                      (DPO, Rafailov et al. 2023, Eq. 5)

tends to the pointwise mutual information under the base model, up to a per-prompt constant,

    r*(x, y) = log pi_ref(y|x) - log pi_ref(y) + c(x) = pmi(x; y) + c(x)      (MIPO, Sec. 3)

for any beta. Within one prompt, r against pmi then has slope 1 and rank correlation 1, and r
ranks the response to x above responses to other prompts whenever pmi does.

This module measures it on held-out prompts, from scores the evaluation already has:

* ``identity_candidates``: for each held-out prompt x_i, the candidates y_i (the base model's response
  to x_i) and every y_j whose MI row drew x_i as an alternative (``MIEstimate.other_indices``), with
  log pi_ref(y_j|x_i) and row j's marginal log pi_ref(y_j) taken from ``mipo.mi.estimate_pmi``'s
  scores: nothing is scored again under the reference (``prompt_names`` names each prompt by its held-out row);
* ``score_candidates``: log pi_theta of the same (x, y) rows under the trained policy (the only new scores);
* the equations, each one function over arrays: ``implicit_reward``, ``candidate_pmi`` (with
  ``rows_log_marginal``), ``demean_within_prompts``, ``within_prompt_spearman``, ``demeaned_slope``,
  ``heldout_pair_accuracy``; ``identity_metrics`` puts them together for ``eval.json``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats

from mipo.data.chat import Messages, prompt_key
from mipo.mi import MIEstimate, RowScorer, pointwise_mi

MIN_SPEARMAN_CANDIDATES = 3  # a rank correlation of 2 points is always +-1: prompts need at least 3 candidates
# What the identity predicts at DPO's optimum on MIPO pairs (and chance for the pair accuracy).
THEORY = {"slope_demeaned": 1.0, "spearman_within_prompt": 1.0, "heldout_pair_accuracy_chance": 0.5}


# --------------------------------------------------------------------------------------------
# The candidates and their scores
# --------------------------------------------------------------------------------------------

@dataclass
class IdentityCandidates:
    """The (x, y) rows the identity is measured on: M candidates, grouped by the prompt x they are scored under.

    ``prompts[m]`` is the prompt x and ``rows[m]`` the held-out row j whose response y_j it is;
    ``groups[m]`` names the prompt: the first held-out row i with x_i = x, or N, N+1, ... for a prompt
    that is no held-out row's (a context-swapped alternative); ``answers[m]`` says y_j is
    the response to x (row j's own prompt); ``logp_reference[m]`` = log pi_ref(y_j|x) and
    ``log_marginal[m]`` = log pi_ref(y_j), both from the MI estimator.
    """

    prompts: list[Messages]  # (M,)
    groups: list[int]  # (M,)
    rows: list[int]  # (M,)
    answers: list[bool]  # (M,)
    logp_reference: list[float]  # (M,)
    log_marginal: list[float]  # (M,)

    def record(self) -> dict[str, list]:
        """The candidates without their prompts (the evaluation cache keeps this, plus ``logp_policy``)."""
        return {"groups": self.groups, "rows": self.rows, "answers": self.answers,
                "logp_reference": self.logp_reference, "log_marginal": self.log_marginal}


def rows_log_marginal(logp_y_given_x: Sequence[float], logp_y_given_others: Sequence[Sequence[float]],
                      include_positive: bool = False) -> np.ndarray:
    """log pi_ref(y_j) of each MI row: the Monte Carlo marginal ``mipo.mi.pointwise_mi`` uses for row j.

    pmi_K(x_j; y_j) = log pi_ref(y_j|x_j) - log pi_ref(y_j) (MIPO, Sec. 3), so the marginal is
    log pi_ref(y_j|x_j) - pmi_K(x_j; y_j), with ``pointwise_mi``'s estimator (plain or InfoNCE).

    Args:
        logp_y_given_x: (N,) log pi_ref(y_j|x_j).
        logp_y_given_others: (N, K) log pi_ref(y_j|x'_{j,k}).

    Returns:
        (N,) float64.
    """
    logp_x = torch.as_tensor(logp_y_given_x, dtype=torch.float64)  # (N,)
    logp_others = torch.as_tensor(logp_y_given_others, dtype=torch.float64)  # (N, K)
    pmi = pointwise_mi(logp_x, logp_others, include_positive=include_positive)  # (N,)
    return (logp_x - pmi).numpy()


def identity_candidates(prompts: Sequence[Messages], estimate: MIEstimate,
                        alternatives: Sequence[Sequence[Messages]] | None = None) -> IdentityCandidates:
    """Every (x, y) pair the MI estimator scored, regrouped by the prompt x: y_j under its own x_j and
    under each alternative that row j drew.

    For the plain pmi(x; y) (``alternatives=None``) ``estimate.other_indices[j][k]`` is a held-out row
    whose prompt row j drew, so prompt x_i gets y_i and every y_j with i in ``other_indices[j]``. With
    ``alternatives`` (the conditional pmi(c; y | q)) the alternative prompts are ``alternatives[j][k]``:
    the same query under another context, so most of them hold one candidate.

    The order is the estimator's (row j's own prompt, then its K alternatives), so a scorer with the
    same settings forms the same batches, and a policy equal to the reference gives r = 0 exactly.
    """
    log_marginal = rows_log_marginal(estimate.logp_y_given_x, estimate.logp_y_given_others,
                                     estimate.include_positive)  # (N,)
    candidates = IdentityCandidates([], [], [], [], [], [])
    for j, (own, others) in enumerate(zip(prompts, estimate.other_indices)):
        scored = [own] + [prompts[o] if alternatives is None else alternatives[j][o] for o in others]  # (K+1,)
        logps = [estimate.logp_y_given_x[j], *estimate.logp_y_given_others[j]]  # (K+1,)
        for column, (messages, logp) in enumerate(zip(scored, logps)):
            candidates.prompts.append(messages)
            candidates.rows.append(j)
            candidates.answers.append(column == 0)  # an alternative is never the row's own prompt
            candidates.logp_reference.append(float(logp))
            candidates.log_marginal.append(float(log_marginal[j]))
    candidates.groups = prompt_names(prompts, candidates.prompts)
    return candidates


def prompt_names(held_out: Sequence[Messages], scored: Sequence[Messages]) -> list[int]:
    """(M,) a name for the prompt of each scored row: the first held-out row i with x_i equal to it, or
    N, N+1, ... (in order of appearance) for a prompt that is no held-out row's."""
    names: dict[str, int] = {}
    for i, messages in enumerate(held_out):
        names.setdefault(prompt_key(messages), i)
    out, next_name = [], len(held_out)
    for messages in scored:
        key = prompt_key(messages)
        if key not in names:
            names[key], next_name = next_name, next_name + 1
        out.append(names[key])
    return out


def score_candidates(policy: RowScorer, candidates: IdentityCandidates, responses: Sequence[str],
                     finished: Sequence[bool], desc: str | None = "identity") -> list[float]:
    """(M,) log pi_theta(y|x) of every candidate under the trained ``policy`` (a ``mipo.model.logprobs.Scorer``).

    ``finished[j]`` is row j's flag, as the MI estimator scored y_j: a response cut at max_new_tokens
    is scored without an end-of-turn token under every prompt.
    """
    texts = [responses[j] for j in candidates.rows]  # (M,)
    flags = [bool(finished[j]) for j in candidates.rows]  # (M,)
    return torch.as_tensor(policy.score(candidates.prompts, texts, desc=desc, finished=flags)).tolist()


# --------------------------------------------------------------------------------------------
# The equations
# --------------------------------------------------------------------------------------------

def implicit_reward(logp_policy: Sequence[float], logp_reference: Sequence[float], beta: float) -> np.ndarray:
    """DPO's implicit reward r(x, y) = beta * (log pi_theta(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023,
    Eq. 5, without its beta log Z(x), a per-prompt constant), the quantity MIPO's identity is about.

    Args:
        logp_policy, logp_reference: (M,) log pi_theta(y|x), log pi_ref(y|x).
        beta: ``loss.beta`` of the trained policy.

    Returns:
        (M,) float64.
    """
    return beta * (np.asarray(logp_policy, dtype=np.float64) - np.asarray(logp_reference, dtype=np.float64))


def candidate_pmi(logp_reference: Sequence[float], log_marginal: Sequence[float]) -> np.ndarray:
    """pmi(x; y) = log pi_ref(y|x) - log pi_ref(y) (MIPO, Sec. 3) of each candidate, with y's marginal
    from its own MI row (``rows_log_marginal``); (M,) float64."""
    return np.asarray(logp_reference, dtype=np.float64) - np.asarray(log_marginal, dtype=np.float64)


def demean_within_prompts(values: Sequence[float], groups: Sequence[int]) -> np.ndarray:
    """values - (mean of the values of the same prompt): removes the per-prompt constant c(x) of
    r*(x, y) = pmi(x; y) + c(x) (MIPO, Sec. 3), the within transformation of a fixed-effects fit; (M,)."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    _, index = np.unique(groups, return_inverse=True)  # (M,) group of each candidate, 0..G-1
    means = np.bincount(index, weights=values) / np.bincount(index)  # (G,)
    return values - means[index]


def within_prompt_spearman(reward: Sequence[float], pmi: Sequence[float], groups: Sequence[int],
                           min_candidates: int = MIN_SPEARMAN_CANDIDATES) -> dict[str, Any]:
    """Mean over prompts of Spearman's rank correlation of r with pmi among a prompt's candidates
    (``scipy.stats.spearmanr``); 1 at the identity r = pmi + c(x) (MIPO, Sec. 3).

    Only prompts with at least ``min_candidates`` candidates are correlated; a correlation that is
    undefined (r or pmi constant within the prompt, e.g. r = 0 before training) is skipped and counted.

    Returns:
        ``spearman_within_prompt`` (mean, None when no prompt has one), its ``_stderr`` (std ddof=1
        / sqrt(n) over prompts, None for n < 2), ``spearman_prompts`` (n), ``spearman_undefined``,
        ``spearman_too_few`` (prompts with fewer candidates).
    """
    reward, pmi, groups = np.asarray(reward, dtype=np.float64), np.asarray(pmi, dtype=np.float64), np.asarray(groups)
    correlations, undefined, too_few = [], 0, 0
    for group in np.unique(groups):
        members = groups == group
        if members.sum() < min_candidates:
            too_few += 1
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            rho = float(stats.spearmanr(reward[members], pmi[members]).statistic)
        if math.isfinite(rho):
            correlations.append(rho)
        else:
            undefined += 1
    mean, stderr = _mean_stderr(correlations)
    return {"spearman_within_prompt": mean, "spearman_within_prompt_stderr": stderr,
            "spearman_prompts": len(correlations), "spearman_undefined": undefined, "spearman_too_few": too_few}


def demeaned_slope(reward: Sequence[float], pmi: Sequence[float], groups: Sequence[int]) -> dict[str, Any]:
    """Pooled slope of r on pmi after removing each prompt's mean: OLS through the origin on the
    demeaned values (the fixed-effects, or within, estimator),

        b = sum_m r~_m p~_m / sum_m p~_m^2,    r~ = r - mean_x(r),  p~ = pmi - mean_x(pmi);

    the identity r = pmi + c(x) (MIPO, Sec. 3) gives b = 1 for any beta.

    The standard error is clustered by prompt (candidates of one prompt share its draw; Arellano 1987;
    Cameron & Miller 2015, Sec. III): V = G/(G-1) * sum_g (sum_{m in g} p~_m e_m)^2 / (sum_m p~_m^2)^2
    with residuals e = r~ - b p~ over the G prompts with at least two candidates.

    Returns:
        ``slope_demeaned`` (None when pmi does not vary within any prompt), ``slope_demeaned_stderr``
        (None for fewer than 2 such prompts), ``slope_prompts`` (G).
    """
    reward_demeaned, pmi_demeaned = demean_within_prompts(reward, groups), demean_within_prompts(pmi, groups)  # (M,)
    _, index, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    n_prompts = int((sizes >= 2).sum())
    denominator = float(np.sum(pmi_demeaned ** 2))
    if denominator == 0.0:
        return {"slope_demeaned": None, "slope_demeaned_stderr": None, "slope_prompts": n_prompts}
    slope = float(np.sum(reward_demeaned * pmi_demeaned) / denominator)
    residuals = reward_demeaned - slope * pmi_demeaned  # (M,)
    scores = np.bincount(index, weights=pmi_demeaned * residuals)  # (G_all,) per-prompt score; 0 for singletons
    stderr = (math.sqrt(n_prompts / (n_prompts - 1) * float(np.sum(scores ** 2))) / denominator
              if n_prompts >= 2 else None)
    return {"slope_demeaned": slope, "slope_demeaned_stderr": stderr, "slope_prompts": n_prompts}


def heldout_pair_accuracy(reward: Sequence[float], answers: Sequence[bool], groups: Sequence[int]) -> dict[str, Any]:
    """How often r ranks the response to x above a response to another prompt, under x: over every
    (x, y_x, y_other) with both scored under x, [r(x, y_x) > r(x, y_other)] (a tie counts 1/2, so
    r = 0 before training gives 0.5, chance). DPO's reward accuracy, on prompts it never trained on;
    under the identity it is the rate at which pmi(x; y_x) > pmi(x; y_other) (MIPO, Sec. 3).

    Comparisons within a prompt share its r(x, y_x), so the standard error is clustered by prompt (a
    ratio estimator: Cochran 1977, Sec. 6.4; Cameron & Miller 2015): with w_g wins of n_g comparisons
    and a = sum w_g / sum n_g, SE = sqrt(G/(G-1) * sum_g (w_g - a n_g)^2) / sum_g n_g over the G
    prompts with a comparison.

    Returns:
        ``heldout_pair_accuracy`` (None without a comparison), its ``_stderr`` (None for G < 2),
        ``pair_comparisons``, ``pair_ties``, ``pair_prompts`` (G).
    """
    reward, answers, groups = np.asarray(reward, dtype=np.float64), np.asarray(answers, dtype=bool), np.asarray(groups)
    wins, counts, ties = [], [], 0
    for group in np.unique(groups):
        own = reward[(groups == group) & answers]  # (A,) r(x, y_x)
        other = reward[(groups == group) & ~answers]  # (B,) r(x, y_other)
        if own.size == 0 or other.size == 0:
            continue
        above = own[:, None] > other[None, :]  # (A, B)
        tied = own[:, None] == other[None, :]  # (A, B)
        wins.append(float(above.sum()) + 0.5 * float(tied.sum()))
        counts.append(own.size * other.size)
        ties += int(tied.sum())
    if not counts:
        return {"heldout_pair_accuracy": None, "heldout_pair_accuracy_stderr": None, "pair_comparisons": 0,
                "pair_ties": 0, "pair_prompts": 0}
    wins_array, counts_array = np.asarray(wins), np.asarray(counts, dtype=np.float64)  # (G,), (G,)
    accuracy = float(wins_array.sum() / counts_array.sum())
    n_prompts = len(counts)
    stderr = (math.sqrt(n_prompts / (n_prompts - 1) * float(np.sum((wins_array - accuracy * counts_array) ** 2)))
              / float(counts_array.sum()) if n_prompts >= 2 else None)
    return {"heldout_pair_accuracy": accuracy, "heldout_pair_accuracy_stderr": stderr,
            "pair_comparisons": int(counts_array.sum()), "pair_ties": ties, "pair_prompts": n_prompts}


def identity_metrics(scores: dict[str, list], beta: float) -> dict[str, Any]:
    """The ``identity`` section of ``eval.json`` from a candidate record (``IdentityCandidates.record()``
    with ``logp_policy``): r (``implicit_reward``) against pmi (``candidate_pmi``) within prompts.

    Holds the three measures with their standard errors and counts, ``theory`` (what the identity
    predicts at DPO's optimum), and ``per_candidate`` (prompt, response row, answers, pmi, reward: (M,) each).
    """
    reward = implicit_reward(scores["logp_policy"], scores["logp_reference"], beta)  # (M,)
    pmi = candidate_pmi(scores["logp_reference"], scores["log_marginal"])  # (M,)
    groups, answers = scores["groups"], scores["answers"]
    return {
        "beta": float(beta), "candidates": len(reward), "prompts": len(set(groups)),
        **within_prompt_spearman(reward, pmi, groups), **demeaned_slope(reward, pmi, groups),
        **heldout_pair_accuracy(reward, answers, groups), "theory": dict(THEORY),
        "per_candidate": {"prompt": list(groups), "response": list(scores["rows"]), "answers": list(answers),
                          "pmi": pmi.tolist(), "reward": reward.tolist()},
    }


def _mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and std (ddof=1) / sqrt(n); None where undefined (no value; one value for the stderr)."""
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else None
