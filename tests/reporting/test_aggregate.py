"""Sweep aggregation (mipo.reporting.sweep, mipo.reporting.summary, mipo.reporting.plots, mipo.reporting.aggregate) and aggregate.py on a
hand-written sweep directory with known numbers.

The sweep: loss.beta in {0.01, 0.1} x negatives in {random, partial} x seed in {0, 1}, plus one failed
job (seed 2 of beta=0.1/partial: train.json but no eval.json). Every override list also holds the
constant ``task=arc_challenge``, which is not a swept key.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mipo.reporting.aggregate import aggregate
from mipo.reporting.plots import (
    base_reference,
    figure_name,
    identity_summary,
    plot,
    plot_deltas,
    plot_identity,
    plot_identity_sweep,
    plot_lines,
    use_log_scale,
)
from mipo.reporting.summary import (
    Stat,
    SummaryRow,
    default_columns,
    over_seeds,
    summarize,
    write_table,
)
from mipo.reporting.sweep import (
    AggregateError,
    Result,
    collect_runs,
    parse_overrides,
    read_run,
    swept_keys,
)

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (beta, negatives, seed): (base acc, trained acc, base MI, trained MI, final loss, final reward accuracy)
RESULTS = {
    (0.01, "random", 0): (0.25, 0.30, 0.40, 0.50, 0.60, 0.70),
    (0.01, "random", 1): (0.35, 0.50, 0.50, 0.70, 0.62, 0.80),
    (0.01, "partial", 0): (0.20, 0.20, 0.30, 0.30, 0.65, 0.55),
    (0.01, "partial", 1): (0.20, 0.30, 0.30, 0.50, 0.67, 0.65),
    (0.1, "random", 0): (0.25, 0.45, 0.40, 0.90, 0.50, 0.90),
    (0.1, "random", 1): (0.35, 0.55, 0.50, 0.70, 0.54, 0.86),
    (0.1, "partial", 0): (0.20, 0.40, 0.30, 0.60, 0.58, 0.75),
    (0.1, "partial", 1): (0.20, 0.40, 0.30, 0.80, 0.60, 0.77),
}
FAILED = (0.1, "partial", 2)  # trains (final loss 0.10, which would move the mean) but never evaluates
TRAINED_ACC_STDERR, TRAINED_MI_STDERR = 0.071, 0.052

CONFIG = """\
model:
  name: smollm2-135m-instruct
task:
  name: {task}
  max_new_tokens: 64
negatives:
  strategy: {negatives}
loss:
  name: dpo
  beta: {beta}
seed: {seed}
sampling:
  max_new_tokens: ${{task.max_new_tokens}}
paths:
  cache_dir: ${{oc.env:MIPO_CACHE_DIR,.cache/mipo}}
  stamp: ${{never_registered:%Y-%m-%d}}  # like Hydra's ${{now:...}} where Hydra has not registered it
