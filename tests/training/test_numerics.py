"""A non-finite loss or gradient never trains the policy: it stops the run, naming the step and the
pairs of its batch, or with trainer.skip_nonfinite=true the step is skipped and counted."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mipo.stages.train
from mipo.data.pairs import PairsFile
from mipo.stages.reference import ReferencePass
from mipo.stages.train import NonFiniteError, batch_order, train
from tests.helpers import compose_config, load_weights, write_pairs_file

NAN_PAIR = 5  # the pair whose reference log-prob is made NaN


def config(tmp_path, pairs_file, *overrides):
    return compose_config(
        "model=tiny-llama", f"data.pairs_path={pairs_file}", f"paths.cache_dir={tmp_path / 'cache'}",
        "data.max_length=256", "data.max_prompt_length=128", "trainer.batch_size=2", "trainer.micro_batch_size=1",
        "trainer.lr=1e-3", "trainer.warmup_ratio=1.0", "trainer.epochs=2", "kernel=torch", *overrides)


@pytest.fixture
def nan_reference(monkeypatch):
    """The real reference log-probs, with pair NAN_PAIR's log pi_ref(y+|x) set to NaN."""
    real = ReferencePass.logps

    def with_nan(self, *args, **kwargs):
        reference = real(self, *args, **kwargs)
        reference.chosen = reference.chosen.clone()
        reference.chosen[NAN_PAIR] = float("nan")
        return reference

    monkeypatch.setattr(ReferencePass, "logps", with_nan)


def nan_steps(num_pairs, batch_size, epochs, seed=0):
    return [s for s, batch in enumerate(batch_order(num_pairs, batch_size, epochs, seed), start=1) if NAN_PAIR in batch]


@pytest.mark.parametrize("uids", [True, False])
def test_nonfinite_loss_stops_the_run_naming_step_and_pairs(tmp_path, nan_reference, uids):
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", 8, uids=uids)
    first = nan_steps(8, 2, 2)[0]
    batch = next(b for s, b in enumerate(batch_order(8, 2, 2, 0), start=1) if s == first)
    with pytest.raises(NonFiniteError) as error:
        train(config(tmp_path, pairs_file), tmp_path / "run", PairsFile.hashed(pairs_file))
    message = str(error.value)
    assert message.startswith(f"step {first}: the loss (nan)")
    names = [f"q{i}" for i in batch] if uids else [f"{pairs_file} line {i + 1}" for i in batch]
    assert str(names) in message and "trainer.skip_nonfinite=true" in message
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, first))
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "train.json").exists()


def test_skip_nonfinite_skips_the_update_and_counts_it(tmp_path, nan_reference):
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", 8)
    skipped = nan_steps(8, 2, 2)
    assert len(skipped) == 2 and skipped[0] < 8  # one per epoch, the first one not the last step
    summary = train(config(tmp_path, pairs_file, "trainer.skip_nonfinite=true",
                           "trainer.lr_scheduler=constant_with_warmup"), tmp_path / "run", PairsFile.hashed(pairs_file))
    assert summary["skipped_nonfinite"] == 2 and summary["skipped_steps"] == skipped
    assert summary["optimizer_steps"] == summary["steps"] - 2 == 6
    assert json.loads((tmp_path / "run" / "train.json").read_text())["skipped_steps"] == skipped

    metrics = {m["step"]: m for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(metrics) == list(range(1, 9))
    for step, record in metrics.items():
        assert record["train/skipped_nonfinite"] == sum(s <= step for s in skipped)
        assert ("train/loss" in record) == (step not in skipped)
        assert all(math.isfinite(v) for k, v in record.items() if k != "time")
    # a skipped step does not advance the warmup: the learning rate follows the optimizer steps taken
    for step in set(metrics) - set(skipped):
        taken = step - 1 - sum(s < step for s in skipped)
        assert metrics[step]["train/lr"] == pytest.approx(1e-3 * min(1.0, taken / 8))  # warmup from 0 over 8 steps
    assert all(torch.isfinite(w).all() for w in load_weights(tmp_path / "run" / "model").values())


def flushes_subnormals() -> bool:
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0


@pytest.mark.parametrize("flush", [True, False])
def test_flush_denormal_holds_during_the_loop_and_is_restored(tmp_path, monkeypatch, flush):
    """trainer.flush_denormal: subnormal gradients (a saturated loss) are flushed in the loop's arithmetic."""
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", 4)
    seen = []
    real = mipo.stages.train.parallel.grad_norm_value

    def observe(norm):
        seen.append(flushes_subnormals())
        return real(norm)

    monkeypatch.setattr(mipo.stages.train.parallel, "grad_norm_value", observe)
    assert not flushes_subnormals()
    train(config(tmp_path, pairs_file, f"trainer.flush_denormal={str(flush).lower()}", "trainer.epochs=1"),
          tmp_path / "run", PairsFile.hashed(pairs_file))
    assert seen == [flush, flush]  # 4 pairs, batches of 2: two steps
    assert not flushes_subnormals()  # restored
