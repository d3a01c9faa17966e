"""The printed table of an evaluation (``eval_table.md``): each model's metrics and trained minus base.

``format_table`` turns ``eval.json``'s results (``mipo.stages.evaluate.evaluate``) into Markdown:
one row per model (each metric with its standard error), the paired ``trained − base`` row
(mean difference, 95% bootstrap interval, p-value), then the notes (unparsed answers, diversity,
the judge). ``TABLE_COLUMNS`` lists the metric columns, in order; ``IDENTITY_COLUMNS`` the column group
of the paper's identity (the trained model's implicit reward against pmi; MIPO, arXiv 2603.19294: DPO's
optimal implicit reward on MIPO pairs is the pointwise MI up to a per-prompt constant).
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def _percent(value: float, stderr: float | None) -> str:
    return f"{100 * value:.1f}% ± {100 * stderr:.1f}" if stderr is not None and math.isfinite(stderr) else f"{100 * value:.1f}%"


def _number(value: float, stderr: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}f} ± {stderr:.{digits}f}" if stderr is not None and math.isfinite(stderr) else f"{value:.{digits}f}"


def _delta_cell(delta: dict[str, Any] | None, percent: bool, digits: int = 3) -> str:
    """``+2.5 pp [-1.2, +6.2] p=0.27`` (accuracies in percentage points) or ``-11.946 [-15.1, -8.7] p<0.001``."""
    if delta is None:
        return "—"
    scale, unit, fmt = (100.0, " pp", ".1f") if percent else (1.0, "", f".{digits}f")
    lo, hi = delta["ci95"]
    p = delta["p_value"]
    p_text = "p<0.001" if p < 0.001 else f"p={p:.3f}"
    return f"{scale * delta['mean']:+{fmt}}{unit} [{scale * lo:+{fmt}}, {scale * hi:+{fmt}}] {p_text}"


# The columns of the printed table: (header, metric, stderr field, percent?)
TABLE_COLUMNS = (
    ("accuracy strict", "accuracy_strict", "accuracy_strict_stderr", True),
    ("accuracy flexible", "accuracy_flexible", "accuracy_flexible_stderr", True),
    ("accuracy loglik", "accuracy_loglik", "accuracy_loglik_stderr", True),
    ("accuracy loglik norm", "accuracy_loglik_norm", "accuracy_loglik_norm_stderr", True),
    ("pmi (nats)", "mi_mean", "mi_stderr", False),
    ("pmi / token (nats)", "mi_per_token_mean", "mi_per_token_stderr", False),
    ("tokens", "mean_response_tokens", "mean_response_tokens_stderr", False),
    ("cut at max_new_tokens", "truncated_fraction", None, True),
    ("judge win rate (ties win)", "judge_win_rate", "judge_win_rate_stderr", True),
    ("judge strict win rate", "judge_strict_win_rate", "judge_strict_win_rate_stderr", True),
    ("judge score (1-5)", "judge_score_mean", "judge_score_stderr", False),
)


# The identity's column group, filled for the trained model from ``eval.json``'s ``identity``
# (``mipo.metrics.identity``): (header, field, stderr field, percent?)
IDENTITY_COLUMNS = (
    ("r~pmi Spearman (within prompt)", "spearman_within_prompt", "spearman_within_prompt_stderr", False),
    ("r~pmi slope (demeaned)", "slope_demeaned", "slope_demeaned_stderr", False),
    ("held-out pair accuracy", "heldout_pair_accuracy", "heldout_pair_accuracy_stderr", True),
)


def _cells(values: dict[str, Any], columns: Sequence[tuple[str, str, str | None, bool]]) -> list[str]:
    """One row's cells: each metric ± its standard error, ``—`` where it is missing or undefined."""
    cells = []
    for _, metric, stderr, percent in columns:
        if values.get(metric) is None:
            cells.append("—")
            continue
        se = values.get(stderr) if stderr else None
        digits = 1 if metric == "mean_response_tokens" else 3
        cells.append(_percent(values[metric], se) if percent else _number(values[metric], se, digits))
    return cells


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per model (each metric ± its standard error), then ``trained − base``
    (mean difference over the same prompts, 95% bootstrap interval and p-value), then the
    responses' diversity, the unparsed counts and the judge's label where they apply. Where the
    evaluation measured the identity, its column group (``IDENTITY_COLUMNS``) is filled for the
    trained model, and a note says what it measures."""
    models = results["models"]
    columns = [c for c in TABLE_COLUMNS if any(c[1] in m for m in models.values())]
    identity = results.get("identity")
    identity_columns = IDENTITY_COLUMNS if identity else ()
    lines = [f"{results['task']}: {results['num_eval']} held-out prompts, {results['mi']} under the base model "
             f"(K={results['mi_k']})", ""]
    lines.append("| model | " + " | ".join(header for header, *_ in (*columns, *identity_columns)) + " |")
    lines.append("|---|" + "---|" * (len(columns) + len(identity_columns)))
    for name, r in models.items():
        own_identity = _cells(identity, identity_columns) if name == "trained" else ["—"] * len(identity_columns)
        lines.append(f"| {name} | " + " | ".join(_cells(r, columns) + own_identity) + " |")
    deltas = results.get("deltas")
    if deltas:
        cells = [_delta_cell(deltas.get(metric), percent, 1 if metric == "mean_response_tokens" else 3)
                 for _, metric, _, percent in columns] + ["—"] * len(identity_columns)
        lines.append("| trained − base | " + " | ".join(cells) + " |")
        comparison = results.get("comparison", {})
        lines += ["", f"trained − base: mean over the same prompts, [95% bootstrap interval over prompts, "
                      f"{comparison.get('bootstrap_resamples', '?')} resamples], p: McNemar's exact test for accuracies and "
                      "the cut fraction, a sign-flip permutation test otherwise"]
    notes = []
    for name, r in models.items():
        parts = []
        if "unparsed_strict" in r:
            parts.append(f"{r['unparsed_strict']} strict / {r['unparsed_flexible']} flexible responses without an answer")
        if "self_bleu" in r or "distinct_2" in r:
            bleu = f"self-BLEU {r['self_bleu']:.1f}, " if "self_bleu" in r else ""
            parts.append(f"{bleu}distinct-1 {r['distinct_1']:.3f}, distinct-2 {r['distinct_2']:.3f}")
        if "judge_judgments" in r:
            parts.append(f"judge: {r['judge_unparsed']} of {r['judge_judgments']} judgments unparsed, "
                         f"{r['judge_unscored']} responses unscored, {r['judge_compared']} compared with the reference")
        if parts:
            notes.append(f"{name}: " + "; ".join(parts))
    if notes:
        lines += [""] + notes
    if "judge" in results:
        lines += ["", f"judge: {results['judge']['label']}"]
    if identity:
        lines += ["", identity_note(identity)]
    return "\n".join(lines)


def identity_note(identity: dict[str, Any]) -> str:
    """What the identity's columns measure, and on how many candidates and prompts."""
    return (f"identity (trained model): r = β log πθ(y|x)/πref(y|x) (β={identity['beta']}) "
            f"against {identity['pmi']} "
            f"on the base model's responses, {identity['candidates']} (x, y) candidates under {identity['prompts']} "
            f"prompts; Spearman over {identity['spearman_prompts']} prompts with ≥ 3 candidates "
            f"({identity['spearman_undefined']} undefined, skipped); slope through the origin after removing each "
            f"prompt's mean; pair accuracy over {identity['pair_comparisons']} (x, y_x, y_other) comparisons "
            f"(ties count 1/2). DPO's optimum on MIPO pairs: slope 1, Spearman 1; chance accuracy 0.5")
