"""Invariances of the training computation, in fp32 on the tiny model (in the manner of TRL's
invariance tests): a result must not depend on how a batch was split, padded or scored.

- micro-batch 1 x accumulation 4 gives the same update as micro-batch 4;
- the concatenated chosen+rejected forward equals two separate forwards;
- the amount of padding does not change sequence log-probs;
- cached reference log-probs equal fresh ones computed under another batch size.
"""

from __future__ import annotations

import json

import pytest
import torch

from mipo.data.encoding import EncodedRow, encode_pairs, pad_batch
from mipo.data.pairs import PairsFile, read_pairs
from mipo.losses import dpo_loss
from mipo.model.logprobs import (
    Scorer,
    ScoringSettings,
    prompt_tree_logps,
    sequence_logps,
)
from mipo.stages.reference import ReferencePass
from mipo.stages.train import train
from mipo.training.forward import ReferenceLogps, micro_batch_loss
from tests.helpers import (
    collate_pairs,
    compose_config,
    load_weights,
    single_forward,
    tiny_model,
    tiny_tokenizer,
    write_pairs_file,
)

LOSS = {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid"}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def rows(tokenizer, tmp_path_factory):
    pairs = read_pairs(write_pairs_file(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 8))
    return encode_pairs(tokenizer, pairs, max_length=256, max_prompt_length=128)


def fake_reference(n: int) -> ReferenceLogps:
    generator = torch.Generator().manual_seed(0)
    return ReferenceLogps(-50 - 10 * torch.rand(n, generator=generator), -50 - 10 * torch.rand(n, generator=generator),
                          path=None, cache_hit=True)


def test_micro_batches_of_one_accumulated_equal_one_micro_batch_of_four(tmp_path):
    """The trainer's own loop: two steps of 4 pairs, split 1 x 4 or 4 x 1, give the same weights and
    the same logged gradient norms and losses (AdamW alone would hide a mis-scaled gradient)."""
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", 8)
    weights, metrics = {}, {}
    for micro in (1, 4):
        cfg = compose_config(
            "model=tiny-llama", f"data.pairs_path={pairs_file}", f"paths.cache_dir={tmp_path / 'cache'}",
            "data.max_length=256", "data.max_prompt_length=128", "trainer.batch_size=4",
            f"trainer.micro_batch_size={micro}", "trainer.lr=1e-3", "trainer.warmup_ratio=0", "kernel=torch")
        train(cfg, tmp_path / f"micro{micro}", PairsFile.hashed(pairs_file))
        weights[micro] = load_weights(tmp_path / f"micro{micro}" / "model")
        metrics[micro] = [json.loads(line) for line in (tmp_path / f"micro{micro}" / "metrics.jsonl").open()]
    for one, four in zip(metrics[1], metrics[4], strict=True):
        for key in ("train/grad_norm", "train/loss", "train/reward_margin", "train/logps_chosen"):
            assert one[key] == pytest.approx(four[key], rel=1e-6, abs=1e-6), key
    initial = tiny_model(tiny_tokenizer(), compose_config("model=tiny-llama").model).state_dict()
    moved = 0
    for name, value in weights[4].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=1e-6, msg=name)
        moved += not torch.equal(value, initial[name])
    assert moved > 10  # the two steps did change the weights


