"""A real 2x2 Hydra multirun (loss.beta x negatives) through pipeline.py, then aggregate.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_multirun_sweep_then_aggregate(tmp_path: Path) -> None:
    sweep_dir, cache = tmp_path / "sweep", tmp_path / "cache"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, "pipeline.py", "-m", "loss.beta=0.1,0.5", "negatives=random,partial",
        "model=tiny-llama", "task=arc_challenge", "data.source=offline",
        "data.num_train=12", "data.num_eval=4", "data.max_length=768", "data.max_prompt_length=700",
        "sampling.max_new_tokens=8", "eval.max_new_tokens=8", "eval.mi_k=2",
        "trainer.batch_size=2", "trainer.micro_batch_size=2", "trainer.lr=1e-3", "trainer.max_steps=2",
        f"paths.cache_dir={cache}", f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "Error executing job" not in proc.stdout, proc.stdout[-3000:]

    jobs = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").exists())
    assert len(jobs) == 4
    for job in jobs:  # each job has its own directory with its resolved config and results
        assert (job / ".hydra" / "config.yaml").exists() and (job / "eval.json").exists()

    # One pairs file and one reference cache per negative strategy, shared across betas: the
    # second beta of each strategy hits the cache and never loads the reference model.
    assert len(list((cache / "pairs").glob("*.jsonl"))) == 2
    assert len(list((cache / "reference").glob("*.pt"))) == 2
    hits = [json.loads((job / "train.json").read_text())["reference_cache_hit"] for job in jobs]
    assert sorted(hits) == [False, False, True, True]
    assert proc.stdout.count("reference cache hit") == 2
    assert proc.stdout.count("reference cache miss") == 2
    # The base model is evaluated once for the whole sweep.
    assert proc.stdout.count("evaluation of the base model: cached") == 3

    agg = subprocess.run([sys.executable, "aggregate.py", str(sweep_dir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert agg.returncode == 0, agg.stderr
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {(float(r["loss.beta"]), r["negatives"]) for r in rows} == {
        (0.1, "random"), (0.5, "random"), (0.1, "partial"), (0.5, "partial")}
    for row in rows:
        job = next(j for j in jobs if f"loss.beta={float(row['loss.beta'])}" in j.name and f"negatives={row['negatives']}" in j.name)
        results = json.loads((job / "eval.json").read_text())
        assert float(row["trained/mi_mean"]) == results["models"]["trained"]["mi_mean"]
        assert float(row["base/accuracy_strict"]) == results["models"]["base"]["accuracy_strict"]
        assert float(row["trained/accuracy_flexible"]) == results["models"]["trained"]["accuracy_flexible"]
        assert float(row["trained/mi_per_token_mean"]) == results["models"]["trained"]["mi_per_token_mean"]
        # one seed: the delta is the run's paired comparison, its error bar the paired standard error
        assert float(row["delta/mi_mean"]) == results["deltas"]["mi_mean"]["mean"]
        assert float(row["delta/mi_mean_sem"]) == results["deltas"]["mi_mean"]["stderr"]
        assert float(row["delta/accuracy_strict"]) == results["deltas"]["accuracy_strict"]["mean"]
        assert float(row["train/final_loss"]) == json.loads((job / "train.json").read_text())["final_loss"]
    # all jobs share the base model's evaluation
    assert len({r["base/mi_mean"] for r in rows if r["negatives"] == "random"}) == 1
    assert "| loss.beta | negatives |" in (sweep_dir / "summary.md").read_text()
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in sweep_dir.iterdir())