"""


def write_job(sweep: Path, num: int, beta: float, negatives: str, seed: int, *, task: str = "arc_challenge",
              results: tuple | None = None, evaluated: bool = True, with_accuracy: bool = True) -> Path:
    """One Hydra job directory as ``pipeline.py -m`` leaves it."""
    job = sweep / f"{num}_loss.beta={beta},negatives={negatives},seed={seed},task={task}"
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"task={task}", f"loss.beta={beta}", f"negatives={negatives}", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "config.yaml").write_text(CONFIG.format(task=task, negatives=negatives, beta=beta, seed=seed))
    base_acc, trained_acc, base_mi, trained_mi, loss, reward_acc = results or (0.2, 0.3, 0.3, 0.4, 0.10, 0.5)
    (job / "train.json").write_text(json.dumps({
        "steps": 12, "pairs": 48, "pairs_path": "p.jsonl", "reference_cache": "r.pt", "reference_cache_hit": True,
        "final_loss": loss, "final_reward_margin": 0.3, "final_reward_accuracy": reward_acc, "model_dir": "m"}))
    if evaluated:
        models = {
            "base": {"mi_mean": base_mi, "mi_stderr": 0.05, "accuracy": base_acc, "accuracy_stderr": 0.07,
                     "mean_response_chars": 120.0},
            "trained": {"mi_mean": trained_mi, "mi_stderr": TRAINED_MI_STDERR, "accuracy": trained_acc,
                        "accuracy_stderr": TRAINED_ACC_STDERR, "mean_response_chars": 100.0},
        }
        if not with_accuracy:
            for values in models.values():
                del values["accuracy"], values["accuracy_stderr"]
        (job / "eval.json").write_text(json.dumps({
            "task": task, "num_eval": 40, "mi_k": 3, "mi": "pmi(x; y)", "models": models,
            "mi_values": {"base": [0.1, 0.2], "trained": [0.3, 0.4]}}))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun" / "2026-11-21" / "10-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    for num, ((beta, negatives, seed), results) in enumerate(RESULTS.items()):
        write_job(sweep, num, beta, negatives, seed, results=results)
    write_job(sweep, len(RESULTS), *FAILED, evaluated=False)
    return sweep


def row_for(rows: list[dict], beta: float, negatives: str) -> dict:
    (row,) = [r for r in rows if r["loss.beta"] == beta and r["negatives"] == negatives]
    return row


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "aggregate.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

def test_parse_overrides_prefixes_and_value_types():
    parsed = parse_overrides(["loss.beta=0.01", "+trainer.lr=1e-5", "++eval.mi_k=8", "negatives=random",
                              "data.num_train=null", "sampling.overwrite=true", "tag='0.5'"])
    assert parsed == {"loss.beta": 0.01, "trainer.lr": 1e-5, "eval.mi_k": 8, "negatives": "random",
                      "data.num_train": None, "sampling.overwrite": True, "tag": "0.5"}
    assert isinstance(parsed["loss.beta"], float) and isinstance(parsed["eval.mi_k"], int)


def test_collect_runs_reads_metrics_config_and_failures(sweep: Path):
    runs = collect_runs(sweep)
    assert len(runs) == 9
    assert [r.name.split("_")[0] for r in runs] == [str(i) for i in range(9)]  # job order, not text order

    first = runs[0]
    assert first.overrides == {"task": "arc_challenge", "loss.beta": 0.01, "negatives": "random", "seed": 0}
    assert not first.failed
    assert first.metrics["trained/accuracy"] == 0.30
    assert first.metrics["base/mi_mean"] == 0.40
    assert first.metrics["train/final_loss"] == 0.60
    assert first.metrics["train/final_reward_accuracy"] == 0.70
    assert first.metrics["trained/accuracy_stderr"] == TRAINED_ACC_STDERR
    assert first.metrics["delta/accuracy"] == pytest.approx(0.05)
    assert first.metrics["delta/mi_mean"] == pytest.approx(0.10)
    # Plain values of a config with unresolvable interpolations (a resolver not registered) are still read.
    assert first.task == "arc_challenge"
    assert first.config_value("loss.beta") == 0.01
    assert first.config_value("negatives.strategy") == "random"
    assert first.config_value("paths.stamp", "unresolved") == "unresolved"

    failed = [r for r in runs if r.failed]
    assert [r.overrides["seed"] for r in failed] == [2]
    assert "eval.json" in failed[0].problem
    assert failed[0].metrics["train/final_loss"] == 0.10  # its training results are kept for runs.csv


def test_unreadable_or_missing_results_are_failures_not_crashes(tmp_path: Path):
    broken = write_job(tmp_path, 0, 0.1, "random", 0)
    (broken / "eval.json").write_text("{not json")
    (broken / ".hydra" / "config.yaml").write_text("task:\n  name: gsm8k\nbad: ${oops\n")  # OmegaConf rejects it
    crashed = write_job(tmp_path, 1, 0.1, "random", 1, evaluated=False)
    (crashed / "train.json").unlink()

    broken_run, crashed_run = read_run(broken, tmp_path), read_run(crashed, tmp_path)
    assert broken_run.failed and "unreadable eval.json" in broken_run.problem
    assert broken_run.task == "gsm8k"  # read from the YAML fallback
    assert crashed_run.failed and "no train.json" in crashed_run.problem and "no eval.json" in crashed_run.problem
    assert crashed_run.metrics == {}


def test_job_dirs_in_job_number_order(tmp_path: Path):
    for num in (10, 2, 0):
        (tmp_path / f"{num}_seed={num}" / ".hydra").mkdir(parents=True)
        (tmp_path / f"{num}_seed={num}" / ".hydra" / "overrides.yaml").write_text(f"- seed={num}\n")
    assert [r.name for r in collect_runs(tmp_path)] == ["0_seed=0", "2_seed=2", "10_seed=10"]


def test_collect_runs_without_job_dirs_names_what_it_expects(tmp_path: Path):
    with pytest.raises(AggregateError, match=r"expected Hydra multirun job directories with \.hydra/overrides\.yaml"):
        collect_runs(tmp_path)


def test_swept_keys_in_override_order_without_constants(sweep: Path):
    assert swept_keys(collect_runs(sweep)) == ["loss.beta", "negatives", "seed"]


# --------------------------------------------------------------------------------------------------
# Summarising
# --------------------------------------------------------------------------------------------------

def test_summarize_means_and_sems_over_seeds(sweep: Path):
    rows = [row.record() for row in summarize(collect_runs(sweep))]  # as the CSV columns
    assert [(r["loss.beta"], r["negatives"]) for r in rows] == [
        (0.01, "partial"), (0.01, "random"), (0.1, "partial"), (0.1, "random")]
    assert all("seed" not in r for r in rows)

    # With two seeds a, b: mean (a + b) / 2 and sem = std(ddof=1) / sqrt(2) = |a - b| / 2.
    row = row_for(rows, 0.01, "random")
    expected = {
        "trained/accuracy": (0.40, 0.10), "base/accuracy": (0.30, 0.05), "delta/accuracy": (0.10, 0.05),
        "trained/mi_mean": (0.60, 0.10), "base/mi_mean": (0.45, 0.05), "delta/mi_mean": (0.15, 0.05),
        "train/final_loss": (0.61, 0.01), "train/final_reward_accuracy": (0.75, 0.05),
    }
    for metric, (mean, sem) in expected.items():
        assert row[metric] == pytest.approx(mean), metric
        assert row[metric + "_sem"] == pytest.approx(sem), metric
    assert (row["n_seeds"], row["n_failed"]) == (2, 0)

    assert row_for(rows, 0.01, "partial")["trained/accuracy"] == pytest.approx(0.25)
    assert row_for(rows, 0.01, "partial")["delta/accuracy_sem"] == pytest.approx(0.05)
    assert row_for(rows, 0.1, "random")["trained/mi_mean"] == pytest.approx(0.80)
    assert row_for(rows, 0.1, "random")["trained/mi_mean_sem"] == pytest.approx(0.10)

    # The failed seed 2 (final loss 0.10) is counted as failed, not averaged in.
    with_failure = row_for(rows, 0.1, "partial")
    assert (with_failure["n_seeds"], with_failure["n_failed"]) == (2, 1)
    assert with_failure["train/final_loss"] == pytest.approx(0.59)
    assert with_failure["trained/accuracy_sem"] == pytest.approx(0.0)


def test_summarize_with_one_seed_uses_the_runs_own_stderr(sweep: Path):
    rows = [row.record() for row in summarize([r for r in collect_runs(sweep) if r.overrides["seed"] == 0])]
    assert len(rows) == 4
    row = row_for(rows, 0.01, "random")
    assert row["n_seeds"] == 1
    assert row["trained/accuracy"] == pytest.approx(0.30)
    assert row["trained/accuracy_sem"] == TRAINED_ACC_STDERR
    assert row["trained/mi_mean_sem"] == TRAINED_MI_STDERR
    assert row["delta/accuracy_sem"] is None  # no per-run stderr of a difference
    assert row["train/final_loss_sem"] is None


def test_summary_rows_are_typed_records(sweep: Path):
    runs = collect_runs(sweep)
    assert runs[0].results["trained/accuracy"] == Result(0.30, TRAINED_ACC_STDERR)
    assert runs[0].results["delta/accuracy"].stderr is None
    assert not any(name.endswith("_stderr") for name in runs[0].results)  # standard errors belong to a metric

    rows = summarize(runs)
    row = rows[3]
    assert row.values == {"loss.beta": 0.1, "negatives": "random"}
    assert (row.n_seeds, row.n_failed) == (2, 0)
    stat = row.stats["trained/mi_mean"]
    assert (stat.mean, stat.stderr, stat.n) == (pytest.approx(0.80), pytest.approx(0.10), 2)
    assert list(row.stats) == list(rows[0].stats)  # every row holds every metric, in table order
    assert row.mean("no/such_metric") is None


def test_over_seeds_of_per_seed_results():
    assert over_seeds([]) == Stat(None, None, 0)
    assert over_seeds([Result(0.5, 0.07)]) == Stat(0.5, 0.07, 1)  # one seed: its own standard error
    stat = over_seeds([Result(0.2, 0.07), Result(0.4, 0.07), Result(0.6, None)])
    assert (stat.mean, stat.stderr, stat.n) == (pytest.approx(0.4), pytest.approx(0.2 / 3 ** 0.5), 3)


# --------------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------------

def test_write_table_csv_and_markdown(sweep: Path, tmp_path: Path):
    rows = summarize(collect_runs(sweep))
    columns = default_columns(rows)
    metrics = ["trained/accuracy", "base/accuracy", "delta/accuracy", "trained/mi_mean", "base/mi_mean",
               "delta/mi_mean", "train/final_loss", "train/final_reward_accuracy"]
    assert columns == ["loss.beta", "negatives", *metrics, "pairs", "steps", "n_seeds", "n_failed"]

    markdown = write_table(rows, columns, tmp_path / "summary.csv", tmp_path / "summary.md")

    with open(tmp_path / "summary.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["loss.beta", "negatives", *[c for m in metrics for c in (m, m + "_sem")],
                        "pairs_min", "pairs_max", "steps_min", "steps_max", "n_seeds", "n_failed"]
    assert len(table) == 1 + 4
    record = dict(zip(table[0], table[2]))  # second row: beta 0.01, random
    assert (record["loss.beta"], record["negatives"], record["n_seeds"]) == ("0.01", "random", "2")
    assert float(record["trained/accuracy"]) == pytest.approx(0.40)
    assert float(record["trained/accuracy_sem"]) == pytest.approx(0.10)

    md_lines = (tmp_path / "summary.md").read_text().strip().splitlines()
    assert md_lines == markdown.splitlines()
    assert md_lines[0] == "| " + " | ".join(columns) + " |"
    assert len([line for line in md_lines[2:] if line.startswith("|")]) == 4
    assert md_lines[3].startswith("| 0.01 | random | 0.400 ± 0.100 | 0.300 ± 0.050 | 0.100 ± 0.050 | 0.600 ± 0.100 |")
    assert md_lines[3].endswith("| 0.610 ± 0.010 | 0.750 ± 0.050 | 48 | 12 | 2 | 0 |")


def test_plot_writes_png_figures(sweep: Path, tmp_path: Path):
    rows = summarize(collect_runs(sweep))
    for y in ("trained/accuracy", "trained/mi_mean"):
        path = plot(rows, x="loss.beta", y=y, group="negatives", path=tmp_path / figure_name(y, "loss.beta"),
                    title="arc_challenge")
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 5_000
    assert figure_name("trained/accuracy", "loss.beta") == "trained_accuracy_vs_loss.beta.png"


def test_plot_errors_name_the_available_keys(sweep: Path, tmp_path: Path):
    rows = summarize(collect_runs(sweep))
    with pytest.raises(AggregateError, match="unknown y 'nope'.*trained/accuracy"):
        plot(rows, x="loss.beta", y="nope", path=tmp_path / "a.png")
    with pytest.raises(AggregateError, match="unknown x 'seed'.*loss.beta"):
        plot(rows, x="seed", y="trained/accuracy", path=tmp_path / "b.png")
    with pytest.raises(AggregateError, match=r"\['negatives'\].*add them to the group"):
        plot(rows, x="loss.beta", y="trained/accuracy", group=[], path=tmp_path / "c.png")


@pytest.mark.parametrize("values, expected", [
    ([0.01, 0.1], True), ([0.01, 0.1, 0.5], True), ([0.1, 0.5], False), ([0.0, 1.0], False),
    (["random", "partial"], False),
])
def test_use_log_scale(values, expected):
    assert use_log_scale(values) is expected


def test_personalization_sweep_has_no_accuracy_columns(tmp_path: Path):
    for num, beta in enumerate((0.01, 0.1)):
        write_job(tmp_path, num, beta, "random_context", 0, task="persistbench", with_accuracy=False)
    rows = summarize(collect_runs(tmp_path))
    columns = default_columns(rows)
    assert columns == ["loss.beta", "trained/mi_mean", "base/mi_mean", "delta/mi_mean", "train/final_loss",
                       "train/final_reward_accuracy", "pairs", "steps", "n_seeds"]
    assert rows[0].record()["trained/mi_mean_sem"] == TRAINED_MI_STDERR


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def test_cli_prints_table_lists_failed_job_and_writes_files(sweep: Path, tmp_path: Path):
    out = tmp_path / "report"
    result = run_cli(str(sweep), "--out", str(out))
    assert result.returncode == 0, result.stderr
    # the compact table: the headline delta (accuracy: the base model scores above 0) first, base value beside it
    assert "| loss.beta | negatives | Δ accuracy | base accuracy | Δ mi_mean | pairs | steps | seeds | failed |" \
        in result.stdout
    assert "| 0.01 | random | 0.100 ± 0.050 | 0.300 ± 0.050 | 0.150 ± 0.050 | 48 | 12 | 2 | 0 |" in result.stdout
    assert "8 of 9 jobs complete" in result.stdout
    assert "8_loss.beta=0.1,negatives=partial,seed=2,task=arc_challenge: training finished, no eval.json" \
        in result.stdout

    for name in ("summary.csv", "summary.md", "runs.csv"):
        assert (out / name).is_file() and str(out / name) in result.stdout
    for name in ("delta_accuracy_vs_loss.beta.png", "trained_mi_mean_vs_loss.beta.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    with open(out / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 9
    assert [r["status"] for r in runs].count("failed") == 1
    assert runs[0]["seed"] == "0" and float(runs[0]["trained/accuracy"]) == pytest.approx(0.30)


def test_aggregate_returns_the_report_it_wrote(sweep: Path, tmp_path: Path):
    report = aggregate(sweep, out_dir=tmp_path / "report", y="delta/accuracy", group=["negatives"])
    assert [p.name for p in report.written] == ["summary.md", "summary.csv", "runs.csv",
                                                "delta_accuracy_vs_loss.beta.png", "trained_mi_mean_vs_loss.beta.png"]
    assert all(p.is_file() for p in report.written)
    assert len(report.runs) == 9 and len(report.rows) == 4
    assert report.text.startswith((tmp_path / "report" / "summary.md").read_text().split("\n\n8 of 9")[0])
    assert "8 of 9 jobs complete" in report.text and "1 job(s) failed" in report.text


def test_aggregate_without_results_lists_the_failed_jobs(tmp_path: Path):
    write_job(tmp_path, 0, 0.1, "random", 0, evaluated=False)
    with pytest.raises(AggregateError, match="has results yet") as error:
        aggregate(tmp_path)
    assert error.value.report.startswith("0 of 1 jobs complete")
    assert not (tmp_path / "summary.csv").exists()


def test_cli_error_for_a_directory_without_jobs(tmp_path: Path):
    result = run_cli(str(tmp_path))
    assert result.returncode == 2
    assert "expected Hydra multirun job directories with .hydra/overrides.yaml" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_error_for_unknown_y_lists_metrics(sweep: Path, tmp_path: Path):
    result = run_cli(str(sweep), "--y", "trained/acc", "--out", str(tmp_path / "report"))
    assert result.returncode == 2
    assert "unknown --y 'trained/acc'" in result.stderr
    assert "trained/accuracy" in result.stderr and "trained/mi_mean" in result.stderr
    assert not (tmp_path / "report" / "summary.csv").exists()  # checked before anything is written


def summary_row(means: dict[str, float]) -> SummaryRow:
    """A one-seed row holding just these metric means."""
    return SummaryRow(values={}, stats={m: Stat(v, None, 1) for m, v in means.items()}, n_seeds=1, n_failed=0)


def test_base_reference_line_only_when_one_base_model():
    rows = [summary_row({"trained/accuracy": 0.5, "base/accuracy": 0.25}),
            summary_row({"trained/accuracy": 0.6, "base/accuracy": 0.25})]
    assert base_reference(rows, "trained/accuracy") == 0.25
    assert base_reference(rows, "base/accuracy") is None
    # two different base models: no single reference line
    rows[1] = summary_row({"trained/accuracy": 0.6, "base/accuracy": 0.3})
    assert base_reference(rows, "trained/accuracy") is None


# --------------------------------------------------------------------------------------------------
# Paired deltas (eval.json written by the current evaluation)
# --------------------------------------------------------------------------------------------------

def write_paired_job(sweep: Path, num: int, beta: float, seed: int, delta_strict: float, delta_mi: float,
                     negatives: str = "random") -> Path:
    """A job whose eval.json has strict/flexible accuracy, per-token MI and paired ``deltas``."""
    job = write_job(sweep, num, beta, negatives, seed)
    evaluation = json.loads((job / "eval.json").read_text())
    for name, acc in (("base", 0.20), ("trained", 0.20 + delta_strict)):
        evaluation["models"][name].update(accuracy_strict=acc, accuracy_strict_stderr=0.04, accuracy_flexible=acc + 0.1,
                                          accuracy_flexible_stderr=0.05, mi_per_token_mean=0.5, mi_per_token_stderr=0.02)
    evaluation["deltas"] = {
        "accuracy_strict": {"mean": delta_strict, "stderr": 0.03, "ci95": [delta_strict - 0.06, delta_strict + 0.06],
                            "p_value": 0.2, "n": 40, "test": "mcnemar_exact"},
        "mi_mean": {"mean": delta_mi, "stderr": 0.5, "ci95": [delta_mi - 1, delta_mi + 1], "p_value": 0.04,
                    "n": 40, "test": "sign_flip"},
    }
    (job / "eval.json").write_text(json.dumps(evaluation))
    return job


def test_paired_deltas_averaged_over_seeds(tmp_path: Path):
    for num, (seed, d_acc, d_mi) in enumerate([(0, 0.05, 1.0), (1, 0.15, 3.0), (2, 0.10, 2.0)]):
        write_paired_job(tmp_path, num, 0.1, seed, d_acc, d_mi)
    runs = collect_runs(tmp_path)
    # one job: the delta's own error bar is its paired standard error; p-value and interval are per job only
    assert runs[0].results["delta/accuracy_strict"] == Result(0.05, 0.03)
    assert runs[0].results["delta/accuracy"] == Result(0.05, 0.03)  # alias of the strict delta
    assert runs[0].results["delta/mi_mean"] == Result(1.0, 0.5)  # not base/trained's mi_stderr naming
    assert runs[0].metrics["delta/mi_mean_p_value"] == 0.04 and runs[0].metrics["delta/mi_mean_ci95_lo"] == 0.0
    assert not any(m.endswith(("_p_value", "_ci95_lo", "_ci95_hi")) for m in runs[0].results)
    (row,) = summarize(runs)
    # three seeds: the mean of the deltas, and the standard error over seeds (std ddof=1 / sqrt(3))
    stat = row.stats["delta/accuracy_strict"]
    assert (stat.mean, stat.stderr, stat.n) == (pytest.approx(0.10), pytest.approx(0.05 / 3 ** 0.5), 3)
    assert row.stats["delta/mi_mean"].mean == pytest.approx(2.0) and row.n_seeds == 3
    columns = default_columns([row])
    assert "delta/accuracy_strict" in columns and "trained/accuracy_flexible" in columns
    assert "trained/mi_per_token_mean" in columns
    assert "trained/accuracy" not in columns and "delta/accuracy" not in columns  # the alias stays out


def test_categorical_x_adds_the_paired_deltas_figure(tmp_path: Path):
    """A comparison of methods (a swept key whose values are names): each delta against the base model's 0."""
    jobs = [("random", 0, 0.05, 1.0), ("random", 1, 0.15, 3.0), ("partial", 0, -0.05, 0.5), ("partial", 1, 0.0, 0.2)]
    for num, (negatives, seed, d_acc, d_mi) in enumerate(jobs):
        write_paired_job(tmp_path / "sweep", num, 0.1, seed, d_acc, d_mi, negatives=negatives)
    rows = summarize(collect_runs(tmp_path / "sweep"))
    path = plot_deltas(rows, "negatives", tmp_path / "d.png", title="arc_challenge")
    assert path.read_bytes()[:8] == PNG_MAGIC
    report = aggregate(tmp_path / "sweep", out_dir=tmp_path / "out", x="negatives")
    assert tmp_path / "out" / "deltas_vs_negatives.png" in report.written
    # the numbers the panels show: mean delta and its standard error over seeds, per x value
    lines = plot_lines(rows, "negatives", "delta/accuracy_strict", [])
    assert [(v, pytest.approx(m), pytest.approx(e)) for v, m, e in lines[""]] == [
        ("partial", -0.025, 0.025), ("random", 0.10, 0.05)]
    # a numeric x: the line figures only
    for num, (beta, seed) in enumerate([(0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)]):
        write_paired_job(tmp_path / "betas", num, beta, seed, 0.05 * seed, 1.0)
    numeric = aggregate(tmp_path / "betas", out_dir=tmp_path / "out2", x="loss.beta")
    assert numeric.written and not any(p.name.startswith("deltas") for p in numeric.written)



