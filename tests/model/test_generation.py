"""The decode loop of mipo/model/generation.py: greedy equals transformers' ``generate``, the sampling
distribution is the configured one and nothing else, and per-prompt seeds make chunks reproducible."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import mipo.model.generation as generation
from mipo.data.encoding import encode_prompt, truncate_prompt
from mipo.model.generation import (
    DecodeLoop,
    DecodeSettings,
    Plan,
    PlanSettings,
    auto_batch_size,
    decode_problems,
    generate,
    next_tokens,
    nucleus,
    plan_generation,
    row_seed,
)
from mipo.model.kv_cache import SlotCache, shared_prefix_length
from mipo.model.prompt_tree import common_prefix_length
from tests.helpers import tiny_model, tiny_tokenizer, user

SYSTEM = {"role": "system", "content": "You answer questions about words."}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer).eval()


def prompts(n: int = 10) -> list[list[dict[str, str]]]:
    """Prompts of different lengths sharing a system message (a common prefix of many tokens)."""
    return [[SYSTEM, *user("word " * (i % 4 + 1) + f"number {i}?")] for i in range(n)]


def hf_greedy(model, tokenizer, messages, max_new_tokens: int, max_prompt_length: int | None = None):
    """One prompt alone through ``model.generate(do_sample=False)``: (new tokens before end-of-turn, finish reason)."""
    ids = encode_prompt(tokenizer, messages)
    if max_prompt_length is not None:
        ids = list(truncate_prompt(ids, max_prompt_length))
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_token_id in new:
        return new[: new.index(tokenizer.eos_token_id)], "eos"
    return new, "length"


# --------------------------------------------------------------------------------------------
# Greedy decoding is transformers' greedy decoding
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size, chunk_size, share_prefix", [
    (1, 256, True),   # one row in flight: every prompt refills the freed slot
    (3, 256, True),   # rows leave and new prompts refill mid-decode
    (3, 4, False),    # several chunks, no shared prefix
    ("auto", 256, True),
])
def test_greedy_matches_hf_generate_token_for_token(model, tokenizer, monkeypatch, batch_size, chunk_size, share_prefix):
    messages = prompts(10)
    max_new = 24
    expected = [hf_greedy(model, tokenizer, m, max_new) for m in messages]
    assert {reason for _, reason in expected} == {"eos", "length"}  # both ways of ending are exercised

    calls = []
    generate_chunk = DecodeLoop.generate_chunk
    monkeypatch.setattr(DecodeLoop, "generate_chunk", lambda self, *a, **k: calls.append(k) or generate_chunk(
        self, *a, **{**k, "share_prefix": share_prefix}))
    out = generate(model, tokenizer, messages, DecodeSettings(max_new),
                   PlanSettings(batch_size=batch_size, chunk_size=chunk_size), desc=None)
    assert calls
    for (tokens, reason), got in zip(expected, out):
        assert got.text == tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert (got.finish_reason, got.num_tokens) == (reason, len(tokens))
    assert out.summary()["truncated"] == sum(reason == "length" for _, reason in expected)


def test_cache_compaction_keeps_greedy_exact(model, tokenizer, monkeypatch):
    """Many refills of 2 slots outgrow the cache's columns: the unused left columns are dropped on the way."""
    shifts = []
    original = SlotCache._shift
    monkeypatch.setattr(SlotCache, "_shift", lambda self, offset: shifts.append(offset) or original(self, offset))
    messages = prompts(12)
    out = generate(model, tokenizer, messages, DecodeSettings(30), PlanSettings(batch_size=2), desc=None)
    assert any(offset < 0 for offset in shifts)
    for m, got in zip(messages, out):
        tokens, reason = hf_greedy(model, tokenizer, m, 30)
        assert (got.text, got.finish_reason) == (tokenizer.decode(tokens, skip_special_tokens=True).strip(), reason)


