"""Sweeps through Hydra's submitit launcher with its local executor (hydra/launcher=local), on CPU:

* a 2x2 pipeline multirun gives every job the eval.json numbers the basic launcher gives it, in one sweep
  directory pinned by the launching process, and a status.json per job;
* a job of 2 tasks (tasks_per_node=2, gloo, DDP) trains to the weights of one process;
* a job sent submitit's checkpoint signal mid-training checkpoints, is requeued, resumes (a bare train.py job,
  without trainer.resume=true), and ends bitwise equal (fp32) to an uninterrupted run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import (
    ROOT,
    entry_env,
    load_weights,
    run_entry,
    tiny_overrides,
    write_pairs_file,
)

SWEEP = ["negatives=random,partial", "seed=0,1"]  # no two jobs share a pairs file: they run at the same time


def multirun(script: str, overrides: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), "-m", *overrides], check=False, cwd=cwd,
                          env=entry_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0 and "Error executing job" not in proc.stdout, proc.stdout[-4000:]
    return proc


def job_dirs(sweep: Path) -> dict[str, Path]:
    """{the job's task overrides but the cache, joined: its directory}."""
    found = {}
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        job = overrides.parent.parent
        lines = [line[2:] for line in overrides.read_text().splitlines() if not line.startswith("- paths.")]
        found[",".join(sorted(lines))] = job
    return found


def pipeline_overrides(cache: Path) -> list[str]:
    small = [o for o in tiny_overrides(cache)
             if not o.startswith(("data.num_train", "data.num_eval", "paths.", "trainer.batch_size"))]
    return [*small, "data.num_train=12", "data.num_eval=4", "trainer.batch_size=2", "trainer.max_steps=2",
            "eval.identity=false", f"paths.cache_dir={cache}", *SWEEP]


# about 85-140 s on 2 shared cores: 4 jobs in 4 processes, and the same 4 in one
def test_local_launcher_gives_each_job_the_basic_launchers_numbers(tmp_path: Path) -> None:
    multirun("pipeline.py", [*pipeline_overrides(tmp_path / "cache-basic"), f"hydra.sweep.dir={tmp_path / 'basic'}"],
             ROOT)
    # no hydra.sweep.dir: multirun/<date>/<time> under the working directory, resolved once by this process
    proc = multirun("pipeline.py", ["hydra/launcher=local", *pipeline_overrides(tmp_path / "cache-local")], tmp_path)
    assert "submitit sweep: every job is composed with hydra.sweep.dir='multirun/" in proc.stdout
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps  # every job, each in its own process, in the launching process's directory
    basic, local = job_dirs(tmp_path / "basic"), job_dirs(sweeps[0])
    assert len(basic) == 4 and basic.keys() == local.keys()
    for name, job in local.items():
        theirs = json.loads((basic[name] / "eval.json").read_text())
        mine = json.loads((job / "eval.json").read_text())
        for part in ("models", "deltas"):
            differ = {f"{model}.{key}": (value, mine[part][model].get(key))
                      for model, values in theirs[part].items() for key, value in values.items()
                      if mine[part][model].get(key) != value}
            assert not differ, (name, part, differ)
        status = json.loads((job / "status.json").read_text())
        assert status["state"] == "finished" and status["attempts"] == 1 and status["world_size"] == 1
        assert json.loads((basic[name] / "status.json").read_text())["state"] == "finished"
    assert len(list((tmp_path / "cache-local" / "pairs").glob("*.jsonl"))) == 4  # the local jobs computed their own


def train_overrides(tmp_path: Path, epochs: int = 1) -> list[str]:
    """16 pairs, batches of 4 (micro-batches of 2): 4 steps per epoch."""
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", 16)
    return ["model=tiny-llama", f"data.pairs_path={pairs}", f"paths.cache_dir={tmp_path / 'cache'}",
            "trainer.batch_size=4", "trainer.micro_batch_size=2", "trainer.lr=1e-3", "trainer.warmup_ratio=0",
            "data.max_length=256", "data.max_prompt_length=128", f"trainer.epochs={epochs}"]


def test_a_job_of_two_tasks_trains_to_the_weights_of_one_process(tmp_path: Path) -> None:
    overrides = train_overrides(tmp_path)
    run_entry("train.py", overrides, tmp_path / "single")
    proc = multirun("train.py", ["hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "trainer.strategy=ddp",
                                 *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}"], ROOT)
    (job,) = job_dirs(tmp_path / "sweep").values()
    log = "\n".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob("*/*_0_log.*"))
    assert "2 x 1 accumulation x 2 ranks, ddp" in log, (log[-3000:], proc.stdout[-2000:])
    status = json.loads((job / "status.json").read_text())
    assert status["state"] == "finished" and status["world_size"] == 2
    single = load_weights(tmp_path / "single" / "model")
    for key, value in load_weights(job / "model").items():
        torch.testing.assert_close(value, single[key], atol=1e-5, rtol=0)


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_preempted_job_is_requeued_and_ends_bitwise_equal(tmp_path: Path) -> None:
    overrides = train_overrides(tmp_path, epochs=40)  # 160 steps: time to send the signal mid-training
    run_entry("train.py", overrides, tmp_path / "uninterrupted")
    sweep = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=local",  # no trainer.resume: the job's own
               *overrides, f"hydra.sweep.dir={sweep}"]
    launcher = subprocess.Popen(command, cwd=ROOT, env=entry_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        def training() -> bool:
            metrics = list(sweep.glob("*/metrics.jsonl"))
            return bool(metrics) and len(metrics[0].read_text().splitlines()) >= 3

        wait_for(training, "the job to train 3 steps")
        (job,) = job_dirs(sweep).values()
        status = json.loads((job / "status.json").read_text())
        signal_sent = time.monotonic()
        subprocess.run(["kill", "-USR2", str(status["pid"])], check=True)  # what SLURM sends before a time limit
        output, _ = launcher.communicate(timeout=600)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, output[-4000:]
    assert time.monotonic() - signal_sent > 0
    log = "\n".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "checkpointing after this training step, then requeueing" in log, log[-4000:]
    assert "resuming from" in log and "Requeued job" in log
    status = json.loads((job / "status.json").read_text())
    assert status["state"] == "finished" and status["attempts"] == 2
    assert [h["state"] for h in status["history"]] == ["running", "requeued", "running", "finished"]
    uninterrupted = load_weights(tmp_path / "uninterrupted" / "model")
    resumed = load_weights(job / "model")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in resumed.items():
        assert value.dtype == torch.float32 and torch.equal(value, uninterrupted[key]), key
    strip = [{k: v for k, v in json.loads(line).items() if k != "time"}
             for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "time"}
                     for line in (tmp_path / "uninterrupted" / "metrics.jsonl").read_text().splitlines()]
    assert len(strip) == 160
    assert signal.SIGUSR2  # the default checkpoint signal (SUBMITIT_PREEMPT_SIGNAL unset)
