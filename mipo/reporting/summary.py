"""Average a sweep's runs over seeds into ``SummaryRow`` records, and write them as CSV and Markdown.

    rows = summarize(collect_runs("multirun/2026-11-21/10-00-00"))
    rows[0].values["loss.beta"], rows[0].stats["trained/accuracy"]   # 0.01, Stat(mean=0.4, stderr=0.1, n=2)
    write_table(rows, default_columns(rows), "summary.csv", None)              # the full table
    compact_table(rows, compact_columns(rows, headline_metric(rows)))           # summary.md's table

A table column is named by a swept key (``loss.beta``), a metric (``trained/accuracy``) or a count
(``n_seeds``, ``n_failed``, and ``pairs``, ``steps``: the range over a row's seeds of each job's training pairs
and optimizer steps from ``train.json``); in the CSV each metric is followed by its standard error,
``<metric>_sem``, and each range by ``_min`` and ``_max``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mipo.reporting.sweep import (
    AggregateError,
    Result,
    Run,
    hashable,
    sort_key,
    swept_keys,
)

# Metrics a researcher looks at first, in table order; ``default_columns`` keeps those that exist.
# ``*/accuracy`` (an alias of ``*/accuracy_strict``, all older sweeps have) is shown only where
# ``*/accuracy_strict`` is not there.
DEFAULT_METRICS = (
    "trained/accuracy_strict", "base/accuracy_strict", "delta/accuracy_strict",
    "trained/accuracy", "base/accuracy", "delta/accuracy",
    "trained/accuracy_flexible", "base/accuracy_flexible", "delta/accuracy_flexible",
    "trained/accuracy_loglik", "base/accuracy_loglik", "delta/accuracy_loglik",
    "trained/mi_mean", "base/mi_mean", "delta/mi_mean",
    "trained/mi_per_token_mean", "base/mi_per_token_mean", "delta/mi_per_token_mean",
    "trained/mean_response_tokens", "base/mean_response_tokens",
    "trained/judge_win_rate", "base/judge_win_rate", "delta/judge_win_rate",
    "identity/slope_demeaned", "identity/spearman_within_prompt", "identity/heldout_pair_accuracy",
    "train/final_loss", "train/final_reward_accuracy", "train/final_pmi_margin",
)
ALIASES = {"/accuracy": "/accuracy_strict"}
# The count fields of ``SummaryRow``, as table columns.
COUNT_COLUMNS = ("n_seeds", "n_failed")
# Per-row ranges over the complete seeds: column -> the train.json numbers it reads, first found wins.
RANGE_COLUMNS = {"pairs": ("train/pairs",), "steps": ("train/optimizer_steps", "train/steps")}
SEM_SUFFIX = "_sem"
# The compact table (summary.md): the paired deltas, in this order after the headline, then the identity.
COMPACT_DELTAS = ("delta/accuracy_strict", "delta/accuracy_flexible", "delta/accuracy_loglik",
                  "delta/accuracy", "delta/judge_win_rate", "delta/mi_per_token_mean", "delta/mi_mean",
                  "delta/mean_response_tokens")
COMPACT_IDENTITY = ("identity/slope_demeaned", "identity/heldout_pair_accuracy")
# The headline's candidates where a task has gold answers, in order (``headline_metric``).
HEADLINE_ACCURACIES = ("accuracy_strict", "accuracy_flexible", "accuracy_loglik", "accuracy")
HEADLINE_WITHOUT_GOLD = ("delta/mi_per_token_mean", "delta/mi_mean", "trained/mi_mean")
COLUMN_LABELS = {"n_seeds": "seeds", "n_failed": "failed"}


@dataclass(frozen=True)
class Stat:
    """One metric of one combination over its seeds.

    ``mean`` over the ``n`` seeds that report the metric (``None`` when none does); ``stderr`` is the
    standard error across them (ddof=1) or, with one seed, that run's own standard error where it
    reports one (accuracy, MI), else ``None``.
    """

    mean: float | None
    stderr: float | None
    n: int


@dataclass
class SummaryRow:
    """One combination of swept values (the seed excluded) and its metrics over seeds.

    ``values`` maps each swept key to its value, in sweep order; ``stats`` holds every metric of the
    sweep, in table order (``Stat(None, None, 0)`` where no seed of this combination has it).
    ``n_seeds`` counts the complete runs, ``n_failed`` the failed or incomplete ones.
    """

    values: dict[str, Any]
    stats: dict[str, Stat]
    n_seeds: int
    n_failed: int
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # RANGE_COLUMNS -> (min, max)

    def mean(self, metric: str) -> float | None:
        """The mean of ``metric``; ``None`` where it has none or is not a metric of the sweep."""
        stat = self.stats.get(metric)
        return None if stat is None else stat.mean

    def record(self) -> dict[str, Any]:
        """The row as CSV columns: swept values, counts, and each metric's mean and ``<metric>_sem``."""
        record: dict[str, Any] = {**self.values, "n_seeds": self.n_seeds, "n_failed": self.n_failed}
        for column in RANGE_COLUMNS:
            record[column + "_min"], record[column + "_max"] = self.ranges.get(column, (None, None))
        for metric, stat in self.stats.items():
            record[metric], record[metric + SEM_SUFFIX] = stat.mean, stat.stderr
        return record

    def range_text(self, column: str) -> str:
        """``64``, ``28-38`` (seeds differ) or ``—`` for a ``RANGE_COLUMNS`` column."""
        if column not in self.ranges:
            return "—"
        low, high = (format_count(v) for v in self.ranges[column])
        return low if low == high else f"{low}-{high}"


