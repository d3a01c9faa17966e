"""The optimizer, its learning-rate schedule and the precision of the training forward.

The paper trained with OpenRLHF 0.6's DPO defaults (``openrlhf/cli/train_dpo.py``): AdamW with
betas (0.9, 0.95) and no weight decay, gradients clipped at norm 1.0, and the
``cosine_with_min_lr`` schedule (linear warmup from 0 over 3% of the steps, then a cosine to
10% of the peak learning rate). ``conf/trainer/default.yaml`` uses the same values; the
schedules come from ``transformers.get_scheduler`` as in OpenRLHF.

Low-precision weights. At lr 5e-7 most AdamW updates of a bf16 weight are below half a bf16
step (2^-8 relative), so a bf16 optimizer rounds them away and the model barely trains.
``trainer.master_weights`` makes the optimizer keep an fp32 master copy of every low-precision
parameter (``MasterWeightAdamW``), on the GPU or offloaded to the CPU; the update is applied
to the master, and the parameter is the master rounded to its dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Iterable, Mapping

import torch
from transformers import get_scheduler

from mipo.runtime.errors import failed, is_int, is_number

LR_SCHEDULERS = ("constant_with_warmup", "linear", "cosine_with_min_lr")
MASTER_WEIGHTS = ("none", "device", "cpu")


def adamw_update(param: torch.Tensor, grad: torch.Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> None:
    """One AdamW step in place (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019,
    Algorithm 2), in the operation order of ``torch.optim.AdamW``:

        theta <- theta (1 - lr lambda)
        m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
        theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

    ``state``: the parameter's ``exp_avg`` (m), ``exp_avg_sq`` (v) and ``step`` (t, already counting this
    step); ``group``: its param group's ``lr``, ``betas``, ``eps`` and ``weight_decay`` (lambda).
    """
    exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], int(state["step"])
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW that keeps fp32 master weights for low-precision parameters.

    The state of each parameter holds ``master`` (fp32, on ``master_device`` or the parameter's
    device), ``exp_avg`` and ``exp_avg_sq`` (fp32, beside the master) and ``step``. Each step
    casts the gradient to fp32 on the master's device, applies ``adamw_update`` to the master and
    copies the master back into the parameter (rounding it to the parameter's dtype). Small
    updates accumulate in the master until they move the rounded weight, as with fp32 training.
    The state is keyed by the model's own parameters, so ``state_dict`` and
    ``torch.distributed.checkpoint`` see a standard optimizer.

    Memory per parameter: the parameter and its gradient in their dtype (bf16: 4 bytes) on the
    device, plus 12 bytes of fp32 master and moments on ``master_device`` (the CPU for a 7-8B
    model on one GPU: 96 GB of host memory for 8B parameters).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, master_device: str | torch.device | None = None):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.master_device = None if master_device is None else torch.device(master_device)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    master = p.detach().to(self.master_device or p.device, torch.float32, copy=True)
                    state.update(step=torch.tensor(0.0), master=master, exp_avg=torch.zeros_like(master),
                                 exp_avg_sq=torch.zeros_like(master))
                state["step"] += 1
                grad = p.grad.to(state["master"].device, torch.float32)
                adamw_update(state["master"], grad, state, group)
                p.copy_(state["master"])
        return loss

    FP32_STATE = ("master", "exp_avg", "exp_avg_sq")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``, except that the fp32 state stays fp32 on the
        master device: the base class casts every floating state tensor to its parameter's dtype,
        which would round the masters to bf16 on resume (``tests/training/test_checkpoint.py``)."""
        fp32 = {index: {key: value for key, value in state.items() if key in self.FP32_STATE}
                for index, state in state_dict["state"].items()}
        # the saved groups name parameters by index, or by name under torch.distributed.checkpoint
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = dict(zip(saved_ids, (p for group in self.param_groups for p in group["params"])))
        for saved_id, tensors in fp32.items():
            param = params[saved_id]
            for key, value in tensors.items():
                self.state[param][key] = value.to(self.master_device or param.device, torch.float32, copy=True)

    @torch.no_grad()
    def load_masters_into_trained(self) -> None:
        """Make each optimized parameter its fp32 master (on the parameter's device), leaving the others as
        they are: the weights to save when only some parameters train (LoRA adapters on a frozen base)."""
        for group in self.param_groups:
            for p in group["params"]:
                if "master" in self.state[p]:
                    p.data = self.state[p]["master"].to(p.device, torch.float32, copy=True)

    @torch.no_grad()
    def load_masters_into(self, model: torch.nn.Module) -> None:
        """Make ``model`` fp32 and its parameters the fp32 masters: the weights to save or evaluate."""
        model.float()
        for group in self.param_groups:
            for p in group["params"]:
                if "master" in self.state[p]:
                    p.copy_(self.state[p]["master"])


