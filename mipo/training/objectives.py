"""The training objectives: one table from ``loss.loss_type`` to what the loss reads and how it computes.

The training forward (``mipo.training.forward.micro_batch_loss``) runs the policy once and gets a
(b, K) tensor of log pi(y_k | context_k), one column per continuation of each of the b pairs. Which
continuations those are, and what turns them into per-pair losses, is the loss's ``Objective``:

    =========  =================================  =======================  ================================
    objective  columns of the (b, K) log-probs     reference log-probs      equation (``mipo.losses``)
    =========  =================================  =======================  ================================
    DPO        y+, then the K y- under x           (b, 1 + K), cached      ``dpo_loss`` (K = 1; mean of the
               (``CHOSEN_AND_REJECTED``)                                    K pairs), ``dpo_plackett_luce_loss``
    SFT        y+ under x (``CHOSEN``)             none                     ``sft_loss``
    SimPO      y+, y- under x                      none                     ``simpo_loss``
    SAMI       y+, y- under x, then under x'       none                     ``sami_loss``
               (``BOTH_CONTEXTS``)
    InfoNCE    as SAMI                             none                     ``infonce_loss``
    =========  =================================  =======================  ================================

An ``Objective`` builds on ``mipo.losses.LossFamily`` (what the data and the trainer must provide:
the reference pass, y-, x', K > 1) and adds the function from ``ObjectiveInputs`` (policy and
reference log-probs, response lengths) and the ``loss`` config to ``PairLosses``: the (b,) losses
and what the metrics are computed from (``training_metrics``, shared by all objectives: the
same names and values for every loss). Adding a baseline is its equation in ``mipo.losses``, its
``LossFamily`` there and one entry in ``OBJECTIVES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from mipo.losses import (
    LOSS_FAMILIES,
    LOSS_TYPES,
    LossFamily,
    dpo_loss,
    dpo_plackett_luce_loss,
    infonce_loss,
    loss_family,
    sami_loss,
    sft_loss,
    simpo_loss,
)

# The columns of the (b, K) log-probs an objective reads, in order (``TrainingRows.for_loss`` lays them out)
CHOSEN = "y+|x"  # (b, 1): SFT
CHOSEN_AND_REJECTED = "y+|x, y-_1..K|x"  # (b, 1 + K): DPO (K >= 1), SimPO (K = 1)
BOTH_CONTEXTS = "y+|x, y-|x, y+|x', y-|x'"  # (b, 4): SAMI, InfoNCE


@dataclass(frozen=True)
class ObjectiveInputs:
    """What one micro-batch gives an objective: log-probs in the objective's column order."""

    policy_logps: torch.Tensor  # (b, K) log pi(y_k | context_k), with a graph
    reference_logps: torch.Tensor | None  # (b, K) log pi_ref(y_k | x); None for reference-free objectives
    lengths: torch.Tensor | None  # (b, K) response tokens of each continuation


@dataclass
class PairLosses:
    """An objective's result for b pairs: the losses, and what the shared metrics are computed from."""

    losses: torch.Tensor  # (b,) per-pair losses, with a graph
    policy_chosen_logps: torch.Tensor  # (b,) log pi(y+|x): ``logps_chosen``
    policy_rejected_logps: torch.Tensor | None = None  # (b,) or (b, K) log pi(y-|x): ``logps_rejected``
    chosen_rewards: torch.Tensor | None = None  # (b,) implicit reward of y+, detached: ``reward_*``
    rejected_rewards: torch.Tensor | None = None  # (b,) or (b, K) implicit rewards of the y-, detached
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # the objective's own (SAMI/InfoNCE: pmi_*)


@dataclass(frozen=True)
class Objective:
    """One entry of ``OBJECTIVES``: what a loss needs (its ``LossFamily``) and how it computes its losses."""

    family: LossFamily  # needs_reference, uses_rejected, needs_negative_prompt, multi_negative (mipo.losses)
    pair_losses: Callable[[ObjectiveInputs, Mapping[str, Any]], PairLosses]  # (inputs, loss config) -> losses

    @property
    def columns(self) -> str:
        """The continuations its (b, K) log-probs hold: ``CHOSEN``, ``CHOSEN_AND_REJECTED`` or ``BOTH_CONTEXTS``."""
        if not self.family.uses_rejected:
            return CHOSEN
        return BOTH_CONTEXTS if self.family.needs_negative_prompt else CHOSEN_AND_REJECTED

    def __call__(self, inputs: ObjectiveInputs, loss_cfg: Mapping[str, Any]) -> PairLosses:
        return self.pair_losses(inputs, loss_cfg)


# --------------------------------------------------------------------------------------------
# The objectives: (b, K) log-probs -> per-pair losses (the equations are mipo.losses')
# --------------------------------------------------------------------------------------------

