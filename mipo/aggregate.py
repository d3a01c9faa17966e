"""Aggregate a Hydra multirun sweep: one table row per swept combination, mean ± s.e.m. over seeds.

A sweep directory (``multirun/<date>/<time>/``) holds one job directory per combination, each with
``.hydra/overrides.yaml``, ``.hydra/config.yaml`` and, when the job got that far, ``train.json`` and
``eval.json``. This module reads them (``collect_runs``), finds what was swept (``swept_keys``),
averages over seeds (``summarize``) and writes a table (``write_table``) and figures (``plot``).

    runs = collect_runs("multirun/2026-11-21/10-00-00")
    rows = summarize(runs)
    write_table(rows, default_columns(rows), "summary.csv", "summary.md")
    plot(rows, x="loss.beta", y="trained/accuracy", path="trained_accuracy_vs_loss.beta.png")

The command-line front end is ``aggregate.py`` at the repository root.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

# Metrics a researcher looks at first, in table order; ``default_columns`` keeps those that exist.
DEFAULT_METRICS = (
    "trained/accuracy", "base/accuracy", "delta/accuracy",
    "trained/mi_mean", "base/mi_mean", "delta/mi_mean",
    "train/final_loss", "train/final_reward_accuracy",
)
# Per-model metrics from eval.json that get a ``delta/<name>`` (trained minus base).
DELTA_METRICS = ("accuracy", "mi_mean")
# The within-run standard error eval.json reports for a per-model metric (used when there is one seed).
STDERR_FIELDS = {"accuracy": "accuracy_stderr", "mi_mean": "mi_stderr"}
# Count columns that ``summarize`` adds to every row.
COUNT_COLUMNS = ("n_seeds", "n_failed")
SEM_SUFFIX = "_sem"
NO_JOBS_HINT = "expected Hydra multirun job directories with .hydra/overrides.yaml"
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class AggregateError(ValueError):
    """A problem with the sweep directory or the requested columns, worded for the user to fix."""


@dataclass
class Run:
    """One Hydra job: its overrides, (unresolved) config and flat metrics.

    ``problem`` is ``None`` for a complete job (``eval.json`` read); otherwise it says what is missing.
    """

    job_dir: Path
    name: str
    overrides: dict[str, Any]
    config: DictConfig | dict | None
    metrics: dict[str, float] = field(default_factory=dict)
    task: str | None = None
    problem: str | None = None

    @property
    def failed(self) -> bool:
        return self.problem is not None

    def config_value(self, key: str, default: Any = None) -> Any:
        """A plain value of the composed config (``"loss.beta"``); ``default`` if absent or unresolvable."""
        return config_value(self.config, key, default)


# --------------------------------------------------------------------------------------------------
# Reading a sweep
# --------------------------------------------------------------------------------------------------

def find_job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every directory under ``sweep_dir`` (itself included) holding ``.hydra/overrides.yaml``, in job order."""
    sweep_dir = Path(sweep_dir)
    found = {p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    return sorted(found, key=lambda d: _natural_key(d.relative_to(sweep_dir).as_posix()))


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
    """One job directory as a ``Run``; never raises for missing or unreadable result files."""
    job_dir = Path(job_dir)
    name = job_dir.relative_to(sweep_dir).as_posix() if sweep_dir is not None else job_dir.name
    if name == ".":
        name = job_dir.name
    overrides = parse_overrides(_load_override_list(job_dir / ".hydra" / "overrides.yaml"))
    config = _load_config(job_dir / ".hydra" / "config.yaml")
    train, train_problem = _load_json(job_dir / "train.json")
    evaluation, eval_problem = _load_json(job_dir / "eval.json")

    metrics = train_metrics(train) if train is not None else {}
    if evaluation is not None:
        metrics.update(eval_metrics(evaluation))
    task = config_value(config, "task.name") or (evaluation or {}).get("task")
    problem = None
    if evaluation is None:
        stage = "training finished, " if train is not None else (f"{train_problem}, " if train_problem else "")
        problem = stage + (eval_problem or "no eval.json")
    return Run(job_dir=job_dir, name=name, overrides=overrides, config=config,
               metrics=metrics, task=task, problem=problem)


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
    return {f"train/{k}": v for k, v in train.items() if _is_number(v)}


def eval_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """``eval.json`` numbers as ``<model>/<name>`` (``trained/accuracy``), ``eval/<name>`` and ``delta/<name>``."""
    metrics = {f"eval/{k}": v for k, v in evaluation.items() if _is_number(v)}
    models = evaluation.get("models") or {}
    for model, values in models.items():
        if isinstance(values, dict):
            metrics.update({f"{model}/{k}": v for k, v in values.items() if _is_number(v)})
    for name in DELTA_METRICS:
        trained, base = metrics.get(f"trained/{name}"), metrics.get(f"base/{name}")
        if trained is not None and base is not None:
            metrics[f"delta/{name}"] = trained - base
    return metrics


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


# --------------------------------------------------------------------------------------------------
# Summarising
# --------------------------------------------------------------------------------------------------

def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value differs across runs (or is missing from some), in first-appearance order."""
    ordered: list[str] = []
    for run in runs:
        ordered.extend(k for k in run.overrides if k not in ordered)
    missing = object()
    return [k for k in ordered if len({_hashable(r.overrides.get(k, missing)) for r in runs}) > 1]


def summarize(runs: Sequence[Run], seed_key: str = "seed") -> list[dict[str, Any]]:
    """One row per combination of swept values other than ``seed_key``, sorted by those values.

    Each row holds the swept values, ``n_seeds`` (complete runs), ``n_failed`` and, for every metric of
    any complete run, its mean and ``<metric>_sem``: the standard error across seeds (ddof=1), or with
    one seed the run's own standard error where eval.json reports one (accuracy, MI), else ``None``.
    Combinations whose runs all failed are kept, with ``n_seeds=0`` and ``None`` metrics.
    """
    keys = [k for k in swept_keys(runs) if k != seed_key]
    metrics = metric_names(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(_hashable(run.overrides.get(k)) for k in keys), []).append(run)

    rows = []
    for group_runs in groups.values():
        row: dict[str, Any] = {k: group_runs[0].overrides.get(k) for k in keys}
        complete = [r for r in group_runs if not r.failed]
        row["n_seeds"] = len(complete)
        row["n_failed"] = len(group_runs) - len(complete)
        for metric in metrics:
            row[metric], row[metric + SEM_SUFFIX] = _mean_and_sem(complete, metric)
        rows.append(row)
    rows.sort(key=lambda row: tuple(_sort_key(row[k]) for k in keys))
    return rows


def metric_names(runs: Sequence[Run]) -> list[str]:
    """Metrics of complete runs worth averaging: ``DEFAULT_METRICS`` first, then the rest sorted.

    Standard-error fields are left out: across seeds they are replaced by ``<metric>_sem``.
    """
    present = {m for r in runs if not r.failed for m in r.metrics if not _is_stderr_field(m)}
    return [m for m in DEFAULT_METRICS if m in present] + sorted(present - set(DEFAULT_METRICS))


def key_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The swept-value columns of ``summarize`` rows (everything that is neither a metric nor a count)."""
    if not rows:
        return []
    row = rows[0]
    return [c for c in row if c not in COUNT_COLUMNS and not c.endswith(SEM_SUFFIX) and c + SEM_SUFFIX not in row]


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics of ``summarize`` rows that have a value in at least one row."""
    if not rows:
        return []
    return [c for c in rows[0] if c + SEM_SUFFIX in rows[0] and any(r.get(c) is not None for r in rows)]


def default_columns(rows: Sequence[dict[str, Any]], extra_metrics: Sequence[str] = ()) -> list[str]:
    """Swept keys, then the ``DEFAULT_METRICS`` (and ``extra_metrics``) that exist, then ``n_seeds``.

    ``n_failed`` is added when a combination has a failed job.
    """
    available = metric_columns(rows)
    wanted = list(DEFAULT_METRICS) + [m for m in extra_metrics if m not in DEFAULT_METRICS]
    counts = ["n_seeds"] + (["n_failed"] if any(r.get("n_failed") for r in rows) else [])
    return key_columns(rows) + [m for m in wanted if m in available] + counts


def _mean_and_sem(runs: Sequence[Run], metric: str) -> tuple[float | None, float | None]:
    values = [r.metrics[metric] for r in runs if metric in r.metrics]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) >= 2:
        variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        return mean, math.sqrt(variance / len(values))
    only = next(r for r in runs if metric in r.metrics)
    return mean, only.metrics.get(_stderr_field(metric))


def _stderr_field(metric: str) -> str:
    """``trained/accuracy`` -> ``trained/accuracy_stderr``; ``base/mi_mean`` -> ``base/mi_stderr``."""
    prefix, _, name = metric.rpartition("/")
    return f"{prefix}/{STDERR_FIELDS.get(name, name + '_stderr')}"


def _is_stderr_field(metric: str) -> bool:
    return metric.endswith("_stderr")


# --------------------------------------------------------------------------------------------------
# Writing tables
# --------------------------------------------------------------------------------------------------

def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], csv_path: str | Path | None,
                md_path: str | Path | None, caption: str | None = None) -> str:
    """Write ``rows`` as CSV (raw numbers, a ``<metric>_sem`` column after each metric) and Markdown
    (``0.412 ± 0.031``); either path may be ``None``. Returns the Markdown text.

    ``columns`` is the ordered list to show: swept keys first, then metrics (e.g. ``default_columns(rows)``).
    """
    _check_columns(rows, columns)
    if csv_path is not None:
        write_csv(rows, csv_columns(rows, columns), csv_path)
    markdown = markdown_table(rows, columns, caption)
    if md_path is not None:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown + "\n")
    return markdown


def csv_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """``columns`` with each metric followed by its ``_sem`` column."""
    sems = set(rows[0]) if rows else set()
    out: list[str] = []
    for column in columns:
        out.append(column)
        if column + SEM_SUFFIX in sems:
            out.append(column + SEM_SUFFIX)
    return out


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str | Path) -> None:
    """Plain CSV with the csv module; ``None`` becomes an empty cell."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], caption: str | None = None) -> str:
    """A Markdown table; metrics as ``mean ± sem`` with three decimals, ``—`` where there is no value."""
    lines = [caption, ""] if caption else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = [_markdown_cell(row, c) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_table_rows(runs: Sequence[Run]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per job (unaggregated) and its columns: job, status, overrides, task, every metric."""
    override_keys: list[str] = []
    for run in runs:
        override_keys.extend(k for k in run.overrides if k not in override_keys)
    metrics = {m for r in runs for m in r.metrics}
    metric_order = [m for m in DEFAULT_METRICS if m in metrics] + sorted(metrics - set(DEFAULT_METRICS))
    columns = ["job", "status", *override_keys, "task", *metric_order, "problem"]
    rows = [{"job": r.name, "status": "failed" if r.failed else "complete", **r.overrides,
             "task": r.task, **r.metrics, "problem": r.problem} for r in runs]
    return rows, columns


def format_number(value: float) -> str:
    """Three decimals, or fewer digits for large values (``12.0`` -> ``12.000``, ``12345.6`` -> ``12346``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if math.isfinite(value) and abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3f}"


def _markdown_cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if column + SEM_SUFFIX not in row:  # a swept value or a count
        return "—" if value is None and column not in COUNT_COLUMNS else str(value)
    if value is None:
        return "—"
    sem = row.get(column + SEM_SUFFIX)
    return format_number(value) if sem is None else f"{format_number(value)} ± {format_number(sem)}"


def _check_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        return
    unknown = [c for c in columns if c not in rows[0]]
    if unknown:
        raise AggregateError(f"unknown column(s) {unknown}; available: {list(rows[0])}")


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------

def plot(rows: Sequence[dict[str, Any]], x: str = "loss.beta", y: str = "trained/accuracy",
         group: str | Sequence[str] | None = None, path: str | Path = "figure.png",
         title: str | None = None) -> Path:
    """``y`` against ``x``, one line per value of ``group``, error bars = ``<y>_sem``; saved as PNG.

    ``group`` is a swept key or a list of them; ``None`` means all swept keys other than ``x`` (so every
    row lands on exactly one line). The x axis is logarithmic when all x values are positive and span
    at least 10x, categorical when they are not numbers. ``title`` (e.g. the task name) heads the figure.
    """
    from matplotlib.figure import Figure  # the Agg canvas, without touching the global pyplot backend

    keys = key_columns(rows)
    group_keys = resolve_group(keys, x, group)
    _check_plot_columns(rows, keys, x, y)
    lines = plot_lines(rows, x, y, group_keys)

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    x_values = sorted({row[x] for row in rows if row[x] is not None}, key=_sort_key)
    categorical = not all(_is_number(v) for v in x_values)
    positions = {v: i for i, v in enumerate(x_values)}
    for label, points in lines.items():
        xs = [positions[p[0]] if categorical else p[0] for p in points]
        axes.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3,
                      label=label or y)
    baseline = base_reference(rows, y)
    if baseline is not None:  # the untrained model, for reading the trained lines against
        axes.axhline(baseline, color="0.4", linestyle="--", linewidth=1, label=f"base model ({y.replace('trained/', 'base/')})")
    if categorical:
        axes.set_xticks(range(len(x_values)), [str(v) for v in x_values])
    elif use_log_scale(x_values):
        axes.set_xscale("log")
        if len(x_values) <= 10:  # label the swept values themselves, not powers of ten
            axes.set_xticks(x_values, [str(v) for v in x_values])
            axes.minorticks_off()
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.set_title(f"{title}: {y} vs {x}" if title else f"{y} vs {x}", fontsize="medium")
    axes.grid(True, alpha=0.3)
    if lines:
        axes.legend(fontsize="small")
    figure.supxlabel(error_bar_note(rows, y), x=0.99, ha="right", fontsize="x-small", color="0.4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def base_reference(rows: Sequence[dict[str, Any]], y: str) -> float | None:
    """For a ``trained/<metric>`` figure: the base model's value, when every row shares one.

    A sweep over training settings evaluates one base model, so ``base/<metric>`` is the same in
    every row; with several base models (e.g. a sweep over ``model``) there is no single line.
    """
    if not y.startswith("trained/"):
        return None
    values = {row.get("base/" + y.split("/", 1)[1]) for row in rows}
    if len(values) != 1 or None in values:
        return None
    return float(values.pop())


def use_log_scale(values: Iterable[Any]) -> bool:
    """True when every value is a positive number and the largest is at least 10x the smallest."""
    values = list(values)
    if not values or not all(_is_number(v) and v > 0 for v in values):
        return False
    return max(values) / min(values) >= 10


def error_bar_note(rows: Sequence[dict[str, Any]], y: str) -> str:
    """What the error bars of ``y`` mean, from the seed counts of the plotted rows."""
    counts = sorted({r["n_seeds"] for r in rows if r.get(y) is not None})
    if counts and counts[0] >= 2:
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return f"error bars: standard error across seeds (n={n})"
    if counts == [1]:
        return "error bars: the evaluation's own standard error (1 seed)"
    return "error bars: standard error across seeds; the evaluation's own where there is 1 seed"


def figure_name(y: str, x: str) -> str:
    """``trained/accuracy``, ``loss.beta`` -> ``trained_accuracy_vs_loss.beta.png``."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9._=-]+", "_", s).strip("_")  # noqa: E731
    return f"{safe(y)}_vs_{safe(x)}.png"


def sweep_title(runs: Sequence[Run]) -> str:
    """``arc_challenge · smollm2-135m-instruct``: the task(s) and model(s) of the runs, for figure titles."""
    tasks = sorted({r.task for r in runs if r.task})
    models = sorted({str(m) for r in runs if (m := r.config_value("model.name"))})
    return " · ".join(part for part in (", ".join(tasks), ", ".join(models)) if part)


def group_label(row: dict[str, Any], group_keys: Sequence[str]) -> str:
    """``negatives=random, loss.name=dpo`` for the row's values of ``group_keys``."""
    return ", ".join(f"{k}={row.get(k)}" for k in group_keys)


def resolve_group(keys: Sequence[str], x: str, group: str | Sequence[str] | None) -> list[str]:
    """The group keys for lines: ``group`` checked against the swept ``keys``, or all keys but ``x``."""
    if group is None:
        return [k for k in keys if k != x]
    group_keys = [group] if isinstance(group, str) else list(group)
    unknown = [g for g in group_keys if g not in keys or g == x]
    if unknown:
        raise AggregateError(f"unknown group key(s) {unknown}; available (swept keys other than x={x!r}): "
                             f"{[k for k in keys if k != x]}")
    return group_keys


def _check_plot_columns(rows: Sequence[dict[str, Any]], keys: Sequence[str], x: str, y: str) -> None:
    if x not in keys:
        raise AggregateError(f"unknown x {x!r}; available (swept keys other than the seed): {list(keys)}")
    metrics = metric_columns(rows)
    if y not in metrics:
        raise AggregateError(f"unknown y {y!r}; available metrics: {metrics}")


def plot_lines(rows: Sequence[dict[str, Any]], x: str, y: str,
                group_keys: Sequence[str]) -> dict[str, list[tuple[Any, float, float]]]:
    """``{group label: [(x, mean, sem), ...]}``, lines in order of their group values, points sorted by x.

    Rows without a value of ``y`` are skipped; two rows on the same line at the same x are an error.
    """
    lines: dict[str, list[tuple[Any, float, float]]] = {}
    order: dict[str, tuple] = {}
    seen: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in rows:
        label = group_label(row, group_keys)
        order[label] = tuple(_sort_key(row.get(k)) for k in group_keys)
        if (label, _hashable(row[x])) in seen:
            others = [k for k in key_columns(rows) if k != x and k not in group_keys]
            raise AggregateError(f"several rows have {x}={row[x]} in the line '{label or y}': the swept key(s) "
                                 f"{others} are neither x nor in the group; add them to the group")
        seen[(label, _hashable(row[x]))] = row
        if row[y] is None or row[x] is None:
            continue
        sem = row.get(y + SEM_SUFFIX)
        lines.setdefault(label, []).append((row[x], row[y], float("nan") if sem is None else sem))
    for points in lines.values():
        points.sort(key=lambda p: _sort_key(p[0]))
    return dict(sorted(lines.items(), key=lambda item: order[item[0]]))


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return repr(value)


def _sort_key(value: Any) -> tuple:
    """Numbers numerically, then strings, then anything else by text; ``None`` last."""
    if value is None:
        return (3, 0, "")
    if _is_number(value):
        return (0, value, "")
    if isinstance(value, str):
        return (1, 0, value)
    return (2, 0, repr(value))


def _natural_key(text: str) -> list:
    """``10_x`` after ``9_x``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]
