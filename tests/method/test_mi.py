"""Tests of the pointwise MI estimator (mipo/mi.py).

The toy joint distribution: X uniform over M prompts, Y | X categorical with a Dirichlet
table p(y|x), so the exact pmi(x; y) = log p(y|x) - log (1/M) sum_x' p(y|x') is known.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mipo.mi import (
    Marginal,
    MIEstimate,
    conditional_pointwise_mi,
    estimate_pmi,
    pointwise_mi,
)
from mipo.model.loading import load_model
from mipo.model.logprobs import Scorer, ScoringSettings
from mipo.model.tokenizer import byte_tokenizer
from tests.helpers import score_responses

KS = (1, 4, 16, 64, 256)


# --------------------------------------------------------------------------------------------
# Toy joint distribution with closed-form pmi
# --------------------------------------------------------------------------------------------

def _toy_table(num_prompts: int = 16, num_outcomes: int = 32, alpha: float = 0.3, seed: int = 0) -> np.ndarray:
    """log p(y|x) of shape (M, V): peaked rows (alpha < 1) so that pmi is far from 0."""
    table = np.random.default_rng(seed).dirichlet(np.full(num_outcomes, alpha), size=num_prompts)
    return np.log(table)


def _toy_rows(log_table: np.ndarray, num_rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, exact pmi(x; y)) for (x, y) ~ p(x) p(y|x), x uniform."""
    table = np.exp(log_table)
    x = rng.integers(len(table), size=num_rows)
    y = (table[x].cumsum(1) > rng.random((num_rows, 1))).argmax(1)  # inverse-CDF sampling of p(.|x)
    log_marginal = np.log(table.mean(0))  # log p(y) = log (1/M) sum_x' p(y|x')
    return x, y, log_table[x, y] - log_marginal[y]


def _toy_estimates(log_table, x, y, k, rng, include_positive):
    """pointwise_mi with K other prompts x'_k drawn from the prior p(x) (uniform)."""
    other_x = rng.integers(len(log_table), size=(len(x), k))  # (N, K)
    return pointwise_mi(
        torch.from_numpy(log_table[x, y]), torch.from_numpy(log_table[other_x, y[:, None]]), include_positive
    ).numpy()


def test_plain_estimator_converges_to_exact_pmi_as_k_grows():
    log_table = _toy_table()
    errors = {k: [] for k in KS}  # signed error of the mean estimate, per seed
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        x, y, exact = _toy_rows(log_table, 4000, rng)
        for k in KS:
            estimate = _toy_estimates(log_table, x, y, k, rng, include_positive=False)
            errors[k].append(estimate.mean() - exact.mean())
    mean_error = {k: float(np.mean(errors[k])) for k in KS}
    abs_error = {k: abs(e) for k, e in mean_error.items()}
    # Jensen: the estimated marginal is biased low, so pmi is biased high, strongly so at K = 1.
    assert mean_error[1] > 0.5, mean_error
    # The bias shrinks monotonically (~1/K) and is small at K = 256.
    assert all(abs_error[a] > abs_error[b] for a, b in zip(KS, KS[1:])), abs_error
    assert abs_error[256] < 0.02, abs_error
    assert abs_error[256] < abs_error[1] / 50, abs_error


def test_infonce_form_is_bounded_and_a_lower_bound():
    log_table = _toy_table()
    rng = np.random.default_rng(7)
    x, y, exact = _toy_rows(log_table, 16000, rng)
    previous = -math.inf
    for k in KS:
        estimate = _toy_estimates(log_table, x, y, k, rng, include_positive=True)
        assert np.all(estimate <= math.log(k + 1) + 1e-9), (k, estimate.max())
        assert estimate.mean() <= math.log(k + 1)
        # E[pmi_K+] <= I(X; Y) = E[pmi]: below the exact mean up to noise, and increasing in K.
        gap = estimate - exact
        assert gap.mean() < 3 * gap.std() / math.sqrt(len(gap)), (k, gap.mean())
        assert estimate.mean() > previous, (k, estimate.mean(), previous)
        previous = estimate.mean()
    # At small K the bound is far below the MI (log 2 caps it at K = 1), not merely noisy.
    assert _toy_estimates(log_table, x, y, 1, rng, include_positive=True).mean() < exact.mean() - 0.3


