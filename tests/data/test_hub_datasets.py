"""The hub datasets through small fixtures in each dataset's hub schema (tests/fixtures/README.md).

Every loader is fed its fixture two ways: as rows handed to the task in place of
``sources.load_hub_rows`` (no ``datasets`` needed), and, when ``datasets`` is installed, through the
real ``load_hub_rows`` with ``datasets.load_dataset`` redirected to ``load_dataset("json", ...)``
on the fixture, which proves the schema loads and that what ``datasets`` returns (null-filled
nested keys, float columns) parses the same.
"""

from __future__ import annotations

import csv
import random
import re
import sys
from pathlib import Path

import pytest

from mipo.data.tasks import (
    GSM8K_COT_EXEMPLARS,
    get_task,
    load_splits,
    sources,
    split_sentences,
)
from mipo.negatives import plan_negatives
from mipo.runtime.files import read_jsonl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

PRISM = "HannahRoseKirk/prism-alignment"
COMMUNITY = "facebook/community-alignment-dataset"
MULTIFACETED = "kaist-ai/Multifaceted-Bench"

# (hub dataset, config, split) -> fixture file
HUB_FILES = {
    ("openai/gsm8k", "main", "train"): "gsm8k/train.jsonl",
    ("openai/gsm8k", "main", "test"): "gsm8k/test.jsonl",
    ("ChilleD/SVAMP", None, "train"): "svamp/train.jsonl",
    ("ChilleD/SVAMP", None, "test"): "svamp/test.jsonl",
    ("allenai/ai2_arc", "ARC-Easy", "train"): "arc_easy/train.jsonl",
    ("allenai/ai2_arc", "ARC-Easy", "test"): "arc_easy/test.jsonl",
    (PRISM, "conversations", "train"): "prism/conversations.jsonl",
    (PRISM, "survey", "train"): "prism/survey.jsonl",
    (COMMUNITY, None, "filtered"): "community_alignment/filtered.jsonl",
    (MULTIFACETED, None, "train"): "multifaceted_bench/train.jsonl",
}
PERSONALIZATION = ["prism", "community_alignment", "multifaceted_bench"]
HUB_TASKS = ["gsm8k", "svamp", "arc_easy", *PERSONALIZATION]


def fixture_rows(key):
    return [row for _, row in read_jsonl(FIXTURES / HUB_FILES[key])]


def serve_rows(monkeypatch, tables=None):
    """Answer ``load_hub_rows`` from the fixtures (``tables`` overrides some); return the calls."""
    tables = {**{key: fixture_rows(key) for key in HUB_FILES}, **(tables or {})}
    calls = []

    def load_hub_rows(dataset, config, split):
        calls.append((dataset, config, split))
        return sources.hub_rows(dataset, config, split, tables[(dataset, config, split)])

    monkeypatch.setattr(sources, "load_hub_rows", load_hub_rows)
    return calls


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_datasets")


def serve_datasets(monkeypatch, cache_dir):
    """Run the real ``load_hub_rows``, with ``datasets.load_dataset`` reading the fixture JSONL."""
    datasets = pytest.importorskip("datasets")
    real_load_dataset = datasets.load_dataset

    def load_dataset(path, name=None, split=None, **kwargs):
        data_file = str(FIXTURES / HUB_FILES[(path, name, split)])
        return real_load_dataset("json", data_files=data_file, split="train", cache_dir=str(cache_dir))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


@pytest.fixture(params=["rows", "datasets"])
def hub(request, monkeypatch, hf_cache):
    """The fixtures served as plain rows, or through ``datasets`` (skipped when not installed)."""
    if request.param == "rows":
        serve_rows(monkeypatch)
    else:
        serve_datasets(monkeypatch, hf_cache)
    return request.param


