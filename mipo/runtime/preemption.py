"""Preemption and time limits under submitit: the checkpoint signal, deferred to the end of a training step.

submitit (Hydra's submitit launcher) signals a job shortly before SLURM ends it, for a time limit
(``--signal=USR2@<signal_delay_s>``) or a preemption: ``SIGUSR2`` by default (``SUBMITIT_PREEMPT_SIGNAL``).
Its handler (``submitit.core.job_environment.SignalHandler.checkpoint_and_try_requeue``) runs at once, on
whichever line the job is: on rank 0 it asks the launcher's ``checkpoint()`` for the job to run again
(the same Hydra job: same overrides, same job directory), requeues it (``scontrol requeue``; the local
executor restarts its tasks) and exits; other ranks return from it and wait to be ended.

``install()`` (run by ``mipo.stages.launch.JobStates`` as each job starts) puts a handler in front of
submitit's:

* outside ``deferred()``: submitit's handler runs at once, as without mipo (a sampling stage resumes
  from its finished chunks, a reference pass or an evaluation starts again);
* inside ``deferred()`` (the training loop, ``mipo.stages.train.train``): the handler only sets a flag.
  After each optimizer step the loop asks ``requested()`` (true on every rank when any rank got the
  signal: one all-reduce, so that every rank stops after the same step), writes a checkpoint and
  calls ``stop()``: rank 0 hands the signal to submitit, which requeues the job, and every rank exits
  the way rank 0 does. The requeued job resumes from that checkpoint (``trainer.resume``), bit for bit.

The step and the checkpoint must fit in ``signal_delay_s`` (``conf/hydra/launcher/slurm.yaml``).
Outside a submitit job ``install()`` does nothing and ``requested()`` is always false.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

from mipo.runtime import distributed

log = logging.getLogger(__name__)


@dataclass
class _State:
    signum: int | None = None  # the checkpoint signal (installed: not None)
    previous: Any = None  # submitit's handler
    on_outcome: Callable[[str, str], None] | None = None  # (state, detail): "requeued" or "failed", rank 0
    deferring: bool = False
    flag: bool = False


_STATE = _State()


def install(on_outcome: Callable[[str, str], None] | None = None) -> bool:
    """Put the deferring handler in front of submitit's handler of its checkpoint signal; returns whether it
    did (only in a submitit job, after submitit installed its own). ``on_outcome(state, detail)`` is told on
    rank 0 what submitit made of the signal: ``"requeued"``, or ``"failed"`` with submitit's reason."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return False
    from submitit import (
        JobEnvironment,  # the cluster extra: present in every submitit job
    )

    signum = JobEnvironment._usr_sig()
    current = signal.getsignal(signum)
    if current is not _handle:
        _STATE.previous = current
    _STATE.signum, _STATE.on_outcome, _STATE.flag = signum, on_outcome, False
    signal.signal(signum, _handle)
    return True


def installed() -> bool:
    return _STATE.signum is not None


def uninstall() -> None:
    """Give the signal back to the handler ``install`` found (tests; a job's process ends anyway)."""
    if _STATE.signum is not None and signal.getsignal(_STATE.signum) is _handle:
        signal.signal(_STATE.signum, _STATE.previous if _STATE.previous is not None else signal.SIG_DFL)
    _STATE.signum, _STATE.previous, _STATE.on_outcome, _STATE.flag, _STATE.deferring = None, None, None, False, False


@contextmanager
def deferred() -> Iterator[None]:
    """Inside: the checkpoint signal only sets the flag ``requested()`` reads. On a normal exit a signal that
    came after the last ``requested()`` is handed to submitit then."""
    _STATE.deferring = True
    try:
        yield
    finally:
        _STATE.deferring = False
    if requested():  # every rank leaves the loop after the same step: a collective is safe here
        stop()


def requested() -> bool:
    """Whether any rank got the checkpoint signal inside ``deferred()`` (the same answer on every rank).

    Installed on several ranks, every call is one all-reduce of one number: every rank must call it
    after the same steps (the training loop: after every step).
    """
    if _STATE.signum is None:
        return False
    return distributed.any_rank(_STATE.flag)


def stop() -> NoReturn:
    """After the checkpoint: rank 0 hands the signal to submitit (which requeues the job and exits, or refuses
    with ``UncompletedJobError`` when the job timed out too often); every other rank ends the same way."""
    distributed.barrier()  # every rank's share of the checkpoint is written
    outcome: BaseException | None = None
    if distributed.is_main():
        try:
            _hand_over(_STATE.signum or signal.SIGUSR2, None)
            outcome = SystemExit(1)  # submitit's handler returned on rank 0: end anyway, the job is incomplete
        except BaseException as error:  # noqa: BLE001  SystemExit (requeued) or submitit's UncompletedJobError: re-raised below
            outcome = error
    outcome = distributed.broadcast_object(outcome)
    raise outcome


def _handle(signum: int, frame: Any) -> None:
    if _STATE.deferring:
        log.warning("signal %s: checkpointing after this training step, then requeueing", signal.Signals(signum).name)
        _STATE.flag = True
        return
    _hand_over(signum, frame)


def _hand_over(signum: int, frame: Any) -> None:
    """Run submitit's handler now, telling ``on_outcome`` what came of it (rank 0: requeued or not)."""
    _STATE.flag = False
    previous = _STATE.previous
    if not callable(previous):  # no submitit handler (SIG_DFL / SIG_IGN): end as the signal would
        raise SystemExit(128 + signum)
    try:
        previous(signum, frame)
    except SystemExit:
        _report("requeued", f"signal {signal.Signals(signum).name}")
        raise
    except Exception as error:
        _report("failed", str(error))
        raise


def _report(state: str, detail: str) -> None:
    if _STATE.on_outcome is not None:
        try:
            _STATE.on_outcome(state, detail)
        except OSError as error:  # the status file is a report: never let it stop the requeue
            log.warning("could not record the job's state %s: %s", state, error)
