"""The report aggregate.py writes: the compact table (deltas first, pairs, steps and seeds per arm), the
headline metric, the caption's ±, missing and unreadable jobs with the launcher's state, and a config key
on the x axis (mipo.reporting.summary, mipo.reporting.jobs, mipo.reporting.aggregate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mipo.reporting.aggregate import aggregate
from mipo.reporting.jobs import expand_sweep
from mipo.reporting.summary import Stat, SummaryRow, headline_metric, spread_note
from mipo.reporting.sweep import AggregateError, collect_runs

SWEEP = ["loss.beta=0.1,0.5", "negatives=random,partial", "seed=0,1"]


def write_job(sweep: Path, number: int, overrides: list[str], *, pairs: int = 64, steps: int = 16,
              base_strict: float = 0.2, delta_strict: float = 0.05, evaluated: bool = True,
              lora_rank: int | None = None) -> Path:
    """A job folder as pipeline.py -m leaves it, with paired deltas and train.json's pairs and steps."""
    job = sweep / f"{number}_{','.join(overrides)}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"task": {"name": "arc_challenge"}, "model": {"name": "smollm2-135m-instruct"},
              **({"lora": {"rank": lora_rank}} if lora_rank is not None else {})}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / "train.json").write_text(json.dumps({"steps": steps, "optimizer_steps": steps, "pairs": pairs,
                                                "final_loss": 0.5}))
    if evaluated:
        models = {"base": {"accuracy_strict": base_strict, "mi_per_token_mean": 3.0},
                  "trained": {"accuracy_strict": base_strict + delta_strict, "mi_per_token_mean": 3.2}}
        deltas = {"accuracy_strict": {"mean": delta_strict, "stderr": 0.02},
                  "mi_per_token_mean": {"mean": 0.2, "stderr": 0.1}, "mi_mean": {"mean": -1.0, "stderr": 0.5}}
        (job / "eval.json").write_text(json.dumps({"task": "arc_challenge", "models": models, "deltas": deltas}))
    return job


def write_sweep(sweep: Path, skip: tuple[int, ...] = (), **job_settings) -> list[list[str]]:
    """multirun.yaml for ``SWEEP`` and a folder for every job but ``skip``."""
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"hydra": [f"hydra.sweep.dir={sweep}"], "task": SWEEP}}}))
    jobs = expand_sweep(SWEEP)
    for number, job in enumerate(jobs):
        if number not in skip:
            partial = "negatives=partial" in job
            write_job(sweep, number, job, pairs=28 + 10 * (number % 2) if partial else 64, **job_settings)
    return jobs


def test_expand_sweep_in_hydra_job_order():
    jobs = expand_sweep(["experiment=demo_cpu", "trainer.max_steps=4,8", "seed=0,1,2"])
    assert len(jobs) == 6
    assert jobs[0] == ["experiment=demo_cpu", "trainer.max_steps=4", "seed=0"]
    assert jobs[4] == ["experiment=demo_cpu", "trainer.max_steps=8", "seed=1"]  # the first key varies slowest
    with pytest.raises(AggregateError, match="cannot expand the sweep"):
        expand_sweep(["loss.beta=interval(0,1)"])


def test_compact_table_leads_with_the_deltas_and_counts_pairs_steps_seeds(tmp_path: Path):
    write_sweep(tmp_path / "sweep")
    report = aggregate(tmp_path / "sweep", out_dir=tmp_path / "out", x="loss.beta")
    table = (tmp_path / "out" / "summary.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| loss.beta"))
    assert header == ("| loss.beta | negatives | Δ accuracy_strict | base accuracy_strict | Δ mi_per_token_mean | "
                      "Δ mi_mean | pairs | steps | seeds |")
    rows = {tuple(line.split(" | ")[:2]): line for line in table.splitlines() if line.startswith("| 0.")}
    assert rows[("| 0.1", "partial")].endswith("| 28-38 | 16 | 2 |")  # the partial arm's seeds trained on 28 and 38
    assert rows[("| 0.1", "random")].endswith("| 64 | 16 | 2 |")
    assert "± = standard error over seeds (n=2)" in table and "Headline: delta/accuracy_strict" in table
    assert "all 8 jobs complete" in table
    csv_header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"pairs_min", "pairs_max", "steps_min", "trained/accuracy_strict", "train/final_loss"} <= set(csv_header)
    assert tmp_path / "out" / "delta_accuracy_strict_vs_loss.beta.png" in report.written


