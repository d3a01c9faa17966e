"""Figures of a summarised sweep: a metric against a swept key, one line per group, s.e.m. error bars.

    rows = summarize(collect_runs("multirun/2026-11-21/10-00-00"))
    plot(rows, x="loss.beta", y="trained/accuracy", path=figure_name("trained/accuracy", "loss.beta"))

And the paper's identity (MIPO, arXiv 2603.19294: DPO's optimal implicit reward on MIPO pairs is the
pointwise MI up to a per-prompt constant): ``plot_identity`` draws one run's r against pmi
(``identity.png``), ``plot_identity_sweep`` the slope, correlation and held-out pair accuracy against a
swept key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mipo.metrics.identity import demean_within_prompts
from mipo.reporting.summary import SummaryRow, key_columns, metric_columns, spread_note
from mipo.reporting.sweep import AggregateError, hashable, sort_key
from mipo.runtime.errors import is_number


def plot(rows: Sequence[SummaryRow], x: str = "loss.beta", y: str = "trained/accuracy",
         group: str | Sequence[str] | None = None, path: str | Path = "figure.png",
         title: str | None = None) -> Path:
    """``y`` against ``x``, one line per value of ``group``, error bars = the standard error of ``y``; saved as PNG.

    ``group`` is a swept key or a list of them; ``None`` means all swept keys other than ``x`` (so every
    row lands on exactly one line). The x axis is logarithmic when all x values are positive and span
    at least 10x, categorical when they are not numbers. ``title`` (e.g. the task name) heads the figure.
    """
    from matplotlib.figure import (
        Figure,  # the Agg canvas, without touching the global pyplot backend
    )

    keys = key_columns(rows)
    group_keys = resolve_group(keys, x, group)
    _check_plot_columns(rows, keys, x, y)
    lines = plot_lines(rows, x, y, group_keys)

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    x_values = sorted({row.values[x] for row in rows if row.values[x] is not None}, key=sort_key)
    categorical = not all(is_number(v) for v in x_values)
    positions = {v: i for i, v in enumerate(x_values)}
    for label, points in lines.items():
        xs = [positions[p[0]] if categorical else p[0] for p in points]
        axes.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3,
                      label=label or y)
    baseline = base_reference(rows, y)
    if baseline is not None:  # the untrained model, for reading the trained lines against
        axes.axhline(baseline, color="0.4", linestyle="--", linewidth=1, label=f"base model ({y.replace('trained/', 'base/')})")
    if y.startswith("delta/"):  # a paired delta: the base model is 0
        axes.axhline(0.0, color="0.4", linestyle="--", linewidth=1, label="base model (Δ = 0)")
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


# the paired deltas (trained - base, per held-out prompt) a comparison of methods is read by, in panel order
DELTA_METRICS = ("delta/accuracy_strict", "delta/accuracy_flexible", "delta/accuracy_loglik",
                 "delta/mi_per_token_mean", "delta/mi_mean", "delta/judge_win_rate")


def plot_deltas(rows: Sequence[SummaryRow], x: str, path: str | Path, group: str | Sequence[str] | None = None,
                metrics: Sequence[str] = DELTA_METRICS, title: str | None = None) -> Path | None:
    """One panel per paired delta in ``metrics`` that the sweep has: each value of ``x`` (e.g. the
    methods of a comparison) with its mean delta and standard-error bar; 0 is the base model.

    Made for a categorical ``x``: every point is read against the dashed base line, not against its
    neighbours, so points are not joined. Groups (other swept keys) sit side by side. Returns ``None``
    when the sweep has none of ``metrics``.
    """
    from matplotlib.figure import Figure

    keys = key_columns(rows)
    group_keys = resolve_group(keys, x, group)
    available = [m for m in metrics if m in metric_columns(rows) and any(r.mean(m) is not None for r in rows)]
    if not available:
        return None
    x_values = sorted({row.values[x] for row in rows if row.values[x] is not None}, key=sort_key)
    positions = {v: i for i, v in enumerate(x_values)}
    columns = min(3, len(available))
    panel_rows = -(-len(available) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * panel_rows + 0.6), layout="constrained")
    for p, metric in enumerate(available):
        axes = figure.add_subplot(panel_rows, columns, p + 1)
        lines = plot_lines(rows, x, metric, group_keys)
        width = 0.6 / max(1, len(lines))
        for g, (label, points) in enumerate(lines.items()):
            offset = (g - (len(lines) - 1) / 2) * width
            axes.errorbar([positions[v] + offset for v, _, _ in points], [m for _, m, _ in points],
                          yerr=[e for _, _, e in points], marker="o", linestyle="none", capsize=3,
                          label=label or None)
        axes.axhline(0.0, color="0.4", linestyle="--", linewidth=1, label="base model")
        axes.set_xticks(range(len(x_values)), [str(v) for v in x_values], rotation=20)
        axes.set_xlim(-0.5, len(x_values) - 0.5)
        axes.set_title(metric.replace("delta/", "") + " (trained − base)", fontsize="medium")
        axes.grid(True, axis="y", alpha=0.3)
        if p == 0:
            axes.legend(fontsize="x-small")
    heading = f"paired deltas vs {x}"
    figure.suptitle(f"{title}: {heading}" if title else heading, fontsize="medium")
    figure.supxlabel(error_bar_note(rows, available[0]), x=0.99, ha="right", fontsize="x-small", color="0.4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


# The identity's measures in a sweep, with what the identity predicts at DPO's optimum and what the
# untrained policy (pi_theta = pi_ref, so r = 0: step 0) gives: (metric, title, theory, untrained).
IDENTITY_PANELS = (
    ("identity/slope_demeaned", "slope of r on pmi (within prompt)", 1.0, 0.0),
    ("identity/spearman_within_prompt", "Spearman r ~ pmi (within prompt)", 1.0, None),
    ("identity/heldout_pair_accuracy", "held-out pair accuracy", None, 0.5),
)


def plot_identity(identity: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """One run's identity (``eval.json``'s ``identity``): r = beta log pi_theta/pi_ref against pmi(x; y)
    over the held-out candidates, coloured by whether y answers x.

    Left: the values as measured (each prompt has its own offset c(x)). Right: both with each prompt's
    mean removed, the fitted slope through the origin (``slope_demeaned``) and the identity line,
    slope 1, which DPO's optimum on MIPO pairs reaches (MIPO, arXiv 2603.19294, Sec. 3).
    """
    from matplotlib.figure import Figure

    per = identity["per_candidate"]
    answers = [bool(a) for a in per["answers"]]  # (M,)
    centred = {"pmi": demean_within_prompts(per["pmi"], per["prompt"]),
               "reward": demean_within_prompts(per["reward"], per["prompt"])}  # (M,) each
    figure = Figure(figsize=(10.4, 4.4), layout="constrained")
    for p, (values, label) in enumerate(((per, ""), (centred, " − prompt mean"))):
        axes = figure.add_subplot(1, 2, p + 1)
        for answered, colour, name in ((False, "tab:gray", "y answers another prompt"),
                                       (True, "tab:red", "y answers x")):
            keep = [m for m, a in enumerate(answers) if a == answered]
            axes.scatter([values["pmi"][m] for m in keep], [values["reward"][m] for m in keep], s=12, alpha=0.6,
                         color=colour, label=name)
        axes.set_xlabel(f"pmi(x; y){label} (nats, base model)")
        axes.set_ylabel(f"r(x, y) = β log πθ/πref{label}")
        axes.grid(True, alpha=0.3)
    low, high = (float(min(centred["pmi"], default=0.0)), float(max(centred["pmi"], default=0.0)))
    axes.plot([low, high], [low, high], color="0.3", linestyle="--", linewidth=1, label="identity (slope 1)")
    if identity.get("slope_demeaned") is not None:
        slope = identity["slope_demeaned"]
        axes.plot([low, high], [slope * low, slope * high], color="tab:blue", linewidth=1.5,
                  label=f"fit: slope {slope:.3f}")
    axes.legend(fontsize="small")
    figure.suptitle(f"{title + ': ' if title else ''}implicit reward vs pmi, β={identity.get('beta')}",
                    fontsize="medium")
    figure.supxlabel(identity_summary(identity), x=0.99, ha="right", fontsize="x-small", color="0.4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def identity_summary(identity: Mapping[str, Any]) -> str:
    """``slope 0.812 ± 0.051 · Spearman 0.604 ± 0.040 (72 prompts) · pair accuracy 0.781 ± 0.030``."""
    def value(name: str) -> str:
        mean, stderr = identity.get(name), identity.get(f"{name}_stderr")
        if mean is None:
            return "undefined"
        return f"{mean:.3f}" if stderr is None else f"{mean:.3f} ± {stderr:.3f}"

    return (f"slope {value('slope_demeaned')} · Spearman {value('spearman_within_prompt')} "
            f"({identity.get('spearman_prompts', 0)} prompts, {identity.get('spearman_undefined', 0)} undefined) · "
            f"held-out pair accuracy {value('heldout_pair_accuracy')} · {identity.get('candidates', 0)} candidates")


def plot_identity_sweep(rows: Sequence[SummaryRow], x: str, path: str | Path,
                        group: str | Sequence[str] | None = None, title: str | None = None) -> Path | None:
    """The identity's three measures against ``x`` (e.g. ``trainer.max_steps`` or ``loss.beta``), one panel
    each (``IDENTITY_PANELS``), error bars over seeds; dotted: what the identity predicts at DPO's
    optimum (slope and correlation 1), dashed: the untrained policy (r = 0: slope 0, pair accuracy
    0.5, chance). Returns ``None`` when the sweep has none of them."""
    from matplotlib.figure import Figure

    group_keys = resolve_group(key_columns(rows), x, group)
    panels = [panel for panel in IDENTITY_PANELS if any(r.mean(panel[0]) is not None for r in rows)]
    if not panels:
        return None
    figure = Figure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    for p, (metric, heading, theory, untrained) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), p + 1)
        for label, points in plot_lines(rows, x, metric, group_keys).items():
            axes.errorbar([v for v, _, _ in points], [m for _, m, _ in points], yerr=[e for _, _, e in points],
                          marker="o", capsize=3, label=label or None)
        if theory is not None:
            axes.axhline(theory, color="tab:green", linestyle=":", linewidth=1.2, label="identity at DPO's optimum")
        if untrained is not None:
            axes.axhline(untrained, color="0.4", linestyle="--", linewidth=1,
                         label="untrained (r = 0)" + (": chance" if metric.endswith("accuracy") else ""))
        if use_log_scale(row.values[x] for row in rows if row.values[x] is not None):
            axes.set_xscale("log")
        axes.set_xlabel(x)
        axes.set_title(heading, fontsize="medium")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="x-small")
    heading = f"implicit reward vs pmi against {x}"
    figure.suptitle(f"{title}: {heading}" if title else heading, fontsize="medium")
    figure.supxlabel(error_bar_note(rows, panels[0][0]), x=0.99, ha="right", fontsize="x-small", color="0.4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def base_reference(rows: Sequence[SummaryRow], y: str) -> float | None:
    """For a ``trained/<metric>`` figure: the base model's value, when every row shares one.

    A sweep over training settings evaluates one base model, so ``base/<metric>`` is the same in
    every row; with several base models (e.g. a sweep over ``model``) there is no single line.
    """
    if not y.startswith("trained/"):
        return None
    values = {row.mean("base/" + y.split("/", 1)[1]) for row in rows}
    if len(values) != 1 or None in values:
        return None
    return float(values.pop())


def use_log_scale(values: Iterable[Any]) -> bool:
    """True when every value is a positive number and the largest is at least 10x the smallest."""
    values = list(values)
    if not values or not all(is_number(v) and v > 0 for v in values):
        return False
    return max(values) / min(values) >= 10


def error_bar_note(rows: Sequence[SummaryRow], y: str) -> str:
    """What the error bars of ``y`` mean, from the seed counts of the plotted rows (``spread_note``)."""
    return "error bars: " + spread_note(rows, y).replace("± = ", "")


def figure_name(y: str, x: str) -> str:
    """``trained/accuracy``, ``loss.beta`` -> ``trained_accuracy_vs_loss.beta.png``."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9._=-]+", "_", s).strip("_")  # noqa: E731
    return f"{safe(y)}_vs_{safe(x)}.png"


