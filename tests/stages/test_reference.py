"""Tests of the reference log-prob cache (mipo/stages/reference.py) on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mipo.stages.reference as reference
from mipo.data.encoding import encode_pairs
from mipo.data.pairs import PairsFile, PreferencePair, read_pairs, write_pairs
from mipo.model.logprobs import ScoringSettings
from mipo.model.precision import ForwardPrecision
from mipo.stages.keys import reference_path
from mipo.stages.reference import ReferencePass
from mipo.training.forward import TrainingForward, continuation_batch_logps
from tests.helpers import (
    TINY_CONFIG,
    collate_pairs,
    score_responses,
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
         max_prompt_length=MAX_PROMPT_LENGTH):
    scoring = ScoringSettings(max_length, max_prompt_length, batch_size=BATCH_SIZE, kernel="torch")
    reference_pass = ReferencePass(model_cfg, tokenizer, scoring, reference.FP32, torch.device("cpu"), Path(cache_dir))
    return reference_pass.logps(PairsFile.hashed(pairs_path))


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


def _forbid_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the reference model must not be loaded on a cache hit")

    monkeypatch.setattr(reference, "load_model", refuse)


def test_miss_then_hit_without_loading_the_model(tmp_path, pairs_path, tokenizer, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = _ref(pairs_path, cache_dir, tokenizer)
    assert first.cache_hit is False
    assert first.path.parent == cache_dir / "reference"
    assert first.path.suffix == ".pt" and first.path.exists()
    assert list((cache_dir / "reference").glob("*.pt")) == [first.path]
    assert first.chosen.shape == first.rejected.shape == (len(PAIRS),)
    assert first.chosen.dtype == first.rejected.dtype == torch.float32
    _no_temp_files(cache_dir)

    _forbid_model_loading(monkeypatch)
    second = _ref(pairs_path, cache_dir, tokenizer)
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


# ---- step 0: the reference in the policy's numerics --------------------------------------------

BF16_AUTOCAST = ForwardPrecision(torch.float32, torch.bfloat16)  # fp32 weights, bf16 forward (a GPU run's default)


def step0_gap(model_cfg, policy, tokenizer, pairs_file, cache_dir, reference_precision) -> float:
    """Mean |log pi(y|x) - log pi_ref(y|x)| at step 0 over all y+ and y-, the policy's forward
    run as the trainer runs it (prompt-shared, fused output layer, bf16 autocast)."""
    pairs = read_pairs(pairs_file)
    chosen, rejected = encode_pairs(tokenizer, pairs, MAX_LENGTH * 4, MAX_PROMPT_LENGTH * 4)
    scoring = ScoringSettings(MAX_LENGTH * 4, MAX_PROMPT_LENGTH * 4, batch_size=4, kernel="torch", fused_lm_head=True)
    reference_pass = ReferencePass(model_cfg, tokenizer, scoring, reference_precision, torch.device("cpu"),
                                   Path(cache_dir))
    ref = reference_pass.logps(PairsFile.hashed(pairs_file), (chosen, rejected))
    forward = TrainingForward.prepare({"trainer": {"share_prompt": "auto", "shared_attention": "auto"},
                                       "kernel": "torch", "fused_lm_head": True}, policy, BF16_AUTOCAST.autocast)
    gaps = []
    with torch.no_grad():
        for start in range(0, len(pairs), 2):
            batch = collate_pairs(chosen, rejected, range(start, min(start + 2, len(pairs))), ref, tokenizer.pad_token_id,
                                  share_prompt=forward.share_prompt)
            with BF16_AUTOCAST.context("cpu"):
                logps = continuation_batch_logps(policy, batch.inputs, len(batch.reference_logps), kernel="torch")
            gaps.append((logps.float() - batch.reference_logps).abs().flatten())
    return torch.cat(gaps).mean().item()


def test_reference_in_the_policy_precision_makes_step_0_consistent(tmp_path, pairs_path, tokenizer):
    """With bf16 autocast, an fp32 reference leaves the step-0 rewards as bf16 noise; the
    reference computed in the policy's precision removes (at least 4/5 of) it."""
    policy = tiny_model(tokenizer)
    fp32 = step0_gap(TINY_CONFIG, policy, tokenizer, pairs_path, tmp_path / "a", reference.FP32)
    same = step0_gap(TINY_CONFIG, policy, tokenizer, pairs_path, tmp_path / "b", BF16_AUTOCAST)
    assert fp32 > 1e-3, fp32  # bf16 autocast does change the log-probs of this model
    assert same <= fp32 / 5, (same, fp32)
    # and the two are different caches: the precision is part of the key
    assert len(list((tmp_path / "a" / "reference").glob("*.pt"))) == 1
    passes = [ReferencePass(TINY_CONFIG, tokenizer, ScoringSettings(64, 40), p, torch.device("cpu"), tmp_path)
              for p in (reference.FP32, BF16_AUTOCAST)]
    keys = [reference_pass.key(PairsFile.hashed(pairs_path), 1) for reference_pass in passes]
    assert reference_path(tmp_path, keys[0]) != reference_path(tmp_path, keys[1])
