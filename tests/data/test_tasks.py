"""Tests for mipo.data.tasks: loading, splits, prompts, partial/context negatives, grading, errors."""

from __future__ import annotations

import json
import random
import re
import sys

import pytest

from mipo.data import tasks
from mipo.data.tasks import (
    Example,
    available_tasks,
    extract_number,
    get_task,
    load_splits,
    normalize_number,
    sources,
    split_sentences,
)


def write_jsonl(path, rows):
    """Write rows (dicts, or raw strings written as-is) one per line."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gsm8k_offline():
    return get_task("gsm8k").load("offline")


@pytest.fixture(scope="module")
def persistbench_offline():
    return get_task("persistbench").load("offline")


# -- registry -------------------------------------------------------------------------------------


def test_available_tasks_lists_registered_names():
    assert available_tasks() == [
        "arc_challenge", "arc_easy", "community_alignment", "gsm8k", "jsonl", "multifaceted_bench", "persistbench",
        "prism", "svamp",
    ]


def test_unknown_task_lists_available_names():
    with pytest.raises(ValueError, match="unknown task 'gsm9k'.*arc_challenge.*gsm8k.*persistbench"):
        get_task("gsm9k")


def test_unknown_option_names_accepted_options():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_shots'\].*num_fewshot"):
        get_task("gsm8k", num_shots=3)


def test_task_attributes():
    assert (get_task("gsm8k").max_new_tokens, get_task("gsm8k").has_answers) == (512, True)
    assert get_task("arc_challenge").max_new_tokens == 256
    assert get_task("arc_easy").name == "arc_easy"
    assert (get_task("persistbench").max_new_tokens, get_task("persistbench").has_answers) == (512, False)
    assert get_task("gsm8k", max_new_tokens=64).max_new_tokens == 64


# -- offline loading ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "count"),
    [
        ("gsm8k", {}, 1319),
        ("arc_challenge", {}, 1172),
        ("persistbench", {}, 500),
        ("persistbench", {"subsets": ["sycophancy"]}, 200),
        ("persistbench", {"subsets": ["beneficial_samples", "cross_domain"]}, 300),
    ],
)
def test_offline_copies_have_documented_row_counts(name, options, count):
    examples = get_task(name, **options).load("offline")
    assert len(examples) == count
    assert len({ex.uid for ex in examples}) == count
    assert all(ex.question and ex.question == ex.question.strip() for ex in examples)


def test_gsm8k_offline_rows(gsm8k_offline):
    first = gsm8k_offline[0]
    assert first.uid == "gsm8k/test/0"
    assert first.question.startswith("Janet")
    assert first.answer == "18"
    # offline gold answers like "2,125" are normalised
    assert all(normalize_number(ex.answer) == ex.answer for ex in gsm8k_offline)
    assert not any("," in ex.answer for ex in gsm8k_offline)


def test_arc_offline_rows():
    examples = get_task("arc_challenge").load("offline")
    first = examples[0]
    assert first.answer == "C"
    assert [label for label, _ in first.choices] == ["A", "B", "C", "D"]
    assert first.choices[2][1] == "Planetary days will become shorter."
    assert all(ex.answer in dict(ex.choices) for ex in examples)
    assert {len(ex.choices) for ex in examples} == {3, 4}


def test_persistbench_offline_rows(persistbench_offline):
    first = persistbench_offline[0]
    assert first.uid == "persistbench/beneficial_samples/0"
    assert first.answer is None
    assert first.context.startswith("- The user is planning a dinner party")
    assert first.context.count("\n- ") == 6  # 7 memories, one bullet each
    assert {ex.uid.split("/")[1] for ex in persistbench_offline} == set(tasks.PERSISTBENCH_SUBSETS)


def test_offline_copy_has_only_test_split():
    with pytest.raises(ValueError, match="only the 'test' split.*load_splits"):
        get_task("gsm8k").load("offline", split="train")


def test_arc_easy_has_no_offline_copy():
    with pytest.raises(ValueError, match="arc_easy has no offline copy.*hub.*local .jsonl"):
        get_task("arc_easy").load("offline")


def test_persistbench_has_no_hub_source():
    with pytest.raises(ValueError, match="persistbench has no Hugging Face hub source"):
        get_task("persistbench").load("hub")


def test_persistbench_rejects_unknown_subset():
    with pytest.raises(ValueError, match="subsets must be distinct names"):
        get_task("persistbench", subsets=["cross_domain", "nope"])


def test_hub_without_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        get_task("gsm8k").load("hub")


def test_auto_uses_offline_copy_when_hub_is_off(monkeypatch):
    monkeypatch.setattr(sources, "hub_configured", lambda: False)
    assert get_task("gsm8k").resolve_source("auto") == "offline"
    assert get_task("arc_easy").resolve_source("auto") == "hub"  # no offline copy to fall back on


def test_unknown_source_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown source.*'auto', 'hub', 'offline'"):
        get_task("gsm8k").load(str(tmp_path / "missing.jsonl"))


# -- load_splits ----------------------------------------------------------------------------------


def _question_keys(examples):
    return {" ".join(ex.question.split()).casefold() for ex in examples}


@pytest.mark.parametrize("name", ["gsm8k", "arc_challenge", "persistbench"])
def test_load_splits_single_source_is_disjoint_and_deterministic(name):
    task = get_task(name)
    train, evaluation = load_splits(task, "offline", num_train=200, num_eval=100, seed=0)
    assert (len(train), len(evaluation)) == (200, 100)
    assert not {ex.uid for ex in train} & {ex.uid for ex in evaluation}
    assert not _question_keys(train) & _question_keys(evaluation)
    again = load_splits(task, "offline", num_train=200, num_eval=100, seed=0)
    assert again == (train, evaluation)
    other_train, other_eval = load_splits(task, "offline", num_train=200, num_eval=100, seed=1)
    assert [ex.uid for ex in other_eval] != [ex.uid for ex in evaluation]
    assert [ex.uid for ex in other_train] != [ex.uid for ex in train]


def test_load_splits_removes_duplicate_questions_from_train():
    # ARC-Challenge test has 2 questions that appear twice with different choices.
    task = get_task("arc_challenge")
    for seed in range(3):
        train, evaluation = load_splits(task, "offline", num_train=None, num_eval=600, seed=seed)
        assert not _question_keys(train) & _question_keys(evaluation)
        assert len(train) + len(evaluation) <= 1172


def test_load_splits_none_means_all():
    task = get_task("gsm8k")
    train, evaluation = load_splits(task, "offline", num_train=None, num_eval=300, seed=3)
    assert (len(train), len(evaluation)) == (1019, 300)
    train, evaluation = load_splits(task, "offline", num_train=None, num_eval=None, seed=3)
    assert (len(train), len(evaluation)) == (0, 1319)


def test_load_splits_rejects_impossible_sizes():
    task = get_task("gsm8k")
    with pytest.raises(ValueError, match="num_train=1300 but only 1219"):
        load_splits(task, "offline", num_train=1300, num_eval=100, seed=0)
    with pytest.raises(ValueError, match="num_eval"):
        load_splits(task, "offline", num_train=0, num_eval=-1, seed=0)


def _fake_hub(monkeypatch, rows_by_split):
    calls = []

    def fake_load_hub_rows(dataset, config, split):
        calls.append((dataset, config, split))
        return [(f"{dataset} row {i + 1}", row) for i, row in enumerate(rows_by_split[split])]

    monkeypatch.setattr(sources, "load_hub_rows", fake_load_hub_rows)
    return calls


def test_load_splits_uses_hub_train_split_and_removes_test_questions(monkeypatch):
    train_rows = [{"question": f"Train question {i}?", "answer": f"Work.\n#### {i}"} for i in range(50)]
    test_rows = [{"question": f"Test question {i}?", "answer": f"#### {i}"} for i in range(20)]
    train_rows.append({"question": "Test question 3?", "answer": "#### 3"})  # leaked test question
    calls = _fake_hub(monkeypatch, {"train": train_rows, "test": test_rows})
    task = get_task("gsm8k")
    train, evaluation = load_splits(task, "hub", num_train=None, num_eval=5, seed=0)
    assert ("openai/gsm8k", "main", "train") in calls and ("openai/gsm8k", "main", "test") in calls
    assert len(evaluation) == 5 and all(ex.uid.startswith("gsm8k/test/") for ex in evaluation)
    assert len(train) == 50 and all(ex.uid.startswith("gsm8k/train/") for ex in train)
    assert "test question 3?" not in _question_keys(train)
    assert load_splits(task, "hub", num_train=None, num_eval=5, seed=0) == (train, evaluation)


def test_auto_falls_back_to_offline_when_hub_fails(monkeypatch):
    def unreachable(dataset, config, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(sources, "hub_configured", lambda: True)
    monkeypatch.setattr(sources, "load_hub_rows", unreachable)
    task = get_task("gsm8k")
    assert task.resolve_source("auto") == "hub"
    train, evaluation = load_splits(task, "auto", num_train=10, num_eval=10, seed=0)
    assert all(ex.uid.startswith("gsm8k/test/") for ex in train + evaluation)
    assert len(task.load("auto")) == 1319
    with pytest.raises(ConnectionError):
        task.load("hub")


# -- GSM8K prompts and grading ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 4, 8])
def test_gsm8k_messages_contain_k_exemplars_and_question(k, gsm8k_offline):
    task = get_task("gsm8k", num_fewshot=k)
    ex = gsm8k_offline[5]
    messages = task.messages(ex)
    assert [m["role"] for m in messages] == ["user"]
    content = messages[0]["content"]
    assert content.count("Question: ") == k + 1
    assert content.count("\n#### ") == k
    assert content.endswith(f"Question: {ex.question}\nAnswer:")
    assert '"#### <number>"' in content
    shown = [shot for shot in tasks.GSM8K_COT_EXEMPLARS if shot[0] in content]
    assert shown == list(tasks.GSM8K_COT_EXEMPLARS[:k])


def test_gsm8k_exemplars_are_the_wei_et_al_eight():
    exemplars = tasks.GSM8K_COT_EXEMPLARS
    assert len(exemplars) == 8
    assert exemplars[0][0].startswith("There are 15 trees in the grove.")
    assert exemplars[1][0].startswith("If there are 3 cars in the parking lot")
    assert [answer for _, _, answer in exemplars] == ["6", "5", "39", "8", "9", "29", "33", "8"]
    assert all(answer in reasoning for _, reasoning, answer in exemplars)


@pytest.mark.parametrize("k", [-1, 9, 2.0, True])
def test_gsm8k_rejects_bad_num_fewshot(k):
    with pytest.raises(ValueError, match="num_fewshot"):
        get_task("gsm8k", num_fewshot=k)


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
        ("Total: 1,000 + 234.\n#### 1,234", "1234", "1234"),
        ("#### $1,234.50", "1234.5", "1234.5"),
        ("The profit is $70,000.\n#### $70,000", "70000", "70000"),
        ("#### 18.", "18", "18"),
        ("#### 18.00", "18", "18"),
        ("#### -5", "-5", "-5"),
        ("The temperature drops to 2 - 7 = -5 degrees.\n#### -5 degrees", "-5", "-5"),
        ("#### 0.25", "0.25", "0.25"),
        ("#### 007", "7", "7"),
        ("####18", "18", "18"),
        ("First #### 3 then a correction.\n#### 4", "4", "4"),  # the last ####; lm-eval takes the first
        # no "####": strict fails, flexible takes the last number (lm-eval "flexible-extract")
        ("So she makes 9 * 2 = $18 every day.", None, "18"),
        ("5 - 3 = 2", None, "2"),
        ("It is 12.5 meters long.", None, "12.5"),
        ("She pays $1,234.50 in total.", None, "1234.5"),
        ("#### \nThe answer is 42.", None, "42"),  # strict: only whitespace or $ between #### and the number
        ("The answer is 42. #### unknown", None, "42"),
        ("#### unknown", None, None),
        ("I cannot solve this.", None, None),
        ("", None, None),
    ],
)
def test_gsm8k_extract_answer(text, strict, flexible):
    task = get_task("gsm8k")
    assert task.extract_answer(text) == strict  # strict is the default
    assert task.extract_answer(text, mode="strict") == strict
    assert task.extract_answer(text, mode="flexible") == flexible


@pytest.mark.parametrize(
    ("text", "expected_strict"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72", "72"),
        ("He has 3 + 4 = 7 apples.", None),
        ("Total: $1,000", None),
        ("It costs 5 dollars, so 10 in all.", None),
    ],
)
def test_gsm8k_modes_agree_with_lm_eval_regexes(text, expected_strict):
    # lm-evaluation-harness gsm8k.yaml: strict-match "#### (\-?[0-9\.\,]+)" (first match) and
    # flexible-extract "(-?[$0-9.,]{2,})|(-?[0-9]+)" (group_select -1: the last match)
    lm_eval_strict = re.findall(r"#### (\-?[0-9\.\,]+)", text)
    lm_eval_flexible = re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", text)
    task = get_task("gsm8k")
    assert task.extract_answer(text, mode="strict") == expected_strict
    assert expected_strict == (normalize_number(lm_eval_strict[0]) if lm_eval_strict else None)
    flexible = expected_strict or normalize_number("".join(lm_eval_flexible[-1]))
    assert task.extract_answer(text, mode="flexible") == flexible


def test_answer_mode_must_be_strict_or_flexible():
    with pytest.raises(ValueError, match=r"mode must be one of \['strict', 'flexible'\], got 'loose'"):
        get_task("gsm8k").extract_answer("#### 3", mode="loose")
    with pytest.raises(ValueError, match="got 'loose'"):
        get_task("arc_challenge").extract_answer("The answer is B", mode="loose")
    with pytest.raises(ValueError, match="got 'loose'"):
        get_task("persistbench").extract_answer("x", mode="loose")


@pytest.mark.parametrize(
    ("response", "gold", "strict", "flexible"),
    [
        ("... so 70000.\n#### 70,000", "70000", True, True),
        ("#### $70,000.00", "70000", True, True),
        ("#### 70001", "70000", False, False),
        ("#### -3", "3", False, False),
        ("No final number here.", "3", False, False),
        ("#### 2.5", "2.5", True, True),
        ("So the answer is 18.", "18", False, True),
    ],
)
def test_gsm8k_is_correct(response, gold, strict, flexible):
    ex = Example(uid="gsm8k/test/0", question="q?", answer=gold)
    assert get_task("gsm8k").is_correct(response, ex) is strict
    assert get_task("gsm8k").is_correct(response, ex, mode="flexible") is flexible
    assert get_task("svamp").is_correct(response, ex, mode="flexible") is flexible


def test_gsm8k_gold_parsed_from_worked_solution(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm.jsonl",
        [
            {"question": "A? B?", "answer": "Some work: 1000 + 234 = 1234.\n#### 1,234"},
            {"question": "C?", "answer": 42},
            {"question": "D?", "answer": "$-7.0"},
        ],
    )
    examples = get_task("gsm8k").load(str(path))
    assert [ex.answer for ex in examples] == ["1234", "42", "-7"]
    assert [ex.uid for ex in examples] == ["gsm8k/gsm/0", "gsm8k/gsm/1", "gsm8k/gsm/2"]


def test_is_correct_raises_for_partial_examples(gsm8k_offline):
    partial = get_task("gsm8k").partial(gsm8k_offline[0], random.Random(0))
    assert partial.answer is None
    with pytest.raises(ValueError, match="no gold answer"):
        get_task("gsm8k").is_correct("#### 18", partial)


# -- ARC --------------------------------------------------------------------------------------------


def test_arc_numeric_labels_map_to_letters(tmp_path):
    rows = [
        {"question": "Which is a metal?", "choices": {"text": ["wood", "iron", "glass", "paper"],
                                                      "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
        {"question": "Pick D.", "choices": {"text": ["a", "b", "c", "d", "e"],
                                            "label": ["A", "B", "C", "D", "E"]}, "answerKey": "D"},
        {"question": "Pick 3.", "choices": ["x", "y", "z"], "labels": ["1", "2", "3"], "answer": "3"},
    ]
    examples = get_task("arc_easy").load(str(write_jsonl(tmp_path / "arc.jsonl", rows)))
    assert examples[0].choices == (("A", "wood"), ("B", "iron"), ("C", "glass"), ("D", "paper"))
    assert examples[0].answer == "B"
    assert examples[1].answer == "D" and len(examples[1].choices) == 5
    assert examples[2].answer == "C" and [label for label, _ in examples[2].choices] == ["A", "B", "C"]
    content = get_task("arc_easy").messages(examples[0])[0]["content"]
    assert "Which is a metal?\nA. wood\nB. iron\nC. glass\nD. paper" in content
    assert '"The answer is X"' in content


def test_arc_answer_must_be_a_label(tmp_path):
    row = {"question": "Q?", "choices": ["a", "b"], "labels": ["A", "B"], "answer": "C"}
    with pytest.raises(ValueError, match=r'arc.jsonl line 1: field "answer" is \'C\''):
        get_task("arc_challenge").load(str(write_jsonl(tmp_path / "arc.jsonl", [row])))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Days get shorter. The answer is C", "C"),
        ("The answer is (B).", "B"),
        ("the answer is B.", "B"),
        ("THE ANSWER IS D", "D"),
        ("Therefore, the answer is **A**.", "A"),
        ("The answer is: **(C) Planetary days will become shorter.**", "C"),
        ("The answer is option B", "B"),
        ("The answer is $\\boxed{C}$.", "C"),
        ("The answer is A. Wait, no. The answer is D.", "D"),
        ("I think it is B.", None),
        ("The answer is a tricky one.", None),
        ("The answer is Apples.", None),
        ("", None),
    ],
)
def test_arc_extract_answer(text, expected):
    task = get_task("arc_challenge")
    assert task.extract_answer(text) == expected
    assert task.extract_answer(text, mode="flexible") == expected  # flexible keeps every strict answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # "Answer: X" and "the correct choice/option is X"
        ("Answer: B", "B"),
        ("Reasoning first.\n**Answer:** (D)", "D"),
        ("Final answer: C.", "C"),
        ("The correct choice is B because metals conduct.", "B"),
        ("The correct option is (A).", "A"),
        ("the correct choice is: **D**", "D"),
        ("Answer: B. Hmm, the correct option is C.", None),  # explicit letters that differ: unparsed
        ("Answer: B ... Answer: B", "B"),
        # a lone option letter at the start: plain, in parentheses or bold, alone or with "." / ")" and the text
        ("C", "C"),
        ("C.", "C"),
        ("C)", "C"),
        ("(C)", "C"),
        ("**C**", "C"),
        ("**C.** speed of Earth's rotation", "C"),
        ("C. speed of Earth's rotation", "C"),
        ("(C) speed of Earth's rotation", "C"),
        ("C) speed of Earth's rotation", "C"),
        ("  B\nBecause iron is a metal.", "B"),
        # not a lone letter
        ("A good question. Plants need light.", None),
        ("I think the Earth rotates.", None),
        ("Cats are mammals.", None),
        ("c. speed", None),  # lowercase
        ("The Earth rotates. C.", None),  # not at the start
        # a response that lists the options (several different letters at line starts) is unparsed
        ("A. wood\nB. iron\nC. glass\nD. paper", None),
        ("(A) wood\n(B) iron", None),
        ("C. glass\nD. paper", None),
        ("**A.** wood\n**B.** iron", None),
        # ... unless an explicit statement chooses one
        ("A. wood\nB. iron\nC. glass\nD. paper\n\nAnswer: B", "B"),
    ],
)
def test_arc_flexible_rules(text, expected):
    task = get_task("arc_challenge")
    assert task.extract_answer(text, mode="flexible") == expected
    assert task.extract_answer(text, mode="strict") is None  # none of these says "the answer is X"


def test_arc_is_correct():
    ex = Example(uid="u", question="q", answer="C", choices=(("A", "a"), ("B", "b"), ("C", "c")))
    task = get_task("arc_challenge")
    assert task.is_correct("reasoning... The answer is (C)", ex)
    assert not task.is_correct("reasoning... The answer is (B)", ex)
    assert not task.is_correct("C. speed of Earth's rotation", ex)
    assert task.is_correct("C. speed of Earth's rotation", ex, mode="flexible")
    assert not task.is_correct("A. a\nB. b\nC. c", ex, mode="flexible")


# -- partial prompts -----------------------------------------------------------------------------


def _sentences(text):
    return [sentence.strip() for sentence in split_sentences(text)]


def test_split_sentences_keeps_abbreviations_and_decimals_together():
    text = "Mr. Smith paid $2.50 for 1.5 lbs. of tea. Then he left! How much is 1 lb? Round up."
    assert _sentences(text) == [
        "Mr. Smith paid $2.50 for 1.5 lbs. of tea.",
        "Then he left!",
        "How much is 1 lb?",
        "Round up.",
    ]
    assert "".join(split_sentences(text)) == text


def test_gsm8k_partial_drops_exactly_one_sentence_and_keeps_the_question(gsm8k_offline):
    task = get_task("gsm8k")
    rng = random.Random(0)
    made = 0
    for ex in gsm8k_offline:
        original = _sentences(ex.question)
        partial = task.partial(ex, rng)
        if len(original) == 1:
            assert partial is None
            continue
        made += 1
        remaining = _sentences(partial.question)
        assert len(remaining) == len(original) - 1
        assert remaining[-1] == original[-1]
        dropped = [i for i in range(len(original)) if original[:i] + original[i + 1 :] == remaining]
        assert dropped and dropped[0] != len(original) - 1
        assert partial.uid == ex.uid + "#partial"
        assert partial.answer is None
    assert made == 1319 - 16  # 16 GSM8K test questions are a single sentence


def test_partial_protects_the_question_sentence_before_a_trailing_instruction():
    ex = Example(uid="u", question="Tea costs $2. He buys 3. What is the cost? (Round to the nearest integer.)", answer="6")
    for seed in range(20):
        partial = get_task("gsm8k").partial(ex, random.Random(seed))
        assert "What is the cost?" in partial.question
        assert partial.question.endswith("(Round to the nearest integer.)")


def test_partial_returns_none_for_one_sentence_questions():
    task = get_task("arc_challenge")
    ex = Example(uid="u", question="Which gas do plants absorb from the air?", answer="A",
                 choices=(("A", "carbon dioxide"), ("B", "neon")))
    assert task.partial(ex, random.Random(0)) is None
    ex_two = Example(uid="u", question="What is the total cost? Round to the nearest dollar.", answer="A")
    assert task.partial(ex_two, random.Random(0)) is None  # question sentence and last sentence protected


def test_partial_is_deterministic_for_a_seed(gsm8k_offline):
    task = get_task("gsm8k")
    long_questions = [ex for ex in gsm8k_offline if len(split_sentences(ex.question)) >= 5][:30]
    first = [task.partial(ex, random.Random(7)).question for ex in long_questions]
    second = [task.partial(ex, random.Random(7)).question for ex in long_questions]
    other = [task.partial(ex, random.Random(8)).question for ex in long_questions]
    assert first == second
    assert first != other


def test_arc_partial_keeps_choices():
    examples = get_task("arc_challenge").load("offline")
    ex = next(ex for ex in examples if len(split_sentences(ex.question)) >= 3)
    partial = get_task("arc_challenge").partial(ex, random.Random(0))
    assert partial.choices == ex.choices
    assert len(_sentences(partial.question)) == len(_sentences(ex.question)) - 1


# -- personalization ------------------------------------------------------------------------------


def test_persistbench_messages_contain_context_only_when_present(persistbench_offline):
    task = get_task("persistbench")
    ex = persistbench_offline[0]
    content = task.messages(ex)[0]["content"]
    assert content == f"Here is what you know about me:\n{ex.context}\n\n{ex.question}"
    partial = task.partial(ex, random.Random(0))
    assert partial.context is None and partial.question == ex.question
    assert partial.uid == ex.uid + "#partial"
    assert task.messages(partial) == [{"role": "user", "content": ex.question}]
    assert task.partial(partial, random.Random(0)) is None


def test_persistbench_with_context_swaps_the_context(persistbench_offline):
    task = get_task("persistbench")
    ex, other = persistbench_offline[0], persistbench_offline[300]
    swapped = task.with_context(ex, other.context)
    assert swapped.question == ex.question and swapped.context == other.context
    assert swapped.uid.startswith(ex.uid + "#context-") and swapped.uid != ex.uid
    content = task.messages(swapped)[0]["content"]
    assert other.context in content and ex.context not in content
    assert task.with_context(ex, None).context is None


def test_persistbench_is_correct_raises_and_extract_is_none(persistbench_offline):
    task = get_task("persistbench")
    assert task.extract_answer("anything") is None
    with pytest.raises(ValueError, match="has_answers=False"):
        task.is_correct("anything", persistbench_offline[0])


def test_with_context_raises_for_tasks_without_context(gsm8k_offline):
    with pytest.raises(ValueError, match="gsm8k examples have no user context"):
        get_task("gsm8k").with_context(gsm8k_offline[0], "- likes tea")


def test_persistbench_local_jsonl_accepts_string_memories(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [{"query": "Plan my week.", "memories": "I work nights."}, {"query": "Hi?", "memories": []}],
    )
    examples = get_task("persistbench").load(str(path))
    assert examples[0].context == "I work nights." and examples[0].uid == "persistbench/mine/0"
    assert examples[1].context is None


# -- generic jsonl ------------------------------------------------------------------------------


def test_jsonl_task_with_numeric_and_string_answers(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [{"prompt": "2 + 2?", "gold": 4}, {"prompt": "Capital of France?", "gold": "Paris"}],
    )
    task = get_task("jsonl", path=str(path), question_field="prompt", answer_field="gold",
                     system_prompt="End with #### <answer>.")
    numeric, text = task.load()
    assert (numeric.answer, text.answer) == ("4", "Paris")
    assert task.messages(numeric) == [
        {"role": "system", "content": "End with #### <answer>."},
        {"role": "user", "content": "2 + 2?"},
    ]
    assert task.is_correct("2 + 2 = 4\n#### 4.0", numeric)
    assert not task.is_correct("#### 5", numeric)
    assert task.is_correct("It is Paris.\n#### paris.", text)
    assert not task.is_correct("Thinking...\nParis", text)  # strict: only after ####
    assert task.is_correct("Thinking...\nParis", text, mode="flexible")  # flexible: the last line
    assert not task.is_correct("2 + 2 is 4", numeric)
    assert task.is_correct("2 + 2 is 4", numeric, mode="flexible")
    assert not task.is_correct("#### Lyon", text, mode="flexible")
    assert task.load(str(path)) == [numeric, text]  # a path as source overrides nothing else


def test_jsonl_task_with_context_and_without_answers(tmp_path):
    path = write_jsonl(tmp_path / "ctx.jsonl", [{"question": "What should I cook?", "facts": ["I am vegan."]}])
    task = get_task("jsonl", path=str(path), answer_field=None, context_field="facts")
    (ex,) = task.load()
    assert ex.context == "- I am vegan." and ex.answer is None and not task.has_answers
    assert "- I am vegan." in task.messages(ex)[0]["content"]
    assert task.partial(ex, random.Random(0)).context is None
    assert task.with_context(ex, "- I eat meat.").context == "- I eat meat."
    with pytest.raises(ValueError, match="has_answers=False"):
        task.is_correct("x", ex)


def test_jsonl_task_without_path_or_with_hub_is_rejected():
    with pytest.raises(ValueError, match="set the path option"):
        get_task("jsonl").load()
    with pytest.raises(ValueError, match="no hub source"):
        get_task("jsonl", path="x.jsonl").load("hub")


def test_jsonl_task_load_splits(tmp_path):
    rows = [{"question": f"Question number {i}?", "answer": i} for i in range(30)]
    task = get_task("jsonl", path=str(write_jsonl(tmp_path / "d.jsonl", rows)))
    train, evaluation = load_splits(task, "auto", num_train=20, num_eval=10, seed=0)
    assert {ex.uid for ex in train} | {ex.uid for ex in evaluation} == {f"jsonl/d/{i}" for i in range(30)}


# -- error messages -----------------------------------------------------------------------------


GOOD_GSM8K_ROW = {"question": "How many?", "answer": "3"}


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ({"answer": "3"}, r'bad\.jsonl line 3: field "question" is missing \(expected a non-empty string\)'),
        ({"question": "   ", "answer": "3"}, r'bad\.jsonl line 3: field "question" is empty \(expected a non-empty string\)'),
        ({"question": 5, "answer": "3"}, r'bad\.jsonl line 3: field "question" has type int'),
        ({"question": "Q?"}, r'bad\.jsonl line 3: field "answer" is missing \(expected a number or a worked solution'),
        ({"question": "Q?", "answer": "many"}, r'bad\.jsonl line 3: field "answer" is \'many\''),
        ('{"question": "Q?", "answer": ', r"bad\.jsonl line 3: invalid JSON"),
        ("[1, 2]", r"bad\.jsonl line 3: expected a JSON object, got list"),
    ],
)
def test_gsm8k_bad_rows_name_file_line_and_field(tmp_path, bad_row, expected):
    # line 2 is blank: line numbers count physical lines
    path = tmp_path / "bad.jsonl"
    bad_line = bad_row if isinstance(bad_row, str) else json.dumps(bad_row)
    path.write_text(json.dumps(GOOD_GSM8K_ROW) + "\n\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=expected):
        get_task("gsm8k").load(str(path))


def test_persistbench_bad_memories_are_reported(tmp_path):
    path = write_jsonl(tmp_path / "pb.jsonl", [{"query": "Hi", "memories": ["ok", ""]}])
    with pytest.raises(ValueError, match=r'pb\.jsonl line 1: field "memories" item 2 is \'\''):
        get_task("persistbench").load(str(path))


def test_jsonl_task_missing_answer_suggests_answer_field_none(tmp_path):
    path = write_jsonl(tmp_path / "open.jsonl", [{"question": "Tell me a story."}])
    with pytest.raises(ValueError, match=r'open\.jsonl line 1: field "answer" is missing .*answer_field=None'):
        get_task("jsonl", path=str(path)).load()


def test_empty_file_is_reported(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file has no rows"):
        get_task("gsm8k").load(str(path))


def test_number_helpers():
    assert normalize_number("-0.0") == "0"
    assert normalize_number("1,234,567") == "1234567"
    assert normalize_number("12 apples") is None
    assert extract_number("\u22123 degrees") == "-3"


@pytest.mark.parametrize("text, number", [
    ("The Lions won 35\u201328.", "28"),  # an en dash between digits: a score, not -28
    ("The Lions won 35 \u2013 28.", "28"),
    ("The final was 35\u201428.", "28"),  # an em dash too
    ("Prices run $10\u2013$20", "20"),
    ("Pages 1.5\u20132.5", "2.5"),
    ("It fell to \u22123 degrees", "-3"),  # the minus sign
    ("It fell to \u20133 degrees", "-3"),  # an en dash before a number, a space before it: still a minus
    ("\u20137", "-7"),
    ("5 \u2212 8 = \u22123", "-3"),
    ("35-28", "-28"),  # an ASCII hyphen is read as lm-eval's regex reads it
])
def test_en_and_em_dashes_between_numbers_separate_them(text, number):
    assert extract_number(text, "flexible") == number
    assert get_task("gsm8k").extract_answer(text, "flexible") == number


def test_a_dash_between_numbers_is_no_sign_after_the_marker_or_in_a_gold_answer():
    assert extract_number("#### \u20135", "strict") == "-5"
    assert extract_number("#### 35\u201328", "strict") == "35"  # the number after ####, never -28
    assert normalize_number("\u20135") == "-5" and normalize_number("\u2212 5") == "-5"
    assert normalize_number("35\u201328") is None  # two numbers, not one
