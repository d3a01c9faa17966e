"""The prompt-shared training forward (mipo/model/prompt_tree.py, mipo/model/segment_attention.py, mipo/training/forward.py) against the
unshared rows: same log-probs, same loss, same gradient of every parameter, on a tiny random Llama; and the table of
objectives (mipo/training/objectives.py) that turns the forward's log-probs into each loss."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mipo.data.encoding import (
    EncodedRow,
    encode_pair,
    encode_prompt,
    encode_response,
    pad_batch,
)
from mipo.model.loading import enable_activation_checkpointing
from mipo.model.logprobs import continuation_logps, sequence_logps
from mipo.model.prompt_tree import PromptGroup, dense_mask, group_by_prompt, pack_groups
from mipo.model.segment_attention import NAME as SEGMENTS
from mipo.training.forward import (
    ReferenceLogps,
    TrainingForward,
    collate_groups,
    continuation_batch_logps,
    micro_batch_loss,
    pair_groups,
)
from tests.helpers import (
    collate_pairs,
    group_rows,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
    user,
)

FEWSHOT = "Solve. Q: 1+1? A: 2. Q: 2+3? A: 5. Q: 7-4? A: 3. "  # a shared prefix, as GSM8K's 8-shot block
PROMPTS = [FEWSHOT + "Q: 2+2?", FEWSHOT + "Q: 10-1?", "Name a fruit.", FEWSHOT + "Q: 2+2?"]
CONTINUATIONS = [  # three continuations per prompt, of different lengths
    ["4, because two and two make four.", "Banana", "9"],
    ["9", "I do not know, maybe ten?", "Nine."],
    ["Apple.", "Four", "A fruit: the mango, sweet and yellow."],
    ["Four", "4", "Twenty-two"],  # the same prompt as the first group
]
LOSS = {"beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid"}
ATTENTIONS = [SEGMENTS, "sdpa", "eager"]  # sdpa and eager follow the dense mask


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def sharp_model(tokenizer, seed=1, attn="sdpa"):
    model = tiny_model(tokenizer, tiny_config(init_seed=seed))
    with torch.no_grad():  # non-uniform next-token distributions, so that mistakes show
        model.lm_head.weight.mul_(30.0)
    model.set_attn_implementation(attn)
    return model


def rows_per_continuation(tokenizer, k=3):
    """k lists of rows; rows at index i share prompt i."""
    return [[encode_pair(encode_prompt(tokenizer, user(p)), encode_response(tokenizer, c[j]), 512, 256)
             for p, c in zip(PROMPTS, CONTINUATIONS)] for j in range(k)]


def unshared_logps(model, rows, kernel="torch"):
    """(b, K) by the plain path: every (x, y_k) its own right-padded row."""
    flat = [row for per_k in rows for row in per_k]
    return sequence_logps(model, pad_batch(flat, 0), kernel=kernel).view(len(rows), -1).T


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same_gradients(got: dict, want: dict, tol: float = 1e-5) -> None:
    """Every parameter's gradient equal within ``tol`` of its largest entry (fp32 rounding differs
    elementwise: the shared path sums a prompt's gradient contributions in another order)."""
    assert got.keys() == want.keys()
    for name, g in want.items():
        scale = g.abs().max()
        assert scale > 0 or name.endswith("norm.weight"), f"no gradient reached {name}"
        error = (got[name] - g).abs().max()
        assert error <= tol * scale, f"gradient of {name}: max error {error:.3g} > {tol} x {scale:.3g}"


# --------------------------------------------------------------------------------------------
# Layout and mask
# --------------------------------------------------------------------------------------------