# --------------------------------------------------------------------------------------------
# Invariances and numerics of pointwise_mi
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("include_positive", [False, True])
def test_response_equally_likely_under_every_prompt_has_zero_mi(include_positive):
    logp = torch.tensor([-3.0, -250.0, -1e4, -1e5], dtype=torch.float32)
    others = logp[:, None].expand(-1, 7)
    assert torch.equal(pointwise_mi(logp, others, include_positive), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("include_positive", [False, True])
def test_column_permutation_changes_nothing(include_positive):
    generator = torch.Generator().manual_seed(0)
    logp = -torch.rand(5, generator=generator, dtype=torch.float64) * 50
    others = -torch.rand(5, 9, generator=generator, dtype=torch.float64) * 50
    permuted = others[:, torch.randperm(9, generator=generator)]
    torch.testing.assert_close(
        pointwise_mi(logp, others, include_positive), pointwise_mi(logp, permuted, include_positive),
        rtol=0, atol=1e-12)


@pytest.mark.parametrize("include_positive", [False, True])
@pytest.mark.parametrize("scale", [1e4, 1e5])
def test_large_negative_log_probs_stay_finite(scale, include_positive):
    logp = torch.tensor([-scale, -scale - 3.0, -1.0, -scale])
    others = torch.tensor([
        [-scale - 1.0, -scale - 2.0, -scale],
        [-scale, -scale, -scale],
        [-scale, -1.0, -scale],  # a mixture: one other prompt explains y as well as x does
        [-1.0, -2.0, -scale],
    ])
    values = pointwise_mi(logp, others, include_positive)
    assert torch.isfinite(values).all(), values
    if not include_positive:
        # hand-computed: log-mean-exp subtracting the max by hand
        expected = torch.tensor([
            -scale - (-scale + math.log((math.exp(-1) + math.exp(-2) + 1) / 3)),
            -3.0,
            -1.0 - (-1.0 + math.log((1 + 2 * math.exp(1 - scale)) / 3)),
            -scale - (-1.0 + math.log((1 + math.exp(-1)) / 3)),
        ], dtype=torch.float64)
        torch.testing.assert_close(values, expected, rtol=0, atol=1e-9)


def test_k_equal_one_is_the_log_likelihood_ratio():
    logp = torch.tensor([-12.5, -3.25, -1e4, -0.5], dtype=torch.float64)
    other = torch.tensor([-14.0, -1.0, -1e4 + 7.0, -80.0], dtype=torch.float64)
    assert torch.equal(pointwise_mi(logp, other[:, None]), logp - other)
    # InfoNCE with K = 1: log 2 - log(1 + pi(y|x')/pi(y|x)) = log 2 - softplus(log pi(y|x') - log pi(y|x))
    torch.testing.assert_close(
        pointwise_mi(logp, other[:, None], include_positive=True),
        math.log(2) - torch.nn.functional.softplus(other - logp), rtol=0, atol=1e-12)


def test_float32_inputs_are_computed_in_float64():
    logp = torch.tensor([-1e4], dtype=torch.float32)
    others = torch.tensor([[-1e4 - 1.0, -1e4 - 2.0]], dtype=torch.float32)
    value = pointwise_mi(logp, others)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(-math.log((math.exp(-1) + math.exp(-2)) / 2), abs=1e-9)
    # float64 inputs keep differences far below float32 resolution at -1e5 (spacing ~0.008)
    close = pointwise_mi(torch.tensor([-1e5], dtype=torch.float64), torch.tensor([[-1e5 - 1e-6]], dtype=torch.float64))
    assert close.item() == pytest.approx(1e-6, abs=1e-10)


def test_gradient_flows_through_both_inputs():
    logp = torch.tensor([-2.0, -5.0], dtype=torch.float64, requires_grad=True)
    others = torch.tensor([[-3.0, -4.0], [-1.0, -6.0]], dtype=torch.float64, requires_grad=True)
    pointwise_mi(logp, others).sum().backward()
    assert torch.equal(logp.grad, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(others.grad, -torch.softmax(others.detach(), dim=1))


def test_conditional_variant_is_the_same_equation():
    logp = torch.tensor([-4.0, -9.0])
    others = torch.tensor([[-6.0, -5.0, -7.0], [-9.0, -2.0, -30.0]])
    for include_positive in (False, True):
        assert torch.equal(
            conditional_pointwise_mi(logp, others, include_positive), pointwise_mi(logp, others, include_positive))


@pytest.mark.parametrize(
    "logp, others, match",
    [
        (torch.zeros(3, 1), torch.zeros(3, 2), r"shape \(N,\)"),
        (torch.zeros(3), torch.zeros(3), r"shape \(N, K\).*\[:, None\]"),
        (torch.zeros(3), torch.zeros(4, 2), "3 rows but logp_y_given_others has 4"),
        (torch.zeros(3), torch.zeros(3, 0), "K = 0"),
    ],
)
def test_shape_errors_are_actionable(logp, others, match):
    with pytest.raises(ValueError, match=match):
        pointwise_mi(logp, others)


# --------------------------------------------------------------------------------------------
# estimate_pmi on a tiny random Llama
# --------------------------------------------------------------------------------------------

TINY_LLAMA = {
    "random_init": True,
    "tokenizer": "byte",
    "config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024},
}


@pytest.fixture(scope="module")
def tiny():
    tokenizer = byte_tokenizer()
    model = load_model(TINY_LLAMA, device="cpu", vocab_size=len(tokenizer))
    return model, tokenizer


class ConstantScorer:
    """A stand-in scorer for tests of the sampling alone (no model, no forward passes)."""

    def score(self, prompts, responses, desc=None):
        return torch.zeros(len(prompts))


def _user(text: str):
    return [{"role": "user", "content": text}]


# rows 0 and 3 share a prompt, as do rows 2 and 6: identical prompts must never serve as "other"
PROMPTS = [_user(t) for t in ("Name a fruit.", "What is 2+2?", "Write a haiku about rain.", "Name a fruit.",
                              "Translate 'cat' to French.", "Who wrote Hamlet?", "Write a haiku about rain.",
                              "List three primes.")]
RESPONSES = ["Apple.", "4", "Grey clouds weep softly", "Banana, ripe and yellow.", "Chat.",
             "Shakespeare wrote it.", "Drops on the tin roof", "2, 3, 5"]


def _one_at_a_time(model, tokenizer, prompts, responses, other_prompts, include_positive):
    """The reference computation: every (prompt, response) scored alone, then pointwise_mi."""
    def score(prompt, response):
        return score_responses(model, tokenizer, [prompt], [response], batch_size=1, desc=None)[0]
    logp = torch.stack([score(p, r) for p, r in zip(prompts, responses)])
    others = torch.stack([torch.stack([score(p, r) for p in row]) for row, r in zip(other_prompts, responses)])
    return pointwise_mi(logp, others, include_positive)


@pytest.mark.parametrize("include_positive", [False, True])
def test_estimate_matches_row_at_a_time_computation(tiny, include_positive):
    model, tokenizer = tiny
    estimate = estimate_pmi(Scorer(model, tokenizer, ScoringSettings(batch_size=4)), PROMPTS, RESPONSES,
                            Marginal(k=3, seed=1, include_positive=include_positive), desc=None)
    other_prompts = [[PROMPTS[j] for j in row] for row in estimate.other_indices]
    expected = _one_at_a_time(model, tokenizer, PROMPTS, RESPONSES, other_prompts, include_positive)
    torch.testing.assert_close(torch.tensor(estimate.values, dtype=torch.float64), expected, rtol=0, atol=1e-5)
    values = np.array(estimate.values)
    assert estimate.mean == pytest.approx(values.mean())
    assert estimate.stderr == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)))
    assert np.array(estimate.logp_y_given_others).shape == (len(PROMPTS), 3)
    assert estimate.k == 3 and estimate.include_positive is include_positive
    # The logged log-probs recombine to the logged values.
    recombined = pointwise_mi(torch.tensor(estimate.logp_y_given_x), torch.tensor(estimate.logp_y_given_others),
                              include_positive)
    torch.testing.assert_close(recombined, torch.tensor(estimate.values, dtype=torch.float64))