def dpo_objective(inputs: ObjectiveInputs, loss_cfg: Mapping[str, Any]) -> PairLosses:
    """DPO against the cached reference (Rafailov et al., 2023, Eq. 7; ``loss.loss_type`` sigmoid/ipo/hinge).

    Columns y+, y-_1..y-_K under x. K = 1: ``dpo_loss``, as the paper. K > 1 (``negatives.num_negatives``):
    ``loss.multi_negative=mean``, the mean of the K pairwise ``dpo_loss``es (y+ against each y-_k), or
    ``plackett_luce``, the (K + 1)-way softmax of ``dpo_plackett_luce_loss`` (Appendix A.3, top-1).

    ``loss.length_normalize`` (IPO only, ``mipo.losses.loss_config_problems``): every log-prob, policy and
    reference, is divided by its response's tokens before the loss, so h / beta is a difference of per-token
    log-ratios and the implicit rewards are per token. That is TRL's IPO (``trl/trainer/dpo_trainer.py``,
    ``DPOTrainer.concatenated_forward``: ``if self.loss_type == "ipo": all_logps = all_logps /
    loss_mask.sum(-1)``, which also computes the reference log-probs; ``get_batch_logps(average_log_prob=
    self.loss_type == "ipo")`` in older versions). The default (false) keeps the sums: the IPO paper (Azar et
    al., 2023, Eq. 17) states the loss on sequence log-likelihoods, as DPO's, and mipo's other DPO losses and
    the MI estimates use the sums. The logged ``logps_*`` are the sums either way.
    """
    logps, reference_logps = inputs.policy_logps, inputs.reference_logps  # (b, 1 + K) each
    policy_chosen_logps, policy_rejected_logps = logps[:, 0], logps[:, 1:]  # (b,), (b, K): summed, for the metrics
    if loss_cfg.get("length_normalize", False):
        tokens = inputs.lengths.clamp(min=1)  # (b, 1 + K) response tokens of each column
        logps, reference_logps = logps / tokens.to(logps.dtype), reference_logps / tokens.to(reference_logps.dtype)
    reference_chosen_logps, reference_rejected_logps = reference_logps[:, 0], reference_logps[:, 1:]
    loss_chosen_logps, loss_rejected_logps = logps[:, 0], logps[:, 1:]  # (b,), (b, K): what the loss reads
    if logps.shape[1] == 2:  # one negative: DPO as the paper
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            loss_chosen_logps, loss_rejected_logps[:, 0], reference_chosen_logps, reference_rejected_logps[:, 0],
            beta=loss_cfg["beta"], label_smoothing=loss_cfg["label_smoothing"], loss_type=loss_cfg["loss_type"],
        )  # each (b,)
    elif loss_cfg.get("multi_negative", "mean") == "plackett_luce":
        losses, chosen_rewards, rejected_rewards = dpo_plackett_luce_loss(
            loss_chosen_logps, loss_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            beta=loss_cfg["beta"])  # (b,), (b,), (b, K)
    else:  # mean of the K pairwise DPO losses
        num_negatives = loss_rejected_logps.shape[1]
        pair_losses, chosen_k, rejected_rewards = dpo_loss(
            loss_chosen_logps[:, None].expand(-1, num_negatives), loss_rejected_logps,
            reference_chosen_logps[:, None].expand(-1, num_negatives), reference_rejected_logps,
            beta=loss_cfg["beta"], label_smoothing=loss_cfg["label_smoothing"], loss_type=loss_cfg["loss_type"],
        )  # each (b, K)
        losses, chosen_rewards = pair_losses.mean(dim=1), chosen_k[:, 0]
    return PairLosses(losses, policy_chosen_logps, policy_rejected_logps, chosen_rewards, rejected_rewards)


def sft_objective(inputs: ObjectiveInputs, loss_cfg: Mapping[str, Any]) -> PairLosses:
    """SFT on y+ (the MIPO paper's SFT baseline, ``sft_loss``): -log pi(y+|x), per token (``loss.sft_reduction``)."""
    policy_chosen_logps = inputs.policy_logps[:, 0]  # (b,)
    losses = sft_loss(policy_chosen_logps, inputs.lengths[:, 0], loss_cfg["sft_reduction"])  # (b,)
    return PairLosses(losses, policy_chosen_logps)


def simpo_objective(inputs: ObjectiveInputs, loss_cfg: Mapping[str, Any]) -> PairLosses:
    """SimPO (Meng et al., 2024, Eq. 6, ``simpo_loss``): reference-free margin on the length-normalised log-probs."""
    policy_chosen_logps, policy_rejected_logps = inputs.policy_logps[:, 0], inputs.policy_logps[:, 1]  # (b,), (b,)
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        policy_chosen_logps, policy_rejected_logps, inputs.lengths[:, 0], inputs.lengths[:, 1], beta=loss_cfg["beta"],
        gamma=loss_cfg["gamma"], length_normalize=loss_cfg["length_normalize"])
    return PairLosses(losses, policy_chosen_logps, policy_rejected_logps, chosen_rewards, rejected_rewards)


