"""Preference losses on sequence log-probabilities.

MIPO trains with plain DPO; what makes it MIPO is where the pairs come from (the
rejected response is sampled from the base model conditioned on a *different* prompt,
see ``mipo/negatives.py``). This module is therefore the standard DPO family, written so
that each loss is one line of the function below.

Equation numbers refer to Rafailov et al. (2023), "Direct Preference Optimization"
(arXiv 2305.18290), as reused in the MIPO paper (arXiv 2603.19294, Sec. 3):

    h = beta * [ (log pi(y+|x) - log pi_ref(y+|x)) - (log pi(y-|x) - log pi_ref(y-|x)) ]

    sigmoid (DPO, Eq. 7):     L = -log sigmoid(h)
    cDPO (label smoothing):   L = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)
                              (Mitchell, 2023, "A note on DPO with noisy preferences")
    IPO (Azar et al., 2023, Eq. 17): L = (h / beta - 1 / (2 beta))^2
    hinge (SLiC, Zhao et al., 2023):  L = max(0, 1 - h)

The implicit reward of a response is ``beta * (log pi(y|x) - log pi_ref(y|x))`` (Eq. 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family of losses for a batch of preference pairs.

    Args:
        policy_chosen_logps: log pi_theta(y+|x), summed over response tokens. Shape (B,).
        policy_rejected_logps: log pi_theta(y-|x). Shape (B,).
        reference_chosen_logps: log pi_ref(y+|x) under the frozen base model. Shape (B,).
        reference_rejected_logps: log pi_ref(y-|x). Shape (B,).
        beta: KL-regularisation strength (the paper uses 0.1). Must be > 0.
        label_smoothing: probability eps that a label is flipped (conservative DPO,
            ``sigmoid`` only). 0 gives standard DPO.
        loss_type: ``"sigmoid"`` (DPO, Eq. 7), ``"ipo"`` or ``"hinge"``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each of shape (B,). The rewards are
        the implicit rewards beta * (log pi - log pi_ref) (Eq. 5), detached.
    """
    check_loss_settings(beta, label_smoothing, loss_type)
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    logits = chosen_logratios - rejected_logratios  # (B,)  h / beta

    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * logits)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def loss_settings_problems(beta: float, label_smoothing: float, loss_type: str) -> list[str]:
    """Every reason (beta, label_smoothing, loss_type) do not define a loss of this module (empty: they do)."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    problems = []
    if loss_type not in LOSS_TYPES:
        problems.append(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not (number(beta) and beta > 0):
        problems.append(f"beta must be > 0, got {beta}")
    if not (number(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        problems.append(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    elif label_smoothing and loss_type != "sigmoid":
        problems.append(f"label_smoothing applies to loss_type='sigmoid' only, got {loss_type!r}")
    return problems


def check_loss_settings(beta: float, label_smoothing: float, loss_type: str) -> None:
    """Raise ValueError unless (beta, label_smoothing, loss_type) define a loss of this module."""
    problems = loss_settings_problems(beta, label_smoothing, loss_type)
    if problems:
        raise ValueError("; ".join(problems))
