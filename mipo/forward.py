"""One micro-batch of the training step: collate prompts with their continuations, one policy forward, the loss.

The unit is a prompt with K continuations (DPO: K = 2, y+ and y-). ``collate_groups`` lays b of
them out in one of two ways:

* prompt-shared (``trainer.share_prompt``, the default): one packed row per micro-batch in
  which every prompt, and the prefix the prompts share, runs once and each continuation attends
  to it (``mipo.packing``); only positions that predict a response token reach the output layer.
* unshared: K * b right-padded rows (x, y_k), as the DPO reference implementation's
  ``concatenated_forward``; kept for comparison and for models whose attention cannot follow
  the prompt tree.

Both give the same (b, K) log-probs and the same gradients (tests/test_forward.py).
``continuation_batch_logps`` returns them; ``dpo_forward`` is DPO's use of them.
``TrainingForward`` resolves the config once and is what ``mipo.trainer.train`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from mipo import segment_attention
from mipo.encoding import Batch, EncodedRow, pad_batch
from mipo.logprobs import continuation_logps, sequence_logps
from mipo.losses import dpo_loss
from mipo.packing import PackedGroups, group_rows, pack_groups
from mipo.reference import ReferenceLogps

SHARE_PROMPT = ("auto", True, False)
# attention of the prompt-shared forward -> the model's attention implementation it runs under
SHARED_ATTENTION = {"segments": segment_attention.NAME, "flex": "flex_attention", "dense": None}


# --------------------------------------------------------------------------------------------

@dataclass
class ContinuationBatch:
    """A micro-batch of b prompts, each with K continuations, and their reference log-probs."""

    inputs: Batch | PackedGroups  # unshared: (K * b, T) rows, continuation-major; shared: one packed row
    reference_logps: torch.Tensor  # (b, K) log pi_ref(y_k | x)

    def to(self, device: torch.device | str) -> "ContinuationBatch":
        return ContinuationBatch(self.inputs.to(device), self.reference_logps.to(device))


def collate_groups(rows_per_continuation: Sequence[Sequence[EncodedRow]], index: Sequence[int],
                   reference_logps: torch.Tensor, pad_token_id: int, share_prompt: bool = True) -> ContinuationBatch:
    """The prompts ``index``, each with its row from every list of ``rows_per_continuation``.

    Args:
        rows_per_continuation: K lists of rows; rows at the same index share their prompt.
        reference_logps: (num_prompts, K) log pi_ref of every row, in the same order.
    """
    selected = [[rows[i] for i in index] for rows in rows_per_continuation]  # K lists of b rows
    if share_prompt:
        inputs = pack_groups(group_rows(selected))
    else:
        inputs = pad_batch([row for rows in selected for row in rows], pad_token_id)
    return ContinuationBatch(inputs, reference_logps[list(index)])


def collate_pairs(chosen_rows: Sequence[EncodedRow], rejected_rows: Sequence[EncodedRow], index: Sequence[int],
                  reference: ReferenceLogps, pad_token_id: int, share_prompt: bool = True) -> ContinuationBatch:
    """DPO's micro-batch: the pairs ``index`` as prompts with two continuations (y+, y-)."""
    reference_logps = torch.stack([reference.chosen, reference.rejected], dim=1)  # (N, 2)
    return collate_groups([chosen_rows, rejected_rows], index, reference_logps, pad_token_id, share_prompt)


def continuation_batch_logps(policy: torch.nn.Module, inputs: Batch | PackedGroups, num_prompts: int,
                             kernel: str = "auto", fused_lm_head: bool = True) -> torch.Tensor:
    """(b, K) log pi(y_k | x) of a collated micro-batch, in either layout, differentiable."""
    if isinstance(inputs, PackedGroups):
        return continuation_logps(policy, inputs, kernel=kernel, fused_lm_head=fused_lm_head).view(num_prompts, -1)
    logps = sequence_logps(policy, inputs, kernel=kernel, fused_lm_head=fused_lm_head)  # (K * b,)
    return logps.view(-1, num_prompts).T


def dpo_forward(
    policy: torch.nn.Module,
    batch: ContinuationBatch,
    loss_cfg: Mapping[str, Any],
    kernel: str = "auto",
    fused_lm_head: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of a micro-batch of pairs and its metrics, from one policy forward.

    log pi(y+|x) and log pi(y-|x) come from one forward (prompt-shared or concatenated rows,
    whichever ``batch`` was collated as) and ``dpo_loss`` compares them with the cached
    reference log-probs.

    Returns:
        ``(loss, metrics)``: the mean loss over the b pairs (a scalar with a graph) and detached
        scalar metrics (loss, implicit rewards, their margin and accuracy, policy log-probs).
    """
    b = batch.reference_logps.shape[0]
    with torch.autocast(batch.reference_logps.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        logps = continuation_batch_logps(policy, batch.inputs, b, kernel=kernel, fused_lm_head=fused_lm_head)  # (b, 2)
    policy_chosen_logps, policy_rejected_logps = logps.unbind(1)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, batch.reference_logps[:, 0], batch.reference_logps[:, 1],
        beta=loss_cfg["beta"], label_smoothing=loss_cfg["label_smoothing"], loss_type=loss_cfg["loss_type"],
    )  # each (b,)
    loss = losses.mean()
    metrics = {
        "loss": loss.detach(),
        "reward_chosen": chosen_rewards.mean(),
        "reward_rejected": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps_chosen": policy_chosen_logps.detach().mean(),
        "logps_rejected": policy_rejected_logps.detach().mean(),
    }
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

    ``auto`` and ``segments``: ``mipo.segment_attention`` (sdpa per segment, exact work, any
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
        return collate_pairs(chosen_rows, rejected_rows, index, reference, pad_token_id, share_prompt=self.share_prompt)

    def __call__(self, policy: torch.nn.Module, batch: ContinuationBatch,
                 loss_cfg: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dpo_forward(policy, batch, loss_cfg, kernel=self.kernel, fused_lm_head=self.fused_lm_head,
                           autocast_dtype=self.autocast_dtype)