def test_pack_groups_layout_by_hand():
    groups = [PromptGroup((1, 2, 3, 4), ((10, 11), (12,))), PromptGroup((1, 2, 5), ((13, 14, 15),))]
    packed = pack_groups(groups)
    # shared prefix (1, 2) | tail (3, 4) | (10, 11) | (12,) | tail (5,) | (13, 14, 15)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 10, 11, 12, 5, 13, 14, 15]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 4, 2, 3, 4, 5]]
    assert packed.segment_ids.tolist() == [[0, 0, 1, 1, 2, 2, 3, 4, 5, 5, 5]]
    assert [s.parent for s in packed.segments] == [-1, 0, 1, 1, 0, 4]
    # y_0 of a continuation is predicted by its prompt's last token, wherever the continuation sits
    assert packed.sources.tolist() == [3, 4, 3, 7, 8, 9]
    assert packed.targets.tolist() == [10, 11, 12, 13, 14, 15]
    assert packed.owners.tolist() == [0, 0, 1, 2, 2, 2]
    assert packed.num_continuations == 3


def test_every_token_sees_exactly_its_unshared_row(tokenizer):
    """Under the dense mask each token attends to the (token, position) pairs of its own unshared row, no more."""
    rows = rows_per_continuation(tokenizer)
    packed = pack_groups(group_rows(rows))
    mask = dense_mask(packed)[0, 0]  # (N, N)
    ids, pos = packed.input_ids[0].tolist(), packed.position_ids[0].tolist()
    unshared_prefixes = set()
    for per_k in rows:
        for row in per_k:
            seq = row.input_ids
            unshared_prefixes |= {tuple(zip(seq[: t + 1], range(t + 1))) for t in range(len(seq))}
    for q in range(len(ids)):
        seen = tuple((ids[k], pos[k]) for k in range(len(ids)) if mask[q, k])
        assert seen in unshared_prefixes, f"token {q} sees a context no unshared row has"
    # and the shared prefix really is shared: fewer tokens than the unshared rows
    assert packed.input_ids.shape[1] < sum(len(r.input_ids) for per_k in rows for r in per_k) // 2


def test_group_rows_rejects_rows_of_different_prompts():
    with pytest.raises(ValueError, match="different prompt ids"):
        group_rows([[EncodedRow((1, 2), (3,))], [EncodedRow((1, 9), (3,))]])


def test_group_by_prompt_groups_rows_in_first_seen_order():
    rows = [EncodedRow((1, 2), (3,)), EncodedRow((4,), (5,)), EncodedRow((1, 2), (6, 7))]
    groups, order = group_by_prompt(rows)
    assert groups == [PromptGroup((1, 2), ((3,), (6, 7))), PromptGroup((4,), ((5,),))]
    assert order == [0, 2, 1]  # the row of each packed continuation


def test_pair_groups_keep_pairs_apart_and_map_each_continuation():
    """A pair whose rows have two prompts gives two groups; equal prompts of two pairs are not merged."""
    a, b = (1, 2), (8, 9)
    columns = [[EncodedRow(a, (10,)), EncodedRow(a, (20,))],  # k = 0
               [EncodedRow(b, (11,)), EncodedRow(a, (21,))],  # k = 1: pair 0 under another prompt
               [EncodedRow(a, (12,)), EncodedRow(a, (22,))]]  # k = 2
    groups, order = pair_groups(columns)
    assert groups == [PromptGroup(a, ((10,), (12,))), PromptGroup(b, ((11,),)), PromptGroup(a, ((20,), (21,), (22,)))]
    assert order == [0, 2, 1, 3, 4, 5]  # (i, k) row-major -> packed continuation
    assert pair_groups(columns[::2]) == ([PromptGroup(a, ((10,), (12,))), PromptGroup(a, ((20,), (22,)))], None)


