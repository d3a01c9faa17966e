"""Pointwise (conditional) mutual information between prompts and responses under a model.

MIPO (Nam, Li & Jaques, "Maximizing Mutual Information Between Prompt and Response Improves
LLM Performance With No Additional Data", arXiv 2603.19294, Sec. 3) pairs a positive
y+ ~ pi_ref(.|x) with a negative y- ~ pi_ref(.|x') sampled for a *different* prompt x', and
shows that DPO on such pairs maximises the pointwise mutual information under the frozen base
model pi_ref:

    pmi(x; y) = log pi_ref(y|x) - log pi_ref(y),    pi_ref(y) = E_{x' ~ p(x)} [ pi_ref(y|x') ]

and, for personalization, where a prompt is a user context c plus a query q and only the
context is swapped, the pointwise *conditional* MI

    pmi(c; y | q) = log pi_ref(y|c, q) - log E_{c' ~ p(c)} [ pi_ref(y|c', q) ].

The marginal is an expectation over prompts, estimated here by a Monte Carlo average over K
alternative prompts. ``pointwise_mi`` is the single place that equation is computed;
``conditional_pointwise_mi`` names the conditional quantity and calls it, and
``estimate_pmi`` scores (prompt, response) rows with a model, under K alternative prompts per
row drawn as its ``Marginal`` says, and feeds the result to it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from mipo.data.chat import Messages, prompt_key

# --------------------------------------------------------------------------------------------
# The equation
# --------------------------------------------------------------------------------------------

def _checked_log_probs(logp_y_given_x: Any, logp_y_given_others: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``pointwise_mi``'s inputs as tensors, (N,) and (N, K) floating point with K >= 1; a ValueError or
    TypeError that says how to mend them otherwise."""
    logp_y_given_x = torch.as_tensor(logp_y_given_x)
    logp_y_given_others = torch.as_tensor(logp_y_given_others)
    if logp_y_given_x.dim() != 1:
        raise ValueError(
            f"logp_y_given_x must have shape (N,), got {tuple(logp_y_given_x.shape)}; "
            "pass one log pi(y|x) per row (flatten a (N, 1) tensor with .squeeze(-1))")
    if logp_y_given_others.dim() != 2:
        hint = (" (for a single alternative prompt per row, use logp_y_given_others[:, None])"
                if logp_y_given_others.dim() == 1 else "")
        raise ValueError(
            f"logp_y_given_others must have shape (N, K), got {tuple(logp_y_given_others.shape)}{hint}")
    n, k = logp_y_given_others.shape
    if n != logp_y_given_x.shape[0]:
        raise ValueError(
            f"logp_y_given_x has {logp_y_given_x.shape[0]} rows but logp_y_given_others has {n}: "
            "row i of both must score the same response y_i")
    if k < 1:
        raise ValueError("logp_y_given_others has K = 0 columns: the marginal needs at least one other prompt")
    if not (logp_y_given_x.is_floating_point() and logp_y_given_others.is_floating_point()):
        raise TypeError(
            f"log-probs must be floating point, got {logp_y_given_x.dtype} and {logp_y_given_others.dtype}")
    return logp_y_given_x, logp_y_given_others