# --------------------------------------------------------------------------------------------------
# Summarising
# --------------------------------------------------------------------------------------------------

def summarize(runs: Sequence[Run], seed_key: str = "seed") -> list[SummaryRow]:
    """One row per combination of swept values other than ``seed_key``, sorted by those values.

    Only complete runs are averaged; combinations whose runs all failed are kept, with ``n_seeds=0``
    and empty stats.
    """
    runs = [run for run in runs if run.readable]
    keys = [k for k in swept_keys(runs) if k != seed_key]
    metrics = metric_names(runs)
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(hashable(run.overrides.get(k)) for k in keys), []).append(run)

    rows = []
    for group_runs in groups.values():
        complete = [r for r in group_runs if not r.failed]
        stats = {m: over_seeds([r.results[m] for r in complete if m in r.results]) for m in metrics}
        rows.append(SummaryRow(values={k: group_runs[0].overrides.get(k) for k in keys}, stats=stats,
                               n_seeds=len(complete), n_failed=len(group_runs) - len(complete),
                               ranges=ranges_of(complete)))
    rows.sort(key=lambda row: tuple(sort_key(row.values[k]) for k in keys))
    return rows


def ranges_of(runs: Sequence[Run]) -> dict[str, tuple[float, float]]:
    """``{"pairs": (min, max), "steps": (min, max)}`` over ``runs`` from their train.json; a column no run has is left out."""
    ranges = {}
    for column, names in RANGE_COLUMNS.items():
        values = [next(run.metrics[n] for n in names if n in run.metrics) for run in runs
                  if any(n in run.metrics for n in names)]
        if values:
            ranges[column] = (min(values), max(values))
    return ranges


def over_seeds(results: Sequence[Result]) -> Stat:
    """Mean, standard error (ddof=1; with one seed, its own) and count of one metric's per-seed results."""
    if not results:
        return Stat(None, None, 0)
    values = [r.value for r in results]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return Stat(mean, results[0].stderr, 1)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return Stat(mean, math.sqrt(variance / len(values)), len(values))


def metric_names(runs: Sequence[Run]) -> list[str]:
    """The metrics of complete runs: ``DEFAULT_METRICS`` first, then the rest sorted."""
    present = {m for r in runs if not r.failed for m in r.results}
    return [m for m in DEFAULT_METRICS if m in present] + sorted(present - set(DEFAULT_METRICS))


def key_columns(rows: Sequence[SummaryRow]) -> list[str]:
    """The swept keys of the rows (the seed excluded), in sweep order."""
    return list(rows[0].values) if rows else []