def test_prompts_are_cut_by_truncate_prompt_and_counted(model, tokenizer):
    messages = prompts(4) + [[SYSTEM, *user("a much longer question " * 6)]]
    limit = 60
    lengths = [len(encode_prompt(tokenizer, m)) for m in messages]
    out = generate(model, tokenizer, messages, DecodeSettings(12), PlanSettings(max_prompt_length=limit), desc=None)
    assert [g.prompt_cut for g in out] == [max(0, n - limit) for n in lengths]
    assert out.summary()["prompts_truncated"] == sum(n > limit for n in lengths) > 0
    for m, got in zip(messages, out):
        tokens, _ = hf_greedy(model, tokenizer, m, 12, max_prompt_length=limit)
        assert got.text == tokenizer.decode(tokens, skip_special_tokens=True).strip()


# --------------------------------------------------------------------------------------------
# The checkpoint's generation_config has no say
# --------------------------------------------------------------------------------------------

def polluted(model):
    """A copy of the model whose generation_config.json would change every response of ``model.generate``."""
    other = copy.deepcopy(model)
    other.generation_config = GenerationConfig(repetition_penalty=5.0, no_repeat_ngram_size=2, top_k=1,
                                               min_new_tokens=16, temperature=0.7, top_p=0.5, do_sample=True)
    return other


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_checkpoint_generation_config_has_no_effect(model, tokenizer, temperature):
    messages = prompts(6)
    dirty = polluted(model)
    settings = DecodeSettings(16, temperature=temperature, top_p=0.95)
    clean = generate(model, tokenizer, messages, settings, seed=3, desc=None)
    got = generate(dirty, tokenizer, messages, settings, seed=3, desc=None)
    assert got.texts == clean.texts and got.finish_reasons == clean.finish_reasons
    assert got.settings == clean.settings
    assert got.settings["repetition_penalty"] == 1.0 and got.settings["no_repeat_ngram_size"] == 0
    assert got.settings["min_new_tokens"] == 0 and got.settings["top_k"] is None

    # the same options do change transformers' generate: the test would see a leak
    ids = torch.tensor([encode_prompt(tokenizer, messages[0])])
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    assert not torch.equal(dirty.generate(**kwargs), model.generate(**kwargs))


# --------------------------------------------------------------------------------------------
# Picking tokens: the nucleus, the draw
# --------------------------------------------------------------------------------------------

