"""One micro-batch of the training step: collate prompts with their continuations, one policy forward, the loss.

The unit is a prompt with K continuations (DPO: K = 2, y+ and y-). ``collate_groups`` lays b of
them out in one of two ways:

* prompt-shared (``trainer.share_prompt``, the default): one packed row per micro-batch in
  which every prompt, and the prefix the prompts share, runs once and each continuation attends
  to it (``mipo.model.prompt_tree``; a pair's rows are grouped by prompt with its
  ``group_by_prompt``); only positions that predict a response token reach the output layer.
* unshared: K * b right-padded rows (x, y_k), as the DPO reference implementation's
  ``concatenated_forward``; kept for comparison and for models whose attention cannot follow
  the prompt tree.

Both give the same (b, K) log-probs and the same gradients (tests/training/test_forward.py).
``encode_training_rows`` encodes what each loss trains on, once per run; ``TrainingRows.for_loss``
gives its rows in the column order of the loss's objective: y+ (SFT), y+ and K y- (DPO with
``negatives.num_negatives`` = K, SimPO), or (x, [y+, y-]) and (x', [y+, y-]) as two groups of one
tree (SAMI, InfoNCE), so that all four log-probs of a pair come from one forward.

``micro_batch_loss`` is the loss of a micro-batch in three steps: one forward for the (b, K)
log-probs (``continuation_batch_logps``), the objective of ``loss.loss_type``
(``mipo.training.objectives.OBJECTIVES``: the per-pair losses), the metrics every objective shares.
``TrainingForward`` resolves the config once and is what the training step
(``mipo.training.step.optimizer_step``) calls per micro-batch, through ``mipo.training.parallel``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mipo.data.encoding import Batch, EncodedRow, encode_pairs, encode_rows, pad_batch
from mipo.data.pairs import PreferencePair
from mipo.kernels.logprob import default_impl
from mipo.losses import loss_family
from mipo.model import segment_attention
from mipo.model.architecture import resolve_prompt_tree
from mipo.model.logprobs import continuation_logps, sequence_logps
from mipo.model.prompt_tree import (
    PackedGroups,
    PromptGroup,
    group_by_prompt,
    pack_groups,
)
from mipo.runtime.errors import failed
from mipo.training.objectives import (
    BOTH_CONTEXTS,
    CHOSEN,
    ObjectiveInputs,
    objective,
    training_metrics,
)

log = logging.getLogger(__name__)
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


def pair_groups(selected: Sequence[Sequence[EncodedRow]]) -> tuple[list[PromptGroup], list[int] | None]:
    """Pair i's continuations grouped by prompt (``mipo.model.prompt_tree.group_by_prompt`` of its K rows).

    Args:
        selected: K lists of b rows; column i holds pair i's K (prompt, response) rows, whose prompts
            may differ (SAMI and InfoNCE score y+ and y- under x and under x').

    Returns:
        ``(groups, order)``: the groups for ``pack_groups``, pair by pair (one group per distinct prompt
        of pair i, in first-seen order), and for each (i, k), row-major, the index of its continuation
        in the packed order (``None`` when that is the identity, as for DPO).
    """
    num_continuations, b = len(selected), len(selected[0])
    groups, order = [], [0] * (b * num_continuations)
    packed = 0
    for i in range(b):
        pair_rows_groups, ks = group_by_prompt([selected[k][i] for k in range(num_continuations)])
        groups.extend(pair_rows_groups)
        for k in ks:  # packed order: continuation k of pair i is the next one
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
        groups, order_list = pair_groups(selected)
        inputs = pack_groups(groups)
        order = None if order_list is None else torch.tensor(order_list)
    else:
        inputs = pad_batch([row for rows in selected for row in rows], pad_token_id)
    lengths = torch.tensor([[len(rows[i].response_ids) for rows in selected] for i in range(len(index))])  # (b, K)
    return ContinuationBatch(inputs, None if reference_logps is None else reference_logps[list(index)], lengths, order,
                             None if pair_lengths is None else pair_lengths[list(index)])


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
        """The row lists, in the column order the loss's objective reads its (b, K) log-probs in
        (``mipo.training.objectives.Objective.columns``)."""
        columns = objective(loss_type).columns
        if columns == CHOSEN:  # SFT
            return [self.chosen]
        if columns == BOTH_CONTEXTS:
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

def micro_batch_loss(
    policy: torch.nn.Module,
    batch: ContinuationBatch,
    loss_cfg: Mapping[str, Any],
    kernel: str = "auto",
    fused_lm_head: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of ``loss_cfg`` on a micro-batch and its metrics, from one policy forward.

    Three steps: every log-prob the loss needs (y+ and y- under x; K - 1 more y- under x; y+ and
    y- under x' for SAMI and InfoNCE) comes from one forward (prompt-shared or concatenated rows,
    whichever ``batch`` was collated as), as (b, K) log pi(y_k | context_k); the objective of
    ``loss.loss_type`` (``mipo.training.objectives.OBJECTIVES``) turns them, with the cached reference
    log-probs where it needs them, into per-pair losses; ``training_metrics`` logs the same names
    for every objective.

    Returns:
        ``(loss, metrics)``: the mean loss over the b pairs (a scalar with a graph) and detached
        scalar metrics (``training_metrics``).
    """
    policy_logps = batch_logps(policy, batch, kernel, fused_lm_head, autocast_dtype)  # (b, K)
    result = objective(loss_cfg["loss_type"])(ObjectiveInputs(policy_logps, batch.reference_logps, batch.lengths),
                                              loss_cfg)
    loss = result.losses.mean()
    return loss, training_metrics(loss, result, batch.pair_lengths)


def batch_logps(policy: torch.nn.Module, batch: ContinuationBatch, kernel: str = "auto", fused_lm_head: bool = True,
                autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(b, K) log pi(y_k | context_k) of a collated micro-batch under the training forward's autocast: what the
    loss reads, and (at step 0, without gradients) what the reference pass stores as log pi_ref."""
    device = batch.lengths.device if batch.lengths is not None else batch.reference_logps.device
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return continuation_batch_logps(policy, batch.inputs, batch.num_pairs, kernel=kernel,
                                        fused_lm_head=fused_lm_head, order=batch.order)


# --------------------------------------------------------------------------------------------

def resolve_share_prompt(setting: Any, policy: torch.nn.Module) -> bool:
    """``trainer.share_prompt``: the prompt tree wherever it is exact for the policy.

    ``auto``: the tree iff ``mipo.model.architecture.prompt_tree_problem(policy)`` is None (full causal
    attention in every layer: no window, softcapping or ALiBi, a switchable attention implementation),
    else unshared rows and one INFO line saying why; where it is exact the tree never does more work
    than the rows (fewer tokens, fewer attention blocks; bench/RESULTS.md). ``true`` on a model the tree
    is not exact for raises ``ConfigError`` with the reason; ``false``: rows.
    """
    return resolve_prompt_tree(policy, setting, "trainer.share_prompt")


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


def resolve_fused_lm_head(setting: Any, policy: torch.nn.Module) -> bool:
    """``fused_lm_head``, unless the policy softcaps its final logits (Gemma2: ``final_logit_softcapping``),
    which the fused output layer does not implement: then the plain one, said once."""
    softcap = getattr(policy.config, "final_logit_softcapping", None)
    if bool(setting) and softcap:
        log.info("fused_lm_head: %s softcaps its final logits (final_logit_softcapping=%s), which the fused output "
                 "layer does not implement; using the plain output layer", type(policy).__name__, softcap)
        return False
    return bool(setting)


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
        return cls(share, kernel=cfg["kernel"], fused_lm_head=resolve_fused_lm_head(cfg["fused_lm_head"], policy),
                   autocast_dtype=autocast_dtype)

    def collate_rows(self, rows: TrainingRows, index: Sequence[int], reference: ReferenceLogps | None,
                     pad_token_id: int, loss_type: str) -> ContinuationBatch:
        """The micro-batch ``loss_type`` trains on: its rows (``TrainingRows.for_loss``), with the reference
        log-probs when it needs them, and every pair's y+/y- lengths for the metrics."""
        reference_logps = reference.stacked() if objective(loss_type).family.needs_reference else None  # (N, 1 + K)
        return collate_groups(rows.for_loss(loss_type), index, reference_logps, pad_token_id,
                              share_prompt=self.share_prompt, pair_lengths=rows.pair_lengths)

    def identity(self, policy: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        """What this forward computes with, every setting resolved (no ``auto``): the layout, the attention
        implementation the policy runs, the log-prob kernel, the output layer, the weights' and autocast dtypes."""
        dtype = self.autocast_dtype or next(policy.parameters()).dtype
        return {"weights": str(next(policy.parameters()).dtype).removeprefix("torch."),
                "layout": "prompt_tree" if self.share_prompt else "rows",
                "attention": str(policy.config._attn_implementation),
                "kernel": default_impl(device, dtype) if self.kernel == "auto" else self.kernel,
                "fused_lm_head": self.fused_lm_head,
                "autocast": str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else None}

    def logps(self, policy: torch.nn.Module, batch: ContinuationBatch) -> torch.Tensor:
        """(b, K) log-probs of the micro-batch: the loss's forward without the loss (``batch_logps``)."""
        return batch_logps(policy, batch, self.kernel, self.fused_lm_head, self.autocast_dtype)

    def __call__(self, policy: torch.nn.Module, batch: ContinuationBatch,
                 loss_cfg: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return micro_batch_loss(policy, batch, loss_cfg, kernel=self.kernel, fused_lm_head=self.fused_lm_head,
                                autocast_dtype=self.autocast_dtype)


def forward_problems(trainer: Mapping[str, Any]) -> list[str]:
    """``trainer.share_prompt`` and ``trainer.shared_attention``: the layout of the training forward."""
    share, attention = trainer["share_prompt"], trainer["shared_attention"]
    choices = ("auto", *SHARED_ATTENTION)
    return failed([(share in SHARE_PROMPT,
                    f"trainer.share_prompt={share}: expected auto, true (one prompt-shared forward) or false"),
                   (attention in choices, f"trainer.shared_attention={attention}: expected one of {', '.join(choices)}")])