def metric_columns(rows: Sequence[SummaryRow]) -> list[str]:
    """The metrics of the rows that have a value in at least one row."""
    if not rows:
        return []
    return [m for m in rows[0].stats if any(r.mean(m) is not None for r in rows)]


def default_columns(rows: Sequence[SummaryRow], extra_metrics: Sequence[str] = ()) -> list[str]:
    """Swept keys, then the ``DEFAULT_METRICS`` (and ``extra_metrics``) that exist, then ``n_seeds``.

    An alias (``trained/accuracy``) is left out where its target (``trained/accuracy_strict``) exists.

    ``n_failed`` is added when a combination has a failed job.
    """
    available = metric_columns(rows)
    wanted = list(DEFAULT_METRICS) + [m for m in extra_metrics if m not in DEFAULT_METRICS]
    wanted = [m for m in wanted if m in extra_metrics or not any(
        m.endswith(alias) and m[: -len(alias)] + target in available for alias, target in ALIASES.items())]
    counts = ["n_seeds"] + (["n_failed"] if any(r.n_failed for r in rows) else [])
    ranges = [c for c in RANGE_COLUMNS if any(c in row.ranges for row in rows)]
    return key_columns(rows) + [m for m in wanted if m in available] + ranges + counts


def headline_metric(rows: Sequence[SummaryRow]) -> str:
    """The task's headline metric, the default y of ``aggregate.py``: a paired delta (trained − base).

    The rule: where the task has gold answers, the first of exact-match (``accuracy_strict``), flexible
    and log-likelihood accuracy whose base model scores above zero in some row (a base model that never
    writes the asked format scores 0 exact match, and a delta from 0 measures the format, not the
    answers); where it has none (personalization), or no accuracy is above zero, the pointwise MI per
    response token (``delta/mi_per_token_mean``), which unlike the summed pmi does not grow with length.
    Sweeps written before paired deltas fall back to ``delta/mi_mean`` and ``trained/mi_mean``.
    """
    metrics = metric_columns(rows)
    for name in HEADLINE_ACCURACIES:
        if f"delta/{name}" in metrics and any((row.mean(f"base/{name}") or 0.0) > 0.0 for row in rows):
            return f"delta/{name}"
    return next((m for m in HEADLINE_WITHOUT_GOLD if m in metrics), metrics[0] if metrics else HEADLINE_WITHOUT_GOLD[0])


def compact_columns(rows: Sequence[SummaryRow], headline: str) -> list[str]:
    """summary.md's columns: swept keys, the ``headline`` and the base model's value of it, the other paired
    deltas (``COMPACT_DELTAS``), the identity's slope and held-out pair accuracy, then ``pairs``, ``steps``
    and ``n_seeds`` per row (``n_failed`` when a job failed). The full table is summary.csv's."""
    available = metric_columns(rows)
    base = "base/" + headline.split("/", 1)[1] if headline.startswith(("delta/", "trained/")) else None
    metrics = [headline] + [m for m in (base, *COMPACT_DELTAS, *COMPACT_IDENTITY) if m and m != headline]
    metrics = [m for m in dict.fromkeys(metrics) if m in available]
    if "delta/accuracy_strict" in metrics and "delta/accuracy" in metrics and headline != "delta/accuracy":
        metrics.remove("delta/accuracy")  # the alias of the strict delta
    ranges = [c for c in RANGE_COLUMNS if any(c in row.ranges for row in rows)]
    counts = ["n_seeds"] + (["n_failed"] if any(r.n_failed for r in rows) else [])
    return key_columns(rows) + metrics + ranges + counts


def column_label(column: str) -> str:
    """``delta/mi_mean`` -> ``Δ mi_mean``, ``base/accuracy_strict`` -> ``base accuracy_strict``, ``n_seeds`` -> ``seeds``."""
    if column in COLUMN_LABELS:
        return COLUMN_LABELS[column]
    prefix, _, name = column.partition("/")
    if not name:
        return column
    return f"Δ {name}" if prefix == "delta" else f"{prefix} {name}"


