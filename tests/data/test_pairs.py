"""Tests of the preference-pairs JSONL file (mipo/data/pairs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mipo.data.pairs import PairsFileError, PreferencePair, read_pairs, write_pairs


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
            rejected="",
            metadata={},
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
