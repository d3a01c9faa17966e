"""One micro-batch of the training step: collate pairs, one policy forward, the DPO loss.

``collate_pairs`` lays b pairs out as 2b right-padded rows (chosen first) with their cached
reference log-probs; ``dpo_forward`` runs the policy once over all of them and returns the
loss and its metrics. ``mipo.trainer.train`` calls these two in its micro-batch loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from mipo.encoding import Batch, EncodedRow, pad_batch
from mipo.logprobs import sequence_logps
from mipo.losses import dpo_loss
from mipo.reference import ReferenceLogps


# --------------------------------------------------------------------------------------------

@dataclass
class PairBatch:
    """A micro-batch of b preference pairs, laid out for one concatenated forward."""

    inputs: Batch  # (2b, T): rows [0, b) are (x, y+), rows [b, 2b) are (x, y-)
    reference_chosen_logps: torch.Tensor  # (b,) log pi_ref(y+|x)
    reference_rejected_logps: torch.Tensor  # (b,) log pi_ref(y-|x)

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.inputs.to(device), self.reference_chosen_logps.to(device),
                         self.reference_rejected_logps.to(device))


def collate_pairs(chosen_rows: Sequence[EncodedRow], rejected_rows: Sequence[EncodedRow], index: Sequence[int],
                  reference: ReferenceLogps, pad_token_id: int) -> PairBatch:
    """The pairs ``index`` as one right-padded batch, chosen rows first, with their reference log-probs."""
    rows = [chosen_rows[i] for i in index] + [rejected_rows[i] for i in index]
    return PairBatch(pad_batch(rows, pad_token_id), reference.chosen[index], reference.rejected[index])


def dpo_forward(
    policy: torch.nn.Module,
    batch: PairBatch,
    loss_cfg: Mapping[str, Any],
    kernel: str = "auto",
    fused_lm_head: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of a micro-batch and its metrics, from one forward over chosen and rejected rows.

    As the DPO reference implementation's ``concatenated_forward``: y+ and y- rows run through the
    policy together (one forward instead of two), their summed response log-probs are split,
    and ``dpo_loss`` compares them with the cached reference log-probs.

    Returns:
        ``(loss, metrics)``: the mean loss over the b pairs (a scalar with a graph) and detached
        scalar metrics (loss, implicit rewards, their margin and accuracy, policy log-probs).
    """
    b = batch.reference_chosen_logps.shape[0]
    with torch.autocast(batch.inputs.input_ids.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        logps = sequence_logps(policy, batch.inputs, kernel=kernel, fused_lm_head=fused_lm_head)  # (2b,)
    policy_chosen_logps, policy_rejected_logps = logps[:b], logps[b:]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, batch.reference_chosen_logps, batch.reference_rejected_logps,
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
