"""Summarise a Hydra sweep: a table (mean ± s.e.m. over seeds) and figures, from the job directories.

``aggregate`` reads the sweep (``mipo.reporting.sweep``) and the jobs it should have (``mipo.reporting.jobs``),
averages it over seeds (``mipo.reporting.summary``), checks the requested axes, writes summary.md (the compact
table: the paired deltas first, the headline metric leading, with each row's pairs, steps and seeds),
summary.csv (every metric), runs.csv (every job) and the figures (``mipo.reporting.plots``), and returns a
``Report`` whose ``text`` is what ``aggregate.py``, the command-line front end, prints: the compact table and
the jobs that failed, have no results yet (with the cluster launcher's state) or never started.

    report = aggregate("multirun/2026-11-21/10-00-00", x="loss.beta", y="delta/accuracy", out_dir="figs/")
    print(report.text)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mipo.reporting.jobs import (
    MissingJob,
    missing_jobs,
    missing_report,
    with_config_key,
)
from mipo.reporting.plots import (
    figure_name,
    plot,
    plot_deltas,
    plot_identity_sweep,
    plot_lines,
    resolve_group,
)
from mipo.reporting.summary import (
    SummaryRow,
    compact_columns,
    compact_table,
    default_columns,
    headline_metric,
    key_columns,
    metric_columns,
    run_table_rows,
    spread_note,
    summarize,
    write_csv,
    write_table,
)
from mipo.reporting.sweep import (
    AggregateError,
    Run,
    collect_runs,
    sweep_title,
    swept_keys,
)
from mipo.runtime.errors import is_number
from mipo.runtime.files import folder_problem

MI_METRIC = "trained/mi_mean"
MI_PER_TOKEN_METRIC = "trained/mi_per_token_mean"
NO_X_NOTE = "nothing was swept apart from the seed: no figures drawn (they need a swept key for the x axis)"


@dataclass
class Report:
    """What ``aggregate`` read and wrote; ``text`` is the table, the failed jobs and the written files."""

    runs: list[Run]
    rows: list[SummaryRow]
    written: list[Path]
    text: str
    missing: list[MissingJob]


def aggregate(sweep_dir: str | Path, out_dir: str | Path | None = None, x: str | None = None,
              y: str | None = None, group: Sequence[str] | None = None, seed_key: str = "seed") -> Report:
    """Read the sweep, check the requested columns, then write every output into ``out_dir``.

    ``out_dir`` defaults to ``sweep_dir``; ``x``, ``y`` and ``group`` default as ``choose_x``,
    ``choose_y`` and ``resolve_group`` say; ``x`` may also be any key of the jobs' composed config
    (``lora.rank``), not only a swept override. Raises ``AggregateError`` before writing anything when the
    sweep has no results yet or a requested column does not exist.
    """
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    if problem := folder_problem(out_dir, "--out"):
        raise AggregateError(problem)
    runs = collect_runs(sweep_dir)
    missing = missing_jobs(sweep_dir, runs)
    jobs_text = failure_report(runs, missing, sweep_dir)
    if x is not None and x != seed_key and x not in swept_keys(runs):
        runs = with_config_key(runs, x)
    rows = summarize(runs, seed_key=seed_key)
    if not metric_columns(rows):
        raise AggregateError(f"no job under {sweep_dir} has results yet (no eval.json); nothing to summarise",
                             report=jobs_text)
    x = choose_x(rows, x)
    y = choose_y(rows, y)
    group = resolve_group(key_columns(rows), x, group) if group and x else None
    if x is not None:  # checks that every row lands on one line, before anything is written
        plot_lines(rows, x, y, group if group is not None else resolve_group(key_columns(rows), x, None))
    out_dir.mkdir(parents=True, exist_ok=True)

    title = sweep_title(runs)
    written = [out_dir / "summary.md", out_dir / "summary.csv", out_dir / "runs.csv"]
    table = compact_table(rows, compact_columns(rows, y), caption=table_caption(rows, y, title, len(runs), sweep_dir))
    written[0].write_text(table + "\n\n" + jobs_text + "\n")
    write_table(rows, default_columns(rows, extra_metrics=[y]), written[1], None)
    runs_rows, runs_columns = run_table_rows(runs)
    write_csv(runs_rows, runs_columns, written[2])
    if x is None:
        notes = [NO_X_NOTE]
    else:
        notes = []
        written += draw_figures(rows, x, y, group, out_dir, title)

    text = [*notes, table, "", jobs_text, "wrote:", *(f"  {path}" for path in written)]
    return Report(runs=runs, rows=rows, written=written, text="\n".join(text), missing=missing)


def table_caption(rows: Sequence[SummaryRow], y: str, title: str, jobs: int, sweep_dir: Path) -> str:
    """The compact table's caption: what the rows are, what Δ and ± mean, and where the full table is."""
    return (f"{title}: {jobs} jobs in {sweep_dir}. Headline: {y}. Δ = trained − base, paired over the same "
            f"held-out prompts; {spread_note(rows)}; pairs and steps: each job's train.json, the range over "
            f"seeds. Every metric, base and trained values included: summary.csv.")