# --------------------------------------------------------------------------------------------------
# The paper's identity: slope, correlation and held-out pair accuracy against the swept key
# --------------------------------------------------------------------------------------------------

# (max_steps, seed): (slope, Spearman, held-out pair accuracy), each job with its own standard errors
IDENTITY = {(4, 0): (0.10, 0.20, 0.55), (4, 1): (0.20, 0.30, 0.65), (16, 0): (0.50, None, 0.70),
            (16, 1): (0.70, 0.60, 0.80)}


def write_identity_job(sweep: Path, num: int, steps: int, seed: int, measures: tuple) -> Path:
    """A job of the checkpoint sweep (``make identity-cpu``): eval.json with an ``identity`` section."""
    job = sweep / f"{num}_seed={seed},trainer.max_steps={steps}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- trainer.max_steps={steps}\n- seed={seed}\n")
    (job / ".hydra" / "config.yaml").write_text("task:\n  name: arc_challenge\n")
    slope, spearman, accuracy = measures
    identity = {"beta": 0.1, "candidates": 320, "prompts": 80, "pmi": "pmi(x; y)", "theory": {"slope_demeaned": 1.0},
                "slope_demeaned": slope, "slope_demeaned_stderr": 0.05,
                "spearman_within_prompt": spearman, "spearman_within_prompt_stderr": None if spearman is None else 0.04,
                "spearman_undefined": 80 if spearman is None else 0,
                "heldout_pair_accuracy": accuracy, "heldout_pair_accuracy_stderr": 0.03,
                "per_candidate": {"prompt": [0], "response": [0], "answers": [True], "pmi": [0.1], "reward": [0.0]}}
    (job / "eval.json").write_text(json.dumps({
        "task": "arc_challenge", "num_eval": 80, "mi_k": 3, "mi": "pmi(x; y)", "identity": identity,
        "models": {"base": {"mi_mean": 0.3, "mi_stderr": 0.05}, "trained": {"mi_mean": 0.4, "mi_stderr": 0.05}}}))
    return job