# --------------------------------------------------------------------------------------------
# Values and gradients equal the unshared path
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("fused", [True, False])
def test_shared_forward_equals_unshared_values_and_gradients(tokenizer, attn, fused):
    model = sharp_model(tokenizer)
    rows = rows_per_continuation(tokenizer)
    weights = torch.linspace(-1.0, 2.0, len(PROMPTS) * 3).view(len(PROMPTS), 3)  # a non-uniform upstream gradient

    expected = unshared_logps(model, rows)
    (expected * weights).sum().backward()
    expected_grads = grads(model)
    model.zero_grad(set_to_none=True)

    model.set_attn_implementation(attn)
    got = continuation_logps(model, pack_groups(group_rows(rows)), kernel="torch", fused_lm_head=fused).view(len(PROMPTS), 3)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 1.0  # the continuations really differ, so a mix-up would show
    assert_same_gradients(grads(model), expected_grads)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_dpo_forward_loss_and_gradients_match_with_checkpointing(tokenizer, share_prompt):
    """DPO through TrainingForward (micro-batch of 4 pairs, gradient checkpointing) equals the unshared loss."""
    rows = rows_per_continuation(tokenizer, k=2)
    reference = ReferenceLogps(torch.tensor([-40.0, -35.0, -50.0, -30.0]), torch.tensor([-45.0, -30.0, -52.0, -33.0]),
                               path=None, cache_hit=True)

    def run(share, checkpointing):
        model = sharp_model(tokenizer)
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        cfg = OmegaConf.create({"kernel": "torch", "fused_lm_head": True,
                                "trainer": {"share_prompt": share, "shared_attention": "auto"}})
        forward = TrainingForward.prepare(cfg, model)
        assert forward.share_prompt is share
        assert model.config._attn_implementation == (SEGMENTS if share else "sdpa")
        batch = collate_pairs(rows[0], rows[1], [2, 0, 3, 1], reference, tokenizer.pad_token_id,
                              share_prompt=forward.share_prompt)
        loss, metrics = forward(model, batch, LOSS)
        loss.backward()
        return loss.detach(), metrics, grads(model)

    base_loss, base_metrics, base_grads = run(False, checkpointing=False)
    loss, metrics, got = run(share_prompt, checkpointing=True)
    torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-6)
    for name in ("reward_margin", "logps_chosen", "logps_rejected"):
        torch.testing.assert_close(metrics[name], base_metrics[name], rtol=1e-5, atol=1e-5)
    assert_same_gradients(got, base_grads)


def test_collate_orders_continuations_per_prompt(tokenizer):
    rows = rows_per_continuation(tokenizer)
    model = sharp_model(tokenizer, attn=SEGMENTS)
    reference = torch.arange(12.0).view(4, 3)
    index = [3, 1]
    shared = collate_groups(rows, index, reference, tokenizer.pad_token_id, share_prompt=True)
    unshared = collate_groups(rows, index, reference, tokenizer.pad_token_id, share_prompt=False)
    assert shared.reference_logps.tolist() == unshared.reference_logps.tolist() == [[9, 10, 11], [3, 4, 5]]
    with torch.no_grad():
        got = continuation_batch_logps(model, shared.inputs, 2, kernel="torch")
        model.set_attn_implementation("sdpa")
        want = continuation_batch_logps(model, unshared.inputs, 2, kernel="torch")
        single = sequence_logps(model, pad_batch([rows[2][1]], 0), kernel="torch")[0]
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 2], single, rtol=1e-5, atol=1e-5)  # prompt 1, third continuation