def spread_note(rows: Sequence[SummaryRow], metric: str | None = None) -> str:
    """What a ``±`` (or an error bar) of the rows means, from their seed counts: the standard error over
    seeds, or with one seed the run's own standard error over its evaluation prompts (paired for a delta)."""
    counts = sorted({r.n_seeds for r in rows if r.n_seeds and (metric is None or r.mean(metric) is not None)})
    if counts and counts[0] >= 2:
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return f"± = standard error over seeds (n={n})"
    if counts == [1]:
        return "one seed: ± = that run's standard error over its evaluation prompts (paired for Δ)"
    return ("± = standard error over seeds where a row has 2 or more, else the run's own over its evaluation "
            "prompts (see the seeds column)")


def compact_table(rows: Sequence[SummaryRow], columns: Sequence[str], caption: str | None = None) -> str:
    """summary.md's table (``compact_columns``): short headers (``column_label``), ``mean ± sem`` cells and
    the pairs and steps ranges."""
    _check_columns(rows, columns)
    lines = [caption, ""] if caption else []
    lines.append("| " + " | ".join(column_label(c) for c in columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(row, c) for c in columns) + " |")
    return "\n".join(lines)


def format_count(value: float) -> str:
    """``64.0`` -> ``64``; a fractional value keeps one decimal."""
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


# --------------------------------------------------------------------------------------------------
# Writing tables
# --------------------------------------------------------------------------------------------------

def write_table(rows: Sequence[SummaryRow], columns: Sequence[str], csv_path: str | Path | None,
                md_path: str | Path | None, caption: str | None = None) -> str:
    """Write ``rows`` as CSV (raw numbers, a ``<metric>_sem`` column after each metric) and Markdown
    (``0.412 ± 0.031``); either path may be ``None``. Returns the Markdown text.

    ``columns`` is the ordered list to show: swept keys first, then metrics (e.g. ``default_columns(rows)``).
    """
    _check_columns(rows, columns)
    if csv_path is not None:
        write_csv([row.record() for row in rows], csv_columns(rows, columns), csv_path)
    markdown = markdown_table(rows, columns, caption)
    if md_path is not None:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown + "\n")
    return markdown


def csv_columns(rows: Sequence[SummaryRow], columns: Sequence[str]) -> list[str]:
    """``columns`` with each metric followed by its ``<metric>_sem`` column, and each range (``pairs``) as its
    ``_min`` and ``_max``."""
    metrics = rows[0].stats if rows else {}
    out: list[str] = []
    for column in columns:
        if column in RANGE_COLUMNS:
            out += [column + "_min", column + "_max"]
            continue
        out.append(column)
        if column in metrics:
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


def markdown_table(rows: Sequence[SummaryRow], columns: Sequence[str], caption: str | None = None) -> str:
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
    rows = [{"job": r.name, "status": (r.state or "failed") if r.failed else "complete", **r.overrides,
             "task": r.task, **r.metrics, "problem": r.problem} for r in runs]
    return rows, columns


def format_number(value: float) -> str:
    """Three decimals, or fewer digits for large values (``12.0`` -> ``12.000``, ``12345.6`` -> ``12346``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if math.isfinite(value) and abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3f}"


def _markdown_cell(row: SummaryRow, column: str) -> str:
    if column in row.stats:
        stat = row.stats[column]
        if stat.mean is None:
            return "—"
        mean = format_number(stat.mean)
        return mean if stat.stderr is None else f"{mean} ± {format_number(stat.stderr)}"
    if column in COUNT_COLUMNS:
        return str(getattr(row, column))
    if column in RANGE_COLUMNS:
        return row.range_text(column)
    value = row.values[column]
    return "—" if value is None else str(value)


def _check_columns(rows: Sequence[SummaryRow], columns: Sequence[str]) -> None:
    if not rows:
        return
    available = [*rows[0].values, *rows[0].stats, *COUNT_COLUMNS, *RANGE_COLUMNS]
    unknown = [c for c in columns if c not in available]
    if unknown:
        raise AggregateError(f"unknown column(s) {unknown}; available: {available}")