# -- where each task reads from ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected_calls"),
    [
        ("gsm8k", {("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")}),
        ("svamp", {("ChilleD/SVAMP", None, "train"), ("ChilleD/SVAMP", None, "test")}),
        ("arc_easy", {("allenai/ai2_arc", "ARC-Easy", "train"), ("allenai/ai2_arc", "ARC-Easy", "test")}),
        ("prism", {(PRISM, "conversations", "train"), (PRISM, "survey", "train")}),
        ("community_alignment", {(COMMUNITY, None, "filtered")}),
        ("multifaceted_bench", {(MULTIFACETED, None, "train")}),
    ],
)
def test_load_splits_reads_the_documented_hub_splits(monkeypatch, name, expected_calls):
    calls = serve_rows(monkeypatch)
    load_splits(get_task(name), "hub", num_train=1, num_eval=1, seed=0)
    assert set(calls) == expected_calls


def test_hub_examples_are_the_same_through_datasets(monkeypatch, hf_cache):
    serve_rows(monkeypatch)
    from_rows = {name: get_task(name).load("hub") for name in HUB_TASKS}
    serve_datasets(monkeypatch, hf_cache)
    from_datasets = {name: get_task(name).load("hub") for name in HUB_TASKS}
    assert from_datasets == from_rows
    assert all(from_rows.values())


def test_datasets_reads_the_fixtures_with_the_documented_nesting(hf_cache):
    datasets = pytest.importorskip("datasets")

    def features(key):
        return datasets.load_dataset(
            "json", data_files=str(FIXTURES / HUB_FILES[key]), split="train", cache_dir=str(hf_cache)
        ).features

    def item(feature):  # the feature of a list's items (datasets 3 and 4 spell lists differently)
        return feature.feature if hasattr(feature, "feature") else feature[0]

    conversations = features((PRISM, "conversations", "train"))
    assert set(item(conversations["conversation_history"])) == {
        "turn", "role", "content", "model_provider", "model_name", "score", "if_chosen", "within_turn_id",
    }
    assert {"self_description", "system_string", "user_id"} <= set(features((PRISM, "survey", "train")))
    multifaceted = features((MULTIFACETED, None, "train"))
    assert list(multifaceted) == ["source", "preference_set", "system", "prompt", "reference_answer", "rubrics"]
    assert set(item(multifaceted["rubrics"])["score_descriptions"]) == {"1", "2", "3", "4", "5"}
    assert set(features(("allenai/ai2_arc", "ARC-Easy", "test"))["choices"]) == {"text", "label"}
    svamp = features(("ChilleD/SVAMP", None, "test"))
    assert list(svamp) == ["ID", "Body", "Question", "Equation", "Answer", "Type", "question_concat"]
    assert svamp["Answer"].dtype == "float64"


# -- math and multiple choice --------------------------------------------------------------------


def test_gsm8k_hub_splits(hub):
    task = get_task("gsm8k")
    train, test = task.load("hub", "train"), task.load("hub")
    assert [ex.answer for ex in train] == ["12", "210", "45", "8"]
    assert [ex.answer for ex in test] == ["43", "18", "1000"]
    assert [ex.uid for ex in test] == ["gsm8k/test/0", "gsm8k/test/1", "gsm8k/test/2"]
    assert test[0].question.startswith("Maria has 5 boxes") and test[0].reference is None


def test_svamp_hub_rows_join_body_and_question(hub):
    task = get_task("svamp")
    train, test = task.load("hub", "train"), task.load("hub")
    assert train[0].question == "Jack had 8 pens and Mary had 5 pens. Jack gave 3 pens to Mary. How many pens does Jack have now?"
    assert [ex.answer for ex in train] == ["5", "145", "51", "11"]
    assert [ex.answer for ex in test] == ["9", "17", "7.5"]
    assert [ex.uid for ex in test] == ["svamp/test/0", "svamp/test/1", "svamp/test/2"]
    assert task.is_correct("3 * 2.5 = 7.5\n#### 7.5", test[2]) and not task.is_correct("#### 7", test[2])


def test_svamp_prompt_is_gsm8ks(hub):
    ex = get_task("svamp").load("hub")[0]
    svamp_content = get_task("svamp").messages(ex)[0]["content"]
    assert svamp_content == get_task("gsm8k").messages(ex)[0]["content"]
    assert svamp_content.endswith(f"Question: {ex.question}\nAnswer:")
    assert all(question in svamp_content for question, _, _ in GSM8K_COT_EXEMPLARS)
    assert get_task("svamp", num_fewshot=0).messages(ex)[0]["content"].count("Question: ") == 1


