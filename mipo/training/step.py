"""One optimizer step of the training loop: micro-batches, backward, clipping, then the update or the skip.

``optimizer_step`` is the whole step, read top to bottom, as ``mipo.stages.train.train`` calls it
once per step:

1. this rank's share of the step's global batch (``parallel.local_batch``), in micro-batches of
   ``trainer.micro_batch_size`` pairs: collate (``TrainingForward.collate_rows``), forward and loss
   (``TrainingForward``, behind ``trainer.strategy``: gradients are reduced over ranks on the last
   micro-batch only, ``sync_gradients``), backward of loss / accumulation steps, so that the
   gradient is the mean over the global batch;
2. the micro-batches' metrics averaged over the step and the ranks; the gradient clipped to
   ``trainer.max_grad_norm`` (its norm before clipping is logged as ``grad_norm``);
3. a finite loss and gradient norm: AdamW and learning-rate scheduler steps. Otherwise the step
   raises ``NonFiniteError`` naming the step and the pairs of its batch, or with
   ``trainer.skip_nonfinite`` is skipped (no update) and counted: nothing is ever trained on NaN.

What the step reads is bundled once per run: ``StepModel`` (policy, forward, optimizer,
scheduler), ``StepData`` (the encoded rows and reference log-probs the micro-batches are collated
from), ``StepSettings`` (sizes and switches from ``trainer.*`` and ``loss``), and ``LoopState``
(the batch order, the metrics of the steps taken and the skipped steps, saved in checkpoints).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mipo.data.pairs import PreferencePair
from mipo.runtime import distributed
from mipo.runtime.errors import InputError, failed
from mipo.training import parallel
from mipo.training.forward import ReferenceLogps, TrainingRows

log = logging.getLogger(__name__)


class NonFiniteError(InputError, FloatingPointError):
    """A step's loss or gradient is not finite; the message names the step and the pairs of its batch."""


@dataclass(frozen=True)
class StepModel:
    """The policy and what updates it."""

    policy: torch.nn.Module
    forward: Any  # TrainingForward behind trainer.strategy (parallel.ParallelForward)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LRScheduler


@dataclass(frozen=True)
class StepData:
    """What every step's micro-batches are collated from."""

    pairs: Sequence[PreferencePair]  # named in a non-finite step's message
    pairs_file: Path
    rows: TrainingRows  # every pair's encoded rows (mipo.training.forward.encode_training_rows)
    reference: ReferenceLogps | None  # log pi_ref of those rows; None for reference-free losses
    pad_token_id: int
    device: torch.device


@dataclass(frozen=True)
class StepSettings:
    """The step's sizes and switches, from ``trainer.*`` and ``loss``."""

    loss: Mapping[str, Any]  # the loss config group (``loss.loss_type`` picks the objective)
    micro_batch_size: int
    accumulation_steps: int  # micro-batches per rank and step (parallel.accumulation_steps)
    max_grad_norm: float
    skip_nonfinite: bool
    world: int
    rank: int


@dataclass
class LoopState:
    """What the loop carries from step to step; saved in every checkpoint."""

    order: list[list[int]]  # the pair indices of every optimizer step (batch_order)
    history: list[dict[str, float]]  # the metrics of every step taken
    skipped: list[int]  # the steps skipped as non-finite


def optimizer_step(step: int, model: StepModel, data: StepData, settings: StepSettings,
                   state: LoopState) -> dict[str, float]:
    """Optimizer step ``step`` (1-based) over the pairs ``state.order[step - 1]``; see the module docstring.

    Returns:
        The step's metrics (the mean over its pairs of every ``training_metrics`` entry, then
        ``grad_norm`` and ``lr``), also appended to ``state.history``; ``{}`` for a skipped step.
    """
    batch_index = state.order[step - 1]
    metrics: dict[str, float] = {}
    local_index = parallel.local_batch(batch_index, settings.world, settings.rank)  # this rank's share of the batch
    for start in range(0, len(local_index), settings.micro_batch_size):
        index = local_index[start : start + settings.micro_batch_size]
        model.forward.sync_gradients(last=start + settings.micro_batch_size >= len(local_index))
        micro_batch = model.forward.collate_rows(data.rows, index, data.reference, data.pad_token_id,
                                                 settings.loss["loss_type"]).to(data.device)
        loss, micro_metrics = model.forward(model.policy, micro_batch, settings.loss)
        (loss / settings.accumulation_steps).backward()
        for name, value in micro_metrics.items():
            metrics[name] = metrics.get(name, 0.0) + float(value) / settings.accumulation_steps
    metrics = distributed.mean_over_ranks(metrics)  # the global batch's means, as one process computes them
    metrics["grad_norm"] = parallel.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.policy.parameters(),
                                                                                   settings.max_grad_norm))
    metrics["lr"] = model.scheduler.get_last_lr()[0]

    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
        model.optimizer.step()
        model.scheduler.step()
        state.history.append(metrics)
        record = metrics
    else:
        message = (f"step {step}: the loss ({metrics['loss']}) or the gradient norm "
                   f"({metrics['grad_norm']}) is not finite for the batch of pairs "
                   f"{[data.pairs[i].label for i in batch_index]} of {data.pairs_file}")
        if not settings.skip_nonfinite:
            raise NonFiniteError(f"{message}; nothing was trained on it. trainer.skip_nonfinite=true skips "
                                 "such steps (no update, counted in metrics.jsonl and train.json)")
        state.skipped.append(step)
        log.warning("%s: skipped (no optimizer or scheduler step), %d so far", message, len(state.skipped))
        record = {}
    model.optimizer.zero_grad(set_to_none=True)
    return record


def step_problems(trainer: Mapping[str, Any]) -> list[str]:
    """``trainer.skip_nonfinite`` and ``trainer.flush_denormal``: the loop's switches."""
    return failed([(isinstance(value, bool), f"trainer.{key}={value}: expected true or false")
                   for key, value in (("skip_nonfinite", trainer.get("skip_nonfinite")),
                                      ("flush_denormal", trainer.get("flush_denormal", True)))])
