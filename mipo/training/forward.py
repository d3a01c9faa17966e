"""One micro-batch of the training step: collate prompts with their continuations, one policy forward, the loss.

The unit is a prompt with K continuations (DPO: K = 2, y+ and y-). ``collate_groups`` lays b of
them out in one of two ways:

* prompt-shared (``trainer.share_prompt``, the default): one packed row per micro-batch in
  which every prompt, and the prefix the prompts share, runs once and each continuation attends
  to it (``mipo.model.prompt_tree``); only positions that predict a response token reach the output layer.
* unshared: K * b right-padded rows (x, y_k), as the DPO reference implementation's
  ``concatenated_forward``; kept for comparison and for models whose attention cannot follow
  the prompt tree.

Both give the same (b, K) log-probs and the same gradients (tests/test_forward.py).
``continuation_batch_logps`` returns them; ``dpo_forward`` turns them into the loss of ``loss.loss_type``:
DPO (K = 2; K + 1 with ``negatives.num_negatives`` = K), SFT (y+ only), SimPO, and SAMI/InfoNCE,
whose pairs put x' in the same tree: (x, [y+, y-]) and (x', [y+, y-]) as two groups, so their
four log-probs per pair come from one forward with the shared prefix run once.
``TrainingForward`` resolves the config once and is what ``mipo.stages.train.train`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mipo.data.encoding import Batch, EncodedRow, encode_pairs, encode_rows, pad_batch
from mipo.data.pairs import PreferencePair
from mipo.losses import (
    dpo_loss,
    dpo_plackett_luce_loss,
    infonce_loss,
    loss_family,
    sami_loss,
    sft_loss,
    simpo_loss,
)
from mipo.model import segment_attention
from mipo.model.logprobs import continuation_logps, sequence_logps
from mipo.model.prompt_tree import PackedGroups, PromptGroup, pack_groups

SHARE_PROMPT = ("auto", True, False)
# attention of the prompt-shared forward -> the model's attention implementation it runs under
SHARED_ATTENTION = {"segments": segment_attention.NAME, "flex": "flex_attention", "dense": None}


# --------------------------------------------------------------------------------------------

@dataclass
class ReferenceLogps:
    """log pi_ref of every pair's rows, from the reference cache (``mipo.stages.reference``)."""

    chosen: torch.Tensor  # (N,) float32, log pi_ref(y+|x)
    rejected: torch.Tensor  # (N,) float32, log pi_ref(y-|x)
    path: Path
    cache_hit: bool
    extra_rejected: torch.Tensor | None = None  # (N, K - 1) log pi_ref(y-_k|x) of the extra negatives; None for K = 1

    def stacked(self) -> torch.Tensor:
        """(N, 1 + K): log pi_ref(y+|x), then the K rejected responses' log pi_ref(y-_k|x)."""
        columns = [self.chosen[:, None], self.rejected[:, None]]
        if self.extra_rejected is not None:
            columns.append(self.extra_rejected)
        return torch.cat(columns, dim=1)


@dataclass
class ContinuationBatch:
    """A micro-batch of b pairs, each scored under K (context, response) continuations, and their reference log-probs."""

    inputs: Batch | PackedGroups  # unshared: (K * b, T) rows, continuation-major; shared: one packed row
    reference_logps: torch.Tensor | None  # (b, K) log pi_ref(y_k | x); None for reference-free losses
    lengths: torch.Tensor | None = None  # (b, K) response tokens of each continuation
    order: torch.Tensor | None = None  # shared layout: (b * K,) packed continuation of (i, k), row-major; None: identity
    pair_lengths: torch.Tensor | None = None  # (b, 2) tokens of y+ and y- (logged whatever the loss trains on)

    @property
    def num_pairs(self) -> int:
        return self.lengths.shape[0] if self.lengths is not None else self.reference_logps.shape[0]

    def to(self, device: torch.device | str) -> "ContinuationBatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)
        return ContinuationBatch(self.inputs.to(device), move(self.reference_logps), move(self.lengths),
                                 move(self.order), move(self.pair_lengths))