def test_sampled_prompts_are_distinct_and_never_the_rows_own():
    distinct_prompts = len({json.dumps(p) for p in PROMPTS})  # 6
    for seed in range(20):
        estimate = estimate_pmi(ConstantScorer(), PROMPTS, RESPONSES, Marginal(k=distinct_prompts - 1, seed=seed), desc=None)
        for i, row in enumerate(estimate.other_indices):
            assert i not in row
            assert all(PROMPTS[j] != PROMPTS[i] for j in row), (i, row)
            assert len({json.dumps(PROMPTS[j]) for j in row}) == len(row), (i, row)


def test_seed_reproducibility(tiny):
    scorer = Scorer(*tiny)
    first = estimate_pmi(scorer, PROMPTS, RESPONSES, Marginal(k=2, seed=3), desc=None)
    again = estimate_pmi(scorer, PROMPTS, RESPONSES, Marginal(k=2, seed=3), desc=None)
    other = estimate_pmi(scorer, PROMPTS, RESPONSES, Marginal(k=2, seed=4), desc=None)
    assert first == again
    assert first.other_indices != other.other_indices
    assert first.values != other.values
    # The draw neither reads nor advances the global numpy / torch RNGs.
    np.random.seed(0)
    torch.manual_seed(0)
    state = (np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    estimate_pmi(ConstantScorer(), PROMPTS, RESPONSES, Marginal(k=2, seed=3), desc=None)
    assert np.array_equal(np.random.get_state()[1], state[0]) and torch.equal(torch.get_rng_state(), state[1])


def test_alternatives_path_uses_only_the_given_candidates(tiny):
    model, tokenizer = tiny
    queries = ["What should I cook tonight?", "Suggest a weekend plan."]
    contexts = ["I am vegan.", "I love hiking.", "I live in Oslo.", "I have two cats."]

    def prompt(context, query):
        return _user(f"{context}\n{query}" if context else query)

    prompts = [prompt(contexts[0], queries[0]), prompt(contexts[1], queries[1])]
    responses = ["A lentil curry.", "Climb a nearby hill."]
    # other users' contexts and the context removed; row 0 repeats its own prompt and a duplicate
    alternatives = [
        [prompt(contexts[0], queries[0]), prompt(contexts[2], queries[0]), prompt(None, queries[0]),
         prompt(contexts[2], queries[0]), prompt(contexts[3], queries[0])],
        [prompt(contexts[2], queries[1]), prompt(contexts[3], queries[1]), prompt(None, queries[1])],
    ]
    calls = []

    class SpyScorer(Scorer):
        def score(self, prompts, responses, desc=None):
            calls.append((list(prompts), list(responses)))
            return super().score(prompts, responses, desc=desc)

    estimate = estimate_pmi(SpyScorer(model, tokenizer, ScoringSettings(batch_size=4)), prompts, responses, Marginal(k=3, seed=0),
                            alternatives=alternatives, desc=None)
    assert len(calls) == 1, "all N x (K+1) rows must be scored in one call"
    scored_prompts, scored_responses = calls[0]
    assert len(scored_prompts) == 2 * 4
    assert sorted(estimate.other_indices[0]) == [1, 2, 4]  # own prompt and the duplicate of 1 are skipped
    assert sorted(estimate.other_indices[1]) == [0, 1, 2]
    for i in range(2):
        row_prompts = scored_prompts[i * 4: (i + 1) * 4]
        assert row_prompts[0] == prompts[i]
        assert row_prompts[1:] == [alternatives[i][j] for j in estimate.other_indices[i]]
        assert scored_responses[i * 4: (i + 1) * 4] == [responses[i]] * 4
    other_prompts = [[alternatives[i][j] for j in row] for i, row in enumerate(estimate.other_indices)]
    expected = _one_at_a_time(model, tokenizer, prompts, responses, other_prompts, include_positive=False)
    torch.testing.assert_close(torch.tensor(estimate.values, dtype=torch.float64), expected, rtol=0, atol=1e-5)


def test_too_few_candidates_name_the_row():
    with pytest.raises(ValueError, match=r"row 0 .*5 distinct other prompts.*k=6"):
        estimate_pmi(ConstantScorer(), PROMPTS, RESPONSES, Marginal(k=6), desc=None)
    alternatives = [[_user("a"), _user("b")], [_user("a"), _user("a"), PROMPTS[1]]]
    with pytest.raises(ValueError, match=r"row 1 has 1 distinct alternatives .*k=2"):
        estimate_pmi(ConstantScorer(), PROMPTS[:2], RESPONSES[:2], Marginal(k=2), alternatives=alternatives, desc=None)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"responses": RESPONSES[:3]}, ValueError, "8 prompts but 3 responses"),
        ({"k": 0}, ValueError, "k must be >= 1"),
        ({"alternatives": [[_user("a")]]}, ValueError, "alternatives has 1 entries but there are 8 rows"),
        ({"prompts": ["Name a fruit."] * 8}, TypeError, r"prompts\[0\] must be a chat message list"),
    ],
)
def test_input_errors_are_actionable(kwargs, error, match):
    arguments = {"prompts": PROMPTS, "responses": RESPONSES, "k": 2, "desc": None, **kwargs}
    marginal = Marginal(k=arguments.pop("k"))
    with pytest.raises(error, match=match):
        estimate_pmi(ConstantScorer(), marginal=marginal, **arguments)


