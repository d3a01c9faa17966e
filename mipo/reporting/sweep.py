"""Read a Hydra multirun sweep: one ``Run`` per job directory, with its overrides, config and results.

A sweep directory (``multirun/<date>/<time>/``) holds one job directory per combination, each with
``.hydra/overrides.yaml``, ``.hydra/config.yaml`` and, when the job got that far, ``train.json`` and
``eval.json`` (and ``status.json`` where a cluster launcher writes one: its ``state`` is finished, failed,
requeued or running). ``collect_runs`` reads them all; ``swept_keys`` says which overrides vary.

    runs = collect_runs("multirun/2026-11-21/10-00-00")
    swept_keys(runs)              # ['loss.beta', 'negatives', 'seed']
    runs[0].metrics["trained/accuracy"], runs[0].results["trained/accuracy"].stderr

``mipo.reporting.summary`` averages the runs over seeds; ``mipo.reporting.aggregate`` writes the sweep's report.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from mipo.runtime.errors import InputError, is_number

# Per-model metrics that get a ``delta/<name>`` as trained minus base when eval.json has no paired
# ``deltas`` (written by the evaluation code before paired comparisons).
DELTA_METRICS = ("accuracy", "mi_mean")
# The field of eval.json holding a per-model metric's standard error, where it is not ``<name>_stderr``.
STDERR_FIELDS = {"mi_mean": "mi_stderr", "mi_per_token_mean": "mi_per_token_stderr", "judge_score_mean": "judge_score_stderr"}
STDERR_SUFFIX = "_stderr"
# Per-job numbers of a paired delta that are not averaged over seeds (runs.csv lists them).
PER_JOB_SUFFIXES = ("_p_value", "_ci95_lo", "_ci95_hi")
NO_JOBS_HINT = "expected Hydra multirun job directories with .hydra/overrides.yaml"
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class AggregateError(InputError, ValueError):
    """A problem with the sweep directory or the requested columns, worded for the user to fix.

    ``report`` is text for standard output that goes with the error (e.g. the list of failed jobs).
    """

    def __init__(self, message: str, report: str = "") -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Result:
    """One metric of one run: its value and the run's own standard error, where it reports one."""

    value: float
    stderr: float | None = None


@dataclass
class Run:
    """One Hydra job: its overrides, (unresolved) config and results.

    ``metrics`` holds every number of ``train.json`` and ``eval.json`` by flat name (standard errors
    included: ``trained/accuracy_stderr``), as ``runs.csv`` lists them; ``results`` holds the metrics
    that are averaged over seeds, each with its standard error. ``problem`` is ``None`` for a complete
    job (``eval.json`` read); otherwise it says what is missing. ``state`` is ``status.json``'s ``state``
    where the job folder has one (the cluster launcher's: finished, failed, requeued, running).
    ``readable`` is false when ``.hydra/overrides.yaml`` could not be read: the job is listed, not summarised.
    """

    job_dir: Path
    name: str
    overrides: dict[str, Any]
    config: DictConfig | dict | None
    metrics: dict[str, float] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)
    task: str | None = None
    problem: str | None = None
    state: str | None = None
    readable: bool = True

    @property
    def failed(self) -> bool:
        return self.problem is not None

    def config_value(self, key: str, default: Any = None) -> Any:
        """A plain value of the composed config (``"loss.beta"``); ``default`` if absent or unresolvable."""
        return config_value(self.config, key, default)


def find_job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every directory under ``sweep_dir`` (itself included) holding ``.hydra/overrides.yaml``, in job order."""
    sweep_dir = Path(sweep_dir)
    found = {p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    return sorted(found, key=lambda d: natural_key(d.relative_to(sweep_dir).as_posix()))


def collect_runs(sweep_dir: str | Path) -> list[Run]:
    """Read every job directory under ``sweep_dir``; jobs without ``eval.json`` come back with ``problem`` set."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise AggregateError(f"{sweep_dir} is not a directory; {NO_JOBS_HINT} "
                             f"(e.g. multirun/<date>/<time>/)")
    job_dirs = find_job_dirs(sweep_dir)
    if not job_dirs:
        raise AggregateError(f"no job directories found under {sweep_dir}: {NO_JOBS_HINT} "
                             f"(run a sweep with `python pipeline.py -m ...` and pass its multirun/<date>/<time>/ directory)")
    return [read_run(job_dir, sweep_dir) for job_dir in job_dirs]