def test_svamp_partial_drops_one_body_sentence_and_keeps_the_question(hub):
    task = get_task("svamp")
    rows = fixture_rows(("ChilleD/SVAMP", None, "train")) + fixture_rows(("ChilleD/SVAMP", None, "test"))
    examples = task.load("hub", "train") + task.load("hub")
    for seed in range(5):
        for row, ex in zip(rows, examples):
            partial = task.partial(ex, random.Random(seed))
            assert partial.uid == ex.uid + "#partial" and partial.answer is None
            assert partial.question.endswith(row["Question"])
            body = [s.strip() for s in split_sentences(row["Body"])]
            kept = [s.strip() for s in split_sentences(partial.question.removesuffix(row["Question"]))]
            if row["Body"].rstrip()[-1] in ".!?":  # the Body ends a sentence: one of its sentences goes
                assert len(kept) == len(body) - 1 and all(sentence in body for sentence in kept)
    # a Body without a final full stop runs into the question, which keeps that sentence
    no_stop = examples[2]
    assert task.partial(no_stop, random.Random(0)).question == (
        "If there is a discount of 25 dollars on each pack How much do you have to pay to buy each pack?"
    )
    assert task.partial(examples[-1], random.Random(0)).question == "How much do 3 bags weigh?"


def test_arc_easy_hub_rows(hub):
    task = get_task("arc_easy")
    train, test = task.load("hub", "train"), task.load("hub")
    assert [ex.answer for ex in train] == ["B", "C", "B"]
    assert train[2].choices == (("A", "light"), ("B", "sound"), ("C", "heat"))  # labels "1".."3"
    assert [ex.answer for ex in test] == ["C", "B", "A"]
    assert [label for label, _ in test[2].choices] == ["A", "B", "C", "D", "E"]
    assert test[1].uid == "arc_easy/test/1"


# -- personalization -----------------------------------------------------------------------------


def test_prism_joins_conversations_with_the_survey(hub):
    examples = get_task("prism").load("hub")
    assert [ex.uid for ex in examples] == [f"prism/train/{i}" for i in range(5)]
    first = examples[0]
    assert first.question == "What should I cook for a dinner party of six?"
    assert first.context == (
        "- About me: I value honesty and hard work. Family comes first for me, and I try to treat everyone "
        "with respect.\n- How I want an AI assistant to behave: Be direct and concise. Give balanced views on "
        "political topics and never lecture me."
    )
    # the opening-turn response marked if_chosen, not the chosen response of turn 1
    assert [ex.reference for ex in examples] == [
        "A taco bar lets everyone choose.",
        "It has low emissions but waste is a concern.",
        "Use a hands-on greenhouse experiment.",
        "They are injections.",
        "Talk to your pastor first.",
    ]
    assert examples[0].context == examples[1].context != examples[2].context  # one participant, two chats
    assert first.answer is None


def test_prism_profile_fields_option(hub):
    (first, *_) = get_task("prism", profile_fields=["system_string"]).load("hub")
    assert first.context == (
        "- How I want an AI assistant to behave: Be direct and concise. Give balanced views on political "
        "topics and never lecture me."
    )
    with pytest.raises(ValueError, match=r"prism: profile_fields must be distinct names from \['self_description'"):
        get_task("prism", profile_fields=["age"])


def test_community_alignment_rows(hub):
    examples = get_task("community_alignment").load("hub")
    assert [ex.uid for ex in examples] == [f"community_alignment/filtered/{i}" for i in range(4)]  # French row left out
    first = examples[0]
    assert first.question == "How should I plan a weekend trip on a budget?"
    assert first.context == (
        "- Country: United States\n- Age: 18-34\n- Gender: Female\n- Education: Post-secondary graduate\n"
        "- Ethnicity: White\n- Political leaning: Somewhat left-leaning"
    )
    assert first.reference == "Camp at a state park."  # <|end_of_text|> removed
    assert examples[1].reference == "Find a conversation partner."
    assert "Political leaning" not in examples[2].context  # empty cell left out
    assert examples[2].reference is None  # no preference given
    assert examples[3].reference == "Watch films with subtitles."