def test_to_dict_round_trips_through_json(tiny):
    model, tokenizer = tiny
    estimate = estimate_pmi(Scorer(model, tokenizer), PROMPTS, RESPONSES, Marginal(k=2, seed=0), desc=None)
    restored = MIEstimate(**json.loads(json.dumps(estimate.to_dict())))
    assert restored == estimate


def test_estimate_with_a_scorer_of_known_log_probs_and_no_model():
    # log pi(y_i | x_j) = -(i + 1) * (j + 2) for four distinct prompts: known numbers, no forward pass
    prompts = [_user(f"prompt {j}") for j in range(4)]
    responses = [f"response {i}" for i in range(4)]

    class TableScorer:
        def score(self, scored_prompts, scored_responses, desc=None):
            return torch.tensor([-(responses.index(r) + 1.0) * (prompts.index(p) + 2.0)
                                 for p, r in zip(scored_prompts, scored_responses)])

    estimate = estimate_pmi(TableScorer(), prompts, responses, Marginal(k=2, seed=5), desc=None)
    for i, others in enumerate(estimate.other_indices):
        own = -(i + 1.0) * (i + 2.0)
        alternatives = torch.tensor([[-(i + 1.0) * (j + 2.0) for j in others]], dtype=torch.float64)
        expected = pointwise_mi(torch.tensor([own], dtype=torch.float64), alternatives)
        assert estimate.values[i] == pytest.approx(float(expected[0]), abs=1e-12)
        assert i not in others


def test_finished_flags_reach_the_scorer_for_every_alternative():
    # a response cut at max_new_tokens is scored without end-of-turn under its own prompt and all K others
    seen = {}

    class RecordingScorer:
        def score(self, prompts, responses, desc=None, finished=None):
            seen["finished"] = list(finished)
            return torch.zeros(len(prompts))

    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    estimate_pmi(RecordingScorer(), prompts, ["a", "b", "c"], Marginal(k=2), finished=[True, False, True])
    assert seen["finished"] == [True] * 3 + [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="2 finished flags but 3 responses"):
        estimate_pmi(RecordingScorer(), prompts, ["a", "b", "c"], Marginal(k=2), finished=[True, False])


def test_pmi_per_token_by_hand():
    from mipo.mi import pmi_per_token
    assert pmi_per_token([6.0, -3.0, 2.0], [3, 2, 0]) == [2.0, -1.5, 2.0]  # a zero count counts as one token
    with pytest.raises(ValueError, match="one per response"):
        pmi_per_token([1.0], [1, 2])
