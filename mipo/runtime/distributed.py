"""Processes under torchrun, submitit or srun: the process group, who does what, and moving results between ranks.

Every entry point runs unchanged as one process or under ``torchrun --nproc_per_node=N``
(multi-node: ``--nnodes``/``--rdzv-endpoint``). ``init()`` reads torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and starts the
default process group once: ``gloo`` on CPU, ``cpu:gloo,cuda:nccl`` on GPUs (tensors go
through NCCL, Python objects through gloo), each rank on GPU ``LOCAL_RANK``. Without torchrun
nothing is started and every helper here is the one-process identity: rank 0 of 1.

Without torchrun's variables, a job of N tasks started by submitit (Hydra's submitit launcher,
``tasks_per_node=N``: ``submitit.JobEnvironment()``) or by ``srun`` (``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``, ``SLURM_JOB_NODELIST``) gets them from that
environment first (``launch_environment``, exported once by ``export_launch_environment``): rank
and world size as the launcher numbers its tasks, the rendezvous on the job's first host at a
port derived from the job id (the same for every task, and again when the job is requeued).
From there on such a job is a torchrun job to every line of mipo.

The rules the rest of the code follows:

* **Rank 0 decides, every rank follows.** The run directory (``${mipo_now:...}`` in
  ``conf/config.yaml``, the time rank 0 read, broadcast before Hydra creates the folder), and
  every cache-hit decision (``broadcast_object``).
* **Work is shared round-robin, results come back in input order.** ``shard(n)`` is the list of
  items rank r handles (r, r + N, ...); ``gather_in_order`` puts every rank's results back in
  the order of the input, so the output does not depend on N.
* **Only rank 0 writes** logs, wandb, ``metrics.jsonl``, caches and models (``is_main()``);
  the others compute and wait at a ``barrier()``.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import zlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mipo.runtime.resolvers import register_resolver

log = logging.getLogger(__name__)
T = TypeVar("T")


TORCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PORT_BASE, PORT_SPAN = 20000, 20000  # rendezvous ports 20000-39999, one per job id


def launched() -> bool:
    """True when this process is one of several ranks: started by torchrun (``WORLD_SIZE`` > 1), or a task of
    a submitit or srun job of several tasks (``export_launch_environment`` sets torchrun's variables for it)."""
    export_launch_environment()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def export_launch_environment() -> dict[str, str]:
    """Set torchrun's variables from submitit's or SLURM's job environment where torchrun's are absent.

    Returns what was set (nothing under torchrun, in one process, or when done already). A variable
    already in the environment (e.g. ``MASTER_PORT`` set by hand) is kept.
    """
    if "WORLD_SIZE" in os.environ:
        return {}
    found = launch_environment(os.environ)
    exported = {name: value for name, value in found.items() if name not in os.environ}
    os.environ.update(exported)
    return exported


def launch_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a task of a multi-task submitit or srun job (empty otherwise).

    * submitit (``SUBMITIT_EXECUTOR`` set; Hydra's submitit launcher): rank, local rank and task count
      from ``submitit.JobEnvironment()``, the rendezvous on its first host (``127.0.0.1`` for the local
      executor);
    * srun (``SLURM_STEP_NUM_TASKS`` > 1, which srun sets for the tasks of a step and a batch script
      does not: a plain ``python`` in an ``sbatch --ntasks=4`` script stays one process): ``SLURM_PROCID``,
      ``SLURM_LOCALID``, the first host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``).

    The port is ``MASTER_PORT`` if set, else ``job_port(job id)``: every task of the job computes the same.
    """
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit  # the cluster extra; present wherever submitit started this process

        job = submitit.JobEnvironment()
        if job.num_tasks <= 1:
            return {}
        host = "127.0.0.1" if env["SUBMITIT_EXECUTOR"] == "local" else job.hostnames[0]
        ranks, job_id = (job.global_rank, job.num_tasks, job.local_rank), job.job_id
    elif int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        ranks = (int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0")))
        host = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1")
        job_id = env.get("SLURM_JOB_ID", "0")
    else:
        return {}
    rank_, world, local_rank = ranks
    return {"RANK": str(rank_), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank), "MASTER_ADDR": host,
            "MASTER_PORT": env.get("MASTER_PORT") or str(job_port(job_id))}


def job_port(job_id: str) -> int:
    """The rendezvous port of a job: a stable hash (crc32) of its id into 20000-39999."""
    return PORT_BASE + zlib.crc32(str(job_id).encode()) % PORT_SPAN


def first_host(node_list: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``, ``a-[1-2]-ib`` -> ``a-1-ib``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", node_list.strip())
    if match is None or not match.group(0):
        raise ValueError(f"SLURM node list {node_list!r}: expected hosts like node[1-4],other")
    prefix, ranges, suffix = match.groups()
    first = re.split(r"[-,]", ranges)[0] if ranges else ""
    return f"{prefix}{first}{suffix}"


def init() -> bool:
    """Start the default process group from torchrun's environment, once; returns whether one is running.

    On a machine with CUDA each rank uses GPU ``LOCAL_RANK`` (``torch.cuda.set_device``), so a
    device of ``cuda`` means that rank's GPU.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    atexit.register(close)  # once, when the process ends: a multirun's jobs share the group
    log.info("rank %d of %d (local rank %s), backend %s", rank(), world_size(), os.environ.get("LOCAL_RANK"), backend)
    return True


def active() -> bool:
    """A process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, logs and wandb."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` on every rank (picklable objects)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """The items of ``range(n)`` this rank handles: every ``world``-th from ``rank`` (round-robin)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(range(rank_, n, world))


def gather_dict(items: Mapping[Any, T]) -> dict[Any, T]:
    """The union of every rank's ``items`` (disjoint keys), on every rank."""
    if not active():
        return dict(items)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, dict(items))
    return {k: v for part in parts for k, v in part.items()}