def read_run(job_dir: str | Path, sweep_dir: str | Path | None = None) -> Run:
    """One job directory as a ``Run``; never raises for missing or unreadable files (the run says what failed)."""
    job_dir = Path(job_dir)
    name = job_dir.relative_to(sweep_dir).as_posix() if sweep_dir is not None else job_dir.name
    if name == ".":
        name = job_dir.name
    try:
        overrides, overrides_problem = parse_overrides(_load_override_list(job_dir / ".hydra" / "overrides.yaml")), None
    except AggregateError as error:
        overrides, overrides_problem = {}, str(error)
    config = _load_config(job_dir / ".hydra" / "config.yaml")
    train, train_problem = _load_json(job_dir / "train.json")
    evaluation, eval_problem = _load_json(job_dir / "eval.json")
    status, _ = _load_json(job_dir / "status.json")
    state = status.get("state") if status is not None and isinstance(status.get("state"), str) else None
    error = status.get("error") if state and isinstance(status.get("error"), str) else ""
    label = state + (f" ({error.strip().splitlines()[0][:160]})" if error.strip() else "") if state else None

    metrics = train_metrics(train) if train is not None else {}
    if evaluation is not None:
        metrics.update(eval_metrics(evaluation))
    task = config_value(config, "task.name") or (evaluation or {}).get("task")
    problem = overrides_problem
    if evaluation is None:
        stage = "training finished, " if train is not None else (f"{train_problem}, " if train_problem else "")
        problem = (f"{label}: " if label else "") + stage + (eval_problem or "no eval.json")
        problem = f"{overrides_problem}; {problem}" if overrides_problem else problem
    return Run(job_dir=job_dir, name=name, overrides=overrides, config=config, metrics=metrics,
               results=results_of(metrics), task=task, problem=problem, state=state,
               readable=overrides_problem is None)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``['loss.beta=0.01', '+x=a', '++y=null']`` -> ``{'loss.beta': 0.01, 'x': 'a', 'y': None}``.

    Values are read with ``yaml.safe_load`` (so ``0.01`` is a float and ``true`` a bool); ``1e-3``, which
    YAML 1.1 leaves a string, is also read as a float. Lists and dicts stay as their original text.
    A deletion (``~key``) keeps its tilde in the key.
    """
    parsed: dict[str, Any] = {}
    for override in overrides:
        text = str(override).strip()
        key, sep, raw = text.partition("=")
        key = key.lstrip("+").strip()
        parsed[key] = parse_value(raw) if sep else None
    return parsed


def parse_value(raw: str) -> Any:
    """One override value as Python: numbers, bools and ``null`` parsed, anything structured kept as text."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and _NUMBER.match(raw.strip()):  # unquoted 1e-3: a float to Hydra too
        return float(value)
    if isinstance(value, (list, dict)):
        return raw
    return value


def config_value(config: DictConfig | dict | None, key: str, default: Any = None) -> Any:
    """``config[key]`` by dotted path without resolving anything else; ``default`` if absent or unresolvable.

    ``config`` may also be a plain dict (a config.yaml that OmegaConf could not parse): then values are
    read as written, and an interpolation string counts as unresolvable.
    """
    if config is None:
        return default
    if isinstance(config, dict):
        return _plain_value(config, key, default)
    try:
        value = OmegaConf.select(config, key, default=default, throw_on_resolution_failure=False)
    except Exception:  # malformed interpolations raise grammar errors even with throw_on_resolution_failure=False
        return default
    if isinstance(value, DictConfig) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=False)
    return default if value is None else value


def train_metrics(train: dict[str, Any]) -> dict[str, float]:
    """``train.json`` numbers as ``train/<name>`` (``train/final_loss``, ``train/steps``, ...)."""
    return {f"train/{k}": v for k, v in train.items() if is_number(v)}


