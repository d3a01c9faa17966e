"""Tests of the reference log-prob cache (mipo/stages/reference.py) on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mipo.data.encoding import encode_pairs
from mipo.data.pairs import PairsFile, PreferencePair, read_pairs, write_pairs
from mipo.model.loading import load_model
from mipo.stages.reference import ReferencePass
from tests.helpers import (
    TINY_CONFIG,
    score_responses,
    single_forward,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
    user,
)

MAX_LENGTH = 64
MAX_PROMPT_LENGTH = 40
BATCH_SIZE = 2

PAIRS = [
    PreferencePair(user("What is 2+2?"), "4", "Paris is the capital of France.", {"uid": "a"}),
    PreferencePair(user("Name a fruit."), "Apple.", "The answer is 4.", {"uid": "b"}),
    PreferencePair(user("Write a haiku about rain, please, in English."), "Grey clouds weep softly", "Banana.",
                   {"uid": "c"}),
    PreferencePair(user("Who wrote Hamlet?"), "Shakespeare wrote it, around 1600, for the Globe theatre.", "Chat.",
                   {"uid": "d"}),
    PreferencePair(user("A very long prompt " * 6 + "?"), "A long answer that will be truncated " * 3, "Short.",
                   {"uid": "e"}),
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def pairs_path(tmp_path) -> Path:
    path = tmp_path / "data" / "pairs.jsonl"
    write_pairs(path, PAIRS)
    return path


def _ref(pairs_path, cache_dir, tokenizer, model_cfg=TINY_CONFIG, max_length=MAX_LENGTH,
         max_prompt_length=MAX_PROMPT_LENGTH, autocast=None, forbid_forward=False):
    """The reference pass as the trainer runs it: the policy (loaded from ``model_cfg``) behind its
    single-process training forward, micro-batches of BATCH_SIZE pairs in file order."""
    policy = load_model(model_cfg, device="cpu", vocab_size=len(tokenizer))
    forward = single_forward(policy, autocast=autocast)
    if forbid_forward:
        def refuse(batch):
            raise AssertionError("the forward must not run on a cache hit")
        forward.logps = refuse
    micro_batches = [list(range(i, min(i + BATCH_SIZE, len(PAIRS)))) for i in range(0, len(PAIRS), BATCH_SIZE)]
    reference_pass = ReferencePass(forward, model_cfg, tokenizer, (max_length, max_prompt_length), micro_batches,
                                   torch.device("cpu"), Path(cache_dir))
    rows = encode_pairs(tokenizer, read_pairs(pairs_path), max_length, max_prompt_length)
    return reference_pass.logps(PairsFile.hashed(pairs_path), rows)


def _expected(tokenizer, cfg=TINY_CONFIG, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH):
    """log pi_ref computed directly: the same model in fp32, one row at a time."""
    model = tiny_model(tokenizer, cfg, dtype=torch.float32)
    pairs = PAIRS
    kw = dict(batch_size=1, max_length=max_length, max_prompt_length=max_prompt_length, kernel="naive", desc=None)
    chosen = score_responses(model, tokenizer, [p.prompt for p in pairs], [p.chosen for p in pairs], **kw)
    rejected = score_responses(model, tokenizer, [p.prompt for p in pairs], [p.rejected for p in pairs], **kw)
    return chosen, rejected


def _no_temp_files(cache_dir: Path):
    names = [p.name for p in (cache_dir / "reference").iterdir()]
    assert all(n.endswith(".pt") and not n.startswith(".") for n in names), names
    assert not [p for p in cache_dir.rglob("*") if p.name.endswith(".tmp")]


def test_miss_then_hit_without_running_the_forward(tmp_path, pairs_path, tokenizer):
    cache_dir = tmp_path / "cache"
    first = _ref(pairs_path, cache_dir, tokenizer)
    assert first.cache_hit is False
    assert first.path.parent == cache_dir / "reference"
    assert first.path.suffix == ".pt" and first.path.exists()
    assert list((cache_dir / "reference").glob("*.pt")) == [first.path]
    assert first.chosen.shape == first.rejected.shape == (len(PAIRS),)
    assert first.chosen.dtype == first.rejected.dtype == torch.float32
    _no_temp_files(cache_dir)

    second = _ref(pairs_path, cache_dir, tokenizer, forbid_forward=True)
    assert second.cache_hit is True
    assert second.path == first.path
    torch.testing.assert_close(second.chosen, first.chosen, rtol=0, atol=0)
    torch.testing.assert_close(second.rejected, first.rejected, rtol=0, atol=0)


def test_values_equal_direct_scoring(tmp_path, pairs_path, tokenizer):
    result = _ref(pairs_path, tmp_path / "cache", tokenizer)
    chosen, rejected = _expected(tokenizer)
    torch.testing.assert_close(result.chosen, chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(result.rejected, rejected, rtol=1e-5, atol=1e-4)
    # sanity: the chosen and rejected scores are different numbers (a swapped column would fail)
    assert not torch.allclose(result.chosen, result.rejected)


def _changed_pairs(path: Path):
    changed = list(PAIRS)
    changed[1] = PreferencePair(user("Name a fruit."), "Banana.", "The answer is 4.", {"uid": "b"})
    write_pairs(path, changed)


@pytest.mark.parametrize("change", ["pairs", "max_length", "max_prompt_length", "init_seed", "architecture"])
def test_changed_inputs_give_another_cache_path(tmp_path, pairs_path, tokenizer, change):
    cache_dir = tmp_path / "cache"
    first = _ref(pairs_path, cache_dir, tokenizer)
    kwargs = {}
    if change == "pairs":
        _changed_pairs(pairs_path)
    elif change == "max_length":
        kwargs["max_length"] = MAX_LENGTH - 8
    elif change == "max_prompt_length":
        kwargs["max_prompt_length"] = MAX_PROMPT_LENGTH - 8
    elif change == "init_seed":
        kwargs["model_cfg"] = tiny_config(init_seed=1)
    else:
        cfg = tiny_config()
        cfg["config"]["intermediate_size"] = 96
        kwargs["model_cfg"] = cfg
    second = _ref(pairs_path, cache_dir, tokenizer, **kwargs)
    assert second.cache_hit is False
    assert second.path != first.path
    assert sorted((cache_dir / "reference").glob("*.pt")) == sorted([first.path, second.path])
    assert not torch.equal(second.chosen, first.chosen) or not torch.equal(second.rejected, first.rejected)
    _no_temp_files(cache_dir)


def test_changed_pairs_values_follow_the_new_file(tmp_path, pairs_path, tokenizer):
    cache_dir = tmp_path / "cache"
    first = _ref(pairs_path, cache_dir, tokenizer)
    _changed_pairs(pairs_path)
    second = _ref(pairs_path, cache_dir, tokenizer)
    # only row 1's chosen response changed
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(second.chosen[keep], first.chosen[keep])
    torch.testing.assert_close(second.rejected, first.rejected)
    assert abs(float(second.chosen[1] - first.chosen[1])) > 1e-3


def _mismatched_inputs(path):
    stored = torch.load(path, weights_only=True)
    stored["inputs"]["max_length"] = 12345  # computed "for other inputs"
    stored["chosen"] = torch.zeros(len(PAIRS))
    stored["rejected"] = torch.zeros(len(PAIRS))
    torch.save(stored, path)


def _wrong_number_of_rows(path):
    stored = torch.load(path, weights_only=True)
    stored["chosen"] = stored["chosen"][:2]
    stored["rejected"] = stored["rejected"][:2]
    torch.save(stored, path)


def _missing_rejected(path):
    stored = torch.load(path, weights_only=True)
    del stored["rejected"]
    torch.save(stored, path)


@pytest.mark.parametrize("corrupt", [
    _mismatched_inputs,
    _wrong_number_of_rows,
    _missing_rejected,
    lambda path: path.write_bytes(b""),
    lambda path: path.write_bytes(b"not a torch file at all \x00\x01\x02" * 10),
    lambda path: torch.save(torch.zeros(len(PAIRS)), path),  # readable, but not a reference cache
], ids=["mismatched-inputs", "wrong-rows", "missing-rejected", "empty", "garbage", "non-dict"])
def test_bad_cache_file_is_recomputed_and_replaced(tmp_path, pairs_path, tokenizer, corrupt):
    cache_dir = tmp_path / "cache"
    first = _ref(pairs_path, cache_dir, tokenizer)
    corrupt(first.path)
    second = _ref(pairs_path, cache_dir, tokenizer)
    assert second.cache_hit is False and second.path == first.path
    torch.testing.assert_close(second.chosen, first.chosen)
    torch.testing.assert_close(second.rejected, first.rejected)
    assert _ref(pairs_path, cache_dir, tokenizer).cache_hit is True  # the recomputed values replaced it
    _no_temp_files(cache_dir)


def test_tokenizer_change_gives_another_cache_path(tmp_path, pairs_path, tokenizer):
    cache_dir = tmp_path / "cache"
    first = _ref(pairs_path, cache_dir, tokenizer)
    other = tiny_tokenizer()
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
                          "{% if add_generation_prompt %}[assistant] {% endif %}"
    second = _ref(pairs_path, cache_dir, other)
    assert second.cache_hit is False and second.path != first.path


# ---- the forward is the key ------------------------------------------------------------------

def test_another_forward_is_another_cache(tmp_path, pairs_path, tokenizer):
    """bf16 autocast and fp32 are two forwards: two files, and different numbers (step 0's exactness
    in every layout and strategy: tests/training/test_exactness.py)."""
    fp32 = _ref(pairs_path, tmp_path / "cache", tokenizer)
    bf16 = _ref(pairs_path, tmp_path / "cache", tokenizer, autocast=torch.bfloat16)
    assert bf16.cache_hit is False and bf16.path != fp32.path
    assert (bf16.chosen - fp32.chosen).abs().max() > 1e-3  # bf16 autocast does change this model's log-probs
