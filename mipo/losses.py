"""Preference losses on sequence log-probabilities: MIPO's DPO, and the paper's baselines.

MIPO trains with plain DPO; what makes it MIPO is where the pairs come from (the
rejected response is sampled from the base model conditioned on a *different* prompt,
see ``mipo/negatives.py``). The DPO family is ``dpo_loss`` (and ``dpo_plackett_luce_loss``
for K negatives per prompt); the baselines the paper compares with on the same pairs are
``sft_loss``, ``sami_loss``, ``infonce_loss`` and the length-normalised, reference-free
``simpo_loss``. ``LOSS_FAMILIES`` says what each needs: the reference log-probs (DPO only),
the negative prompt x' (SAMI, InfoNCE), the rejected responses (all but SFT).

Equation numbers refer to Rafailov et al. (2023), "Direct Preference Optimization"
(arXiv 2305.18290), as reused in the MIPO paper (arXiv 2603.19294, Sec. 3):

    h = beta * [ (log pi(y+|x) - log pi_ref(y+|x)) - (log pi(y-|x) - log pi_ref(y-|x)) ]

    sigmoid (DPO, Eq. 7):     L = -log sigmoid(h)
    cDPO (label smoothing):   L = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)
                              (Mitchell, 2023, "A note on DPO with noisy preferences")
    IPO (Azar et al., 2023, Eq. 17): L = (h / beta - 1 / (2 beta))^2
                              (on sequence log-likelihoods; ``loss.length_normalize``: per token, as TRL,
                              ``mipo.training.objectives.dpo_objective``)
    hinge (SLiC, Zhao et al., 2023):  L = max(0, 1 - h)

The implicit reward of a response is ``beta * (log pi(y|x) - log pi_ref(y|x))`` (Eq. 5).

Config (``conf/loss/``): ``loss.loss_type`` picks the loss, so the DPO family keeps its
``sigmoid``/``ipo``/``hinge`` names and the baselines are ``sft``, ``simpo``, ``sami`` and
``infonce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from mipo.runtime.errors import is_number

LOSS_TYPES = ("sigmoid", "ipo", "hinge")  # the DPO family (``dpo_loss``)
LENGTH_NORMALIZED = ("ipo", "simpo")  # the losses that read ``loss.length_normalize``
MULTI_NEGATIVE = ("mean", "plackett_luce")  # ``loss.multi_negative``: K > 1 rejected responses per prompt
SFT_REDUCTIONS = ("mean", "sum")  # ``loss.sft_reduction``


@dataclass(frozen=True)
class LossFamily:
    """What a ``loss.loss_type`` needs from the data and the trainer."""

    name: str
    needs_reference: bool  # log pi_ref(y|x) of every response: the reference pass and its cache
    needs_negative_prompt: bool  # log pi(y|x') too: the pairs' ``negative_prompt`` goes into the forward
    uses_rejected: bool  # y- enters the loss (SFT trains on y+ only)
    multi_negative: bool  # accepts K > 1 rejected responses per prompt (``negatives.num_negatives``)


LOSS_FAMILIES: dict[str, LossFamily] = {
    **{t: LossFamily("dpo", needs_reference=True, needs_negative_prompt=False, uses_rejected=True,
                     multi_negative=True) for t in LOSS_TYPES},
    "sft": LossFamily("sft", needs_reference=False, needs_negative_prompt=False, uses_rejected=False,
                      multi_negative=False),
    "simpo": LossFamily("simpo", needs_reference=False, needs_negative_prompt=False, uses_rejected=True,
                        multi_negative=False),
    "sami": LossFamily("sami", needs_reference=False, needs_negative_prompt=True, uses_rejected=True,
                       multi_negative=False),
    "infonce": LossFamily("infonce", needs_reference=False, needs_negative_prompt=True, uses_rejected=True,
                          multi_negative=False),
}


def loss_family(loss_type: str) -> LossFamily:
    """The family of ``loss.loss_type``; ValueError naming the override for an unknown one."""
    if loss_type not in LOSS_FAMILIES:
        raise ValueError(f"unknown loss.loss_type={loss_type!r}; expected one of {tuple(LOSS_FAMILIES)}")
    return LOSS_FAMILIES[loss_type]


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
            ``sigmoid`` only). 0 gives standard DPO exactly: the flipped term is left out, not
            multiplied by 0, so an infinite margin (log pi(y-|x) = -inf) gives a finite loss.
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
        losses = -F.logsigmoid(beta * logits)  # (B,)  Eq. 7
        if label_smoothing:  # cDPO; only then: at logits = +inf (y- impossible) the flipped term is inf * 0 = nan
            losses = losses * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * logits)

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_plackett_luce_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO with K rejected responses per prompt as a (K+1)-way softmax: the Plackett-Luce top-1 form.

    Rafailov et al. (2023, arXiv 2305.18290), Appendix A.3 (the Plackett-Luce model), keeping only
    the first choice: with implicit rewards r_0 = beta (log pi(y+|x) - log pi_ref(y+|x)) and
    r_k = beta (log pi(y-_k|x) - log pi_ref(y-_k|x)),

        L = -log [ exp(r_0) / (exp(r_0) + sum_k exp(r_k)) ] = logsumexp(r_0, r_1..r_K) - r_0.

    For K = 1 this is the sigmoid DPO loss (Eq. 7) exactly.

    Args:
        policy_chosen_logps: log pi_theta(y+|x). Shape (B,).
        policy_rejected_logps: log pi_theta(y-_k|x) of the K rejected responses. Shape (B, K).
        reference_chosen_logps: log pi_ref(y+|x). Shape (B,).
        reference_rejected_logps: log pi_ref(y-_k|x). Shape (B, K).
        beta: KL-regularisation strength, > 0.

    Returns:
        ``(losses (B,), chosen_rewards (B,), rejected_rewards (B, K))``, rewards detached.
    """
    check_loss_settings(beta, 0.0, "sigmoid")
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)  # (B, K)
    rewards = torch.cat([chosen_rewards[:, None], rejected_rewards], dim=1)  # (B, K + 1)
    losses = torch.logsumexp(rewards, dim=1) - chosen_rewards  # (B,)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def sft_loss(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Supervised fine-tuning on the self-generated positives: the negative log-likelihood of y+.

    The SFT baseline of the MIPO paper (arXiv 2603.19294, Sec. 5): maximise log pi(y+|x) on the
    same pairs' positives, nothing else.

        sum:   L = -log pi(y+|x)                      (the sequence log-likelihood)
        mean:  L = -log pi(y+|x) / |y+|               (the per-token cross-entropy of the response)

    ``mean`` is the default (``conf/loss/sft.yaml``): it is the usual SFT cross-entropy (OpenRLHF's
    ``GPTLMLoss`` averages over tokens), and its size does not grow with the response, so the DPO
    runs' learning rate and gradient clipping mean the same thing for it.

    Args:
        policy_chosen_logps: log pi_theta(y+|x), summed over response tokens. Shape (B,).
        chosen_lengths: |y+|, the number of response tokens scored. Shape (B,).
        reduction: ``"mean"`` or ``"sum"`` over the response's tokens.

    Returns:
        losses: shape (B,).
    """
    if reduction not in SFT_REDUCTIONS:
        raise ValueError(f"unknown loss.sft_reduction={reduction!r}; expected one of {SFT_REDUCTIONS}")
    if reduction == "sum":
        return -policy_chosen_logps
    return -policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)  # (B,)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
    length_normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO: a reference-free margin loss on the average log-prob (Meng et al., 2024, arXiv 2405.14734, Eq. 6).

        r(y) = beta / |y| * log pi(y|x)          (``length_normalize``; else beta * log pi(y|x))
        L    = -log sigmoid(r(y+) - r(y-) - gamma)

    Random-prompt negatives differ from the positives in length as well as in content, and a
    summed log-prob prefers short responses; the average removes that confounder. With
    ``length_normalize=False`` it is the reference-free margin loss on summed log-probs.

    Args:
        policy_chosen_logps: log pi_theta(y+|x), summed over response tokens. Shape (B,).
        policy_rejected_logps: log pi_theta(y-|x). Shape (B,).
        chosen_lengths: |y+| in tokens. Shape (B,).
        rejected_lengths: |y-| in tokens. Shape (B,).
        beta: reward scale, > 0. gamma: target reward margin, >= 0.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,), rewards detached.
    """
    if length_normalize:
        chosen_rewards = beta * policy_chosen_logps / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1)  # (B,)
        rejected_rewards = beta * policy_rejected_logps / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1)
    else:
        chosen_rewards, rejected_rewards = beta * policy_chosen_logps, beta * policy_rejected_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)  # (B,)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def context_response_grid(logp_pos_x: torch.Tensor, logp_neg_x: torch.Tensor, logp_pos_xneg: torch.Tensor,
                          logp_neg_xneg: torch.Tensor) -> torch.Tensor:
    """G[b, c, r] = log pi(response r | context c), c in (x, x'), r in (y+, y-): the (B, 2, 2) grid of SAMI/InfoNCE."""
    return torch.stack([torch.stack([logp_pos_x, logp_neg_x], dim=1),
                        torch.stack([logp_pos_xneg, logp_neg_xneg], dim=1)], dim=1)  # (B, 2, 2)


