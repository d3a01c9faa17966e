"""Sampling stops where the model ends its turn (mipo/model/generation.py, mipo/model/vllm_backend.py), with the
stop ids read when the tokenizer is loaded (mipo/model/loading.py): the generation config's eos ids, the eos and
the chat template's end-of-turn token. Checked on offline checkpoints of four chat template families."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mipo.data.chat import STOP_IDS_ATTRIBUTE, stop_token_ids, turn_end
from mipo.data.encoding import encode_rows
from mipo.model.generation import DecodeSettings, generate, plan_generation
from mipo.model.loading import load_model, load_tokenizer
from mipo.model.tokenizer import tokenizer_identity
from mipo.model.vllm_backend import VLLMGenerator
from tests.data.chat_families import FAMILIES, conversation, model_cfg, save_family
from tests.helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One local checkpoint per family: tokenizer, tiny random Llama, generation config listing the turn end."""
    return {name: save_family(name, tmp_path_factory.mktemp(name)) for name in FAMILIES}


def ids_of(tok, *tokens: str) -> set[int]:
    return {tok.convert_tokens_to_ids(t) for t in tokens}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_stop_ids_are_the_generation_configs_eos_ids_the_eos_and_the_turn_end(name, checkpoints):
    tok = load_tokenizer(model_cfg(checkpoints[name]))
    family = FAMILIES[name]
    assert turn_end(tok).token_id == tok.convert_tokens_to_ids(family.end_of_turn)
    assert set(stop_token_ids(tok)) == ids_of(tok, *family.generation_eos, tok.eos_token, family.end_of_turn)
    assert stop_token_ids(tok)[0] == turn_end(tok).token_id


def test_a_template_and_generation_config_that_disagree_are_logged_once(tmp_path, caplog):
    folder = save_family("gemma", tmp_path, generation_eos=("<eos>",))  # gemma-7b-it: eos_token_id 1 only
    with caplog.at_level(logging.WARNING, logger="mipo.model.loading"):
        tok = load_tokenizer(model_cfg(folder))
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "'<end_of_turn>'" in record.getMessage() and "'<eos>'" in record.getMessage()
    assert set(stop_token_ids(tok)) == ids_of(tok, "<eos>", "<end_of_turn>")  # stops at both all the same


def test_families_that_agree_log_nothing(checkpoints, caplog):
    with caplog.at_level(logging.WARNING, logger="mipo.model.loading"):
        for name in FAMILIES:
            load_tokenizer(model_cfg(checkpoints[name]))
        load_tokenizer({"tokenizer": "byte", "random_init": True})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_byte_tokenizer_stops_at_its_eos_alone():
    tok = tiny_tokenizer()
    assert stop_token_ids(tok) == (tok.eos_token_id,) and turn_end(tok).token_id == tok.eos_token_id


def test_the_identity_changes_with_what_a_response_is_scored_with(checkpoints):
    cfg = model_cfg(checkpoints["chatml"])
    default = tokenizer_identity(load_tokenizer(cfg))
    assert tokenizer_identity(load_tokenizer(cfg, response_suffix="template")) != default
    assert tokenizer_identity(load_tokenizer(cfg)) == default
    gemma = load_tokenizer(model_cfg(checkpoints["gemma"]))
    before = tokenizer_identity(gemma)
    setattr(gemma, STOP_IDS_ATTRIBUTE, (gemma.eos_token_id,))  # the stop ids are part of it (eval generation)
    assert tokenizer_identity(gemma) != before
    with pytest.raises(ValueError, match="data.response_suffix"):
        load_tokenizer(cfg, response_suffix="trl")


def force(model, tok, word: str, end: int):
    """Make ``model`` answer ``word`` (its first token) and then emit ``end``: the next token is ``end`` after
    that token, and that token after anything else (a hook on the logits, so any architecture would do)."""
    first = tok(word, add_special_tokens=False)["input_ids"][0]

    def hook(module, args, kwargs, output):
        last = kwargs["input_ids"][:, -1]  # (rows,)
        target = torch.where(last == first, torch.full_like(last, end), torch.full_like(last, first))
        output.logits[:, -1] = -1e4
        output.logits[torch.arange(len(last)), -1, target] = 1e4
        return output

    return model.register_forward_hook(hook, with_kwargs=True), tok.decode([first])


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_stops_at_the_turn_end_and_trains_it(name, temperature, checkpoints):
    cfg = model_cfg(checkpoints[name])
    tok = load_tokenizer(cfg)
    model = load_model(cfg, device="cpu", vocab_size=len(tok)).eval()
    end_of_turn = tok.convert_tokens_to_ids(FAMILIES[name].end_of_turn)
    handle, word = force(model, tok, "the", end_of_turn)
    prompts = [conversation(name, "Where is the cat?"), conversation(name, "And the dog?")]
    try:
        ended = generate(model, tok, prompts, DecodeSettings(8, temperature=temperature), desc=None)
        cut = generate(model, tok, prompts, DecodeSettings(1, temperature=temperature), desc=None)
        setattr(tok, STOP_IDS_ATTRIBUTE, (tok.eos_token_id,))  # stopping at the eos alone: as before the fix
        before = generate(model, tok, prompts, DecodeSettings(8, temperature=temperature), desc=None)
    finally:
        handle.remove()
    assert ended.texts == [word, word] and ended.finish_reasons == ["eos", "eos"]
    assert [g.num_tokens for g in ended] == [1, 1]
    assert cut.texts == [word, word] and cut.finish_reasons == ["length", "length"]
    if end_of_turn != tok.eos_token_id:  # the old loop ran past the end of the turn to max_new_tokens
        assert before.finish_reasons == ["length", "length"]

    finished = [g.finish_reason == "eos" for g in [*ended, *cut]]
    rows = encode_rows(tok, prompts * 2, [*ended.texts, *cut.texts], 512, 256, finished=finished)
    word_ids = tok(word, add_special_tokens=False)["input_ids"]
    assert [list(r.response_ids) for r in rows] == [word_ids + [end_of_turn]] * 2 + [word_ids] * 2


def test_the_vllm_backend_sends_and_strips_the_same_stop_ids(checkpoints):
    tok = load_tokenizer(model_cfg(checkpoints["gemma"]))
    end_of_turn, eos = tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id
    plan = plan_generation(tok, [conversation("gemma", "hi")], max_new_tokens=4)
    word = tok("the", add_special_tokens=False)["input_ids"]
    generator = VLLMGenerator(None, tok, SimpleNamespace)
    _, (params,) = generator.requests(plan, 0, DecodeSettings(4), seed=0)
    assert set(params.stop_token_ids) == {end_of_turn, eos}
    for tokens, reason in ((word + [end_of_turn], "stop"), (word + [eos], "stop"), (word, "length")):
        output = SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, finish_reason=reason)])
        generation = generator.to_generation(output, 0)
        assert (generation.text, generation.num_tokens) == ("the", len(word))
