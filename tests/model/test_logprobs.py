"""Tests of tokenisation and padding (mipo/data/encoding.py) and sequence log-probs (mipo/model/logprobs.py) on a tiny
random Llama."""

from __future__ import annotations

import random

import pytest
import torch

from mipo.data.encoding import (
    IGNORE_INDEX,
    Batch,
    EncodedRow,
    encode_pair,
    encode_prompt,
    encode_response,
    pad_batch,
)
from mipo.model.logprobs import sequence_logps
from tests.helpers import score_responses, tiny_config, tiny_model, tiny_tokenizer, user

PROMPTS = [user(t) for t in ("What is 2+2?", "Name a fruit.", "Write a haiku about rain, please.",
                             "Who wrote Hamlet?", "Hi", "Translate 'cat' into French, then into German.",
                             "What is 2+2?")]
RESPONSES = ["4", "Apple, or maybe a banana.", "Grey clouds weep softly", "Shakespeare.", "Hello! How can I help?",
             "Chat. Katze.", "Four, obviously."]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    m = tiny_model(tokenizer)
    # random init gives near-uniform next-token distributions (logits ~ 0); sharpen them so that
    # log-probs differ between tokens and positions and mistakes cannot hide behind log(1/V).
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)
    m.eval()
    return m


def _rows(tokenizer, prompts=PROMPTS, responses=RESPONSES, max_length=512, max_prompt_length=256):
    return [encode_pair(encode_prompt(tokenizer, p), encode_response(tokenizer, r), max_length, max_prompt_length)
            for p, r in zip(prompts, responses)]


def _ids_labels(row: EncodedRow) -> tuple[list[int], list[int]]:
    return row.input_ids, row.labels


