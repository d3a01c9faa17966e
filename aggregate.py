"""Summarise a Hydra sweep: a table (mean ± s.e.m. over seeds) and figures, from the job directories.

    python pipeline.py -m loss.beta=0.01,0.1,0.5 negatives=random,partial seed=0,1,2
    python aggregate.py multirun/2026-11-21/10-00-00
    python aggregate.py multirun/2026-11-21/10-00-00 --x loss.beta --y delta/accuracy --group negatives --out figs/

Writes summary.csv, summary.md, runs.csv (one row per job) and <y>_vs_<x>.png (plus the MI figure)
into --out (default: the sweep directory), prints the table, and lists failed or incomplete jobs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from mipo.aggregate import (
    AggregateError,
    Run,
    collect_runs,
    default_columns,
    figure_name,
    key_columns,
    metric_columns,
    plot,
    plot_lines,
    resolve_group,
    run_table_rows,
    summarize,
    sweep_title,
    write_csv,
    write_table,
)

MI_METRIC = "trained/mi_mean"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aggregate.py",
        description="Aggregate a Hydra multirun sweep (multirun/<date>/<time>/) into tables and figures.")
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory holding the job directories")
    parser.add_argument("--x", default=None,
                        help="swept key on the x axis (default: loss.beta if swept, else the first numeric swept key)")
    parser.add_argument("--y", default=None,
                        help="metric on the y axis (default: trained/accuracy if present, else trained/mi_mean); "
                             "a trained/mi_mean figure is always drawn as well")
    parser.add_argument("--group", default=None,
                        help="swept key(s), comma-separated, giving one line each (default: all other swept keys)")
    parser.add_argument("--seed-key", default="seed", help="override key averaged over (default: seed)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: SWEEP_DIR)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        aggregate(args)
    except AggregateError as error:
        print(f"aggregate.py: error: {error}", file=sys.stderr)
        return 2
    return 0


def aggregate(args: argparse.Namespace) -> None:
    """Read the sweep, check the requested columns, write every output and print a report."""
    runs = collect_runs(args.sweep_dir)
    rows = summarize(runs, seed_key=args.seed_key)
    if not metric_columns(rows):
        report_failures(runs)
        raise AggregateError(f"no job under {args.sweep_dir} has results yet (no eval.json); nothing to summarise")
    x = choose_x(rows, args.x)
    y = choose_y(rows, args.y)
    group = resolve_group(key_columns(rows), x, args.group.split(",")) if args.group and x else None
    if x is not None:
        plot_lines(rows, x, y, group if group is not None else resolve_group(key_columns(rows), x, None))
    out_dir = args.out or args.sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    title = sweep_title(runs)
    caption = f"{title}: mean ± standard error over seeds ({len(runs)} jobs in {args.sweep_dir})"
    written = [out_dir / "summary.csv", out_dir / "summary.md", out_dir / "runs.csv"]
    table = write_table(rows, default_columns(rows, extra_metrics=[y]), written[0], written[1], caption=caption)
    runs_rows, runs_columns = run_table_rows(runs)
    write_csv(runs_rows, runs_columns, written[2])
    written += draw_figures(rows, x, y, group, out_dir, title)

    print(table)
    print()
    report_failures(runs)
    print("wrote:")
    for path in written:
        print(f"  {path}")


def choose_x(rows: list[dict[str, Any]], requested: str | None) -> str | None:
    """``requested`` if it is a swept key; else ``loss.beta``, the first numeric swept key, or the first one."""
    keys = key_columns(rows)
    if requested is not None:
        if requested not in keys:
            raise AggregateError(f"unknown --x {requested!r}; available (swept keys other than the seed): {keys}")
        return requested
    if "loss.beta" in keys:
        return "loss.beta"
    numeric = [k for k in keys if all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for r in rows)]
    return (numeric or keys or [None])[0]


def choose_y(rows: list[dict[str, Any]], requested: str | None) -> str:
    """``requested`` if it is a metric with values; else ``trained/accuracy`` or ``trained/mi_mean``."""
    metrics = metric_columns(rows)
    if requested is not None:
        if requested not in metrics:
            raise AggregateError(f"unknown --y {requested!r}; available metrics: {metrics}")
        return requested
    for candidate in ("trained/accuracy", MI_METRIC, "base/accuracy", "base/mi_mean"):
        if candidate in metrics:
            return candidate
    return metrics[0]


def draw_figures(rows: list[dict[str, Any]], x: str | None, y: str, group: list[str] | None,
                 out_dir: Path, title: str) -> list[Path]:
    """The ``y`` figure and, when it is another metric that exists, the MI figure."""
    if x is None:
        print("nothing was swept apart from the seed: no figures drawn (they need a swept key for the x axis)")
        return []
    ys = [y] + ([MI_METRIC] if MI_METRIC != y and MI_METRIC in metric_columns(rows) else [])
    return [plot(rows, x=x, y=metric, group=group, path=out_dir / figure_name(metric, x), title=title)
            for metric in ys]


def report_failures(runs: list[Run]) -> None:
    failed = [r for r in runs if r.failed]
    if not failed:
        print(f"all {len(runs)} jobs complete")
        return
    print(f"{len(failed)} of {len(runs)} jobs failed or are incomplete (left out of the summary):")
    for run in failed:
        print(f"  {run.name}: {run.problem}")


if __name__ == "__main__":
    sys.exit(main())
