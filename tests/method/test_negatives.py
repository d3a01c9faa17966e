"""Tests of negative-prompt planning (mipo/negatives.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mipo.data.tasks import Example, get_task
from mipo.negatives import NegativePlan, derangement, negatives_problems, plan_negatives


def _assert_derangement(keys, sigma):
    n = len(keys)
    assert sorted(sigma) == list(range(n)), "not a permutation"
    for i, j in enumerate(sigma):
        assert keys[j] != keys[i], f"row {i} got row {j} with the same key {keys[i]!r}"


# --------------------------------------------------------------------------------------------
# derangement
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 16, 101])
def test_derangement_of_distinct_keys(n):
    keys = [f"prompt {i}" for i in range(n)]
    for seed in range(30):
        sigma = derangement(keys, random.Random(seed))
        _assert_derangement(keys, sigma)
        assert all(sigma[i] != i for i in range(n))


def test_derangement_of_two_is_the_swap():
    assert derangement(["a", "b"], random.Random(0)) == [1, 0]


def test_derangement_is_not_always_the_same_permutation():
    keys = [str(i) for i in range(8)]
    assert len({tuple(derangement(keys, random.Random(seed))) for seed in range(20)}) > 5


@pytest.mark.parametrize(
    "keys",
    [
        ["a", "a", "b", "b"],  # max count exactly n/2: feasible
        ["a", "b", "a", "c", "b", "d", "a"],
        ["x", "x", "y", "z", "z", "w"],
        ["q"] * 3 + ["r", "s", "t", "u"],
    ],
)
def test_duplicate_keys_never_map_to_the_same_key(keys):
    for seed in range(50):
        _assert_derangement(keys, derangement(keys, random.Random(seed)))


@pytest.mark.parametrize(
    "keys",
    [
        [],
        ["only"],
        ["same", "same"],
        ["same", "same", "same", "other"],  # majority: 3 of 4
        ["a", "a", "a", "b", "c"],  # 3 of 5
    ],
)
def test_impossible_cases_raise_value_error(keys):
    with pytest.raises(ValueError):
        derangement(keys, random.Random(0))


def test_deterministic_per_seed():
    keys = [f"k{i % 9}" for i in range(30)]
    first = derangement(keys, random.Random(1234))
    assert derangement(keys, random.Random(1234)) == first
    assert any(derangement(keys, random.Random(s)) != first for s in range(5))


def test_feasible_repetitive_keys_get_a_derangement():
    # A valid sigma exists (swap the two halves), and the ValueError check lets it through, but a
    # uniformly random permutation is valid with probability (30!)^2 / 60! ~ 1e-17.
    keys = ["a"] * 30 + ["b"] * 30
    _assert_derangement(keys, derangement(keys, random.Random(0)))


# --------------------------------------------------------------------------------------------
# plan_negatives
# --------------------------------------------------------------------------------------------

GSM8K_ONE_SENTENCE = [
    Example(uid="g/0", question="How many legs do 3 cats have?", answer="12"),
    Example(uid="g/1", question="What is 7 times 8?", answer="56"),
]
GSM8K_MULTI_SENTENCE = [
    Example(uid="g/2", question="Tom has 3 apples. He buys 4 more. How many apples does he have?", answer="7"),
    Example(uid="g/3", question="A box holds 6 eggs. Ann buys 5 boxes. She breaks 2 eggs. How many are left?",
            answer="28"),
    Example(uid="g/4", question="Sam runs 2 miles a day. How far does he run in a week?", answer="14"),
]


def _persist(uid: str, context: str | None, question: str) -> Example:
    return Example(uid=uid, question=question, context=context)


PERSIST = [
    _persist("p/0", "- I am vegan\n- I live in Oslo", "Suggest a dinner."),
    _persist("p/1", "- I have two dogs", "Plan my weekend."),
    _persist("p/2", "- I am learning Rust", "Recommend a book."),
    _persist("p/3", "- I dislike flying", "Plan a trip."),
    _persist("p/4", "- I am vegan\n- I live in Oslo", "Plan a trip."),  # shares p/0's context
]


def test_random_uses_a_derangement_of_the_examples():
    examples = GSM8K_ONE_SENTENCE + GSM8K_MULTI_SENTENCE
    task = get_task("gsm8k")
    plan = plan_negatives(task, examples, "random", random.Random(5))
    assert isinstance(plan, NegativePlan)
    assert plan.examples == examples
    assert plan.source_index == derangement([e.question for e in examples], random.Random(5))
    assert plan.dropped == 0
    for i, j in enumerate(plan.source_index):
        assert j != i
        assert plan.negatives[i] == examples[j]


def test_random_never_pairs_duplicate_prompts():
    examples = [Example(uid=f"d/{i}", question=q) for i, q in enumerate(["Q1?", "Q2?", "Q1?", "Q3?", "Q2?", "Q4?"])]
    for seed in range(20):
        plan = plan_negatives(get_task("gsm8k"), examples, "random", random.Random(seed))
        for e, neg in zip(plan.examples, plan.negatives):
            assert neg.question != e.question


def test_random_on_contexts_only_keys_on_context_and_question():
    # same question, different contexts: allowed to pair (they are different prompts)
    examples = [_persist(f"p/{i}", f"- fact {i}", "Same query?") for i in range(4)]
    plan = plan_negatives(get_task("persistbench"), examples, "random", random.Random(0))
    assert all(j != i for i, j in enumerate(plan.source_index))


def test_partial_on_gsm8k_drops_one_sentence_and_skips_one_sentence_questions():
    task = get_task("gsm8k")
    examples = GSM8K_ONE_SENTENCE[:1] + GSM8K_MULTI_SENTENCE + GSM8K_ONE_SENTENCE[1:]
    plan = plan_negatives(task, examples, "partial", random.Random(0))
    assert plan.examples == GSM8K_MULTI_SENTENCE
    assert plan.dropped == len(GSM8K_ONE_SENTENCE)
    assert plan.source_index is None
    assert len(plan.negatives) == len(plan.examples)
    for example, negative in zip(plan.examples, plan.negatives):
        assert negative.uid.startswith(example.uid) and negative.uid != example.uid
        assert negative.answer is None
        original = example.question.split(". ")
        reduced = negative.question.split(". ")
        assert len(reduced) == len(original) - 1, (example.question, negative.question)
        assert negative.question.endswith(example.question.split(". ")[-1])  # the question is kept
        assert negative.question != example.question


def test_partial_matches_task_partial_with_the_same_rng():
    task = get_task("gsm8k")
    examples = GSM8K_ONE_SENTENCE + GSM8K_MULTI_SENTENCE
    plan = plan_negatives(task, examples, "partial", random.Random(11))
    rng = random.Random(11)
    expected = [(e, r) for e in examples if (r := task.partial(e, rng)) is not None]
    assert list(zip(plan.examples, plan.negatives)) == expected


def test_partial_with_nothing_to_remove_raises():
    with pytest.raises(ValueError, match="gsm8k"):
        plan_negatives(get_task("gsm8k"), GSM8K_ONE_SENTENCE, "partial", random.Random(0))


def test_partial_on_persistbench_drops_the_context():
    task = get_task("persistbench")
    no_context = _persist("p/9", None, "Tell me a joke.")
    examples = PERSIST[:2] + [no_context] + PERSIST[2:]
    plan = plan_negatives(task, examples, "partial", random.Random(0))
    assert plan.examples == PERSIST
    assert plan.dropped == 1
    for example, negative in zip(plan.examples, plan.negatives):
        assert negative.context is None
        assert negative.question == example.question


def test_random_context_swaps_in_another_users_context():
    task = get_task("persistbench")
    contexts = Counter(e.context for e in PERSIST)
    for seed in range(30):
        plan = plan_negatives(task, PERSIST, "random_context", random.Random(seed))
        assert plan.examples == PERSIST
        assert plan.source_index is None
        assert Counter(n.context for n in plan.negatives) == contexts  # a permutation of the contexts
        for example, negative in zip(plan.examples, plan.negatives):
            assert negative.question == example.question
            assert negative.context != example.context
            assert negative.uid != example.uid


def test_random_context_needs_contexts():
    with pytest.raises(ValueError):
        plan_negatives(get_task("gsm8k"), GSM8K_MULTI_SENTENCE, "random_context", random.Random(0))
    examples = PERSIST + [_persist("p/9", None, "Tell me a joke.")]
    with pytest.raises(ValueError):
        plan_negatives(get_task("persistbench"), examples, "random_context", random.Random(0))


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="strategy"):
        plan_negatives(get_task("gsm8k"), GSM8K_MULTI_SENTENCE, "shuffle", random.Random(0))


# --------------------------------------------------------------------------------------------
# negatives.prompt_set: every strategy on the prompts partial serves; what was dropped and why
# --------------------------------------------------------------------------------------------

def test_prompt_set_partial_gives_random_the_prompts_partial_keeps():
    task = get_task("gsm8k")
    examples = GSM8K_ONE_SENTENCE[:1] + GSM8K_MULTI_SENTENCE + GSM8K_ONE_SENTENCE[1:]
    for seed in range(10):
        partial = plan_negatives(task, examples, "partial", random.Random(seed))
        restricted_partial = plan_negatives(task, examples, "partial", random.Random(seed), prompt_set="partial")
        restricted_random = plan_negatives(task, examples, "random", random.Random(seed), prompt_set="partial")
        assert restricted_partial == partial  # the partial arm's plan is unchanged
        assert restricted_random.examples == partial.examples == GSM8K_MULTI_SENTENCE
        assert restricted_random.dropped_uids == partial.dropped_uids == [e.uid for e in GSM8K_ONE_SENTENCE]
        _assert_derangement([e.question for e in restricted_random.examples], restricted_random.source_index)
        assert "prompt_set=partial" in restricted_random.drop_reason and "gsm8k" in restricted_random.drop_reason
    own_random = plan_negatives(task, examples, "random", random.Random(0))
    assert own_random.examples == examples and own_random.dropped == 0 and own_random.drop_reason is None


def test_prompt_set_partial_with_k_negatives_draws_them_among_the_kept_prompts():
    task = get_task("gsm8k")
    extra = [Example(uid=f"m/{i}", question=f"Ann has {i} pens. She buys {i + 1} more. How many pens?", answer="1")
             for i in range(4)]
    examples = GSM8K_ONE_SENTENCE + GSM8K_MULTI_SENTENCE + extra
    plan = plan_negatives(task, examples, "random", random.Random(3), num_negatives=3, prompt_set="partial")
    assert plan.examples == GSM8K_MULTI_SENTENCE + extra
    assert all(len(sources) == 2 and max(sources) < len(plan.examples) for sources in plan.extra_source_index)


def test_prompt_record_counts_what_was_kept_and_dropped():
    task = get_task("gsm8k")
    examples = GSM8K_ONE_SENTENCE[:1] + GSM8K_MULTI_SENTENCE + GSM8K_ONE_SENTENCE[1:]
    record = plan_negatives(task, examples, "partial", random.Random(0)).prompt_record()
    assert record["prompts_offered"] == len(examples)
    assert (record["kept"], record["dropped"]) == (len(GSM8K_MULTI_SENTENCE), len(GSM8K_ONE_SENTENCE))
    assert record["dropped_uids"] == [e.uid for e in GSM8K_ONE_SENTENCE]
    assert "gsm8k" in record["reason"]


def test_prompt_set_partial_with_nothing_to_remove_raises_and_unknown_sets_are_refused():
    with pytest.raises(ValueError, match="none of the"):
        plan_negatives(get_task("gsm8k"), GSM8K_ONE_SENTENCE, "random", random.Random(0), prompt_set="partial")
    with pytest.raises(ValueError, match="prompt_set"):
        plan_negatives(get_task("gsm8k"), GSM8K_MULTI_SENTENCE, "random", random.Random(0), prompt_set="shared")
    problems = negatives_problems({"strategy": "random", "num_negatives": 1, "prompt_set": "shared"}, "sigmoid", None)
    assert len(problems) == 1 and "negatives.prompt_set=shared" in problems[0]
    assert negatives_problems({"strategy": "random", "prompt_set": "partial"}, "sigmoid", None) == []