def build_optimizer(policy: torch.nn.Module, trainer_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable parameters (all of them, or the LoRA adapters and ``lora.modules_to_save``:
    a frozen base has no gradients and no AdamW states); with fp32 master weights when trainable weights are
    low-precision and ``trainer.master_weights`` is ``device`` or ``cpu``."""
    kwargs = dict(lr=trainer_cfg["lr"], betas=tuple(trainer_cfg["adam_betas"]), weight_decay=trainer_cfg["weight_decay"])
    master = trainer_cfg.get("master_weights", "none")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(policy).__name__} has no parameter that requires grad: nothing would train")
    low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in trainable)
    if master != "none" and low_precision:
        return MasterWeightAdamW(trainable, master_device="cpu" if master == "cpu" else None, **kwargs)
    return torch.optim.AdamW(trainable, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, trainer_cfg: Mapping[str, Any],
                    total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """``trainer.lr_scheduler`` from ``transformers.get_scheduler``: linear warmup from 0 over
    ``warmup_ratio`` of the steps, then constant, linear to 0, or cosine to ``min_lr_ratio`` x lr."""
    name = trainer_cfg["lr_scheduler"]
    specific = {"min_lr_rate": trainer_cfg["min_lr_ratio"]} if name == "cosine_with_min_lr" else None
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(trainer_cfg["warmup_ratio"] * total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=specific)


def final_weights(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """The policy as it should be saved: with fp32 master weights when the optimizer kept them.

    Full fine-tuning: the whole policy becomes fp32 and takes the masters. With a frozen base (LoRA) only the
    trained parameters take their fp32 masters; the base keeps its dtype (the merged save is fp32 anyway,
    ``mipo.model.adapters.save_adapter_and_merged``), so a bf16 base is never copied to fp32 on the device.
    """
    if not isinstance(optimizer, MasterWeightAdamW):
        return policy
    if any(not p.requires_grad for p in policy.parameters()):
        optimizer.load_masters_into_trained()
    else:
        optimizer.load_masters_into(policy)
    return policy


def optimizer_problems(trainer: Mapping[str, Any]) -> list[str]:
    """The optimizer's and the schedule's settings in ``trainer``."""
    betas = list(trainer["adam_betas"]) if isinstance(trainer["adam_betas"], Sequence) and not isinstance(
        trainer["adam_betas"], str) else None
    max_steps = trainer["max_steps"]
    return failed([
        (is_number(trainer["lr"]) and trainer["lr"] > 0, f"trainer.lr={trainer['lr']}: expected a learning rate > 0"),
        (is_number(decay := trainer.get("weight_decay", 0.0)) and decay >= 0,
         f"trainer.weight_decay={decay}: expected a number >= 0 (AdamW's decoupled decay)"),
        (is_number(trainer["warmup_ratio"]) and 0 <= trainer["warmup_ratio"] <= 1,
         f"trainer.warmup_ratio={trainer['warmup_ratio']}: expected a fraction in [0, 1]"),
        (is_number(trainer["max_grad_norm"]) and trainer["max_grad_norm"] > 0,
         f"trainer.max_grad_norm={trainer['max_grad_norm']}: expected a number > 0"),
        (max_steps is None or (is_int(max_steps) and max_steps > 0),
         f"trainer.max_steps={max_steps}: expected null or an int > 0"),
        (trainer["lr_scheduler"] in LR_SCHEDULERS,
         f"trainer.lr_scheduler={trainer['lr_scheduler']}: expected one of {', '.join(LR_SCHEDULERS)}"),
        (is_number(trainer["min_lr_ratio"]) and 0 <= trainer["min_lr_ratio"] <= 1,
         f"trainer.min_lr_ratio={trainer['min_lr_ratio']}: expected a fraction in [0, 1]"),
        (betas is not None and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas),
         f"trainer.adam_betas={trainer['adam_betas']}: expected [beta1, beta2], each in [0, 1)"),
        (trainer["master_weights"] in MASTER_WEIGHTS,
         f"trainer.master_weights={trainer['master_weights']}: expected one of {', '.join(MASTER_WEIGHTS)}"),
    ])
