"""What every Hydra entry point shares: the inputs check, logging set-up, the run directory,
and errors reported as a clean message.

An entry point is ``@hydra.main`` over ``@entry_point("train")`` over a thin ``main(cfg)``
that calls ``setup(cfg, "train")`` first. The errors that mean "the input is wrong" (a bad
config value or file, a run directory that would be overwritten, a non-finite loss, a full
disk, ...) are printed last, one line per problem, on stderr, and the process exits with
status 1; ``HYDRA_FULL_ERROR=1`` shows the full traceback instead.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# distributed registers ${mipo_now:...} at import: the run directory is rank 0's under torchrun
from mipo.runtime import distributed
from mipo.runtime.errors import InputError, raise_problems
from mipo.runtime.files import folder_problem, stable_hash
from mipo.runtime.resolvers import register_resolver
from mipo.stages.inputs import ENTRIES, Inputs, check_inputs, run_dir_problems

log = logging.getLogger("mipo")
MAX_DIRNAME = 100


def job_dirname(overrides: list[str]) -> str:
    """A short, filesystem-safe name for a multirun job from its overrides.

    Path-valued overrides are left out (they would nest directories) and a long name is cut
    and suffixed with a hash of the full list, so it stays unique and under file-name limits.
    ``.hydra/overrides.yaml`` in the job directory always holds the full list.
    """
    kept = [o for o in overrides if not any(k in o.split("=", 1)[0] for k in ("path", "dir", "hydra."))]
    name = ",".join(kept).replace("/", "_") or "job"
    if len(name) > MAX_DIRNAME:
        name = f"{name[: MAX_DIRNAME - 9]}-{stable_hash(list(overrides), 8)}"
    return name


# Registered at import, before @hydra.main composes conf/config.yaml, which uses it for job names.
register_resolver("mipo_job_dirname", lambda overrides: job_dirname(list(overrides)))


def run_dir() -> Path:
    """This job's output directory (``outputs/<date>/<time>`` or ``multirun/<date>/<time>/<job>``)."""
    return Path(HydraConfig.get().runtime.output_dir)


# errors whose message says all: what was wrong and what was expected
REPORTED = (InputError,)  # every subclass: config, pairs file, checkpoint, busy lock, partial samples, ...
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def reported(error: BaseException) -> bool:
    return isinstance(error, REPORTED) or (isinstance(error, OSError) and error.errno in DISK_FULL)


# entries whose jobs failed with a reported error in this process's multirun (Hydra's basic launcher runs them here)
FAILED_JOBS: list[str] = []
IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


@contextmanager
def reported_errors(entry: str, multirun: bool = False, in_process: bool = False) -> Iterator[None]:
    """Print a reported error as ``<entry>.py: error: ...`` on stderr and exit 1.

    In a multirun the error is printed and raised again, so that Hydra records the job as
    failed and goes on with the others. Where the jobs run in this process (``in_process``: Hydra's
    basic launcher) the job ends there instead and is counted in ``FAILED_JOBS``: the others run, and the
    process exits 1 after the last (``RunDirGuard.on_multirun_end``), with the jobs' messages and no traceback.
    """
    try:
        yield
    except Exception as error:
        if not reported(error) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{entry}.py: error: {error}", file=sys.stderr, flush=True)
        if multirun and in_process:
            FAILED_JOBS.append(entry)
            return
        if multirun:
            raise
        sys.exit(1)


def entry_point(entry: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[DictConfig], Any]]:
    """Decorate an entry point's ``main(cfg)`` (under ``@hydra.main``) to report errors cleanly."""
    def decorate(main: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
        @functools.wraps(main)
        def wrapped(cfg: DictConfig) -> Any:
            hydra = HydraConfig.get()
            in_process = hydra.launcher.get("_target_") == IN_PROCESS_LAUNCHER
            with reported_errors(entry, multirun=hydra.mode == RunMode.MULTIRUN, in_process=in_process):
                return main(cfg)
        return wrapped
    return decorate


class RunDirGuard(Callback):
    """Refuses a run directory that holds an earlier run before Hydra writes ``.hydra/`` and the
    job log into it (``conf/config.yaml``: ``hydra.callbacks``).

    Hydra calls ``on_run_start`` for single runs only; in a multirun ``setup`` makes the same
    check in each job, after Hydra has written that job's ``.hydra/`` (``on_multirun_start`` refuses a
    sweep directory no folder can be made at).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        entry = config.hydra.job.name
        if entry in ENTRIES:
            with reported_errors(entry):
                raise_problems("these inputs", run_dir_problems(config, entry, Path(config.hydra.run.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Exit 1 when a job of this process failed with a reported error (its message is printed already)."""
        if FAILED_JOBS:
            sys.exit(1)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep directory that is a file (or under one) is refused before Hydra makes it."""
        entry = config.hydra.job.name
        problem = folder_problem(config.hydra.sweep.dir, "hydra.sweep.dir")
        if entry in ENTRIES and problem:
            with reported_errors(entry):
                raise_problems("these inputs", [problem])


def setup(cfg: DictConfig, entry: str) -> Inputs:
    """Check everything ``entry`` is given (``mipo.stages.inputs``), quiet third-party noise, and
    return what the check read, with the run directory."""
    inputs = check_inputs(cfg, entry, run_dir())
    if distributed.init():  # under torchrun: every rank has checked the run directory before any writes to it
        distributed.barrier()
        if not distributed.is_main():
            quiet_rank()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    out = inputs.run_dir
    out.mkdir(parents=True, exist_ok=True)
    # .hydra/config.yaml keeps the interpolations; this copy has every value resolved.
    if distributed.is_main():
        OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    log.info("run directory: %s", out)
    return inputs


def quiet_rank() -> None:
    """Ranks other than 0 write no log file, log warnings only (on stderr) and print nothing: rank 0
    speaks for the run (its result tables, its log)."""
    sys.stdout = open(os.devnull, "w")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    for name in ("mipo", "__main__"):
        logging.getLogger(name).setLevel(logging.WARNING)