def _hand_logp(model, ids: list[int], labels: list[int]) -> float:
    """float64 sum over response positions t of log_softmax(logits[t-1])[ids[t]], for one unpadded row."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE_INDEX:
            assert labels[t] == ids[t]
            total += float(logp[t - 1, ids[t]])
    return total


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------

def test_encode_prompt_and_response(tokenizer):
    ids = encode_prompt(tokenizer, user("Hi"))
    assert tokenizer.decode(ids) == "<|user|>Hi<|end|>\n<|assistant|>"
    response = encode_response(tokenizer, "ok!")
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == "ok!"
    assert len(response) == 4


def test_encode_pair_cuts_the_prompt_as_generation_does():
    # the prompt is always cut to max_prompt_length, even when the row would fit in max_length:
    # generation saw only those tokens, so the response is scored under them
    prompt, response = [5, 6, 7], [8, 9]
    row = encode_pair(prompt, response, max_length=5, max_prompt_length=2)
    ids, labels = _ids_labels(row)
    assert ids == [6, 7, 8, 9]
    assert labels == [IGNORE_INDEX] * 2 + [8, 9]
    assert (row.prompt_cut, row.response_cut) == (1, 0)
    assert encode_pair([5, 6], response, max_length=5, max_prompt_length=2).prompt_cut == 0


def test_truncated_response_has_no_end_of_turn(tokenizer):
    finished = encode_response(tokenizer, "ok!")
    cut = encode_response(tokenizer, "ok!", finished=False)
    assert finished == cut + [tokenizer.eos_token_id] and tokenizer.eos_token_id not in cut


def test_encode_pair_truncates_prompt_left_and_response_right():
    prompt = list(range(100, 130))  # 30 tokens
    response = list(range(200, 220))  # 20 tokens
    ids, labels = _ids_labels(encode_pair(prompt, response, max_length=32, max_prompt_length=24))
    assert ids == list(range(106, 130)) + list(range(200, 208))
    assert len(ids) == len(labels) == 32
    assert labels == [IGNORE_INDEX] * 24 + list(range(200, 208))


def test_encode_pair_short_prompt_keeps_more_response():
    prompt = [1, 2, 3]
    response = list(range(10, 40))
    ids, labels = _ids_labels(encode_pair(prompt, response, max_length=16, max_prompt_length=8))
    assert ids == [1, 2, 3] + list(range(10, 23))
    assert labels == [IGNORE_INDEX] * 3 + list(range(10, 23))


def test_encode_pair_never_exceeds_max_length():
    prompt, response = list(range(40)), list(range(100, 110))
    try:
        ids, _ = _ids_labels(encode_pair(prompt, response, max_length=32, max_prompt_length=32))
    except ValueError:
        return  # rejecting the setting is also acceptable
    assert len(ids) <= 32


def test_pad_batch_right_pads_with_masks():
    rows = [EncodedRow((1,), (2, 3)), EncodedRow((4, 5), (6, 7, 8)), EncodedRow((), (9,))]
    batch = pad_batch(rows, pad_token_id=0)
    assert isinstance(batch, Batch)
    P, I = 0, IGNORE_INDEX
    assert batch.input_ids.tolist() == [[1, 2, 3, P, P], [4, 5, 6, 7, 8], [9, P, P, P, P]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert batch.labels.tolist() == [[I, 2, 3, I, I], [I, I, 6, 7, 8], [9, I, I, I, I]]
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == torch.long


# --------------------------------------------------------------------------------------------
# sequence_logps
# --------------------------------------------------------------------------------------------

def test_sequence_logps_matches_float64_hand_computation(model, tokenizer):
    rows = _rows(tokenizer)
    assert len({len(row.input_ids) for row in rows}) > 3  # really a padded batch
    batch = pad_batch(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        got = sequence_logps(model, batch)
    assert got.shape == (len(rows),) and got.dtype == torch.float32
    expected = torch.tensor([_hand_logp(model, *_ids_labels(row)) for row in rows], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    # the prompt is not counted: prompt-only log-probs would be far larger in magnitude for long prompts
    assert torch.all(got < 0)


def test_prompt_tokens_do_not_count(model, tokenizer):
    """Changing only the prompt labels to the input ids changes the sum; IGNORE_INDEX excludes them."""
    rows = _rows(tokenizer)[:2]
    batch = pad_batch(rows, tokenizer.pad_token_id)
    full = pad_batch([EncodedRow((), row.input_ids) for row in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        response_only = sequence_logps(model, batch)
        everything = sequence_logps(model, full)
    assert torch.all(everything < response_only - 1.0)


def test_kernels_agree(model, tokenizer):
    batch = pad_batch(_rows(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        results = {k: sequence_logps(model, batch, kernel=k) for k in ("torch", "naive", "auto")}
        fused = {k: sequence_logps(model, batch, kernel=k, fused_lm_head=True) for k in ("torch", "naive")}
    torch.testing.assert_close(results["torch"], results["naive"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(results["auto"], results["naive"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fused["torch"], fused["naive"], rtol=1e-6, atol=1e-5)


def test_fused_lm_head_matches_default_path_values_and_gradients(tokenizer):
    model = tiny_model(tokenizer, tiny_config(init_seed=3))
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    batch = pad_batch(_rows(tokenizer), tokenizer.pad_token_id)
    weights = torch.linspace(-1.0, 2.0, batch.input_ids.shape[0])  # a non-uniform upstream gradient

    def run(fused):
        model.zero_grad(set_to_none=True)
        logps = sequence_logps(model, batch, kernel="torch", fused_lm_head=fused)
        (logps * weights).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return logps.detach(), grads

    default_logps, default_grads = run(False)
    fused_logps, fused_grads = run(True)
    torch.testing.assert_close(fused_logps, default_logps, rtol=1e-6, atol=1e-5)
    assert default_grads.keys() == fused_grads.keys()
    for name, g in default_grads.items():
        assert g.abs().max() > 0 or name.endswith("norm.weight"), f"no gradient reached {name}"
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_fused_lm_head_matches_default_for_granite(tokenizer):
    cfg = tiny_config()
    cfg["config"] = {**cfg["config"], "model_type": "granite", "logits_scaling": 4.0}
    model = tiny_model(tokenizer, cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    batch = pad_batch(_rows(tokenizer)[:3], tokenizer.pad_token_id)
    with torch.no_grad():
        default = sequence_logps(model, batch)
        try:
            fused = sequence_logps(model, batch, fused_lm_head=True)
        except ValueError:
            return  # refusing the unsupported architecture, as for softcapping, is also acceptable
    torch.testing.assert_close(fused, default, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# score_responses
# --------------------------------------------------------------------------------------------

def _one_by_one(model, tokenizer, prompts, responses, max_length=512, max_prompt_length=256):
    out = []
    for row in _rows(tokenizer, prompts, responses, max_length, max_prompt_length):
        with torch.no_grad():
            out.append(sequence_logps(model, pad_batch([row], tokenizer.pad_token_id))[0])
    return torch.stack(out)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_score_responses_equals_row_by_row_in_input_order(model, tokenizer, batch_size):
    expected = _one_by_one(model, tokenizer, PROMPTS, RESPONSES)
    got = score_responses(model, tokenizer, PROMPTS, RESPONSES, batch_size=batch_size, desc=None)
    assert got.shape == (len(PROMPTS),) and got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(set(got.tolist())) == len(PROMPTS)  # distinct values: an order mix-up would show


def test_score_responses_is_permutation_equivariant(model, tokenizer):
    base = score_responses(model, tokenizer, PROMPTS, RESPONSES, batch_size=2, desc=None)
    perm = list(range(len(PROMPTS)))
    random.Random(0).shuffle(perm)
    shuffled = score_responses(model, tokenizer, [PROMPTS[i] for i in perm], [RESPONSES[i] for i in perm],
                               batch_size=2, desc=None)
    torch.testing.assert_close(shuffled, base[perm], rtol=1e-5, atol=1e-5)


def test_score_responses_truncation_matches_encode_pair(model, tokenizer):
    expected = _one_by_one(model, tokenizer, PROMPTS, RESPONSES, max_length=24, max_prompt_length=16)
    got = score_responses(model, tokenizer, PROMPTS, RESPONSES, batch_size=4, max_length=24, max_prompt_length=16,
                          desc=None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_score_responses_restores_training_mode_and_needs_no_grad(model, tokenizer):
    model.train()
    try:
        got = score_responses(model, tokenizer, PROMPTS[:2], RESPONSES[:2], desc=None)
        assert model.training
        assert not got.requires_grad
    finally:
        model.eval()


def test_score_responses_length_mismatch_raises(model, tokenizer):
    with pytest.raises(ValueError):
        score_responses(model, tokenizer, PROMPTS, RESPONSES[:-1], desc=None)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("lengths", [(512, 256), (24, 16)])  # the second truncates prompts and responses
def test_prompt_sharing_matches_full_rows(model, tokenizer, batch_size, lengths):
    # every prompt scored under several responses, in shuffled order: the MI estimator's workload
    rng = random.Random(batch_size)
    prompts = [PROMPTS[rng.randrange(len(PROMPTS))] for _ in range(19)]
    responses = [RESPONSES[rng.randrange(len(RESPONSES))] + " " * rng.randrange(3) for _ in range(19)]
    max_length, max_prompt_length = lengths
    shared = score_responses(model, tokenizer, prompts, responses, batch_size=batch_size, max_length=max_length,
                             max_prompt_length=max_prompt_length, desc=None, share_prompts=True)
    full = score_responses(model, tokenizer, prompts, responses, batch_size=batch_size, max_length=max_length,
                           max_prompt_length=max_prompt_length, desc=None, share_prompts=False)
    assert torch.allclose(shared, full, rtol=1e-5, atol=1e-4), (shared - full).abs().max()
    assert full.std() > 1.0  # the rows really differ, so a mix-up of rows would show


def test_encode_pairs_drops_end_of_turn_only_for_cut_responses(tokenizer):
    from mipo.data.encoding import encode_pairs
    from mipo.data.pairs import PreferencePair

    pairs = [PreferencePair(user("Hi"), "Hello.", "A long rambl", {"rejected_finish_reason": "length"}),
             PreferencePair(user("Yo"), "Hey", "Sup.", {"chosen_finish_reason": "eos", "rejected_finish_reason": "eos"})]
    chosen, rejected = encode_pairs(tokenizer, pairs, max_length=512, max_prompt_length=256)
    eos = tokenizer.eos_token_id
    assert [row.response_ids[-1] == eos for row in chosen] == [True, True]
    assert [row.response_ids[-1] == eos for row in rejected] == [False, True]
    assert tokenizer.decode(rejected[0].response_ids) == "A long rambl"
