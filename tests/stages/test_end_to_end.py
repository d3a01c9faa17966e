"""The method end to end through the real entry points, on a tiny random Llama.

sample.py -> train.py (twice: the second run must hit the reference cache) -> evaluate.py,
each a subprocess composed with Hydra overrides, exactly as a user runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_entry, tiny_overrides


def test_sample_train_evaluate(tmp_path: Path) -> None:
    overrides = tiny_overrides(tmp_path)

    sampled = run_entry("sample.py", overrides, tmp_path / "sample")
    pairs_files = list((tmp_path / "cache" / "pairs").glob("*.jsonl"))
    assert len(pairs_files) == 1
    rows = [json.loads(line) for line in pairs_files[0].read_text().splitlines()]
    assert len(rows) == 8
    for row in rows:
        assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"]
        assert row["chosen"][0]["role"] == "assistant" and row["rejected"][0]["role"] == "assistant"
        assert row["strategy"] == "random" and row["negative_prompt"] != row["prompt"]
        assert row["sampling"] == {"temperature": 0.1, "top_p": 0.9, "top_k": None, "max_new_tokens": 12,
                                   "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0,
                                   "seeding": "per-prompt-v1", "seed": 0, "batch_size": 8, "chunk_size": 256}
        assert row["chosen_finish_reason"] in ("eos", "length") and row["rejected_finish_reason"] in ("eos", "length")
    assert "cut at max_new_tokens=12" in sampled.stdout and "prompts cut to data.max_prompt_length" in sampled.stdout
    assert not list((tmp_path / "cache" / "pairs").glob("*.partial"))  # removed once the pairs file is written
    # random negatives reuse another prompt's positive: every rejected is some row's chosen
    chosen = [r["chosen"][0]["content"] for r in rows]
    uid_to_chosen = {r["uid"]: r["chosen"][0]["content"] for r in rows}
    assert all(r["rejected"][0]["content"] == uid_to_chosen[r["negative_uid"]] for r in rows)
    assert all(r["negative_uid"] != r["uid"] for r in rows)
    assert len(set(chosen)) > 1

    first = run_entry("train.py", overrides, tmp_path / "train1")
    assert "reference cache miss" in first.stdout
    summary = json.loads((tmp_path / "train1" / "train.json").read_text())
    truncated = sum(r["chosen_finish_reason"] == "length" for r in rows) / len(rows)
    assert summary["chosen_truncated_fraction"] == pytest.approx(truncated)
    metrics = [json.loads(line) for line in (tmp_path / "train1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("loss", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected", "grad_norm"):
        assert all(f"train/{key}" in m for m in metrics), key
    assert abs(metrics[0]["train/loss"] - 0.6931) < 1e-3  # policy == reference at the first step
    assert (tmp_path / "train1" / "model" / "config.json").exists()
    assert (tmp_path / "train1" / ".hydra" / "config.yaml").exists()
    resolved = (tmp_path / "train1" / "config_resolved.yaml").read_text()
    assert "micro_batch_size: 2" in resolved and "${" not in resolved

    second = run_entry("train.py", [*overrides, "loss.beta=0.5"], tmp_path / "train2")
    assert "reference cache hit" in second.stdout
    assert len(list((tmp_path / "cache" / "reference").glob("*.pt"))) == 1

    evaluation = run_entry("evaluate.py", [*overrides, f"eval.model_path={tmp_path / 'train1' / 'model'}"],
                           tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(results["models"]) == {"base", "trained"}
    for row in results["models"].values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["mi_stderr"] >= 0
    assert "| base |" in evaluation.stdout and "| trained |" in evaluation.stdout
    assert "| trained − base |" in evaluation.stdout and "accuracy flexible" in evaluation.stdout
    assert {"accuracy_strict", "accuracy_flexible", "mi_mean", "mi_per_token_mean"} <= set(results["deltas"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("task=no_such_task", "Could not find 'task/no_such_task'"),
        ("negatives.strategy=bogus", "unknown negatives.strategy 'bogus'"),
        ("model.name_or_path=./no/such/model", "no such file or directory"),
        ("trainer.no_such_key=1", "Could not override 'trainer.no_such_key'"),
    ],
)
def test_bad_configuration_is_reported_clearly(tmp_path: Path, override: str, message: str) -> None:
    overrides = tiny_overrides(tmp_path)
    if override.startswith("model.name_or_path"):
        overrides = [o for o in overrides if not o.startswith("model=")] + ["model=llama-3.2-1b-instruct"]
    proc = run_entry("sample.py", [*overrides, override], tmp_path / "run", expect_ok=False)
    assert message in proc.stdout, proc.stdout[-2000:]


def test_bad_pairs_file_names_file_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "pairs.jsonl"
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    proc = run_entry("train.py", [*tiny_overrides(tmp_path), f"data.pairs_path={bad}"], tmp_path / "run", expect_ok=False)
    assert f"{bad} line 2: field 'rejected' is missing" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("strategy", ["partial", "random_context"])
def test_personalization_pipeline_measures_conditional_mi(tmp_path: Path, strategy: str) -> None:
    overrides = [o for o in tiny_overrides(tmp_path) if not o.startswith(("task=", "data.max"))] + [
        "task=persistbench", f"negatives={strategy}", "data.max_length=1400", "data.max_prompt_length=1300"]
    proc = run_entry("pipeline.py", overrides, tmp_path / "run")
    pairs_file = next((tmp_path / "cache" / "pairs").glob("*.jsonl"))
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert len(rows) == 8 and all(r["strategy"] == strategy for r in rows)
    for row in rows:
        prompt, negative = row["prompt"][-1]["content"], row["negative_prompt"][-1]["content"]
        assert negative != prompt
        query = prompt.rsplit("\n\n", 1)[-1]
        assert negative.endswith(query)  # same query: only the user's context was removed or swapped
        if strategy == "partial":
            assert negative == query
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert results["mi"] == "conditional pmi(c; y | q)"
    assert "accuracy" not in results["models"]["base"]
    assert "| base |" in proc.stdout