def pmi_metrics(logp_pos_x: torch.Tensor, logp_neg_x: torch.Tensor, logp_pos_xneg: torch.Tensor,
                logp_neg_xneg: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pointwise-MI margin of y+ over y-: pmi(y) = log pi(y|x) - log pi(y|x'), its mean margin and accuracy."""
    pmi_chosen = (logp_pos_x - logp_pos_xneg).detach()  # (b,) log pi(y+|x) - log pi(y+|x')
    pmi_rejected = (logp_neg_x - logp_neg_xneg).detach()  # (b,)
    return {"pmi_margin": (pmi_chosen - pmi_rejected).mean(),
            "pmi_accuracy": (pmi_chosen > pmi_rejected).float().mean()}


def sami_objective(inputs: ObjectiveInputs, loss_cfg: Mapping[str, Any]) -> PairLosses:
    """SAMI (Franken et al., 2024, Eq. 3, ``sami_loss``) on the 2x2 grid of y+/y- under x/x', policy only."""
    logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg = inputs.policy_logps.unbind(1)  # each (b,)
    losses = sami_loss(logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg,
                       label_smoothing=loss_cfg.get("label_smoothing", 0.0))
    return PairLosses(losses, logp_pos_x, logp_neg_x,
                      metrics=pmi_metrics(logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg))


def infonce_objective(inputs: ObjectiveInputs, loss_cfg: Mapping[str, Any]) -> PairLosses:
    """InfoNCE over the two contexts (the MIPO paper's code, ``infonce_loss``), policy only."""
    logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg = inputs.policy_logps.unbind(1)  # each (b,)
    losses = infonce_loss(logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg, temperature=loss_cfg["temperature"])
    return PairLosses(losses, logp_pos_x, logp_neg_x,
                      metrics=pmi_metrics(logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg))


OBJECTIVES: dict[str, Objective] = {
    **{loss_type: Objective(LOSS_FAMILIES[loss_type], dpo_objective) for loss_type in LOSS_TYPES},
    "sft": Objective(LOSS_FAMILIES["sft"], sft_objective),
    "simpo": Objective(LOSS_FAMILIES["simpo"], simpo_objective),
    "sami": Objective(LOSS_FAMILIES["sami"], sami_objective),
    "infonce": Objective(LOSS_FAMILIES["infonce"], infonce_objective),
}


def objective(loss_type: str) -> Objective:
    """The objective of ``loss.loss_type``; ValueError naming the override for an unknown one."""
    loss_family(loss_type)  # raises for an unknown loss type, with the expected ones
    return OBJECTIVES[loss_type]


# --------------------------------------------------------------------------------------------
# The metrics every objective logs
# --------------------------------------------------------------------------------------------

def training_metrics(loss: torch.Tensor, result: PairLosses,
                     pair_lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The detached scalar metrics of a micro-batch, with the same names for every objective.

    ``loss``; ``logps_rejected`` (mean log pi(y-|x), over all K y-); the objective's own (SAMI/InfoNCE:
    ``pmi_margin``, ``pmi_accuracy``); with implicit rewards (DPO, SimPO): ``reward_chosen``,
    ``reward_rejected`` (K negatives: their mean), ``reward_margin`` and ``reward_accuracy`` (y+
    above all K); ``logps_chosen``; ``length_chosen``/``length_rejected``, the tokens of y+ and y-
    (``pair_lengths``, (b, 2)), whatever the loss trains on.
    """
    metrics: dict[str, torch.Tensor] = {"loss": loss.detach()}
    if result.policy_rejected_logps is not None:
        metrics["logps_rejected"] = result.policy_rejected_logps.detach().mean()
    metrics.update(result.metrics)
    chosen_rewards, rejected_rewards = result.chosen_rewards, result.rejected_rewards
    if chosen_rewards is not None:
        rejected_mean = rejected_rewards if rejected_rewards.dim() == 1 else rejected_rewards.mean(dim=1)  # (b,)
        best_rejected = rejected_rewards if rejected_rewards.dim() == 1 else rejected_rewards.max(dim=1).values
        metrics.update(reward_chosen=chosen_rewards.mean(), reward_rejected=rejected_mean.mean(),
                       reward_margin=(chosen_rewards - rejected_mean).mean(),
                       reward_accuracy=(chosen_rewards > best_rejected).float().mean())
    metrics["logps_chosen"] = result.policy_chosen_logps.detach().mean()
    if pair_lengths is not None:
        metrics["length_chosen"] = pair_lengths[:, 0].float().mean()
        metrics["length_rejected"] = pair_lengths[:, 1].float().mean()
    return metrics