def choose_x(rows: Sequence[SummaryRow], requested: str | None) -> str | None:
    """``requested`` if it is a swept key; else ``loss.beta``, the first numeric swept key, or the first one."""
    keys = key_columns(rows)
    if requested is not None:
        if requested not in keys:
            raise AggregateError(f"unknown --x {requested!r}; available (swept keys other than the seed): {keys}")
        return requested
    if "loss.beta" in keys:
        return "loss.beta"
    numeric = [k for k in keys if all(is_number(r.values[k]) for r in rows)]
    return (numeric or keys or [None])[0]


def choose_y(rows: Sequence[SummaryRow], requested: str | None) -> str:
    """``requested`` if it is a metric with values; else the task's headline metric (``headline_metric``:
    the exact-match accuracy delta where the task has gold answers and the base model scores above 0,
    else the per-token pmi delta)."""
    metrics = metric_columns(rows)
    if requested is not None:
        if requested not in metrics:
            raise AggregateError(f"unknown --y {requested!r}; available metrics: {metrics}")
        return requested
    return headline_metric(rows)


def draw_figures(rows: Sequence[SummaryRow], x: str, y: str, group: list[str] | None,
                 out_dir: Path, title: str) -> list[Path]:
    """The ``y`` figure and, when they are other metrics that exist, the MI and per-token MI figures;
    when the runs measured the paper's identity, its slope, correlation and held-out pair accuracy
    (``identity_vs_<x>.png``, ``mipo.reporting.plots.plot_identity_sweep``); when ``x`` is categorical
    (a comparison of methods), also the paired deltas against the base model (``deltas_vs_<x>.png``,
    ``mipo.reporting.plots.plot_deltas``)."""
    ys = [y] + [m for m in (MI_METRIC, MI_PER_TOKEN_METRIC) if m != y and m in metric_columns(rows)]
    written = [plot(rows, x=x, y=metric, group=group, path=out_dir / figure_name(metric, x), title=title)
               for metric in ys]
    identity = plot_identity_sweep(rows, x, out_dir / figure_name("identity", x), group=group, title=title)
    written += [identity] if identity is not None else []
    if not all(is_number(row.values[x]) for row in rows if row.values[x] is not None):
        deltas = plot_deltas(rows, x, out_dir / figure_name("deltas", x), group=group, title=title)
        written += [deltas] if deltas is not None else []
    return written


def failure_report(runs: Sequence[Run], missing: Sequence[MissingJob] = (), sweep_dir: Path | None = None) -> str:
    """``all N jobs complete``, or how many failed and each one's problem (with its launcher state), and the
    jobs of the sweep that have no folder."""
    failed = [r for r in runs if r.failed]
    total = len(runs) + len(missing)
    if not failed and not missing:
        return f"all {len(runs)} jobs complete"
    lines = [f"{len(runs) - len(failed)} of {total} jobs complete; the others are left out of the summary:"]
    if failed:
        lines.append(f"{len(failed)} job(s) failed, have no results yet or cannot be read:")
        lines += [f"  {run.name}: {run.problem}" for run in failed]
    lines += missing_report(missing, sweep_dir if sweep_dir is not None else Path("."))
    return "\n".join(lines)