def test_caption_with_one_seed_says_the_error_is_over_prompts():
    row = SummaryRow(values={}, stats={"delta/mi_mean": Stat(1.0, 0.5, 1)}, n_seeds=1, n_failed=0)
    assert spread_note([row]) == "one seed: ± = that run's standard error over its evaluation prompts (paired for Δ)"
    three = SummaryRow(values={}, stats={"delta/mi_mean": Stat(1.0, 0.5, 3)}, n_seeds=3, n_failed=0)
    assert spread_note([three]) == "± = standard error over seeds (n=3)"
    assert "where a row has 2 or more" in spread_note([row, three])


@pytest.mark.parametrize("base, expected", [
    ({"base/accuracy_strict": 0.1, "base/accuracy_flexible": 0.2}, "delta/accuracy_strict"),
    ({"base/accuracy_strict": 0.0, "base/accuracy_flexible": 0.2}, "delta/accuracy_flexible"),  # format, not answers
    ({"base/accuracy_strict": 0.0, "base/accuracy_flexible": 0.0}, "delta/mi_per_token_mean"),  # nothing gradable
    ({}, "delta/mi_per_token_mean"),  # no gold answers: personalization
])
def test_headline_metric_rule(base, expected):
    deltas = {f"delta/{name.split('/')[1]}": 0.01 for name in base}
    stats = {m: Stat(v, None, 1) for m, v in {**base, **deltas, "delta/mi_per_token_mean": 0.1,
                                                "delta/mi_mean": 1.0}.items()}
    assert headline_metric([SummaryRow(values={}, stats=stats, n_seeds=1, n_failed=0)]) == expected


def test_missing_and_unreadable_jobs_are_listed_with_the_launcher_state(tmp_path: Path):
    sweep = tmp_path / "sweep"
    jobs = write_sweep(sweep, skip=(5,))
    running = next(sweep.glob("2_*"))
    (running / "eval.json").unlink()
    (running / "status.json").write_text(json.dumps({"state": "requeued", "attempts": 2}))
    failed = next(sweep.glob("3_*"))
    (failed / "eval.json").unlink()
    (failed / "status.json").write_text(json.dumps({"state": "failed", "error": "CUDA out of memory\nTraceback"}))
    (next(sweep.glob("4_*")) / ".hydra" / "overrides.yaml").write_text("[unclosed")

    report = aggregate(sweep, out_dir=tmp_path / "out", x="loss.beta")
    assert "4 of 8 jobs complete" in report.text
    assert f"{running.name}: requeued: training finished, no eval.json" in report.text
    assert f"{failed.name}: failed (CUDA out of memory): training finished, no eval.json" in report.text
    assert "cannot read" in report.text and "overrides.yaml" in report.text
    assert [(m.number, m.swept) for m in report.missing] == [(5, tuple(jobs[5]))]
    assert "job 5 of" in report.text and "loss.beta=0.5, negatives=random, seed=1" in report.text
    assert "job 5 of" in (tmp_path / "out" / "summary.md").read_text()
    runs_csv = (tmp_path / "out" / "runs.csv").read_text()
    assert "requeued" in runs_csv and ",failed," in runs_csv


def test_a_config_key_on_x(tmp_path: Path):
    for number, rank in enumerate((8, 8, 16, 16)):
        write_job(tmp_path / "lora", number, ["experiment=demo_cpu", f"seed={number % 2}"], lora_rank=rank,
                  delta_strict=0.01 * rank)
    report = aggregate(tmp_path / "lora", out_dir=tmp_path / "out", x="lora.rank")
    assert [row.values["lora.rank"] for row in report.rows] == [8, 16]
    assert report.rows[1].mean("delta/accuracy_strict") == pytest.approx(0.16)

    write_job(tmp_path / "lora", 4, ["experiment=demo_cpu", "seed=2"])  # a job whose config has no lora
    with pytest.raises(AggregateError, match=r"--x 'lora.rank' is not in the config of 1 of 5 jobs \(4_experiment"):
        aggregate(tmp_path / "lora", out_dir=tmp_path / "out2", x="lora.rank")
    with pytest.raises(AggregateError, match="unknown --x 'no.such.key'"):
        aggregate(tmp_path / "lora", out_dir=tmp_path / "out3", x="no.such.key")
    assert not (tmp_path / "out2").exists()


def test_collect_runs_survives_an_unreadable_overrides_file(tmp_path: Path):
    write_job(tmp_path, 0, ["seed=0"])
    broken = write_job(tmp_path, 1, ["seed=1"])
    (broken / ".hydra" / "overrides.yaml").write_text("seed: 1\n")  # a mapping, not a list
    runs = collect_runs(tmp_path)
    assert [run.readable for run in runs] == [True, False]
    assert runs[1].failed and "should be a YAML list" in runs[1].problem