def test_identity_measures_are_read_averaged_and_plotted(tmp_path: Path):
    for num, ((steps, seed), measures) in enumerate(IDENTITY.items()):
        write_identity_job(tmp_path / "sweep", num, steps, seed, measures)
    runs = collect_runs(tmp_path / "sweep")
    assert runs[0].results["identity/slope_demeaned"] == Result(0.10, 0.05)  # with the job's own stderr
    assert runs[0].results["identity/heldout_pair_accuracy"] == Result(0.55, 0.03)
    assert "identity/spearman_within_prompt" not in runs[2].metrics  # undefined (null): left out, not a 0
    assert runs[2].metrics["identity/spearman_undefined"] == 80
    assert not any(name.startswith("identity/per_candidate") or name == "identity/theory" for name in runs[0].metrics)
    rows = summarize(runs)
    four, sixteen = rows
    assert (four.values, sixteen.values) == ({"trainer.max_steps": 4}, {"trainer.max_steps": 16})
    slope = sixteen.stats["identity/slope_demeaned"]  # two seeds: mean, std (ddof=1) / sqrt(2)
    assert (slope.mean, slope.stderr, slope.n) == (pytest.approx(0.6), pytest.approx(0.1), 2)
    spearman = sixteen.stats["identity/spearman_within_prompt"]  # one seed has it: that seed's own stderr
    assert (spearman.mean, spearman.stderr, spearman.n) == (0.6, 0.04, 1)
    columns = default_columns(rows)
    assert columns[:4] == ["trainer.max_steps", "trained/mi_mean", "base/mi_mean", "delta/mi_mean"]
    identity_columns = {"identity/slope_demeaned", "identity/spearman_within_prompt", "identity/heldout_pair_accuracy"}
    assert identity_columns <= set(columns)

    report = aggregate(tmp_path / "sweep", out_dir=tmp_path / "out", x="trainer.max_steps")
    figure = tmp_path / "out" / "identity_vs_trainer.max_steps.png"
    assert figure in report.written and figure.read_bytes()[:8] == PNG_MAGIC
    assert "identity slope_demeaned" in (tmp_path / "out" / "summary.md").read_text()
    assert "identity/slope_demeaned" in (tmp_path / "out" / "summary.csv").read_text()
    lines = plot_lines(rows, "trainer.max_steps", "identity/heldout_pair_accuracy", [])
    assert [(v, pytest.approx(m)) for v, m, _ in lines[""]] == [(4, 0.60), (16, 0.75)]