def group_by_prompt(selected: Sequence[Sequence[EncodedRow]]) -> tuple[list[PromptGroup], list[int] | None]:
    """Pair i's continuations grouped by prompt: one group per distinct prompt of pair i, in first-seen order.

    Args:
        selected: K lists of b rows; column i holds pair i's K (prompt, response) rows, whose prompts
            may differ (SAMI and InfoNCE score y+ and y- under x and under x').

    Returns:
        ``(groups, order)``: the groups for ``pack_groups``, and for each (i, k), row-major, the index
        of its continuation in the packed order (``None`` when that is the identity, as for DPO).
    """
    num_continuations, b = len(selected), len(selected[0])
    groups, order = [], [0] * (b * num_continuations)
    packed = 0
    for i in range(b):
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for k in range(num_continuations):
            by_prompt.setdefault(selected[k][i].prompt_ids, []).append(k)
        for prompt, ks in by_prompt.items():
            groups.append(PromptGroup(prompt, tuple(selected[k][i].response_ids for k in ks)))
            for k in ks:
                order[i * num_continuations + k] = packed
                packed += 1
    return groups, None if order == list(range(len(order))) else order


def collate_groups(rows_per_continuation: Sequence[Sequence[EncodedRow]], index: Sequence[int],
                   reference_logps: torch.Tensor | None, pad_token_id: int, share_prompt: bool = True,
                   pair_lengths: torch.Tensor | None = None) -> ContinuationBatch:
    """The pairs ``index``, each with its row from every list of ``rows_per_continuation``.

    Args:
        rows_per_continuation: K lists of rows, one row per pair in each. Rows of a pair that share a
            prompt run it once (one group); a pair whose rows have two prompts (x and x') gives two groups.
        reference_logps: (num_pairs, K) log pi_ref of every row, in the same order; None when the loss
            needs none.
        pair_lengths: (num_pairs, 2) tokens of y+ and y- of every pair, for the length metrics.
    """
    selected = [[rows[i] for i in index] for rows in rows_per_continuation]  # K lists of b rows
    order = None
    if share_prompt:
        groups, order_list = group_by_prompt(selected)
        inputs = pack_groups(groups)
        order = None if order_list is None else torch.tensor(order_list)
    else:
        inputs = pad_batch([row for rows in selected for row in rows], pad_token_id)
    lengths = torch.tensor([[len(rows[i].response_ids) for rows in selected] for i in range(len(index))])  # (b, K)
    return ContinuationBatch(inputs, None if reference_logps is None else reference_logps[list(index)], lengths, order,
                             None if pair_lengths is None else pair_lengths[list(index)])


def collate_pairs(chosen_rows: Sequence[EncodedRow], rejected_rows: Sequence[EncodedRow], index: Sequence[int],
                  reference: ReferenceLogps, pad_token_id: int, share_prompt: bool = True) -> ContinuationBatch:
    """DPO's micro-batch: the pairs ``index`` as prompts with two continuations (y+, y-)."""
    reference_logps = torch.stack([reference.chosen, reference.rejected], dim=1)  # (N, 2)
    return collate_groups([chosen_rows, rejected_rows], index, reference_logps, pad_token_id, share_prompt)


def continuation_batch_logps(policy: torch.nn.Module, inputs: Batch | PackedGroups, num_prompts: int,
                             kernel: str = "auto", fused_lm_head: bool = True,
                             order: torch.Tensor | None = None) -> torch.Tensor:
    """(b, K) log pi(y_k | context_k) of a collated micro-batch, in either layout, differentiable.

    ``order``: the batch's ``ContinuationBatch.order`` (prompt-shared layout whose pairs have more
    than one prompt).
    """
    if isinstance(inputs, PackedGroups):
        logps = continuation_logps(policy, inputs, kernel=kernel, fused_lm_head=fused_lm_head)  # (C,)
        if order is not None:
            logps = logps[order]  # (b * K,) row-major
        return logps.view(num_prompts, -1)
    logps = sequence_logps(policy, inputs, kernel=kernel, fused_lm_head=fused_lm_head)  # (K * b,)
    return logps.view(-1, num_prompts).T


# --------------------------------------------------------------------------------------------
# What each loss trains on
# --------------------------------------------------------------------------------------------

