"""Data-parallel training with PyTorch's own engines: ``trainer.strategy=single|ddp|fsdp``.

* ``single``: one process, the policy as it is.
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel``: a full replica per rank, gradients
  averaged by all-reduce during backward (skipped on accumulation micro-steps, as ``no_sync`` does).
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every decoder layer and on the
  root: parameters, gradients and AdamW states sharded over the ranks (each rank holds 1/N of
  them). The sharded fp32 parameters are the master weights; on a GPU the forward runs in bf16
  (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``: each layer's weights are
  all-gathered and cast to bf16, gradients are reduce-scattered in fp32). The micro-batch is not cast
  (the root's ``cast_forward_inputs=False``): FSDP2's default casts every floating input of the root to
  bf16, which rounded the fp32 reference log-probs the loss compares with (log pi_ref ~ -2700 is
  bf16-spaced by 16 nats). ``trainer.cpu_offload``
  keeps the shards, their gradients and the optimizer step on the CPU (``CPUOffloadPolicy``).

What is wrapped. The trainer's forward does not go through ``policy.forward``: it calls
``policy.base_model`` and reads the output layer's weight (``mipo.training.forward``,
``mipo.model.logprobs.output_layer_logps``). DDP prepares its gradient reduction in its own
``forward``, and FSDP2 all-gathers a module's parameters in a hook on that module's
``forward``. So both wrap ``PolicyForward``, a module whose ``forward`` is one whole training
micro-step (``TrainingForward.__call__``: log-probs and loss) and whose child is the policy.
FSDP2's root is ``PolicyForward``: its hook gathers what no decoder layer holds (embeddings,
final norm, output layer) for the length of the micro-step. ``ParallelForward`` has
``TrainingForward``'s call signature, so the trainer's loop is the same for every strategy.

Gradient arithmetic. Each rank runs ``batch_size / world_size`` pairs per optimizer step as
``accumulation_steps(...)`` micro-batches, and scales each micro-batch loss by 1/that number;
DDP and FSDP2 average gradients over ranks. The gradient is then the mean over the global
batch, as in one process with the same ``trainer.batch_size``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mipo.model import adapters
from mipo.runtime import distributed
from mipo.runtime.errors import ConfigError, failed, is_int

log = logging.getLogger(__name__)

STRATEGIES = ("single", "ddp", "fsdp")


def resolve_strategy(setting: str) -> str:
    """``trainer.strategy``, checked against the process group: ``ddp``/``fsdp`` in one process run as ``single``."""
    if setting not in STRATEGIES:
        raise ValueError(f"trainer.strategy={setting!r}: expected one of {', '.join(STRATEGIES)}")
    if setting != "single" and not distributed.active():
        log.warning("trainer.strategy=%s in a single process (not under torchrun with >1 ranks): training as single "
                    "(a 7-8B model in fp32 with AdamW needs ~130 GB on one device: launch with torchrun, or set "
                    "trainer.strategy=single model.train_dtype=bfloat16 model.master_weights=cpu)", setting)
        return "single"
    if setting == "single" and distributed.active():
        raise ConfigError(f"trainer.strategy=single under torchrun with {distributed.world_size()} ranks: every rank "
                         "would train its own copy; set trainer.strategy=ddp or trainer.strategy=fsdp")
    return setting


def local_batch(batch_index: list[int], world: int, rank: int) -> list[int]:
    """This rank's pairs of one global batch: the ``rank``-th of ``world`` equal contiguous slices."""
    size = len(batch_index) // world
    return batch_index[rank * size : (rank + 1) * size]


def batch_split_problem(batch_size: int, micro_batch_size: int, world: int) -> str | None:
    """Why ``batch_size`` pairs cannot be split into micro-batches on ``world`` ranks (None: they can)."""
    if batch_size % (micro_batch_size * world):
        return (f"trainer.batch_size={batch_size} must be a multiple of trainer.micro_batch_size="
                f"{micro_batch_size} x {world} ranks (pairs per step = micro-batch x accumulation x ranks)")
    return None


def accumulation_steps(batch_size: int, micro_batch_size: int, world: int) -> int:
    """Micro-batches per rank and optimizer step: ``batch_size = micro_batch_size x steps x world``."""
    problem = batch_split_problem(batch_size, micro_batch_size, world)
    if problem:
        raise ValueError(problem)
    return batch_size // (micro_batch_size * world)