def test_sweep_without_the_identity_draws_no_identity_figure(sweep: Path, tmp_path: Path):
    report = aggregate(sweep, out_dir=tmp_path / "out")
    assert not any(path.name.startswith("identity") for path in report.written)
    assert plot_identity_sweep(summarize(collect_runs(sweep)), "loss.beta", tmp_path / "i.png") is None


def test_plot_identity_of_one_run(tmp_path: Path):
    identity = {"beta": 0.1, "candidates": 6, "slope_demeaned": 0.8, "slope_demeaned_stderr": 0.1,
                "spearman_within_prompt": None, "spearman_prompts": 0, "spearman_undefined": 2,
                "heldout_pair_accuracy": 0.75, "heldout_pair_accuracy_stderr": None,
                "per_candidate": {"prompt": [0, 0, 0, 1, 1, 1], "response": [0, 1, 2, 1, 0, 2],
                                  "answers": [True, False, False, True, False, False],
                                  "pmi": [1.0, 2.0, 3.0, 0.0, 1.0, 2.0], "reward": [0.1, 0.3, 0.2, 3.0, 2.0, 1.0]}}
    path = plot_identity(identity, tmp_path / "identity.png", title="arc_challenge")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert identity_summary(identity) == ("slope 0.800 ± 0.100 · Spearman undefined (0 prompts, 2 undefined) · "
                                          "held-out pair accuracy 0.750 · 6 candidates")
    assert plot_identity({**identity, "slope_demeaned": None}, tmp_path / "none.png").exists()  # no fit line


def test_cli_error_for_an_output_folder_that_is_a_file(sweep: Path, tmp_path: Path):
    (tmp_path / "report").write_text("a file where the report's folder goes\n")
    result = run_cli(str(sweep), "--out", str(tmp_path / "report"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"aggregate.py: error: --out={tmp_path / 'report'} is a file, not a folder: "
                                      "expected a folder (or a path where one can be made)")
    assert (tmp_path / "report").read_text() == "a file where the report's folder goes\n"