@dataclass
class TrainingRows:
    """Every pair's encoded rows, as the loss needs them (``encode_training_rows``).

    ``chosen``/``rejected``: (x, y+) and (x, y-), scored by the reference too; ``extra_rejected``:
    K - 1 lists of (x, y-_k) for ``negatives.num_negatives`` = K > 1; ``chosen_xneg``/``rejected_xneg``:
    (x', y+) and (x', y-), x' the pair's ``negative_prompt`` (SAMI, InfoNCE).
    """

    chosen: list[EncodedRow]
    rejected: list[EncodedRow]
    extra_rejected: list[list[EncodedRow]] = field(default_factory=list)
    chosen_xneg: list[EncodedRow] | None = None
    rejected_xneg: list[EncodedRow] | None = None

    @cached_property
    def pair_lengths(self) -> torch.Tensor:
        """(N, 2) response tokens of y+ and y- of every pair."""
        return torch.tensor([[len(c.response_ids), len(r.response_ids)] for c, r in zip(self.chosen, self.rejected)])

    def for_loss(self, loss_type: str) -> list[list[EncodedRow]]:
        """The row lists, in the column order the loss reads its (b, K) log-probs in."""
        family = loss_family(loss_type)
        if not family.uses_rejected:  # SFT
            return [self.chosen]
        if family.needs_negative_prompt:
            if self.chosen_xneg is None or self.rejected_xneg is None:
                raise ValueError(f"loss.loss_type={loss_type} needs the rows under x' (encode_training_rows with it)")
            return [self.chosen, self.rejected, self.chosen_xneg, self.rejected_xneg]  # pos_x, neg_x, pos_x', neg_x'
        return [self.chosen, self.rejected, *self.extra_rejected]


def encode_training_rows(tokenizer, pairs: Sequence[PreferencePair], loss_type: str, max_length: int,
                         max_prompt_length: int, num_negatives: int = 1) -> TrainingRows:
    """Encode what ``loss_type`` trains on: (x, y+), (x, y-), K - 1 extra (x, y-_k), (x', y+), (x', y-).

    Every row goes through ``mipo.data.encoding.encode_rows``, the one tokenisation path, so the
    reference scores exactly these tokens. ``num_negatives`` = K reads the pairs' ``extra_negatives``
    (``mipo.data.pairs``); x' is each pair's ``negative_prompt``.
    """
    chosen, rejected = encode_pairs(tokenizer, pairs, max_length, max_prompt_length)
    rows = TrainingRows(chosen, rejected)
    prompts = [pair.prompt for pair in pairs]
    for k in range(num_negatives - 1):
        extras = [pair.extra_rejected(k, num_negatives) for pair in pairs]
        rows.extra_rejected.append(encode_rows(tokenizer, prompts, [text for text, _ in extras], max_length,
                                               max_prompt_length, finished=[done for _, done in extras]))
    if loss_family(loss_type).needs_negative_prompt:
        negative_prompts = [pair.negative_prompt for pair in pairs]
        n = len(pairs)
        xneg = encode_rows(tokenizer, negative_prompts + negative_prompts,
                           [p.chosen for p in pairs] + [p.rejected for p in pairs], max_length, max_prompt_length,
                           finished=[p.chosen_finished for p in pairs] + [p.rejected_finished for p in pairs])
        rows.chosen_xneg, rows.rejected_xneg = xneg[:n], xneg[n:]
    return rows


# --------------------------------------------------------------------------------------------
# The loss of a micro-batch
# --------------------------------------------------------------------------------------------