class PolicyForward(torch.nn.Module):
    """One training micro-step of ``policy`` as a module call: what DDP and FSDP2 wrap (see the module docstring)."""

    def __init__(self, policy: torch.nn.Module, training_forward: Any):
        super().__init__()
        self.policy = policy
        self.training_forward = training_forward

    def forward(self, batch: Any, loss_cfg: Mapping[str, Any] | None) -> Any:
        """The micro-step's ``(loss, metrics)``; with ``loss_cfg=None`` its (b, K) log-probs only (the reference pass)."""
        if loss_cfg is None:
            return self.training_forward.logps(self.policy, batch)
        return self.training_forward(self.policy, batch, loss_cfg)


def decoder_layers(policy: torch.nn.Module) -> list[torch.nn.Module]:
    """The policy's decoder layers (``base_model.layers`` in every transformers decoder-only LM; a PeftModel's
    CausalLM, whose LoRA layers sit inside these layers and are sharded with them)."""
    if hasattr(policy, "get_base_model"):  # a peft.PeftModel: its base_model is peft's tuner, not the decoder
        policy = policy.get_base_model()
    layers = getattr(policy.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"trainer.strategy=fsdp shards per decoder layer, but {type(policy).__name__}.base_model "
                         "has no `layers` list; use trainer.strategy=ddp for this model")
    return list(layers)


class ParallelForward:
    """``TrainingForward`` behind ``strategy``: the same ``collate_rows`` and ``(policy, batch, loss_cfg)`` call.

    Build it with ``wrap``; the trainer calls ``sync_gradients(last)`` before each micro-batch so
    that gradients are reduced only on the last micro-batch of a step.
    """

    def __init__(self, training_forward: Any, policy: torch.nn.Module, module: torch.nn.Module, strategy: str,
                 mixed_precision: torch.dtype | None = None):
        self.inner, self.policy, self.module, self.strategy = training_forward, policy, module, strategy
        self.mixed_precision = mixed_precision  # fsdp: the dtype the parameters are all-gathered in

    def __getattr__(self, name: str) -> Any:  # collate_rows, share_prompt, ... of the TrainingForward
        return getattr(self.__dict__["inner"], name)

    def __call__(self, policy: torch.nn.Module, batch: Any,
                 loss_cfg: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.module(batch, loss_cfg)

    def logps(self, batch: Any) -> torch.Tensor:
        """(b, K) log-probs of a collated micro-batch through the wrapped forward, without gradients: the same
        module, wrapping, mixed-precision policy, layout, attention and kernel as a training micro-step. Under
        DDP and FSDP2 this is a collective call: every rank must make the same number of them."""
        with torch.no_grad():
            return self.module(batch, None)

    def identity(self) -> dict[str, Any]:
        """``TrainingForward.identity`` and what the wrapping adds to the numerics: FSDP2 all-gathers the
        parameters in its mixed-precision dtype (embeddings, norms and the residual stream then run in it)."""
        device = next(self.policy.parameters()).device
        gathered = self.mixed_precision if self.strategy == "fsdp" else None
        return {**self.inner.identity(self.policy, device),
                "parameters": str(gathered).removeprefix("torch.") if gathered else "as stored"}

    def sync_gradients(self, last: bool) -> None:
        """Call before each micro-batch: its gradients are reduced over ranks only if it is the step's ``last``.

        DDP: the flag its ``no_sync()`` context sets (``require_backward_grad_sync``), read by its
        next ``forward``; FSDP2: ``set_requires_gradient_sync``. Single: nothing to reduce.
        """
        if self.strategy == "ddp":
            self.module.require_backward_grad_sync = last
        elif self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(last)


def wrap(policy: torch.nn.Module, training_forward: Any, strategy: str, device: torch.device,
         mixed_precision: torch.dtype | None = None, cpu_offload: bool = False) -> ParallelForward:
    """Wrap the policy's training forward for ``strategy`` (``resolve_strategy``); build the optimizer after this.

    Args:
        mixed_precision: fsdp only: the dtype of the all-gathered parameters for the forward
            (bf16 on a GPU), with fp32 gradient reduction; None keeps the parameters' dtype.
        cpu_offload: fsdp only: sharded parameters, gradients and optimizer step on the CPU.
    """
    module = PolicyForward(policy, training_forward)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=[index] if device.type == "cuda" else None)
    elif strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        trained_dtypes = {str(p.dtype).removeprefix("torch.") for p in policy.parameters() if p.requires_grad}
        if trained_dtypes != {"float32"}:  # a frozen LoRA base may be bf16: FSDP2 asks one dtype of trained ones only
            raise ValueError("trainer.strategy=fsdp keeps the sharded trained parameters as fp32 master weights; got "
                             f"{', '.join(sorted(trained_dtypes))} trained weights: set model.train_dtype=float32 (the "
                             "forward runs in bf16 on a GPU through FSDP's mixed precision)")
        if cpu_offload and device.type != "cuda":
            log.warning("trainer.cpu_offload=true: the model is on the CPU already; ignored")
            cpu_offload = False
        mesh = init_device_mesh(device.type, (distributed.world_size(),))
        offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
        for layer in decoder_layers(policy):
            fully_shard(layer, mesh=mesh, offload_policy=offload,
                        mp_policy=MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32))
        # the root's inputs are the micro-batch: its fp32 reference log-probs must stay fp32
        fully_shard(module, mesh=mesh, offload_policy=offload,
                    mp_policy=MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32,
                                                   cast_forward_inputs=False))
    elif cpu_offload:
        log.warning("trainer.cpu_offload=true has an effect with trainer.strategy=fsdp only; ignored")
    return ParallelForward(training_forward, policy, module, strategy, mixed_precision)


