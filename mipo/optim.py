"""The optimizer, its learning-rate schedule and the precision of the training forward."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from mipo.models import resolve_dtype


def build_optimizer(policy: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW over every parameter of the policy."""
    return torch.optim.AdamW(policy.parameters(), lr=trainer_cfg["lr"], weight_decay=trainer_cfg["weight_decay"])


def build_scheduler(optimizer: torch.optim.Optimizer, trainer_cfg: Mapping[str, Any],
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over ``warmup_ratio`` of the steps (from lr/W), then a constant learning rate."""
    warmup_steps = math.ceil(trainer_cfg["warmup_ratio"] * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def resolve_autocast(setting: str | None, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the forward runs in under autocast, or None for no autocast.

    ``auto``: bf16 on a GPU when the weights are fp32 (mixed precision: fp32 master weights and
    optimizer states, bf16 matmuls), nothing on CPU, where bf16 matmuls are slow.
    """
    if setting in (None, "none", "null"):
        return None
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and weights_dtype == torch.float32 else None
    return resolve_dtype(setting, device)