def test_community_alignment_language_options(hub):
    assert len(get_task("community_alignment", languages=None).load("hub")) == 5
    (french,) = get_task("community_alignment", languages=["fr"]).load("hub")
    assert french.question.startswith("Quelle est") and french.reference == "Ajoutez du cumin."
    with pytest.raises(ValueError, match=r"community_alignment: languages must be distinct names from \['en'"):
        get_task("community_alignment", languages=["english"])


def test_community_alignment_csv_cells_parse_like_json(monkeypatch, tmp_path, hf_cache):
    """The hub files are CSV: empty cells, integer and boolean columns as ``datasets`` reads them."""
    datasets = pytest.importorskip("datasets")
    key = (COMMUNITY, None, "filtered")
    rows = fixture_rows(key)
    path = tmp_path / "filtered_community_alignment.csv"
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    table = datasets.load_dataset("csv", data_files=str(path), split="train", cache_dir=str(hf_cache))
    assert table.features["annotator_political"].dtype in ("string", "large_string")
    assert table[3]["annotator_political"] is None and table[3]["first_turn_preferred_response"] is None
    serve_rows(monkeypatch)
    from_json = get_task("community_alignment", languages=None).load("hub")
    serve_rows(monkeypatch, {key: list(table)})
    assert get_task("community_alignment", languages=None).load("hub") == from_json


def test_multifaceted_bench_rows_and_system_prompt(hub):
    task = get_task("multifaceted_bench")
    examples = task.load("hub")
    assert [ex.uid for ex in examples] == [f"multifaceted_bench/train/{i}" for i in range(4)]
    first = examples[0]
    assert first.question == "How do I change a flat bicycle tire?"
    assert first.context.startswith("You are a patient guide for complete beginners.")
    assert first.reference.startswith("Shift to the smallest gear")
    assert task.messages(first) == [
        {"role": "system", "content": first.context},
        {"role": "user", "content": first.question},
    ]
    assert task.messages(task.partial(first, random.Random(0))) == [{"role": "user", "content": first.question}]


@pytest.mark.parametrize("name", PERSONALIZATION)
def test_personalization_partial_and_with_context(hub, name):
    task = get_task(name)
    assert (task.has_answers, task.supports_context, task.max_new_tokens) == (False, True, 512)
    examples = task.load("hub")
    ex = examples[0]
    other = next(e for e in examples if e.context not in (None, ex.context))

    def text(example):
        return "\n".join(message["content"] for message in task.messages(example))

    partial = task.partial(ex, random.Random(0))
    assert (partial.uid, partial.question, partial.context, partial.reference) == (
        ex.uid + "#partial", ex.question, None, ex.reference,
    )
    assert text(partial) == ex.question
    assert ex.context in text(ex) and ex.question in text(ex)
    assert task.partial(partial, random.Random(0)) is None

    swapped = task.with_context(ex, other.context)
    assert (swapped.question, swapped.context) == (ex.question, other.context)
    assert swapped.uid.startswith(ex.uid + "#context-")
    assert other.context in text(swapped) and ex.context not in text(swapped)
    with pytest.raises(ValueError, match="has_answers=False"):
        task.is_correct("anything", ex)


@pytest.mark.parametrize("name", PERSONALIZATION)
@pytest.mark.parametrize("strategy", ["partial", "random_context"])
def test_personalization_negatives(monkeypatch, name, strategy):
    serve_rows(monkeypatch)
    task = get_task(name)
    examples = [ex for ex in task.load("hub") if ex.context is not None]
    plan = plan_negatives(task, examples, strategy, random.Random(0))
    assert plan.examples == examples and plan.dropped == 0
    for ex, negative in zip(plan.examples, plan.negatives):
        assert negative.question == ex.question and negative.context != ex.context
        assert task.messages(negative) != task.messages(ex)
        if strategy == "random_context":
            assert negative.context in {e.context for e in examples}