def gather_in_order(items: Mapping[int, T], n: int) -> list[T]:
    """Every rank's ``{index: result}`` merged into one list of ``n`` results in index order, on every rank.

    Raises ``ValueError`` naming the first missing index if the ranks' items do not cover ``range(n)``.
    """
    merged = gather_dict(items)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise ValueError(f"gather_in_order: no rank produced item {missing[0]} of {n} ({len(missing)} missing)")
    return [merged[i] for i in range(n)]


def mean_over_ranks(metrics: Mapping[str, float]) -> dict[str, float]:
    """Each metric averaged over ranks (every rank must pass the same keys): what rank 0 logs.

    The trainer's per-rank metrics are means over an equal share of the global batch, so their
    mean over ranks is the mean over the global batch, as one process computes it.
    """
    if not active():
        return dict(metrics)
    names = list(metrics)  # every rank builds them in the same order
    values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= world_size()
    return dict(zip(names, values.tolist()))


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (one all-reduce; the flag itself in one process)."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class NoLogger:
    """What ranks other than 0 log metrics to: nothing (``mipo.runtime.tracking.MetricsLogger``'s methods)."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def position(self) -> dict[str, Any]:
        return {}

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def close() -> None:
    """Destroy the process group if one is running (``init`` registers this to run at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The run directory: rank 0's clock
# --------------------------------------------------------------------------------------------

_MOMENT: list[datetime] = []


def run_moment() -> datetime:
    """The moment that names this run's directory: rank 0's clock, read once, the same on every rank.

    Called while Hydra composes the config (``${mipo_now:...}``), before any entry point code:
    under torchrun it starts the process group here so that rank 0 can broadcast its time.
    """
    if not _MOMENT:
        now = datetime.now()
        if init():
            now = broadcast_object(now)
        _MOMENT.append(now)
    return _MOMENT[0]


def _mipo_now(pattern: str) -> str:
    return run_moment().strftime(pattern)


# Registered at import (mipo.stages.cli imports this module before @hydra.main composes the config).
register_resolver("mipo_now", _mipo_now)