def pointwise_mi(
    logp_y_given_x: torch.Tensor,
    logp_y_given_others: torch.Tensor,
    include_positive: bool = False,
) -> torch.Tensor:
    """Pointwise mutual information pmi(x; y) with a K-sample Monte Carlo marginal.

    The paper's (arXiv 2603.19294, Sec. 3) pmi(x; y) = log pi(y|x) - log pi(y), with the
    marginal pi(y) = E_{x'}[pi(y|x')] over prompts, is estimated from K other prompts
    x'_1..x'_K drawn from the prompt distribution:

        plain (``include_positive=False``):
            pmi_K(x; y) = log pi(y|x) - log( (1/K) sum_k pi(y|x'_k) )

        InfoNCE (``include_positive=True``), the marginal also averages over x itself:
            pmi_K+(x; y) = log pi(y|x) - log( (1/(K+1)) [pi(y|x) + sum_k pi(y|x'_k)] )

    Both are computed with logsumexp in float64, so log-probs of long responses (-1e4, -1e5)
    neither underflow nor overflow.

    Bias. The plain form is the log of an unbiased estimate of pi(y). By Jensen,
    E[log mean_k pi(y|x'_k)] <= log E[pi(y|x')] = log pi(y), so the estimated marginal is biased
    low and pmi_K is biased *high*; the bias is O(1/K) and vanishes as K grows (consistent).
    The InfoNCE form is bounded, pmi_K+ <= log(K+1) for every row, and the mean of pmi_K+ over
    (x, y) ~ p(x) pi(y|x) with x'_k drawn from p(x) is a *lower* bound on I(X; Y) (van den Oord
    et al., 2018; Poole et al., 2019), tight only as K -> infinity. Use the plain form to
    estimate pmi itself and the InfoNCE form when a conservative, bounded score is wanted.

    Relation to MIPO's DPO. The DPO margin compares y+ and y- under the *same* prompt x:
    h = r(x, y+) - r(x, y-), with the implicit reward r(x, y) = beta log pi_theta(y|x) / pi_ref(y|x).
    On MIPO pairs y+ ~ pi_ref(.|x) and y- ~ pi_ref(.|x') with x' ~ p(x), i.e. y- is a sample of the
    marginal pi_ref(y). The population minimiser of the logistic loss -log sigmoid(h) over such
    pairs is the log density ratio of the two samples, so the optimal implicit reward tends to

        r*(x, y) = log pi_ref(y|x) - log pi_ref(y) + c(x) = pmi(x; y) + c(x),

    the pointwise MI up to a constant in x (arXiv 2603.19294, Sec. 3). The K = 1 estimate,
    pmi_1(x; y) = log pi(y|x) - log pi(y|x'), is the paper's single-negative Monte Carlo
    stand-in for that marginal; it is not the reward margin itself.

    Args:
        logp_y_given_x: log pi(y_i | x_i), response log-probs under each row's own prompt.
            Shape (N,).
        logp_y_given_others: log pi(y_i | x'_{i,k}) under K alternative prompts per row (for
            the conditional variant, the same query with other or no user contexts). The
            order of the K columns does not matter. Shape (N, K), K >= 1.
        include_positive: average the marginal over x itself as well (InfoNCE form).

    Returns:
        (N,) float64 tensor of per-row pmi estimates on the device of ``logp_y_given_x``,
        differentiable w.r.t. both inputs. Rows whose response has probability 0 under every
        prompt (all log-probs -inf) are undefined (NaN).
    """
    logp_y_given_x, logp_y_given_others = _checked_log_probs(logp_y_given_x, logp_y_given_others)
    logp_x = logp_y_given_x.to(torch.float64)  # (N,)
    logp_others = logp_y_given_others.to(device=logp_x.device, dtype=torch.float64)  # (N, K)
    if include_positive:
        logp_others = torch.cat([logp_x[:, None], logp_others], dim=1)  # (N, K+1)
    # log of the mean of pi(y|x'_k) over the columns: the Monte Carlo estimate of log pi(y)
    log_marginal = torch.logsumexp(logp_others, dim=1) - math.log(logp_others.shape[1])  # (N,)
    return logp_x - log_marginal


def conditional_pointwise_mi(
    logp_y_given_cq: torch.Tensor,
    logp_y_given_other_contexts: torch.Tensor,
    include_positive: bool = False,
) -> torch.Tensor:
    """Pointwise conditional MI pmi(c; y | q) between a user context c and a response y given a query q.

    For personalization (arXiv 2603.19294) a prompt is a user context c (profile, history,
    preferences) plus a query q, and MIPO's negative is generated from the same query with a
    different (or no) context. The quantity it maximises is

        pmi(c; y | q) = log pi(y|c, q) - log E_{c'}[ pi(y|c', q) ],

    i.e. ``pointwise_mi`` where every alternative prompt shares the query q and only the
    context is swapped (another user's context) or removed (c' = empty). This function is that
    call under the name of the quantity it measures; see ``pointwise_mi`` for the estimator,
    its bias and the InfoNCE form.

    Args:
        logp_y_given_cq: log pi(y_i | c_i, q_i). Shape (N,).
        logp_y_given_other_contexts: log pi(y_i | c'_{i,k}, q_i) for K alternative contexts
            with the same query. Shape (N, K).
        include_positive: also average the marginal over c_i itself (InfoNCE form).

    Returns:
        (N,) float64 tensor of per-row pmi(c; y | q) estimates.
    """
    return pointwise_mi(logp_y_given_cq, logp_y_given_other_contexts, include_positive=include_positive)


