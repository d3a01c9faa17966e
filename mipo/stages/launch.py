"""Sweeps through Hydra's submitit launcher: one sweep directory, jobs that survive requeues, and their states.

``conf/hydra/launcher/slurm.yaml`` submits each job of a multirun to SLURM, ``local.yaml`` runs them
through submitit's local executor (docs/cluster.md). ``JobStates`` (``conf/config.yaml``'s
``hydra.callbacks``) does three things:

* **One sweep directory, whatever process resolves it.** ``hydra.sweep.dir`` is
  ``multirun/${mipo_now:...}``: the launching process's clock. A submitit job composes its config
  again in its own process, hours later after a requeue, where ``mipo_now`` would read another
  time. ``on_multirun_start`` therefore pins the resolved directory as a Hydra override
  (``hydra.overrides.hydra``, which every job's config is composed with, as Hydra passes
  ``hydra.mode``) when the launcher is submitit's. A requeued job is the same Hydra job (same
  overrides, same job directory): ``pipeline.py``'s train stage always continues from the newest
  checkpoint of its content-addressed ``<cache>/runs/<key>.partial`` (and skips every stage whose
  outputs exist); a ``train.py`` job continues its own directory's newest checkpoint
  (``mipo.stages.inputs.job_resume``).
* **Preemption.** ``on_job_start`` exports torchrun's variables from submitit's job environment
  (``mipo.runtime.distributed.export_launch_environment``: a job of ``tasks_per_node=N`` is N ranks)
  and installs the deferring handler of the checkpoint signal (``mipo.runtime.preemption``).
* **What became of each job**: ``<job dir>/status.json`` (``STATUS_FILE``), written by rank 0:
  ``state`` running | finished | failed | requeued, ``attempts`` (runs of this job, requeues
  included), ``started`` (first attempt), ``updated``, ``job_id`` (submitit's), ``error`` (failed),
  and ``history``: one ``{attempt, state, time}`` per change. A job killed outright (SIGKILL, a lost
  node) stays ``running`` with no process behind it: ``aggregate.py`` lists it as missing.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.core.utils import JobStatus as HydraJobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mipo.runtime import distributed, preemption
from mipo.runtime.files import write_json

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATES = ("running", "finished", "failed", "requeued")
SUBMITIT_LAUNCHERS = "hydra_plugins.hydra_submitit_launcher."


def read_status(job_dir: str | Path) -> dict[str, Any]:
    """``<job_dir>/status.json``, or ``{}`` where none was written (or it cannot be read)."""
    import json

    path = Path(job_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_status(job_dir: str | Path, state: str, new_attempt: bool = False, **fields: Any) -> dict[str, Any]:
    """Record ``state`` (one of ``STATES``) for the job in ``job_dir``, keeping what earlier attempts wrote."""
    if state not in STATES:
        raise ValueError(f"job state {state!r}: expected one of {', '.join(STATES)}")
    now = datetime.now().isoformat(timespec="seconds")
    status = read_status(job_dir)
    attempts = int(status.get("attempts", 0)) + int(new_attempt)
    status.update({"state": state, "attempts": attempts, "updated": now, **fields})
    status.setdefault("started", now)
    if state != "failed":
        status.pop("error", None)
    status["history"] = [*status.get("history", []), {"attempt": attempts, "state": state, "time": now}]
    write_json(Path(job_dir) / STATUS_FILE, status)
    return status


def submitit_launcher(config: DictConfig) -> bool:
    """The multirun's launcher is Hydra's submitit plugin (``hydra/launcher=slurm|local``)."""
    target = OmegaConf.select(config, "hydra.launcher._target_", default="") or ""
    return str(target).startswith(SUBMITIT_LAUNCHERS)


def sweep_overrides(config: DictConfig) -> list[str]:
    """The Hydra overrides every job of a submitit multirun is composed with: the sweep directory, resolved
    here once (unless the command line gave it). Hydra overrides only: task overrides would name the jobs."""
    given = {o.split("=", 1)[0].lstrip("+~") for o in config.hydra.overrides.hydra}
    if "hydra.sweep.dir" in given:
        return []
    return ["hydra.sweep.dir=" + quote(str(config.hydra.sweep.dir))]  # resolves ${mipo_now:...}


def quote(value: str) -> str:
    """``value`` as a quoted Hydra override value (any character)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class JobStates(Callback):
    """``hydra.callbacks.job_states``: the sweep directory pinned for submitit, launch variables, the
    preemption handler, and ``status.json`` for every job of a multirun (module docstring)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not submitit_launcher(config):
            return
        pinned = sweep_overrides(config)
        if pinned:
            with read_write(config.hydra.overrides), open_dict(config.hydra.overrides):
                config.hydra.overrides.hydra = [*config.hydra.overrides.hydra, *pinned]
            log.info("submitit sweep: every job is composed with %s", " ".join(pinned))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        distributed.export_launch_environment()
        job_dir = Path(config.hydra.runtime.output_dir)
        preemption.install(on_outcome=lambda state, detail: self._record(job_dir, state, detail))
        if _rank_zero():
            write_status(job_dir, "running", new_attempt=True, job_id=_job_id(config), host=socket.gethostname(),
                         pid=os.getpid(), world_size=int(os.environ.get("WORLD_SIZE", "1")))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        preemption.uninstall()  # the next job of this process (basic launcher) installs its own
        if not _rank_zero():
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == HydraJobStatus.COMPLETED:
            write_status(job_dir, "finished", finished=datetime.now().isoformat(timespec="seconds"))
        else:
            error = job_return._return_value
            write_status(job_dir, "failed", error=f"{type(error).__name__}: {error}".splitlines()[0])

    @staticmethod
    def _record(job_dir: Path, state: str, detail: str) -> None:
        if _rank_zero():
            write_status(job_dir, state, **({"error": detail} if state == "failed" else {"signal": detail}))


def _rank_zero() -> bool:
    """Rank 0 of this job, from the launcher's variables (the process group may not be started yet)."""
    return int(os.environ.get("RANK", "0")) == 0


def _job_id(config: DictConfig) -> str | None:
    job_id = OmegaConf.select(config, "hydra.job.id", default=None)
    return None if job_id is None else str(job_id)