def test_accumulated_gradients_equal_the_full_batch_gradient(tokenizer, rows):
    model = tiny_model(tokenizer)
    chosen, rejected = rows
    reference = fake_reference(len(chosen))
    index = [0, 3, 5, 6]

    def gradients(micro: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for start in range(0, len(index), micro):
            batch = collate_pairs(chosen, rejected, index[start:start + micro], reference, tokenizer.pad_token_id)
            loss, _ = micro_batch_loss(model, batch, LOSS, kernel="torch")
            (loss / (len(index) // micro)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    full, accumulated = gradients(4), gradients(1)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=0, atol=1e-6, msg=name)


def test_concatenated_forward_equals_separate_forwards(tokenizer, rows):
    model = tiny_model(tokenizer)
    chosen, rejected = rows
    index = [1, 2, 4]
    reference = fake_reference(len(chosen))
    batch = collate_pairs(chosen, rejected, index, reference, tokenizer.pad_token_id, share_prompt=False)
    concatenated = sequence_logps(model, batch.inputs, kernel="torch")  # (2b,)
    separate_chosen = sequence_logps(model, pad_batch([chosen[i] for i in index], tokenizer.pad_token_id), kernel="torch")
    separate_rejected = sequence_logps(model, pad_batch([rejected[i] for i in index], tokenizer.pad_token_id),
                                       kernel="torch")
    torch.testing.assert_close(concatenated, torch.cat([separate_chosen, separate_rejected]), rtol=1e-6, atol=1e-5)

    # and the loss and its gradient built on them, concatenated and prompt-shared
    loss, _ = micro_batch_loss(model, batch, LOSS, kernel="torch")
    grad_concatenated = torch.autograd.grad(loss, list(model.parameters()))
    shared = collate_pairs(chosen, rejected, index, reference, tokenizer.pad_token_id, share_prompt=True)
    loss_shared, _ = micro_batch_loss(model, shared, LOSS, kernel="torch")
    grad_shared = torch.autograd.grad(loss_shared, list(model.parameters()))
    c = sequence_logps(model, pad_batch([chosen[i] for i in index], tokenizer.pad_token_id), kernel="torch")
    r = sequence_logps(model, pad_batch([rejected[i] for i in index], tokenizer.pad_token_id), kernel="torch")
    losses, _, _ = dpo_loss(c, r, reference.chosen[index], reference.rejected[index], **LOSS)
    grad_separate = torch.autograd.grad(losses.mean(), list(model.parameters()))
    torch.testing.assert_close(loss, losses.mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_shared, losses.mean(), rtol=1e-6, atol=1e-6)
    for a, b, c in zip(grad_concatenated, grad_separate, grad_shared):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("extra", [1, 37, 200])
def test_right_padding_does_not_change_sequence_logps(tokenizer, rows, extra):
    model = tiny_model(tokenizer)
    chosen, _ = rows
    batch = pad_batch(chosen[:4], tokenizer.pad_token_id)
    padded = pad_batch(chosen[:4] + [EncodedRow((), (tokenizer.pad_token_id,) * (batch.input_ids.shape[1] + extra))],
                       tokenizer.pad_token_id)  # a longer row widens every row's padding by ``extra``
    wider = type(batch)(padded.input_ids[:4], padded.attention_mask[:4], padded.labels[:4])
    assert wider.input_ids.shape[1] == batch.input_ids.shape[1] + extra
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, wider, kernel="torch"), sequence_logps(model, batch, kernel="torch"),
                                   rtol=1e-6, atol=1e-5)


def test_prompt_tree_neighbours_do_not_change_logps(tokenizer, rows):
    model = tiny_model(tokenizer).eval()
    chosen, _ = rows
    long_prompt = EncodedRow(tuple(chosen[0].prompt_ids) * 3, chosen[0].response_ids)
    with torch.no_grad():
        alone = torch.stack([prompt_tree_logps(model, [row], kernel="torch")[0] for row in chosen[:4]])
        beside_a_long_prompt = prompt_tree_logps(model, [*chosen[:4], long_prompt], kernel="torch")[:4]
    torch.testing.assert_close(beside_a_long_prompt, alone, rtol=1e-6, atol=1e-5)


def test_cached_reference_equals_fresh_logps_under_another_batch_size(tmp_path, tokenizer):
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", 8)
    model_cfg = compose_config("model=tiny-llama").model
    model = tiny_model(tokenizer)
    chosen, rejected = encode_pairs(tokenizer, read_pairs(pairs_file), 256, 128)
    micro_batches = [[0, 5], [3, 1], [7, 2], [4, 6]]  # as a shuffled first epoch would have them
    reference_pass = ReferencePass(single_forward(tiny_model(tokenizer)), model_cfg, tokenizer, (256, 128), micro_batches,
                                   torch.device("cpu"), tmp_path / "cache")
    cached = reference_pass.logps(PairsFile.hashed(pairs_file), (chosen, rejected))
    assert not cached.cache_hit
    again = reference_pass.logps(PairsFile.hashed(pairs_file), (chosen, rejected))
    assert again.cache_hit and torch.equal(again.chosen, cached.chosen)

    # another batch size, each row in full (no prompt sharing): the scorer's other path
    scorer = Scorer(model, tokenizer, ScoringSettings(max_length=256, max_prompt_length=128, batch_size=3, kernel="torch",
                                                      share_prompts=False))
    fresh = scorer.score_rows(chosen + rejected, desc=None)
    torch.testing.assert_close(fresh, torch.cat([again.chosen, again.rejected]), rtol=1e-6, atol=1e-4)
    # and the training forward, micro-batches of 2 pairs in file order (not the reference's): policy == reference
    with torch.no_grad():
        for start in range(0, 8, 2):
            batch = collate_pairs(chosen, rejected, list(range(start, start + 2)), again, tokenizer.pad_token_id)
            _, metrics = micro_batch_loss(model, batch, LOSS, kernel="torch")
            torch.testing.assert_close(metrics["reward_chosen"], torch.tensor(0.0), rtol=0, atol=1e-5)
            torch.testing.assert_close(metrics["reward_rejected"], torch.tensor(0.0), rtol=0, atol=1e-5)
