"""Metrics go to metrics.jsonl always, and to wandb only when asked, without an account."""

from __future__ import annotations

import json

import pytest

from mipo.runtime.tracking import MetricsLogger


def test_metrics_jsonl_without_wandb(tmp_path):
    logger = MetricsLogger(tmp_path, {"mode": "disabled"})
    logger.log({"train/loss": 0.69}, step=1)
    logger.log({"train/loss": 0.5}, step=2)
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 0.69), (2, 0.5)]
    assert not (tmp_path / "wandb").exists()


def test_wandb_offline_needs_no_account(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = MetricsLogger(tmp_path, {"mode": "offline", "project": "mipo-test"}, {"loss": {"beta": 0.1}})
    logger.log({"train/loss": 0.69}, step=1)
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_unknown_wandb_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="wandb.mode='cloud'"):
        MetricsLogger(tmp_path, {"mode": "cloud"})


def test_a_resumed_logger_cuts_off_the_steps_after_its_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, {"mode": "disabled"})
    logger.log({"train/loss": 0.7}, step=1)
    position = logger.position()  # what a checkpoint after step 1 stores
    logger.log({"train/loss": 0.6}, step=2)  # logged, then the process was killed
    logger.close()

    resumed = MetricsLogger(tmp_path, {"mode": "disabled"}, resume=position)
    resumed.log({"train/loss": 0.6}, step=2)
    resumed.log({"train/loss": 0.5}, step=3)
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in records] == [(1, 0.7), (2, 0.6), (3, 0.5)]
    assert records[1]["time"] >= round(position["elapsed"], 3) - 0.001  # the clock goes on from the checkpoint

    fresh = MetricsLogger(tmp_path, {"mode": "disabled"})  # a run that starts again starts a new file
    fresh.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resuming_a_shortened_metrics_file_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="has 12 bytes but the checkpoint logged 40"):
        MetricsLogger(tmp_path, {"mode": "disabled"}, resume={"bytes": 40, "elapsed": 1.0, "wandb_id": None})