# -- splits -------------------------------------------------------------------------------------


def _keys(examples):
    return {" ".join(ex.question.split()).casefold() for ex in examples}


@pytest.mark.parametrize(
    ("name", "num_train", "num_eval", "train_prefix", "eval_prefix"),
    [
        ("gsm8k", None, 2, "gsm8k/train/", "gsm8k/test/"),
        ("svamp", 3, None, "svamp/train/", "svamp/test/"),
        ("arc_easy", None, None, "arc_easy/train/", "arc_easy/test/"),
        ("prism", 3, 2, "prism/train/", "prism/train/"),
        ("community_alignment", None, 1, "community_alignment/filtered/", "community_alignment/filtered/"),
        ("multifaceted_bench", None, 1, "multifaceted_bench/train/", "multifaceted_bench/train/"),
    ],
)
def test_hub_load_splits_are_disjoint_and_deterministic(monkeypatch, name, num_train, num_eval, train_prefix, eval_prefix):
    serve_rows(monkeypatch)
    task = get_task(name)
    for seed in range(4):
        train, evaluation = load_splits(task, "hub", num_train=num_train, num_eval=num_eval, seed=seed)
        assert train and evaluation
        assert all(ex.uid.startswith(train_prefix) for ex in train)
        assert all(ex.uid.startswith(eval_prefix) for ex in evaluation)
        assert not {ex.uid for ex in train} & {ex.uid for ex in evaluation}
        assert not _keys(train) & _keys(evaluation)
        assert load_splits(task, "hub", num_train=num_train, num_eval=num_eval, seed=seed) == (train, evaluation)
        if num_eval is not None:
            assert len(evaluation) == num_eval


def test_single_split_datasets_keep_repeated_queries_on_one_side(monkeypatch):
    """Multifaceted-Bench rows 0 and 1 and Community Alignment rows 1 and 3 share a query."""
    serve_rows(monkeypatch)
    for name, shared in (("multifaceted_bench", "How do I change a flat bicycle tire?"),
                         ("community_alignment", "What is a good way to learn a new language?")):
        for seed in range(8):
            train, evaluation = load_splits(get_task(name), "hub", num_train=None, num_eval=1, seed=seed)
            sides = [side for side in (train, evaluation) if any(ex.question == shared for ex in side)]
            assert len(sides) == 1
            assert len(train) + len(evaluation) == (3 if evaluation[0].question == shared else 4)


# -- local copies and errors ---------------------------------------------------------------------


def test_local_files_load_like_the_hub(monkeypatch):
    serve_rows(monkeypatch)
    prism = get_task("prism")
    local = prism.load(str(FIXTURES / "prism" / "conversations.jsonl"))
    hub = prism.load("hub")
    assert [ex.uid for ex in local] == [f"prism/conversations/{i}" for i in range(5)]
    assert [(ex.question, ex.context, ex.reference) for ex in local] == [(ex.question, ex.context, ex.reference) for ex in hub]
    svamp = get_task("svamp").load(str(FIXTURES / "svamp" / "test.jsonl"))
    assert [ex.answer for ex in svamp] == ["9", "17", "7.5"]


def test_local_prism_needs_the_survey_beside_it(tmp_path):
    conversations = tmp_path / "conversations.jsonl"
    conversations.write_text((FIXTURES / "prism" / "conversations.jsonl").read_text(), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"survey\.jsonl: no such file; a local PRISM copy is conversations\.jsonl"):
        get_task("prism").load(str(conversations))


def test_prism_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"HannahRoseKirk/prism-alignment.*pip install datasets"):
        get_task("prism").load("hub")


def _set(field, value):
    def mutate(row):
        row[field] = value
    return mutate


def _drop(field):
    def mutate(row):
        del row[field]
    return mutate


def _chosen_content(value):
    def mutate(row):
        row["conversation_history"][3]["content"] = value
    return mutate