def grad_norm_value(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s total norm as a float (a replicated DTensor under FSDP2)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def save_consolidated(policy: torch.nn.Module, tokenizer: Any, model_dir: Path, strategy: str,
                      adapter_dir: Path | None = None, base_model: Mapping[str, Any] | None = None,
                      load_base: Callable[[], torch.nn.Module] | None = None) -> None:
    """Write the policy as one Hugging Face folder, once (rank 0), with every rank taking part in the gather.

    Under FSDP2 the full state dict is all-gathered to rank 0's CPU
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) and saved from there.
    A policy with LoRA adapters (``mipo.model.adapters``) writes ``adapter_dir`` in peft's format (its base named by
    ``base_model``, the model config it loaded from) and ``model_dir`` as the merged model
    (``save_adapter_and_merged``; ``load_base`` loads that base unquantized, for a QLoRA policy).
    """
    state = None
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # tied weights (an output layer that is the input embedding) are saved once, as save_pretrained does
        kept = {name for name, _ in policy.named_parameters()}
        every_name = {name for name, _ in policy.named_parameters(remove_duplicate=False)}
        state = {name: value for name, value in state.items() if name in kept or name not in every_name}
    if distributed.is_main():
        if adapters.has_adapters(policy):
            if adapter_dir is None or base_model is None:
                raise ValueError("a policy with LoRA adapters is saved with its adapter_dir and base_model")
            adapters.save_adapter_and_merged(policy, state, tokenizer, adapter_dir, model_dir, base_model,
                                            load_base)
        else:
            policy.save_pretrained(model_dir, state_dict=state)
            tokenizer.save_pretrained(model_dir)
    distributed.barrier()


def batch_problems(trainer: Mapping[str, Any], world: int) -> list[str]:
    """``trainer.batch_size`` / ``micro_batch_size`` / ``epochs`` / ``strategy`` / ``cpu_offload``, for ``world`` ranks."""
    problems = failed([(is_int(trainer[key]) and trainer[key] > 0, f"trainer.{key}={trainer[key]}: expected an int > 0")
                       for key in ("batch_size", "micro_batch_size", "epochs")])
    batch, micro = trainer["batch_size"], trainer["micro_batch_size"]
    if is_int(batch) and is_int(micro) and micro > 0:
        if batch % micro != 0:
            problems.append(f"trainer.batch_size={batch} must be a multiple of trainer.micro_batch_size={micro} "
                            "(pairs per step = micro-batch x accumulation)")
        if world > 1 and (problem := batch_split_problem(batch, micro, world)) is not None:
            problems.append(problem)
    strategy = trainer.get("strategy", "single")
    return problems + failed([
        (strategy in STRATEGIES, f"trainer.strategy={strategy}: expected one of {', '.join(STRATEGIES)}"),
        (isinstance(trainer.get("cpu_offload", False), bool),
         f"trainer.cpu_offload={trainer.get('cpu_offload')}: expected true or false"),
    ])