def dpo_forward(
    policy: torch.nn.Module,
    batch: ContinuationBatch,
    loss_cfg: Mapping[str, Any],
    kernel: str = "auto",
    fused_lm_head: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``loss_cfg`` on a micro-batch and its metrics, from one policy forward.

    Every log-prob the loss needs (y+ and y- under x; K - 1 more y- under x; y+ and y- under x'
    for SAMI and InfoNCE) comes from one forward (prompt-shared or concatenated rows, whichever
    ``batch`` was collated as). DPO compares them with the cached reference log-probs (K = 1:
    ``dpo_loss``; K > 1: the mean over the K pairs, or ``dpo_plackett_luce_loss``); the other
    losses use the policy's alone.

    Returns:
        ``(loss, metrics)``: the mean loss over the b pairs (a scalar with a graph) and detached
        scalar metrics (loss, policy log-probs, response lengths; implicit rewards, their margin
        and accuracy for DPO and SimPO (with K negatives: the mean rejected reward, and y+ above
        all K); the pointwise-MI margin log pi(y|x) - log pi(y|x') of y+
        over y- for SAMI and InfoNCE).
    """
    b = batch.num_pairs
    device = batch.lengths.device if batch.lengths is not None else batch.reference_logps.device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        logps = continuation_batch_logps(policy, batch.inputs, b, kernel=kernel, fused_lm_head=fused_lm_head,
                                         order=batch.order)  # (b, K)
    loss_type = loss_cfg["loss_type"]
    family = loss_family(loss_type)
    metrics: dict[str, torch.Tensor] = {}
    chosen_rewards = rejected_rewards = None
    if family.name == "dpo":
        policy_chosen_logps, policy_rejected_logps = logps[:, 0], logps[:, 1:]  # (b,), (b, K)
        reference_chosen_logps, reference_rejected_logps = batch.reference_logps[:, 0], batch.reference_logps[:, 1:]
        if logps.shape[1] == 2:  # one negative: DPO as the paper
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                policy_chosen_logps, policy_rejected_logps[:, 0], reference_chosen_logps, reference_rejected_logps[:, 0],
                beta=loss_cfg["beta"], label_smoothing=loss_cfg["label_smoothing"], loss_type=loss_type,
            )  # each (b,)
        elif loss_cfg.get("multi_negative", "mean") == "plackett_luce":
            losses, chosen_rewards, rejected_rewards = dpo_plackett_luce_loss(
                policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                beta=loss_cfg["beta"])  # (b,), (b,), (b, K)
        else:  # mean of the K pairwise DPO losses
            num_negatives = policy_rejected_logps.shape[1]
            pair_losses, chosen_k, rejected_rewards = dpo_loss(
                policy_chosen_logps[:, None].expand(-1, num_negatives), policy_rejected_logps,
                reference_chosen_logps[:, None].expand(-1, num_negatives), reference_rejected_logps,
                beta=loss_cfg["beta"], label_smoothing=loss_cfg["label_smoothing"], loss_type=loss_type,
            )  # each (b, K)
            losses, chosen_rewards = pair_losses.mean(dim=1), chosen_k[:, 0]
        metrics["logps_rejected"] = policy_rejected_logps.detach().mean()
    elif family.name == "sft":
        policy_chosen_logps = logps[:, 0]  # (b,)
        losses = sft_loss(policy_chosen_logps, batch.lengths[:, 0], loss_cfg["sft_reduction"])
    elif family.name == "simpo":
        policy_chosen_logps = logps[:, 0]
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            policy_chosen_logps, logps[:, 1], batch.lengths[:, 0], batch.lengths[:, 1], beta=loss_cfg["beta"],
            gamma=loss_cfg["gamma"], length_normalize=loss_cfg["length_normalize"])
        metrics["logps_rejected"] = logps[:, 1].detach().mean()
    else:  # sami, infonce: columns log pi(y+|x), log pi(y-|x), log pi(y+|x'), log pi(y-|x')
        logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg = logps.unbind(1)
        policy_chosen_logps = logp_pos_x
        if loss_type == "sami":
            losses = sami_loss(logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg,
                               label_smoothing=loss_cfg.get("label_smoothing", 0.0))
        else:
            losses = infonce_loss(logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg,
                                  temperature=loss_cfg["temperature"])
        pmi_chosen = (logp_pos_x - logp_pos_xneg).detach()  # (b,) log pi(y+|x) - log pi(y+|x')
        pmi_rejected = (logp_neg_x - logp_neg_xneg).detach()  # (b,)
        metrics.update(logps_rejected=logp_neg_x.detach().mean(), pmi_margin=(pmi_chosen - pmi_rejected).mean(),
                       pmi_accuracy=(pmi_chosen > pmi_rejected).float().mean())
    loss = losses.mean()
    metrics = {"loss": loss.detach(), **metrics}
    if chosen_rewards is not None:
        rejected_mean = rejected_rewards if rejected_rewards.dim() == 1 else rejected_rewards.mean(dim=1)  # (b,)
        best_rejected = rejected_rewards if rejected_rewards.dim() == 1 else rejected_rewards.max(dim=1).values
        metrics.update(reward_chosen=chosen_rewards.mean(), reward_rejected=rejected_mean.mean(),
                       reward_margin=(chosen_rewards - rejected_mean).mean(),
                       reward_accuracy=(chosen_rewards > best_rejected).float().mean())
    metrics["logps_chosen"] = policy_chosen_logps.detach().mean()
    if batch.pair_lengths is not None:
        metrics["length_chosen"] = batch.pair_lengths[:, 0].float().mean()
        metrics["length_rejected"] = batch.pair_lengths[:, 1].float().mean()
    return loss, metrics


# --------------------------------------------------------------------------------------------

def resolve_share_prompt(setting: Any, policy: torch.nn.Module) -> bool:
    """``trainer.share_prompt``: ``auto`` shares whenever the policy's attention can be switched.

    Every model whose layers call transformers' ``AttentionInterface`` can run
    ``segment_attention``; prompt sharing then never does more work than the unshared rows (it
    runs fewer tokens and attends over fewer blocks), so ``auto`` is on for all of them (see
    bench/RESULTS.md for the measured speed-ups).
    """
    if setting == "auto":
        return bool(getattr(policy, "_can_set_attn_implementation", lambda: True)())
    return bool(setting)


def resolve_shared_attention(setting: str, policy: torch.nn.Module) -> str:
    """The attention implementation the prompt-shared forward runs under (``trainer.shared_attention``).

    ``auto`` and ``segments``: ``mipo.model.segment_attention`` (sdpa per segment, exact work, any
    device). ``flex``: flex attention with the tree's ``BlockMask`` (GPU; PyTorch has no flex
    backward on CPU; transformers compiles it per sequence length). ``dense``: the policy's own
    sdpa or eager attention with the dense (N, N) mask, the plainest statement of the rule
    and O(N^2) in time and memory.
    """
    name = SHARED_ATTENTION["segments" if setting == "auto" else setting]
    return name or policy.config._attn_implementation


@dataclass(frozen=True)
class TrainingForward:
    """The training forward's settings, resolved once from the config: what the trainer calls per micro-batch."""

    share_prompt: bool
    kernel: str = "auto"
    fused_lm_head: bool = True
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def prepare(cls, cfg: Mapping[str, Any], policy: torch.nn.Module,
                autocast_dtype: torch.dtype | None = None) -> "TrainingForward":
        """Resolve ``trainer.share_prompt``/``shared_attention`` and ``fused_lm_head``; switch the
        policy's attention implementation for the whole run when the prompt-shared forward needs it."""
        tcfg = cfg["trainer"]
        share = resolve_share_prompt(tcfg.get("share_prompt", "auto"), policy)
        if share:
            attention = resolve_shared_attention(tcfg.get("shared_attention", "auto"), policy)
            if attention != policy.config._attn_implementation:
                policy.set_attn_implementation(attention)
        return cls(share, kernel=cfg["kernel"], fused_lm_head=bool(cfg["fused_lm_head"]), autocast_dtype=autocast_dtype)

    def collate(self, chosen_rows: Sequence[EncodedRow], rejected_rows: Sequence[EncodedRow], index: Sequence[int],
                reference: ReferenceLogps, pad_token_id: int) -> ContinuationBatch:
        """DPO's micro-batch of (x, y+), (x, y-) rows."""
        return collate_pairs(chosen_rows, rejected_rows, index, reference, pad_token_id, share_prompt=self.share_prompt)

    def collate_rows(self, rows: TrainingRows, index: Sequence[int], reference: ReferenceLogps | None,
                     pad_token_id: int, loss_type: str) -> ContinuationBatch:
        """The micro-batch ``loss_type`` trains on: its rows (``TrainingRows.for_loss``), with the reference
        log-probs when it needs them, and every pair's y+/y- lengths for the metrics."""
        reference_logps = reference.stacked() if loss_family(loss_type).needs_reference else None  # (N, 1 + K)
        return collate_groups(rows.for_loss(loss_type), index, reference_logps, pad_token_id,
                              share_prompt=self.share_prompt, pair_lengths=rows.pair_lengths)

    def __call__(self, policy: torch.nn.Module, batch: ContinuationBatch,
                 loss_cfg: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dpo_forward(policy, batch, loss_cfg, kernel=self.kernel, fused_lm_head=self.fused_lm_head,
                           autocast_dtype=self.autocast_dtype)
