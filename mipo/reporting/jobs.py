"""The jobs a sweep should have, the ones it lacks, and config keys as sweep columns.

Hydra writes ``multirun.yaml`` into the sweep directory before its first job: ``hydra.overrides.task`` is the
command line's overrides (``loss.beta=0.01,0.1 seed=0,1``). ``expand_sweep`` turns them into each job's
override list as Hydra's basic sweeper does (the cartesian product, the first key varying slowest, so the
list index is ``hydra.job.num``); ``missing_jobs`` names the ones no job folder holds (never started, or
removed), so a sweep whose jobs died before writing anything is not mistaken for a complete one.

    missing_jobs("multirun/identity_cpu", collect_runs("multirun/identity_cpu"))   # [] when every job started
    expand_sweep(["trainer.max_steps=4,8", "seed=0,1"])   # [['trainer.max_steps=4', 'seed=0'], ...] (4 jobs)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from mipo.reporting.sweep import (
    AggregateError,
    Run,
    config_value,
    hashable,
    parse_overrides,
    sweep_title,
)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
_ABSENT = object()


@dataclass(frozen=True)
class MissingJob:
    """A job of a sweep (``multirun.yaml``) without a job folder: its number and its overrides."""

    sweep: Path
    number: int
    overrides: tuple[str, ...]
    swept: tuple[str, ...]  # the overrides of this job that vary across the sweep, for the listing


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Each job's override list, in job order, as Hydra's ``BasicSweeper`` expands a ``-m`` command line.

    Raises ``AggregateError`` for an override Hydra cannot parse or a sweep the basic sweeper refuses
    (``interval(...)``).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as error:
        raise AggregateError(f"cannot expand the sweep {list(overrides)}: {error}") from error
    return jobs


def sweep_overrides(multirun_yaml: Path) -> list[str] | None:
    """The task overrides of ``multirun.yaml`` with the sweeper's ``params`` first (as ``BasicSweeper`` reads
    them); ``None`` when the file is unreadable or its sweeper is not the basic one (its jobs are not known)."""
    try:
        hydra = (yaml.safe_load(multirun_yaml.read_text()) or {}).get("hydra") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    sweeper = hydra.get("sweeper") or {}
    task = (hydra.get("overrides") or {}).get("task")
    if sweeper.get("_target_", BASIC_SWEEPER) != BASIC_SWEEPER or not isinstance(task, list):
        return None
    params = sweeper.get("params") or {}
    return [f"{key}={value}" for key, value in params.items()] + [str(o) for o in task]


def missing_jobs(sweep_dir: str | Path, runs: Sequence[Run]) -> list[MissingJob]:
    """The jobs of every ``multirun.yaml`` under ``sweep_dir`` that no job folder beside it holds.

    A job folder holds a job when its ``.hydra/overrides.yaml`` gives the same overrides (compared as
    parsed values, so ``0.10`` and ``0.1`` match); a folder whose overrides cannot be read holds the job
    its name numbers (``<hydra.job.num>_...``, ``hydra.sweep.subdir``), so it is listed once, as unreadable.
    """
    missing: list[MissingJob] = []
    for multirun_yaml in sorted(Path(sweep_dir).rglob("multirun.yaml")):
        overrides = sweep_overrides(multirun_yaml)
        if overrides is None:
            continue
        jobs = expand_sweep(overrides)
        folder = multirun_yaml.parent
        beside = [run for run in runs if folder in run.job_dir.parents]
        present = {_override_key(run.overrides) for run in beside if run.readable}
        unreadable = {run.job_dir.name.split("_", 1)[0] for run in beside if not run.readable}
        varying = _varying_keys(jobs)
        missing += [MissingJob(folder, number, tuple(job), tuple(o for o in job if o.split("=", 1)[0] in varying))
                    for number, job in enumerate(jobs)
                    if _override_key(parse_overrides(job)) not in present and str(number) not in unreadable]
    return missing


def with_config_key(runs: Sequence[Run], key: str) -> list[Run]:
    """The runs with ``key`` of their composed config (``lora.rank``) as one more override, so that it can
    be a column and an axis although it was not on the command line (e.g. set by ``+method=sft``).

    Raises ``AggregateError`` naming the jobs whose config lacks ``key`` when a complete job does, or when
    no job has it. Failed jobs without it get ``None``.
    """
    values = {run.name: config_value(run.config, key, _ABSENT) for run in runs}
    lacking = [run.name for run in runs if values[run.name] is _ABSENT and not run.failed]
    if len(lacking) == len(runs) or all(value is _ABSENT for value in values.values()):
        raise AggregateError(f"unknown --x {key!r}: neither a swept override nor a key of any job's "
                             f".hydra/config.yaml ({sweep_title(runs) or 'this sweep'})")
    if lacking:
        shown = ", ".join(lacking[:3]) + (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
        raise AggregateError(f"--x {key!r} is not in the config of {len(lacking)} of {len(runs)} jobs ({shown}): "
                             f"every complete job needs a value to be placed on the x axis")
    for run in runs:
        value = values[run.name]
        run.overrides = {**run.overrides, key: None if value is _ABSENT else value}
    return list(runs)


def missing_report(missing: Sequence[MissingJob], sweep_dir: str | Path) -> list[str]:
    """One line per missing job: ``job 7 of multirun/x (trainer.max_steps=16, seed=1): no job folder``."""
    if not missing:
        return []
    lines = [f"{len(missing)} job(s) of the sweep have no job folder (never started, or removed):"]
    for job in missing:
        where = job.sweep.relative_to(sweep_dir).as_posix() if job.sweep != Path(sweep_dir) else str(job.sweep)
        lines.append(f"  job {job.number} of {where} ({', '.join(job.swept or job.overrides)}): no job folder")
    return lines


def _override_key(overrides: dict[str, Any]) -> frozenset:
    return frozenset((key, hashable(value)) for key, value in overrides.items())


def _varying_keys(jobs: Sequence[Sequence[str]]) -> set[str]:
    """The override keys whose value differs between the jobs."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return {key for key, seen in values.items() if len(seen) > 1}