def eval_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """``eval.json`` numbers as ``<model>/<name>`` (``trained/accuracy_strict``), ``eval/<name>``, ``delta/<name>``
    and ``identity/<name>``.

    ``delta/<name>`` is the paired comparison ``deltas.<name>`` (trained minus base over the same
    prompts): its mean, with ``delta/<name>_stderr`` (the paired standard error, used as the
    run's own error bar when there is one seed) and, per job only, ``_p_value``, ``_ci95_lo`` and
    ``_ci95_hi``. ``delta/accuracy`` aliases ``delta/accuracy_strict``, as ``accuracy`` aliases
    ``accuracy_strict``. An eval.json without ``deltas`` (older evaluation code) gets trained
    minus base of ``DELTA_METRICS``, without a standard error.

    ``identity/<name>`` holds the numbers of the paper's identity, measured on the trained model
    (``identity/slope_demeaned``, ``identity/spearman_within_prompt``, ``identity/heldout_pair_accuracy``,
    each with its ``_stderr``, and the counts; ``mipo.metrics.identity``); a measure that was undefined
    (null) is left out.
    """
    metrics = {f"eval/{k}": v for k, v in evaluation.items() if is_number(v)}
    models = evaluation.get("models") or {}
    for model, values in models.items():
        if isinstance(values, dict):
            metrics.update({f"{model}/{k}": v for k, v in values.items() if is_number(v)})
    identity = evaluation.get("identity")
    if isinstance(identity, dict):
        metrics.update({f"identity/{k}": v for k, v in identity.items() if is_number(v)})
    deltas = evaluation.get("deltas")
    if isinstance(deltas, dict) and deltas:
        if "accuracy_strict" in deltas and "accuracy" not in deltas:
            deltas = {**deltas, "accuracy": deltas["accuracy_strict"]}
        for name, delta in deltas.items():
            if not isinstance(delta, dict) or not is_number(delta.get("mean")):
                continue
            metrics[f"delta/{name}"] = delta["mean"]
            if is_number(delta.get("stderr")):
                metrics[f"delta/{name}{STDERR_SUFFIX}"] = delta["stderr"]
            if is_number(delta.get("p_value")):
                metrics[f"delta/{name}_p_value"] = delta["p_value"]
            ci = delta.get("ci95")
            if isinstance(ci, list) and len(ci) == 2 and all(is_number(v) for v in ci):
                metrics[f"delta/{name}_ci95_lo"], metrics[f"delta/{name}_ci95_hi"] = ci
        return metrics
    for name in DELTA_METRICS:
        trained, base = metrics.get(f"trained/{name}"), metrics.get(f"base/{name}")
        if trained is not None and base is not None:
            metrics[f"delta/{name}"] = trained - base
    return metrics


def results_of(metrics: dict[str, float]) -> dict[str, Result]:
    """The metrics worth averaging over seeds, each with its standard error from the same file.

    A number named ``<name>_stderr`` (``mi_stderr`` for ``mi_mean``) is the standard error of
    ``<name>``, not a metric of its own; a delta's p-value and interval bounds describe one job
    and are not averaged over seeds.
    """
    def stderr_name(metric: str) -> str:
        prefix, _, name = metric.rpartition("/")
        if prefix == "delta":  # a paired delta's stderr is always delta/<name>_stderr
            return f"{metric}{STDERR_SUFFIX}"
        return f"{prefix}/{STDERR_FIELDS.get(name, name + STDERR_SUFFIX)}"

    return {m: Result(v, metrics.get(stderr_name(m))) for m, v in metrics.items()
            if not m.endswith((STDERR_SUFFIX, *PER_JOB_SUFFIXES))}


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value differs across runs (or is missing from some), in first-appearance order;
    runs whose overrides could not be read do not count."""
    runs = [run for run in runs if run.readable]
    ordered: list[str] = []
    for run in runs:
        ordered.extend(k for k in run.overrides if k not in ordered)
    missing = object()
    return [k for k in ordered if len({hashable(r.overrides.get(k, missing)) for r in runs}) > 1]


def sweep_title(runs: Sequence[Run]) -> str:
    """``arc_challenge · smollm2-135m-instruct``: the task(s) and model(s) of the runs, for titles."""
    tasks = sorted({r.task for r in runs if r.task})
    models = sorted({str(m) for r in runs if (m := r.config_value("model.name"))})
    return " · ".join(part for part in (", ".join(tasks), ", ".join(models)) if part)


def _load_override_list(path: Path) -> list[str]:
    try:
        overrides = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError) as error:
        raise AggregateError(f"cannot read {path}: {error}") from error
    if not isinstance(overrides, list):
        raise AggregateError(f"{path} should be a YAML list of override strings, got {type(overrides).__name__}")
    return overrides


def _load_config(path: Path) -> DictConfig | dict | None:
    """The composed config, unresolved; a plain dict if OmegaConf rejects it; ``None`` if unreadable."""
    try:
        config = OmegaConf.load(path)
        return config if isinstance(config, DictConfig) else None
    except Exception:  # e.g. a malformed ${...}: fall back to plain YAML, which only costs interpolated values
        pass
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def _plain_value(config: dict, key: str, default: Any) -> Any:
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    if value is None or (isinstance(value, str) and "${" in value):
        return default
    return value


def _load_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object in ``path``, or ``None`` and why not."""
    if not path.exists():
        return None, f"no {path.name}"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return None, f"unreadable {path.name} ({error})"
    if not isinstance(data, dict):
        return None, f"unreadable {path.name} (not a JSON object)"
    return data, None


# Small helpers for swept values, shared by the summary and the figures.

def hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def sort_key(value: Any) -> tuple:
    """Numbers numerically, then strings, then anything else by text; ``None`` last."""
    if value is None:
        return (3, 0, "")
    if is_number(value):
        return (0, value, "")
    if isinstance(value, str):
        return (1, 0, value)
    return (2, 0, repr(value))


def natural_key(text: str) -> list:
    """``10_x`` after ``9_x``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]
