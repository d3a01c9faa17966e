"""Checkpoints of a training run, for exact resume after a crash or a kill.

With ``trainer.checkpoint_every=N``, ``mipo.stages.train.train`` writes after every N-th step::

    <run dir>/checkpoints/step-<N>/
        .metadata, __0_0.distcp   the model's and the optimizer's states (torch.distributed.checkpoint);
                                  with LoRA only the trained parameters (adapters) and their states
        trainer_state.json        the scheduler, every RNG state (python, numpy, torch CPU, CUDA),
                                  and the trainer's loop state: the data order and the step reached,
                                  the position in metrics.jsonl, the steps' metrics so far, and the
                                  inputs the run trains on (a resume with other inputs is refused)

A folder named ``step-<N>`` is complete: it is written under a hidden temporary name, fsynced
and renamed (``mipo.runtime.files.atomic_dir``), so a kill while writing leaves the previous checkpoint
the newest one. ``trainer.keep_checkpoints=K`` keeps the newest K.

Model and optimizer go through ``torch.distributed.checkpoint`` (DCP) with its
``get_state_dict``/``set_state_dict`` helpers: in one process without a process group, DCP
writes one file and reads it back bit for bit (``tests/training/test_checkpoint.py``); under FSDP the
same calls write and read each rank's shards, so the format does not change when training
goes multi-GPU. The small loop state is JSON, readable by eye.

Under torchrun (``mipo.runtime.distributed``) every rank takes part: rank 0 creates the temporary
folder and tells the others its name, each rank writes its own ``__<rank>_0.distcp`` (its FSDP
shards; under DDP DCP writes each replicated tensor once), rank 0 writes ``.metadata`` and
``trainer_state.json`` (with every rank's RNG states, ``rng_ranks``) and renames the folder.
A checkpoint resumes with the world size it was written with, and only with it
(``check_world_size``): the per-rank RNG states and the share of each batch a rank trains on
belong to that world size. (DCP itself could re-shard the model and optimizer to another
world size; resuming that way would not continue the run exactly, so it is refused.)
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from mipo.runtime import distributed
from mipo.runtime.errors import InputError, failed, flatten_settings, is_int
from mipo.runtime.files import atomic_dir, remove_stale, remove_tree

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be resumed from; the message names it and says why."""


# --------------------------------------------------------------------------------------------
# Where checkpoints are
# --------------------------------------------------------------------------------------------

def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run as ``(step, folder)``, oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def clear_checkpoints(run_dir: str | Path) -> None:
    """Remove every checkpoint of a run (a run that starts again from step 0)."""
    folder = checkpoints_dir(run_dir)
    if folder.is_dir():
        remove_tree(folder)


# --------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------

@contextmanager
def _single_process_dcp() -> Iterator[None]:
    """DCP warns on every call that it runs without a process group; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loop_state: Mapping[str, Any],
                    keep: int | None = None) -> Path:
    """Write ``checkpoints/step-<step>`` atomically, then keep only the newest ``keep`` (None: all).

    ``loop_state``: what the trainer needs to continue (JSON-serialisable); the scheduler and
    the RNG states are added here, as they are at this moment.
    """
    folder = checkpoints_dir(run_dir)
    target = folder / f"step-{step}"
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options(model))
    world = distributed.world_size()
    rngs = distributed.gather_in_order({distributed.rank(): rng_state()}, world)
    state = {"format": FORMAT_VERSION, "step": step, "scheduler": scheduler.state_dict(), "rng": rngs[0],
             "world_size": world, **({"rng_ranks": rngs} if world > 1 else {}), **loop_state}
    if not distributed.is_main():  # rank 0 owns the folder; the others write their shards into it
        tmp = distributed.broadcast_object(None)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        distributed.barrier()
        return target
    remove_stale(folder)
    with atomic_dir(target) as tmp:
        distributed.broadcast_object(tmp)
        with _single_process_dcp():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
    if keep is not None:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            remove_tree(old)
    distributed.barrier()
    return target


def _state_options(model: torch.nn.Module) -> StateDictOptions:
    """What of the model a checkpoint holds: every parameter, or with a frozen base (LoRA) only the trained ones.

    The frozen base is the loaded model itself, the same at every start, so a LoRA checkpoint is the adapters
    and their AdamW states (megabytes, not the model); loading it leaves the frozen parameters as loaded
    (``strict=False`` for them only: every key of the template must be in the checkpoint, or DCP refuses it).
    """
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (cheap: no tensors are read)."""
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot be read ({error}); remove {path.parent} to resume from "
                              "the checkpoint before it") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: expected a trainer state of format {FORMAT_VERSION}")
    return state


def check_same_inputs(checkpoint: str | Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise ``CheckpointError`` naming every value that differs between a checkpoint's inputs and this run's."""
    before, now = flatten_settings(saved), flatten_settings(json.loads(json.dumps(current)))
    changed = [f"{key}: {before.get(key, '(absent)')!r:.80} -> {now.get(key, '(absent)')!r:.80}"
               for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    if changed:
        lines = "\n".join(f"  - {c}" for c in changed)
        raise CheckpointError(f"{checkpoint} was written by a run with other inputs; resume with the overrides "
                              f"it was started with, or start again with overwrite=true:\n{lines}")


def check_world_size(checkpoint: str | Path, state: Mapping[str, Any], world: int) -> None:
    """Refuse a checkpoint written by another number of ranks (see the module docstring for why)."""
    saved = int(state.get("world_size", 1))
    if saved != world:
        raise CheckpointError(
            f"{checkpoint} was written by {saved} rank{'s' * (saved > 1)} but this run has {world}: a checkpoint "
            f"resumes with the world size it was written with (torchrun --nnodes x --nproc_per_node = {saved}), "
            "or start again with overwrite=true")


def restore_checkpoint(checkpoint: str | Path, state: Mapping[str, Any], model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Load model, optimizer, scheduler and RNG states in place; call it last before the loop.

    ``state``: ``read_state(checkpoint)``. The RNG states are set here, so nothing that draws
    random numbers may run between this call and the next step.
    """
    # DCP reads in place: the current state dicts are the template it fills (every key must be in the checkpoint)
    options = _state_options(model)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    with _single_process_dcp():
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=Path(checkpoint))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options)
    scheduler.load_state_dict(dict(state["scheduler"]))
    set_rng_state(state["rng_ranks"][distributed.rank()] if "rng_ranks" in state else state["rng"])


# --------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------

def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process as JSON: python, numpy (global), torch CPU and each CUDA device."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _encode(torch.get_rng_state()),
        "cuda": [_encode(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Set every RNG from ``rng_state()``'s output."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode(state["torch"]))
    cuda = [_decode(s) for s in state["cuda"]]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise CheckpointError(f"the checkpoint holds RNG states of {len(cuda)} CUDA devices but "
                                  f"{torch.cuda.device_count()} are visible: resume with the same devices")
        torch.cuda.set_rng_state_all(cuda)


def checkpoint_problems(trainer: Mapping[str, Any]) -> list[str]:
    """``trainer.checkpoint_every`` / ``keep_checkpoints`` (null or a count) and ``trainer.resume``."""
    checks = [(trainer.get(key) is None or (is_int(trainer.get(key)) and trainer.get(key) > 0),
               f"trainer.{key}={trainer.get(key)}: expected null or an int > 0")
              for key in ("checkpoint_every", "keep_checkpoints")]
    checks.append((isinstance(trainer.get("resume"), bool), f"trainer.resume={trainer.get('resume')}: expected true or false"))
    return failed(checks)
