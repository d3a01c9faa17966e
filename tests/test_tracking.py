"""Metrics go to metrics.jsonl always, and to wandb only when asked, without an account."""

from __future__ import annotations

import json

import pytest

from mipo.tracking import MetricsLogger


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
