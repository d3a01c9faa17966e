"""The precision of a forward pass: the dtype of the weights and the autocast dtype, resolved from the config once.

The policy's training forward and the reference pass use the same ``ForwardPrecision``
(``training_precision``): log pi_ref is then what log pi is at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from mipo.model.loading import DTYPES, resolve_dtype
from mipo.runtime.errors import failed

AUTOCAST = ("auto", "none", "null", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")


@dataclass(frozen=True)
class ForwardPrecision:
    """How a forward pass computes: the dtype of the weights and the autocast dtype (None: off).

    The policy's training forward and the reference pass use the same one
    (``mipo.stages.config.training_precision``): log pi_ref is then what log pi is at step 0, up to
    rounding, instead of differing by bf16 noise that grows with the response length.
    """

    weights: torch.dtype
    autocast: torch.dtype | None = None

    def context(self, device_type: str):
        """The autocast context of this precision (a no-op context without autocast)."""
        return torch.autocast(device_type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)

    def describe(self) -> dict[str, str | None]:
        """Plain strings, for cache keys and logs."""
        return {"weights": str(self.weights).removeprefix("torch."),
                "autocast": str(self.autocast).removeprefix("torch.") if self.autocast else None}


def resolve_autocast(setting: str | None, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the forward runs in under autocast, or None for no autocast.

    ``auto``: bf16 on a GPU when the weights are fp32 (mixed precision: fp32 master weights and
    optimizer states, bf16 matmuls), nothing on CPU, where bf16 matmuls are slow. float16
    autocast is refused by ``mipo.stages.config.check_config``: it needs a gradient scaler, which this
    trainer does not use (bf16 has fp32's exponent range and needs none).
    """
    if setting in (None, "none", "null"):
        return None
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and weights_dtype == torch.float32 else None
    return resolve_dtype(setting, device)


def train_dtype(cfg: DictConfig) -> str:
    """The dtype of the policy weights while training: ``model.train_dtype``, else ``model.dtype``."""
    return str(cfg.model.get("train_dtype") or cfg.model.dtype)


def training_precision(cfg: DictConfig, device: torch.device) -> ForwardPrecision:
    """The precision of the training forward: the policy's weights in ``train_dtype``, under
    ``trainer.autocast``. The reference log-probs are computed in it too (``mipo.stages.reference``)."""
    weights = resolve_dtype(train_dtype(cfg), device)
    return ForwardPrecision(weights, resolve_autocast(cfg.trainer.get("autocast"), device, weights))


def precision_problems(cfg: DictConfig) -> list[str]:
    """``trainer.autocast`` and the dtypes of the model (``model.dtype``, ``model.train_dtype``) and of evaluation."""
    autocast = cfg.trainer.autocast
    checks = [(autocast is None or str(autocast) in AUTOCAST,
               f"trainer.autocast={autocast}: expected one of {', '.join(AUTOCAST)}"),
              (str(autocast) not in ("float16", "fp16"),
               f"trainer.autocast={autocast}: float16 autocast needs a gradient scaler, which this trainer does "
               "not use; use trainer.autocast=bfloat16 (fp32's exponent range, no scaler needed)")]
    for key, value in (("model.dtype", cfg.model.get("dtype")), ("model.train_dtype", cfg.model.get("train_dtype")),
                       ("eval.dtype", cfg.eval.get("dtype"))):
        checks.append((value is None or value == "auto" or value in DTYPES,
                       f"{key}={value}: expected auto or one of {', '.join(DTYPES)}"))
    return failed(checks)
