"""Summarise a Hydra sweep: a table (mean ± s.e.m. over seeds) and figures, from the job directories.

    python pipeline.py -m loss.beta=0.01,0.1,0.5 negatives=random,partial seed=0,1,2
    python aggregate.py multirun/2026-11-21/10-00-00
    python aggregate.py multirun/2026-11-21/10-00-00 --x loss.beta --y delta/accuracy --group negatives --out figs/

Writes summary.md (compact: the paired deltas, headline first, with pairs, steps and seeds per row),
summary.csv (every metric), runs.csv (one row per job) and <y>_vs_<x>.png (plus the MI figures) into --out
(default: the sweep directory), prints the table, and lists failed, incomplete and missing jobs.
The work is done by ``mipo.reporting.aggregate.aggregate``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from mipo.reporting.aggregate import AggregateError, aggregate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="aggregate.py",
        description="Aggregate a Hydra multirun sweep (multirun/<date>/<time>/) into tables and figures.")
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory holding the job directories")
    parser.add_argument("--x", default=None,
                        help="swept key or any key of the jobs' config on the x axis (default: loss.beta if swept, "
                             "else the first numeric swept key)")
    parser.add_argument("--y", default=None,
                        help="metric on the y axis (default: the task's headline delta, docs/evaluation.md); "
                             "trained/mi_mean figures are always drawn as well")
    parser.add_argument("--group", default=None,
                        help="swept key(s), comma-separated, giving one line each (default: all other swept keys)")
    parser.add_argument("--seed-key", default="seed", help="override key averaged over (default: seed)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: SWEEP_DIR)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = aggregate(args.sweep_dir, out_dir=args.out, x=args.x, y=args.y, seed_key=args.seed_key,
                           group=args.group.split(",") if args.group else None)
    except AggregateError as error:
        if error.report:
            print(error.report)
        print(f"aggregate.py: error: {error}", file=sys.stderr)
        return 2
    print(report.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