def group_label(row: SummaryRow, group_keys: Sequence[str]) -> str:
    """``negatives=random, loss.name=dpo`` for the row's values of ``group_keys``."""
    return ", ".join(f"{k}={row.values.get(k)}" for k in group_keys)


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


def plot_lines(rows: Sequence[SummaryRow], x: str, y: str,
               group_keys: Sequence[str]) -> dict[str, list[tuple[Any, float, float]]]:
    """``{group label: [(x, mean, sem), ...]}``, lines in order of their group values, points sorted by x.

    Rows without a value of ``y`` are skipped; two rows on the same line at the same x are an error.
    """
    lines: dict[str, list[tuple[Any, float, float]]] = {}
    order: dict[str, tuple] = {}
    seen: set[tuple[str, Any]] = set()
    for row in rows:
        label, x_value, stat = group_label(row, group_keys), row.values[x], row.stats[y]
        order[label] = tuple(sort_key(row.values.get(k)) for k in group_keys)
        if (label, hashable(x_value)) in seen:
            others = [k for k in key_columns(rows) if k != x and k not in group_keys]
            raise AggregateError(f"several rows have {x}={x_value} in the line '{label or y}': the swept key(s) "
                                 f"{others} are neither x nor in the group; add them to the group")
        seen.add((label, hashable(x_value)))
        if stat.mean is None or x_value is None:
            continue
        sem = float("nan") if stat.stderr is None else stat.stderr
        lines.setdefault(label, []).append((x_value, stat.mean, sem))
    for points in lines.values():
        points.sort(key=lambda p: sort_key(p[0]))
    return dict(sorted(lines.items(), key=lambda item: order[item[0]]))


def _check_plot_columns(rows: Sequence[SummaryRow], keys: Sequence[str], x: str, y: str) -> None:
    if x not in keys:
        raise AggregateError(f"unknown x {x!r}; available (swept keys other than the seed): {list(keys)}")
    metrics = metric_columns(rows)
    if y not in metrics:
        raise AggregateError(f"unknown y {y!r}; available metrics: {metrics}")