def test_flex_attention_block_mask_forward(tokenizer):
    """flex attention with the tree's BlockMask gives the same log-probs (forward only: PyTorch has no flex
    backward on CPU)."""
    model = sharp_model(tokenizer, attn="flex_attention")
    rows = rows_per_continuation(tokenizer)
    with torch.no_grad():
        got = continuation_logps(model, pack_groups(group_rows(rows)), kernel="torch").view(len(PROMPTS), 3)
        model.set_attn_implementation("sdpa")
        want = unshared_logps(model, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_segment_attention_without_a_tree_says_what_to_do(tokenizer):
    model = sharp_model(tokenizer, attn=SEGMENTS)
    with pytest.raises(ValueError, match="prompt_tree"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_share_prompt_false_keeps_the_policy_attention(tokenizer):
    model = sharp_model(tokenizer)
    cfg = OmegaConf.create({"kernel": "auto", "fused_lm_head": False, "trainer": {"share_prompt": False}})
    forward = TrainingForward.prepare(cfg, model)
    assert not forward.share_prompt and not forward.fused_lm_head
    assert model.config._attn_implementation == "sdpa"
    ref = ReferenceLogps(torch.zeros(4), torch.zeros(4), path=None, cache_hit=True)
    rows = rows_per_continuation(tokenizer, k=2)
    batch = collate_pairs(rows[0], rows[1], [0, 1], ref, tokenizer.pad_token_id, share_prompt=False)
    loss, _ = micro_batch_loss(model, batch, LOSS, kernel="torch")
    assert batch.inputs.input_ids.shape[0] == 4 and torch.isfinite(loss)


# --------------------------------------------------------------------------------------------
# Every loss through the training forward: x' in the same tree, K negatives as more continuations
# --------------------------------------------------------------------------------------------

from mipo.losses import (  # noqa: E402
    LOSS_FAMILIES,  # noqa: E402
    dpo_plackett_luce_loss,
    infonce_loss,
    sami_loss,
    sft_loss,
    simpo_loss,
)
from mipo.training.forward import TrainingRows  # noqa: E402
from mipo.training.objectives import (  # noqa: E402
    BOTH_CONTEXTS,
    CHOSEN,
    CHOSEN_AND_REJECTED,
    OBJECTIVES,
    objective,
)

NEGATIVE_PROMPTS = [PROMPTS[1], PROMPTS[2], PROMPTS[0], "Name a colour."]  # x' of each pair
FAMILY_LOSSES = {
    "sami": {"loss_type": "sami", "label_smoothing": 0.0},
    "infonce": {"loss_type": "infonce", "temperature": 10.0},
    "simpo": {"loss_type": "simpo", "beta": 2.0, "gamma": 0.5, "length_normalize": True},
    "sft": {"loss_type": "sft", "sft_reduction": "mean"},
    "dpo_k2_mean": {**LOSS, "multi_negative": "mean"},
    "dpo_k2_plackett_luce": {**LOSS, "multi_negative": "plackett_luce"},
}


def training_rows(tokenizer) -> TrainingRows:
    """y+ = continuation 0 and y- = continuation 1 of each prompt, y-_2 = continuation 2; rows under x and x'."""
    def rows(prompts, j):
        return [encode_pair(encode_prompt(tokenizer, user(p)), encode_response(tokenizer, c[j]), 512, 256)
                for p, c in zip(prompts, CONTINUATIONS)]
    return TrainingRows(rows(PROMPTS, 0), rows(PROMPTS, 1), [rows(PROMPTS, 2)], rows(NEGATIVE_PROMPTS, 0),
                        rows(NEGATIVE_PROMPTS, 1))


def expected_loss(name, loss_cfg, columns, lengths, reference):
    """The loss of ``loss_cfg`` from log-probs computed row by row (``columns``: the loss's (b,) inputs)."""
    if name == "sami":
        return sami_loss(*columns).mean()
    if name == "infonce":
        return infonce_loss(*columns, temperature=loss_cfg["temperature"]).mean()
    if name == "simpo":
        return simpo_loss(columns[0], columns[1], lengths[:, 0], lengths[:, 1], beta=2.0, gamma=0.5)[0].mean()
    if name == "sft":
        return sft_loss(columns[0], lengths[:, 0], "mean").mean()
    chosen, rejected = columns[0], torch.stack(columns[1:], dim=1)  # (b,), (b, 2)
    if name == "dpo_k2_plackett_luce":
        return dpo_plackett_luce_loss(chosen, rejected, reference[:, 0], reference[:, 1:], beta=0.1)[0].mean()
    from mipo.losses import dpo_loss
    return dpo_loss(chosen[:, None].expand(-1, 2), rejected, reference[:, :1].expand(-1, 2), reference[:, 1:],
                    beta=0.1)[0].mean()


@pytest.mark.parametrize("name, share_prompt", [(name, True) for name in FAMILY_LOSSES] + [("sami", False),
                                                                                       ("dpo_k2_mean", False)])
def test_every_loss_matches_separate_forwards(tokenizer, name, share_prompt):
    """One (prompt-shared) forward of each loss's continuations gives the loss and every parameter gradient that
    separate per-row forwards give (fp32, 1e-5): SAMI/InfoNCE's x' groups and K = 2 negatives included."""
    loss_cfg = FAMILY_LOSSES[name]
    rows = training_rows(tokenizer)
    if not name.startswith("dpo"):
        rows.extra_rejected = []
    index = [2, 0, 3, 1]
    reference = ReferenceLogps(torch.tensor([-40.0, -35.0, -50.0, -30.0]), torch.tensor([-45.0, -30.0, -52.0, -33.0]),
                               path=None, cache_hit=True, extra_rejected=torch.tensor([[-41.0], [-36.0], [-49.0], [-31.0]]))
    lists = rows.for_loss(loss_cfg["loss_type"])

    model = sharp_model(tokenizer)  # separate forwards: each (context, response) row alone
    model.train()
    columns = [torch.stack([sequence_logps(model, pad_batch([rows_k[i]], 0), kernel="torch")[0] for i in index])
               for rows_k in lists]
    lengths = rows.pair_lengths[index]
    want = expected_loss(name, loss_cfg, columns, lengths, reference.stacked()[index])
    want.backward()
    want_grads = grads(model)

    model = sharp_model(tokenizer)
    model.train()
    cfg = OmegaConf.create({"kernel": "torch", "fused_lm_head": True,
                            "trainer": {"share_prompt": share_prompt, "shared_attention": "auto"}})
    forward = TrainingForward.prepare(cfg, model)
    batch = forward.collate_rows(rows, index, reference, tokenizer.pad_token_id, loss_cfg["loss_type"])
    if share_prompt and name in ("sami", "infonce"):
        assert len(batch.inputs.segments) >= 1 + 6 * len(index)  # two groups per pair: x and x' in one tree
    loss, metrics = forward(model, batch, loss_cfg)
    loss.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    assert_same_gradients(grads(model), want_grads)
    assert float(metrics["length_chosen"]) == pytest.approx(float(lengths[:, 0].float().mean()))
    assert float(metrics["length_rejected"]) == pytest.approx(float(lengths[:, 1].float().mean()))
    assert float(want.detach()) > 0.01  # a loss that is not trivially zero, so a mix-up would show


def test_one_negative_is_the_dpo_forward_bit_for_bit(tokenizer):
    """negatives.num_negatives = 1 collates and trains exactly as the DPO micro-batch always did."""
    rows = training_rows(tokenizer)
    rows.extra_rejected = []
    reference = ReferenceLogps(torch.tensor([-40.0, -35.0, -50.0, -30.0]), torch.tensor([-45.0, -30.0, -52.0, -33.0]),
                               path=None, cache_hit=True)
    results = []
    for via_rows in (False, True):
        model = sharp_model(tokenizer)
        cfg = OmegaConf.create({"kernel": "torch", "fused_lm_head": True,
                                "trainer": {"share_prompt": True, "shared_attention": "auto"}})
        forward = TrainingForward.prepare(cfg, model)
        if via_rows:
            batch = forward.collate_rows(rows, [1, 3], reference, tokenizer.pad_token_id, "sigmoid")
            assert batch.order is None
        else:
            batch = collate_pairs(rows.chosen, rows.rejected, [1, 3], reference, tokenizer.pad_token_id,
                                  share_prompt=forward.share_prompt)
        loss, _ = forward(model, batch, {**LOSS, "multi_negative": "plackett_luce"})
        loss.backward()
        results.append((loss.detach(), grads(model)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


def test_every_loss_type_has_one_objective_built_on_its_family():
    """The table maps every ``loss.loss_type`` to an objective whose needs are its ``LossFamily``'s."""
    assert set(OBJECTIVES) == set(LOSS_FAMILIES)
    for loss_type, entry in OBJECTIVES.items():
        assert entry.family == LOSS_FAMILIES[loss_type] and objective(loss_type) is entry
    assert {name: OBJECTIVES[name].columns for name in ("sigmoid", "sft", "simpo", "sami", "infonce")} == {
        "sigmoid": CHOSEN_AND_REJECTED, "sft": CHOSEN, "simpo": CHOSEN_AND_REJECTED, "sami": BOTH_CONTEXTS,
        "infonce": BOTH_CONTEXTS}
    with pytest.raises(ValueError, match="unknown loss.loss_type='kto'"):
        objective("kto")