def sami_loss(logp_pos_x: torch.Tensor, logp_neg_x: torch.Tensor, logp_pos_xneg: torch.Tensor,
              logp_neg_xneg: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """SAMI (Franken et al., 2024, arXiv 2404.14313, Eq. 3 and App. A.4), per pair, as in the MIPO paper's code.

    On the 2x2 grid G[c, r] = log pi(r | c), c in {x, x'}, r in {y+, y-} (policy only, no
    reference), each context must pick its own response (row-wise softmax, target the diagonal)
    and each response its own context (column-wise softmax, target the diagonal):

        L = 1/2 [ 1/2 sum_c CE(softmax_r G[c, .], c) + 1/2 sum_r CE(softmax_c G[., r], r) ]

    The released code (``openrlhf/models/loss.py``, ``SAMILoss``) averages the same terms over
    the batch; this returns them per pair. ``label_smoothing`` is ``F.cross_entropy``'s (target
    (1 - eps) on the diagonal + eps / 2 on both).

    Args:
        logp_pos_x: log pi(y+|x). logp_neg_x: log pi(y-|x). logp_pos_xneg: log pi(y+|x').
        logp_neg_xneg: log pi(y-|x'). Each (B,), summed over response tokens.

    Returns:
        losses: shape (B,).
    """
    grid = context_response_grid(logp_pos_x, logp_neg_x, logp_pos_xneg, logp_neg_xneg)  # (B, 2, 2)
    b = grid.shape[0]
    target = torch.arange(2, device=grid.device).repeat(b)  # (2B,): the diagonal
    rows = F.cross_entropy(grid.reshape(2 * b, 2), target, reduction="none",
                           label_smoothing=label_smoothing).view(b, 2)  # context c picks among responses
    columns = F.cross_entropy(grid.transpose(1, 2).reshape(2 * b, 2), target, reduction="none",
                              label_smoothing=label_smoothing).view(b, 2)  # response r picks among contexts
    return (rows.mean(dim=1) + columns.mean(dim=1)) / 2  # (B,)


def infonce_loss(logp_pos_x: torch.Tensor, logp_neg_x: torch.Tensor, logp_pos_xneg: torch.Tensor,
                 logp_neg_xneg: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
    """InfoNCE over the two contexts, per pair, as in the MIPO paper's code (``InfoNCELoss``).

    y+ must pick x over x', and y- must pick x' over x (policy log-probs only, no reference):

        L = 1/2 [ CE([log pi(y+|x), log pi(y+|x')] / T, 0) + CE([log pi(y-|x'), log pi(y-|x)] / T, 0) ]

    (the released code subtracts a logsumexp of all four from the logits first, a constant shift
    that a softmax ignores). ``temperature`` T = 100 is the released code's hard-coded value:
    the logits are sums of log-probs over a whole response, hundreds of nats apart, so at T = 1
    the softmax is saturated and the gradient vanishes (the code's comment: "with 1 already
    vanishing gradient"); dividing by 100 brings the differences to a few units.

    Args:
        logp_pos_x: log pi(y+|x). logp_neg_x: log pi(y-|x). logp_pos_xneg: log pi(y+|x').
        logp_neg_xneg: log pi(y-|x'). Each (B,).
        temperature: T > 0.

    Returns:
        losses: shape (B,).
    """
    if not temperature > 0:
        raise ValueError(f"loss.temperature must be > 0, got {temperature}")
    positive_logits = torch.stack([logp_pos_x, logp_pos_xneg], dim=1) / temperature  # (B, 2): y+ under x, x'
    negative_logits = torch.stack([logp_neg_xneg, logp_neg_x], dim=1) / temperature  # (B, 2): y- under x', x
    loss_positive = torch.logsumexp(positive_logits, dim=1) - positive_logits[:, 0]  # (B,)
    loss_negative = torch.logsumexp(negative_logits, dim=1) - negative_logits[:, 0]  # (B,)
    return (loss_positive + loss_negative) / 2


def loss_config_problems(loss: Mapping[str, Any]) -> list[str]:
    """Every reason the ``loss`` config group does not define a loss of this module (empty: it does)."""
    loss_type = loss.get("loss_type")
    family = LOSS_FAMILIES.get(loss_type)
    problems = []
    if family is None or family.name == "dpo":  # an unknown type is checked as the DPO family it most often mistypes
        where = (f" (loss.beta={loss.get('beta')}, loss.loss_type={loss_type}, "
                 f"loss.label_smoothing={loss.get('label_smoothing')})")
        for problem in loss_settings_problems(loss.get("beta"), loss.get("label_smoothing", 0.0), loss_type):
            if problem.startswith("unknown loss_type"):
                problem = f"unknown loss_type {loss_type!r}; expected one of {tuple(LOSS_FAMILIES)}"
            elif problem.startswith("label_smoothing applies") and family is None:
                continue
            problems.append(problem + where)
        if family is None:
            return problems
        normalize = loss.get("length_normalize")
        if loss_type == "ipo" and normalize is not None and not isinstance(normalize, bool):
            problems.append(f"loss.length_normalize={normalize}: expected true or false (IPO on per-token log-ratios)")
        multi = loss.get("multi_negative", "mean")
        if multi not in MULTI_NEGATIVE:
            problems.append(f"unknown loss.multi_negative={multi!r}; expected one of {MULTI_NEGATIVE}")
        elif multi == "plackett_luce" and (loss_type != "sigmoid" or loss.get("label_smoothing", 0.0)):
            problems.append(f"loss.multi_negative=plackett_luce is the softmax form of the sigmoid DPO loss: it needs "
                            f"loss.loss_type=sigmoid and loss.label_smoothing=0, got {loss_type} and "
                            f"{loss.get('label_smoothing')}")
    elif loss_type == "sft":
        if loss.get("sft_reduction") not in SFT_REDUCTIONS:
            problems.append(f"loss.sft_reduction={loss.get('sft_reduction')!r}: expected one of {SFT_REDUCTIONS}")
    elif loss_type == "simpo":
        if not (is_number(loss.get("beta")) and loss["beta"] > 0):
            problems.append(f"loss.beta={loss.get('beta')}: SimPO's reward scale must be > 0")
        if not (is_number(loss.get("gamma")) and loss["gamma"] >= 0):
            problems.append(f"loss.gamma={loss.get('gamma')}: SimPO's margin must be a number >= 0")
        if not isinstance(loss.get("length_normalize"), bool):
            problems.append(f"loss.length_normalize={loss.get('length_normalize')}: expected true or false")
    elif loss_type == "sami":
        smoothing = loss.get("label_smoothing", 0.0)
        if not (is_number(smoothing) and 0.0 <= smoothing < 0.5):
            problems.append(f"loss.label_smoothing={smoothing}: expected a number in [0, 0.5)")
    elif loss_type == "infonce":
        if not (is_number(loss.get("temperature")) and loss["temperature"] > 0):
            problems.append(f"loss.temperature={loss.get('temperature')}: expected a number > 0 (the paper's code: 100)")
    if loss.get("length_normalize") is not None and loss_type not in LENGTH_NORMALIZED:
        problems.append(f"loss.length_normalize={loss['length_normalize']}: loss.loss_type={loss_type} ignores it (it "
                        f"applies to {' and '.join(LENGTH_NORMALIZED)}); remove the override")
    return problems


def loss_settings_problems(beta: float, label_smoothing: float, loss_type: str) -> list[str]:
    """Every reason (beta, label_smoothing, loss_type) do not define a loss of this module (empty: they do)."""
    problems = []
    if loss_type not in LOSS_TYPES:
        problems.append(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not (is_number(beta) and beta > 0):
        problems.append(f"beta must be > 0, got {beta}")
    if not (is_number(label_smoothing) and 0.0 <= label_smoothing < 0.5):
        problems.append(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    elif label_smoothing and loss_type != "sigmoid":
        problems.append(f"label_smoothing applies to loss_type='sigmoid' only, got {loss_type!r}")
    return problems


def check_loss_settings(beta: float, label_smoothing: float, loss_type: str) -> None:
    """Raise ValueError unless (beta, label_smoothing, loss_type) define a loss of this module."""
    problems = loss_settings_problems(beta, label_smoothing, loss_type)
    if problems:
        raise ValueError("; ".join(problems))