BAD_ROWS = [
    ("gsm8k", ("openai/gsm8k", "main", "test"), 1, _set("answer", "Work.\n#### many"),
     r"openai/gsm8k \(main, test\) row 2: field \"answer\" is 'many'"),
    ("svamp", ("ChilleD/SVAMP", None, "train"), 0, _drop("Body"),
     r"ChilleD/SVAMP \(train\) row 1: field \"Body\" is missing \(expected a non-empty string\)"),
    ("svamp", ("ChilleD/SVAMP", None, "test"), 2, _set("Answer", None),
     r"ChilleD/SVAMP \(test\) row 3: field \"Answer\" is missing"),
    ("arc_easy", ("allenai/ai2_arc", "ARC-Easy", "test"), 0, _set("answerKey", "E"),
     r"allenai/ai2_arc \(ARC-Easy, test\) row 1: field \"answerKey\" is 'E'"),
    ("prism", (PRISM, "conversations", "train"), 2, _set("opening_prompt", "  "),
     r"prism-alignment \(conversations, train\) row 3: field \"opening_prompt\" is empty"),
    ("prism", (PRISM, "conversations", "train"), 0, _set("user_id", "user9999"),
     r"\(conversations, train\) row 1: field \"user_id\" is 'user9999', which no survey row has"),
    ("prism", (PRISM, "conversations", "train"), 1, _set("conversation_history", "oops"),
     r"\(conversations, train\) row 2: field \"conversation_history\" has type str"),
    ("prism", (PRISM, "conversations", "train"), 0, _chosen_content(""),
     r"\(conversations, train\) row 1, conversation_history item 4: field \"content\" is empty"),
    ("prism", (PRISM, "survey", "train"), 1, _set("self_description", None),
     r"prism-alignment \(survey, train\) row 2: field \"self_description\" is missing"),
    ("prism", (PRISM, "survey", "train"), 3, _set("user_id", "user0001"),
     r"\(survey, train\) row 4: field \"user_id\" is 'user0001' again"),
    ("community_alignment", (COMMUNITY, None, "filtered"), 1, _set("first_turn_prompt", None),
     r"community-alignment-dataset \(filtered\) row 2: field \"first_turn_prompt\" is missing"),
    ("community_alignment", (COMMUNITY, None, "filtered"), 0, _set("first_turn_preferred_response", "response_e"),
     r"\(filtered\) row 1: field \"first_turn_preferred_response\" is 'response_e'"),
    ("community_alignment", (COMMUNITY, None, "filtered"), 1, _set("first_turn_response_c", None),
     r"\(filtered\) row 2: field \"first_turn_response_c\" is missing"),
    ("community_alignment", (COMMUNITY, None, "filtered"), 4, _set("assigned_lang", None),
     r"\(filtered\) row 5: field \"assigned_lang\" is missing"),
    ("community_alignment", (COMMUNITY, None, "filtered"), 0, _set("annotator_age", ["18", "34"]),
     r"\(filtered\) row 1: field \"annotator_age\" has type list"),
    ("multifaceted_bench", (MULTIFACETED, None, "train"), 2, _drop("system"),
     r"kaist-ai/Multifaceted-Bench \(train\) row 3: field \"system\" is missing"),
    ("multifaceted_bench", (MULTIFACETED, None, "train"), 0, _set("reference_answer", ""),
     r"\(train\) row 1: field \"reference_answer\" is empty"),
]


@pytest.mark.parametrize(("name", "key", "index", "mutate", "message"), BAD_ROWS,
                         ids=[f"{row[0]}-{i}" for i, row in enumerate(BAD_ROWS)])
def test_bad_hub_rows_name_the_row_and_field(monkeypatch, name, key, index, mutate, message):
    rows = fixture_rows(key)
    mutate(rows[index])
    serve_rows(monkeypatch, {key: rows})
    split = key[2] if key[2] == "train" and name in ("gsm8k", "svamp", "arc_easy") else None
    with pytest.raises(ValueError, match=message):
        get_task(name).load("hub", split)


def test_fixture_readme_lists_every_fixture():
    readme = (FIXTURES / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`([\w/]+\.jsonl)`", readme))
    assert listed == set(HUB_FILES.values())