def pmi_per_token(pmi_values: Sequence[float], token_counts: Sequence[int]) -> list[float]:
    """Per-token pmi: each response's pmi divided by the number of tokens it was scored on.

    pmi(x; y) compares log-probabilities of the whole response, sums over its tokens, so it grows
    with length: a model whose responses get shorter can lower the summed pmi while raising the
    pmi per token. ``token_counts[i]`` is the
    response's scored length, end-of-turn token included for a finished response (what
    ``mipo.data.encoding.encode_rows`` scores); a zero count is treated as one.

    Args:
        pmi_values: (N,) per-response pmi (``MIEstimate.values``).
        token_counts: (N,) scored response tokens.

    Returns:
        (N,) pmi / tokens.
    """
    if len(pmi_values) != len(token_counts):
        raise ValueError(f"{len(pmi_values)} pmi values but {len(token_counts)} token counts: give one per response")
    return [float(value) / max(int(count), 1) for value, count in zip(pmi_values, token_counts)]


# --------------------------------------------------------------------------------------------
# The estimator on a model
# --------------------------------------------------------------------------------------------

@dataclass
class MIEstimate:
    """Per-row pmi estimates of (prompt, response) rows under a model, and their mean.

    ``other_indices[i][k]`` says which alternative prompt gave ``logp_y_given_others[i][k]``:
    an index into the rows' ``prompts`` when the alternatives were drawn from the other rows,
    or into ``alternatives[i]`` when alternatives were given.
    """

    mean: float  # mean pmi over rows
    stderr: float  # standard error of the mean over rows: std (ddof=1) / sqrt(N); NaN for N = 1
    values: list[float]  # (N,) per-row pmi
    logp_y_given_x: list[float]  # (N,) log pi(y_i | x_i)
    logp_y_given_others: list[list[float]]  # (N, K) log pi(y_i | x'_{i,k})
    other_indices: list[list[int]]  # (N, K) which alternative was used for each of K
    k: int
    include_positive: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (``json.dumps`` writes a NaN stderr as NaN)."""
        return asdict(self)


def _check_messages(messages: Any, where: str) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not all(
        isinstance(m, dict) for m in messages
    ):
        raise TypeError(
            f"{where} must be a chat message list like [{{'role': 'user', 'content': ...}}], "
            f"got {type(messages).__name__}: {messages!r:.80}")


def _sample_other_rows(keys: list[str], k: int, rng: np.random.Generator) -> list[list[int]]:
    """For each row, K distinct other prompts from the rows, never the row's own prompt.

    Rows that share a prompt count as one candidate (several responses per prompt must not
    weight that prompt more in the marginal over prompts); the index returned for a candidate
    is the first row that holds it.
    """
    first_row: dict[str, int] = {}
    for i, key in enumerate(keys):
        first_row.setdefault(key, i)
    unique_rows = list(first_row.values())  # (U,) row index of each distinct prompt
    position = {key: u for u, key in enumerate(first_row)}  # prompt key -> its index in unique_rows
    if len(unique_rows) - 1 < k:
        raise ValueError(
            f"row 0 (like every row) has {len(unique_rows) - 1} distinct other prompts among the {len(keys)} rows "
            f"({len(unique_rows)} distinct prompts in all) but k={k}: lower k, add rows with more "
            "distinct prompts, or pass alternatives")
    other_indices = []
    for key in keys:
        own = position[key]
        # K distinct positions among the U-1 other prompts, shifted past the row's own
        draws = rng.choice(len(unique_rows) - 1, size=k, replace=False)
        other_indices.append([unique_rows[int(u) + (u >= own)] for u in draws])
    return other_indices


def _distinct_alternatives(messages: Messages, candidates: Sequence[Messages]) -> list[int]:
    """Index into ``candidates`` of each distinct candidate that differs from ``messages`` (first of duplicates)."""
    own = prompt_key(messages)
    seen: set[str] = set()
    distinct = []
    for j, candidate in enumerate(candidates):
        key = prompt_key(candidate)
        if key != own and key not in seen:
            seen.add(key)
            distinct.append(j)
    return distinct


def available_k(prompts: Sequence[Messages], alternatives: Sequence[Sequence[Messages]] | None = None) -> int:
    """The largest K that ``estimate_pmi`` can draw for every row of these prompts (0 for no rows).

    Without ``alternatives``: the distinct prompts minus the row's own; with them: the fewest
    distinct alternatives of any row. The evaluation checks ``eval.mi_k`` against it before
    any model loads.
    """
    if not prompts:
        return 0
    if alternatives is None:
        return len({prompt_key(messages) for messages in prompts}) - 1
    return min(len(_distinct_alternatives(m, c)) for m, c in zip(prompts, alternatives))


def _sample_alternatives(
    prompts: Sequence[Messages], alternatives: Sequence[Sequence[Messages]], k: int, rng: np.random.Generator
) -> list[list[int]]:
    """For each row i, K distinct prompts among ``alternatives[i]`` that differ from ``prompts[i]``.

    Duplicates within ``alternatives[i]`` count once (the index of the first is returned), and
    an alternative identical to the row's own prompt is skipped.
    """
    other_indices = []
    for i, (messages, candidates) in enumerate(zip(prompts, alternatives)):
        for j, candidate in enumerate(candidates):
            _check_messages(candidate, f"alternatives[{i}][{j}]")
        distinct = _distinct_alternatives(messages, candidates)
        if len(distinct) < k:
            raise ValueError(
                f"row {i} has {len(distinct)} distinct alternatives that differ from its own prompt "
                f"(of {len(candidates)} given) but k={k}: give at least k distinct alternatives per row or lower k")
        draws = rng.choice(len(distinct), size=k, replace=False)
        other_indices.append([distinct[int(u)] for u in draws])
    return other_indices


class RowScorer(Protocol):
    """What ``estimate_pmi`` scores with: ``mipo.model.logprobs.Scorer``, or a stand-in with known log-probs."""

    def score(self, prompts: Sequence[Messages], responses: Sequence[str], desc: str | None = ...) -> torch.Tensor:
        """log pi(responses[i] | prompts[i]) for every row, shape (N,)."""
        ...


@dataclass(frozen=True)
class Marginal:
    """How ``estimate_pmi`` estimates the marginal pi(y) = E_{x'}[pi(y|x')] of each row (``pointwise_mi``):
    the mean of pi(y|x'_k) over ``k`` alternative prompts drawn without replacement by a
    ``numpy.random.Generator`` seeded with ``seed``; with ``include_positive`` the mean also takes x
    itself (the InfoNCE form, pmi <= log(K+1))."""

    k: int = 8  # K >= 1; a larger K lowers the plain form's bias (tightens the InfoNCE bound), K + 1 forwards per row
    seed: int = 0
    include_positive: bool = False


def estimate_pmi(scorer: RowScorer, prompts: Sequence[Messages], responses: Sequence[str],
                 marginal: Marginal = Marginal(), alternatives: Sequence[Sequence[Messages]] | None = None,
                 desc: str | None = "MI", finished: Sequence[bool] | None = None) -> MIEstimate:
    """Estimate pmi(x_i; y_i) under the scorer's model for every (prompt, response) row (see ``pointwise_mi``).

    Each row needs log pi(y_i|x_i) and log pi(y_i|x'_{i,k}) for K alternative prompts. All
    N * (K + 1) of them are scored in one call to ``scorer.score`` (flattened, scored,
    reshaped), so batching, length-sorting and prompt sharing span rows and alternatives.

    Where the alternatives come from:

    * ``alternatives=None``: the other rows' prompts, i.e. the empirical prompt distribution.
      For row i, K distinct prompts are drawn without replacement among the rows' distinct
      prompts other than x_i (both row i and any row with an identical prompt are excluded;
      rows sharing a prompt count once). This estimates pmi(x; y).
    * ``alternatives[i]``: row i's candidates, e.g. the same query with other users' contexts
      or with the context removed; this estimates the conditional pmi(c; y | q) (see
      ``conditional_pointwise_mi``). K distinct candidates are drawn per row; duplicates and
      candidates identical to ``prompts[i]`` are not used.

    Args:
        scorer: what scores the rows, usually a ``mipo.model.logprobs.Scorer`` on the frozen reference
            pi_ref: any object with ``score(prompts, responses, desc) -> (N,) tensor`` of
            log pi(response | prompt).
        prompts: chat message lists [{"role": "user", "content": ...}]. Length N.
        responses: response strings, ``responses[i]`` scored under ``prompts[i]``. Length N.
        marginal: K, the seed of the draw of the alternatives, and the plain or InfoNCE form.
        alternatives: per-row candidate prompts (length N), or None to draw from the rows.
        desc: progress-bar label, None to hide it.
        finished: (N,) False for a response cut at ``max_new_tokens``: it is scored without an
            end-of-turn token under every prompt, as training scores it. None: all finished (and
            ``scorer.score`` is called without the argument, so stand-ins need not take it).

    Returns:
        An ``MIEstimate`` with per-row values, their mean and standard error, the log-probs
        and which alternatives were used.

    Raises:
        ValueError: lengths disagree, k < 1, or a row has fewer than k distinct alternatives.
    """
    n, k = len(prompts), marginal.k
    _check_rows(prompts, responses, k)
    other_indices, other_prompts = _draw_alternatives(prompts, alternatives, k, np.random.default_rng(marginal.seed))
    logps = _score_with_alternatives(scorer, prompts, responses, other_prompts, desc, finished)  # (N, K+1)
    logp_y_given_x, logp_y_given_others = logps[:, 0], logps[:, 1:]  # (N,), (N, K)
    values = pointwise_mi(logp_y_given_x, logp_y_given_others, include_positive=marginal.include_positive)  # (N,)
    return MIEstimate(
        mean=values.mean().item(),
        stderr=(values.std(correction=1) / math.sqrt(n)).item() if n > 1 else float("nan"),
        values=values.tolist(),
        logp_y_given_x=logp_y_given_x.tolist(),
        logp_y_given_others=logp_y_given_others.tolist(),
        other_indices=other_indices,
        k=k,
        include_positive=marginal.include_positive,
    )


def _check_rows(prompts: Sequence[Messages], responses: Sequence[str], k: int) -> None:
    """One response per prompt, at least one row, K >= 1, every prompt a chat message list."""
    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"{n} prompts but {len(responses)} responses: give one response per prompt")
    if n == 0:
        raise ValueError("no rows to estimate pmi on: prompts and responses are empty")
    if k < 1:
        raise ValueError(f"k must be >= 1 (the number of alternative prompts per row), got {k}")
    for i, messages in enumerate(prompts):
        _check_messages(messages, f"prompts[{i}]")


def _draw_alternatives(prompts: Sequence[Messages], alternatives: Sequence[Sequence[Messages]] | None, k: int,
                       rng: np.random.Generator) -> tuple[list[list[int]], list[list[Messages]]]:
    """Each row's K alternative prompts: (N, K) indices (``MIEstimate.other_indices``) and the prompts.

    From the other rows' distinct prompts (``alternatives=None``) or from ``alternatives[i]``.
    """
    if alternatives is None:
        keys = [prompt_key(messages) for messages in prompts]
        other_indices = _sample_other_rows(keys, k, rng)
        return other_indices, [[prompts[j] for j in row] for row in other_indices]
    if len(alternatives) != len(prompts):
        raise ValueError(
            f"alternatives has {len(alternatives)} entries but there are {len(prompts)} rows: "
            "give one list of candidate prompts per row")
    other_indices = _sample_alternatives(prompts, alternatives, k, rng)
    return other_indices, [[alternatives[i][j] for j in row] for i, row in enumerate(other_indices)]


def _score_with_alternatives(scorer: RowScorer, prompts: Sequence[Messages], responses: Sequence[str],
                             other_prompts: list[list[Messages]], desc: str | None,
                             finished: Sequence[bool] | None) -> torch.Tensor:
    """(N, K+1) log pi(y_i | x): column 0 under the row's own prompt, then its K alternatives, in one
    ``scorer.score`` call over the flattened rows."""
    n, k = len(prompts), len(other_prompts[0])
    # Flatten: row i occupies positions i*(K+1) .. i*(K+1)+K, its own prompt first.
    flat_prompts: list[Messages] = []
    flat_responses: list[str] = []
    for i in range(n):
        flat_prompts.append(prompts[i])
        flat_prompts.extend(other_prompts[i])
        flat_responses.extend([responses[i]] * (k + 1))
    if finished is None:
        scored = scorer.score(flat_prompts, flat_responses, desc=desc)
    else:
        if len(finished) != n:
            raise ValueError(f"{len(finished)} finished flags but {n} responses: give one per response")
        flat_finished = [bool(done) for done in finished for _ in range(k + 1)]
        scored = scorer.score(flat_prompts, flat_responses, desc=desc, finished=flat_finished)
    return torch.as_tensor(scored).view(n, k + 1)  # (N, K+1)
