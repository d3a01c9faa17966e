"""Tests of the preference-pairs JSONL file (mipo/data/pairs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mipo.data.pairs import (
    PairsFileError,
    PreferencePair,
    identical_pairs_problem,
    max_identical_fraction,
    pairs_config_problems,
    read_pairs,
    write_pairs,
)


def _pairs() -> list[PreferencePair]:
    return [
        PreferencePair(
            prompt=[{"role": "user", "content": "Natalia sold clips to 48 friends. How many?"}],
            chosen="She sold 48 clips.\n#### 48",
            rejected="  The weather is nice — très beau. ",  # whitespace and non-ASCII kept verbatim
            metadata={"strategy": "random", "task": "gsm8k", "uid": "gsm8k/test/0", "answer": "48", "seed": 3,
                      "negative_prompt": [{"role": "user", "content": "What is the weather?"}],
                      "sampling": {"temperature": 0.1, "top_p": 0.9}},
        ),
        PreferencePair(
            prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}],
            chosen="Apple.",
            rejected="",  # the model ended its turn at once: legal where the row says it was sampled
            metadata={"rejected_finish_reason": "eos"},
        ),
    ]


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Bye."}]}


def test_round_trip(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = _pairs()
    write_pairs(path, pairs)
    assert read_pairs(path) == pairs


def test_written_lines_are_conversational_format(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pairs = _pairs()
    write_pairs(path, pairs)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(pairs)
    for line, pair in zip(lines, pairs):
        row = json.loads(line)
        assert row["prompt"] == pair.prompt
        assert row["chosen"] == [{"role": "assistant", "content": pair.chosen}]
        assert row["rejected"] == [{"role": "assistant", "content": pair.rejected}]
        for key, value in pair.metadata.items():
            assert row[key] == value


def test_standard_format_with_strings_is_read(tmp_path):
    path = _write_lines(tmp_path / "std.jsonl", [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "Paris", "extra": 1},
    ])
    (pair,) = read_pairs(path)
    assert pair.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert pair.chosen == "4"
    assert pair.rejected == "Paris"
    assert pair.metadata == {"extra": 1}


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n   \n" + json.dumps(GOOD) + "\n")
    assert len(read_pairs(path)) == 2


def _assert_located(error: pytest.ExceptionInfo, path: Path, line: int, field: str | None):
    message = str(error.value)
    assert str(path) in message, message
    assert f"line {line}" in message, message
    if field is not None:
        assert field in message, message


@pytest.mark.parametrize("missing", ["prompt", "chosen", "rejected"])
def test_missing_field_names_file_line_and_field(tmp_path, missing):
    bad = {k: v for k, v in GOOD.items() if k != missing}
    path = _write_lines(tmp_path / "p.jsonl", [GOOD, "", bad])  # the bad row is on line 3
    with pytest.raises(PairsFileError) as error:
        read_pairs(path)
    _assert_located(error, path, 3, missing)


@pytest.mark.parametrize("prompt", ["", "   ", [{"role": "user", "content": ""}], []])
def test_empty_prompt(tmp_path, prompt):
    path = _write_lines(tmp_path / "p.jsonl", [GOOD, {**GOOD, "prompt": prompt}])
    with pytest.raises(PairsFileError) as error:
        read_pairs(path)
    _assert_located(error, path, 2, "prompt")


def test_invalid_json(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", [GOOD, GOOD, '{"prompt": "x", "chosen": '])
    with pytest.raises(PairsFileError) as error:
        read_pairs(path)
    _assert_located(error, path, 3, None)
    assert "JSON" in str(error.value)


@pytest.mark.parametrize("row", ["[1, 2]", '"just a string"', "42"])
def test_non_object_line(tmp_path, row):
    path = _write_lines(tmp_path / "p.jsonl", [row])
    with pytest.raises(PairsFileError) as error:
        read_pairs(path)
    _assert_located(error, path, 1, None)


@pytest.mark.parametrize(
    "field, value",
    [
        ("prompt", [{"role": "user"}]),  # no content
        ("prompt", ["hello"]),  # not an object
        ("prompt", [{"role": "user", "content": 3}]),  # content not a string
        ("prompt", 17),
        ("chosen", [{"role": "user", "content": "x"}]),  # not an assistant message
        ("chosen", [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]),
        ("chosen", [{"role": "assistant"}]),
        ("rejected", []),
        ("rejected", {"role": "assistant", "content": "x"}),  # an object, not a list
        ("rejected", None),
    ],
)
def test_wrong_message_shape(tmp_path, field, value):
    path = _write_lines(tmp_path / "p.jsonl", [GOOD, GOOD, GOOD, {**GOOD, field: value}])
    with pytest.raises(PairsFileError) as error:
        read_pairs(path)
    _assert_located(error, path, 4, field)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(PairsFileError) as error:
        read_pairs(path)
    assert str(path) in str(error.value)


def test_pairs_file_error_is_a_value_error():
    assert issubclass(PairsFileError, ValueError)


def test_missing_file_points_at_sample_py(tmp_path):
    path = tmp_path / "nope" / "pairs.jsonl"
    with pytest.raises(FileNotFoundError) as error:
        read_pairs(path)
    assert "sample.py" in str(error.value)
    assert str(path) in str(error.value)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "sub" / "pairs.jsonl"
    write_pairs(out, _pairs())
    write_pairs(out, _pairs()[:1])  # overwrite
    assert sorted(p.name for p in out.parent.iterdir()) == ["pairs.jsonl"]
    assert len(read_pairs(out)) == 1


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "pairs.jsonl"
    write_pairs(out, _pairs())
    before = out.read_bytes()

    def broken():
        yield _pairs()[0]
        raise RuntimeError("sampler crashed")

    with pytest.raises(RuntimeError, match="sampler crashed"):
        write_pairs(out, broken())
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]


# --------------------------------------------------------------------------------------------
# Rows that read fine but would train on something else than meant (issue #23)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, message", [
    ({**GOOD, "prompt": [{"role": "usr", "content": "Hi?"}]},
     "line 2: field 'prompt'[0].role is 'usr': expected one of system, user, assistant"),
    ({**GOOD, "prompt": [{"role": "system", "content": "Be brief."}]},
     "line 2: field 'prompt' is empty (expected a non-empty user message)"),
    ({**GOOD, "negative_prompt": [{"role": "human", "content": "Hi?"}]},
     "line 2: field 'negative_prompt'[0].role is 'human'"),
    ({**GOOD, "chosen": ""}, "line 2: field 'chosen' is empty (expected a non-empty response)"),
    ({**GOOD, "rejected": [{"role": "assistant", "content": " \n\t"}]},
     "line 2: field 'rejected' is whitespace only (expected a non-empty response)"),
])
def test_rows_that_would_train_on_the_wrong_thing_are_refused(tmp_path, row, message):
    path = _write_lines(tmp_path / "p.jsonl", [GOOD, row])
    with pytest.raises(PairsFileError) as error:
        read_pairs(path)
    assert str(error.value).startswith(f"{path} {message}")


def test_an_empty_response_the_model_sampled_is_kept(tmp_path):
    """A row that records its sampling (``*_finish_reason``) may hold an empty response: the model ended its turn."""
    path = _write_lines(tmp_path / "p.jsonl", [{**GOOD, "chosen": "", "chosen_finish_reason": "eos"}])
    assert read_pairs(path)[0].chosen == ""


def test_duplicate_uids_name_both_lines(tmp_path):
    path = _write_lines(tmp_path / "p.jsonl", [{**GOOD, "uid": "q1"}, {**GOOD, "uid": "q2"}, {**GOOD, "uid": "q1"}])
    with pytest.raises(PairsFileError, match=r"p.jsonl line 3: field 'uid' is 'q1', the uid of line 1 too"):
        read_pairs(path)
    assert len(read_pairs(_write_lines(tmp_path / "q.jsonl", [GOOD, GOOD]))) == 2  # rows without uids are not compared


def test_identical_pairs_are_counted_and_refused_above_the_fraction(tmp_path, caplog):
    same = {**GOOD, "rejected": [{"role": "assistant", "content": "Hello. "}]}  # equal to chosen up to whitespace
    path = _write_lines(tmp_path / "p.jsonl", [GOOD, same, GOOD, GOOD])
    pairs = read_pairs(path)
    with caplog.at_level("WARNING", logger="mipo.data.pairs"):
        assert identical_pairs_problem(pairs, path, max_fraction=0.5) is None
    assert "1 of 4 pairs (25%) have chosen == rejected" in caplog.text and f"{path} line 2" in caplog.text
    problem = identical_pairs_problem(pairs, path, max_fraction=0.2)
    assert problem.startswith(f"{path}: 1 of 4 pairs have field 'chosen' equal to field 'rejected' (first: {path} line 2)")
    assert "more than data.max_identical_fraction=0.2" in problem
    caplog.clear()
    with caplog.at_level("WARNING", logger="mipo.data.pairs"):
        assert identical_pairs_problem(read_pairs(_write_lines(tmp_path / "q.jsonl", [GOOD])), path, 0.0) is None
    assert caplog.text == ""  # nothing identical: no word


@pytest.mark.parametrize("value, ok", [(0.5, True), (0, True), (1, True), (1.5, False), ("0.5", False), (None, False)])
def test_max_identical_fraction_is_a_number_in_0_1(value, ok):
    problems = pairs_config_problems({"max_identical_fraction": value})
    assert (problems == []) == ok, problems
    assert max_identical_fraction({}) == 0.5
