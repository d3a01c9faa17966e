"""Exact resume through the real entry points: a run killed with SIGKILL and resumed ends with
bitwise the weights of an uninterrupted run, and metrics.jsonl holds each step once with the same
values; the same for pipeline.py's train stage; a finished run is never overwritten; a second
pipeline for the same key is refused while the first trains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mipo.data.pairs import PairsFile
from mipo.runtime.files import BusyError
from mipo.stages import keys
from mipo.stages.pipeline import train_stage
from tests.helpers import (
    ROOT,
    compose_config,
    entry_command,
    entry_env,
    load_weights,
    run_entry,
    tree_hashes,
    write_pairs_file,
)

# 16 pairs, 2 per step, 3 epochs: 24 steps, each fast on the tiny model
TRAIN = ["model=tiny-llama", "data.max_length=256", "data.max_prompt_length=128", "trainer.batch_size=2",
         "trainer.micro_batch_size=1", "trainer.lr=1e-3", "trainer.epochs=3", "kernel=torch"]
STEPS = 24
CHECKPOINTS = ["trainer.checkpoint_every=2", "trainer.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An uninterrupted run without checkpoints: what every resumed run must reproduce."""
    root = tmp_path_factory.mktemp("resume")
    pairs = write_pairs_file(root / "pairs.jsonl", 16)
    overrides = [*TRAIN, f"data.pairs_path={pairs}", f"paths.cache_dir={root / 'cache'}"]
    run_entry("train.py", overrides, root / "uninterrupted")
    return {"root": root, "overrides": overrides, "run": root / "uninterrupted"}


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock time."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def assert_same_run(run_dir: Path, model_dir: Path, reference: Path) -> None:
    expected, got = load_weights(reference / "model"), load_weights(model_dir)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # bitwise
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))  # each step once
    assert metrics(run_dir) == metrics(reference)  # with the same values


def kill_after_step_4(command: list[str], checkpoints: Path) -> None:
    """Start ``command``, SIGKILL it once ``checkpoints/step-4`` exists and step 5 is logged."""
    process = subprocess.Popen(command, cwd=ROOT, env=entry_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics_file = checkpoints.parent / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not ((checkpoints / "step-4").is_dir() and '"step": 5,' in _read(metrics_file)):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 4 within 300 s"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (checkpoints.parent / "train.json").exists(), "the run finished before it was killed"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_sigkill_then_resume_gives_bitwise_the_same_run(uninterrupted):
    run_dir = uninterrupted["root"] / "killed"
    overrides = [*uninterrupted["overrides"], *CHECKPOINTS]
    kill_after_step_4(entry_command("train.py", overrides, run_dir), run_dir / "checkpoints")

    # the same command without trainer.resume=true is refused and changes nothing
    watched = (run_dir, uninterrupted["root"] / "cache", uninterrupted["root"] / "pairs.jsonl")
    before = tree_hashes(*watched)
    refused = run_entry("train.py", overrides, run_dir, expect_ok=False, merge_stderr=False)
    assert refused.returncode == 1
    assert "add trainer.resume=true to continue that run, or overwrite=true to start it again" in refused.stderr
    assert tree_hashes(*watched) == before

    resumed = run_entry("train.py", [*overrides, "trainer.resume=true"], run_dir)
    newest = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert "resuming from" in resumed.stdout and f"(step {STEPS} of {STEPS})" not in resumed.stdout
    assert newest == STEPS and len(list((run_dir / "checkpoints").iterdir())) == 2  # keep_checkpoints=2
    assert_same_run(run_dir, run_dir / "model", uninterrupted["run"])


def test_a_finished_run_is_refused_unless_overwrite(uninterrupted):
    run_dir, overrides = uninterrupted["run"], uninterrupted["overrides"]
    before = tree_hashes(run_dir)
    again = run_entry("train.py", overrides, run_dir, expect_ok=False, merge_stderr=False)
    assert again.returncode == 1 and "holds the outputs of an earlier run (train.json, metrics.jsonl, model)" in again.stderr
    resume = run_entry("train.py", [*overrides, "trainer.resume=true"], run_dir, expect_ok=False, merge_stderr=False)
    assert resume.returncode == 1 and "there is nothing to resume" in resume.stderr
    assert tree_hashes(run_dir) == before  # .hydra/, the log and every output included

    copy = uninterrupted["root"] / "overwritten"
    shutil.copytree(run_dir, copy, symlinks=True)
    run_entry("train.py", [*overrides, "overwrite=true"], copy)
    assert_same_run(copy, copy / "model", run_dir)  # trained again from step 0, metrics not appended


def test_pipeline_resumes_its_train_stage_after_sigkill(uninterrupted):
    root = uninterrupted["root"]
    overrides = [*uninterrupted["overrides"], *CHECKPOINTS, "task=arc_challenge", "data.source=offline",
                 "data.num_train=8", "data.num_eval=4", "eval.max_new_tokens=4", "eval.mi_k=2", "eval.batch_size=4",
                 "eval.score_batch_size=4"]
    run_dir = root / "pipeline"
    command = entry_command("pipeline.py", overrides, run_dir)
    cfg = compose_config(*overrides)
    key = keys.train_dir(cfg, keys.train_key(cfg, PairsFile.hashed(cfg.data.pairs_path))).name
    partial, stage_dir = root / "cache" / "runs" / f"{key}.partial", root / "cache" / "runs" / key
    kill_after_step_4(command, partial / "checkpoints")

    again = run_entry("pipeline.py", overrides, run_dir)  # the same command
    assert f"resuming from {partial}/checkpoints/step-" in again.stdout
    assert not partial.exists() and not (stage_dir / "checkpoints").exists()
    assert_same_run(stage_dir, stage_dir / "model", uninterrupted["run"])
    assert metrics(run_dir) == metrics(stage_dir) and (run_dir / "model").resolve() == (stage_dir / "model").resolve()
    assert json.loads((run_dir / "eval.json").read_text())["models"].keys() == {"base", "trained"}


HOLD_LOCK = """
import sys, time
from mipo.runtime.files import exclusive_lock
with exclusive_lock(sys.argv[1], "a test"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_pipeline_for_the_same_key_is_refused(tmp_path, monkeypatch):
    pairs = PairsFile.hashed(write_pairs_file(tmp_path / "pairs.jsonl", 4))
    cfg = compose_config(*TRAIN, f"data.pairs_path={pairs.path}", f"paths.cache_dir={tmp_path / 'cache'}")
    lock = tmp_path / "cache" / "runs" / f"{keys.train_dir(cfg, keys.train_key(cfg, pairs)).name}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr("mipo.stages.pipeline.train", lambda *a, **k: pytest.fail("trained while another process held the key"))
        with pytest.raises(BusyError, match=rf"the train stage \w+ is already running in another process \(pid {holder.pid};"):
            train_stage(cfg, pairs)
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: the stage may run now
    monkeypatch.setattr("mipo.stages.pipeline.train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("training")))
    with pytest.raises(RuntimeError, match="training"):
        train_stage(cfg, pairs)
    assert os.path.exists(lock)