def hf_filtered(logits: torch.Tensor, temperature: float, top_p: float, top_k: int | None) -> torch.Tensor:
    """transformers' warpers in ``generate``'s order: temperature, top-k, top-p; returns the probabilities."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("temperature, top_p, top_k, scale", [
    (0.1, 0.9, None, 1.0),    # peaked: the nucleus is in the shortlist
    (1.0, 0.9, None, 0.05),   # nearly flat: the nucleus has thousands of tokens, the whole vocabulary is sorted
    (0.7, 0.5, 40, 1.0),
    (1.0, 1.0, 5, 1.0),
    (1.0, 1.0, None, 1.0),
])
def test_nucleus_matches_transformers_warpers(temperature, top_p, top_k, scale):
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * 3 * scale
    ids, probs = nucleus(logits, temperature, top_p, top_k)
    dense = torch.zeros_like(logits).scatter_(-1, ids, probs)  # (B, V)
    expected = hf_filtered(logits, temperature, top_p, top_k)
    assert torch.equal(dense > 0, expected > 0)
    torch.testing.assert_close(dense, expected, atol=1e-6, rtol=1e-5)
    if scale < 1:
        assert (dense > 0).sum(-1).min() > generation.SHORTLIST


def test_draws_follow_the_nucleus_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0]])
    settings = DecodeSettings(max_new_tokens=1, temperature=0.8, top_p=0.9)
    _, probs = nucleus(logits, 0.8, 0.9)
    target = torch.zeros(7).scatter_(0, nucleus(logits, 0.8, 0.9)[0][0], probs[0])
    n = 40000
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tokens = next_tokens(logits.expand(n, -1), settings, uniforms)
    counts = torch.bincount(tokens, minlength=7).double()
    assert counts[target == 0].sum() == 0  # nothing outside the nucleus
    expected = n * target.double()
    sd = (n * target.double() * (1 - target.double())).sqrt()
    assert ((counts - expected).abs() <= 5 * sd + 1e-9).all(), (counts, expected)


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(2))
    uniforms = torch.rand(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    settings = DecodeSettings(max_new_tokens=1, temperature=1.0, top_p=0.8, top_k=50)
    together = next_tokens(logits, settings, uniforms)
    alone = torch.cat([next_tokens(logits[i : i + 1], settings, uniforms[i : i + 1]) for i in range(5)])
    assert torch.equal(together, alone)


# --------------------------------------------------------------------------------------------
# Seeds, plans, chunks, shards
# --------------------------------------------------------------------------------------------

def test_sampling_is_reproducible_and_seeded_per_prompt(model, tokenizer):
    messages = prompts(8)
    settings, planning = DecodeSettings(16, temperature=1.0, top_p=0.95), PlanSettings(batch_size=3)
    first = generate(model, tokenizer, messages, settings, planning, seed=5, desc=None)
    again = generate(model, tokenizer, messages, settings, planning, seed=5, desc=None)
    other = generate(model, tokenizer, messages, settings, planning, seed=6, desc=None)
    assert first.texts == again.texts
    assert first.texts != other.texts
    assert row_seed(5, 0) != row_seed(5, 1) != row_seed(6, 0)
    assert first.settings["seed"] == 5 and first.settings["seeding"] == generation.SEEDING


def test_shards_and_resumed_chunks_reproduce_the_whole_run(model, tokenizer):
    messages = prompts(10)
    settings = DecodeSettings(max_new_tokens=16, temperature=1.0, top_p=0.9)
    plan = plan_generation(tokenizer, messages, 16, batch_size=2, chunk_size=3)
    assert len(plan.chunks) == 4
    loop = DecodeLoop(model, tokenizer)
    whole = loop.generate_plan(plan, settings, seed=1, desc=None)

    # two ranks, each its own chunks, assembled
    by_chunk = {c: loop.generate_chunk(plan, c, settings, seed=1) for rank in range(2) for c in plan.shard(rank, 2)}
    assert sorted(by_chunk) == list(range(4)) and plan.shard(1, 2) == [1, 3]
    assert loop.generate_plan(plan, settings, seed=1, done=by_chunk, desc=None).items == whole.items

    # a resumed run: two chunks read back, the others decoded
    finished = []
    resumed = loop.generate_plan(plan, settings, seed=1, done={0: by_chunk[0], 2: by_chunk[2]},
                                 on_chunk=lambda chunk, gens: finished.append(chunk), desc=None)
    assert finished == [1, 3] and resumed.items == whole.items


def test_plan_sorts_longest_first_and_chunks():
    tokenizer = tiny_tokenizer()
    messages = [user("x" * n) for n in (5, 30, 10, 30, 1)]
    plan = plan_generation(tokenizer, messages, 8, batch_size="auto", chunk_size=2, max_batch_tokens=100)
    assert plan.chunks == ((1, 3), (2, 0), (4,))
    longest = max(len(p.ids) for p in plan.prompts)
    assert plan.batch_size == auto_batch_size([len(p.ids) for p in plan.prompts], 8, 100) == 100 // (longest + 8)
    assert auto_batch_size([10], 8, 10_000) == 1 and auto_batch_size([10] * 1000, 8, 10**9) == 256
    assert plan.fingerprint() == plan_generation(tokenizer, messages, 8, "auto", 2, None, 100).fingerprint()
    assert plan.fingerprint() != Plan(plan.prompts, plan.chunks, plan.batch_size + 1, 2).fingerprint()
    assert shared_prefix_length([(1, 2, 3, 4), (1, 2, 5), (1, 2, 3)]) == 2
    assert shared_prefix_length([(1, 2), (1, 2, 3)]) == 1  # every row keeps a token to run


def test_sliding_window_models_are_refused(tokenizer):
    from tests.helpers import tiny_config

    cfg = tiny_config()
    cfg["config"] = {**cfg["config"], "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
                     "max_window_layers": 0}
    model = tiny_model(tokenizer, cfg)
    if all(t == "full_attention" for t in model.config.layer_types):
        pytest.skip("this transformers version builds no sliding layers from this config")
    with pytest.raises(NotImplementedError, match="full attention"):
        generate(model, tokenizer, prompts(2), DecodeSettings(4, temperature=0.1, top_p=0.9), desc=None)


# --------------------------------------------------------------------------------------------
# The checks beside the settings, and the prefix a chunk shares
# --------------------------------------------------------------------------------------------

GOOD_DECODING = {"temperature": 0.1, "top_p": 0.9, "top_k": None, "max_new_tokens": 8, "batch_size": "auto"}


@pytest.mark.parametrize("group", ["sampling", "eval"])
def test_decode_problems_name_the_override_and_refuse_bools(group):
    assert decode_problems(group, GOOD_DECODING) == []
    assert decode_problems(group, {**GOOD_DECODING, "top_k": 5, "batch_size": 4, "temperature": 0}) == []
    bad = {"temperature": -0.5, "top_p": 0, "top_k": True, "max_new_tokens": True, "batch_size": 0}
    assert decode_problems(group, bad) == [
        f"{group}.temperature=-0.5: expected a number >= 0 (0 = greedy)",
        f"{group}.top_p=0: expected (0, 1]",
        f"{group}.max_new_tokens=True: expected an int > 0",
        f"{group}.batch_size=0: expected auto or an int > 0",
        f"{group}.top_k=True: expected null (no top-k) or an int > 0",
    ]
    assert decode_problems(group, {**GOOD_DECODING, "temperature": "0.1", "top_p": 1.5, "batch_size": True}) == [
        f"{group}.temperature=0.1: expected a number >= 0 (0 = greedy)", f"{group}.top_p=1.5: expected (0, 1]",
        f"{group}.batch_size=True: expected auto or an int > 0"]
    assert decode_problems(group, {k: v for k, v in GOOD_DECODING.items() if k != "top_k"}) == []  # top_k is optional


def test_decode_problems_are_what_the_config_check_reports(tmp_path):
    from hydra import compose, initialize_config_dir

    from mipo.stages.config import config_problems
    from tests.helpers import ROOT

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "model=tiny-llama", f"paths.cache_dir={tmp_path}", "sampling.temperature=-1", "sampling.top_k=0",
            "eval.top_p=2", "eval.batch_size=0", "eval.max_new_tokens=0"])
    expected = decode_problems("sampling", cfg.sampling) + decode_problems("eval", cfg.eval)
    assert len(expected) == 5 and set(expected) <= set(config_problems(cfg))


@pytest.mark.parametrize("sequences, common, shared", [
    ([(5,)], 1, 0),                                # one prompt: all of it is common, its last token is its own
    ([(1, 2, 3)], 3, 2),
    ([(1, 2, 3), (1, 2, 3)], 3, 2),                # identical prompts
    ([(), (1, 2)], 0, 0),
    ([(1, 2), (1, 2, 3)], 2, 1),                   # a prompt that is the others' prefix keeps its last token
    ([(1, 2, 3, 4), (1, 2, 5), (1, 2, 3)], 2, 2),
    ([(7, 1), (8, 1)], 0, 0),
])
def test_the_shared_prefix_is_the_common_prefix_less_a_token_for_every_row(sequences, common, shared):
    # the one common-prefix computation is prompt_tree's; a chunk leaves every prompt a token of its own to prefill
    assert common_prefix_length(sequences) == common
    assert shared_prefix_length(sequences) == shared
