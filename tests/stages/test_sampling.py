"""The sampling stage: pairs metadata, content-addressed path, and resuming after SIGKILL byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mipo.stages.keys import pairs_key, pairs_path
from mipo.stages.sample import ChunkStore, PartialSamplesError

ROOT = Path(__file__).resolve().parents[2]


def overrides(cache: Path) -> list[str]:
    return ["model=tiny-llama", "task=arc_challenge", "data.source=offline", "data.num_train=24",
            "data.max_length=768", "data.max_prompt_length=700", "sampling.max_new_tokens=24",
            "sampling.batch_size=2", "sampling.chunk_size=2", "negatives.reuse_positives=false",
            f"paths.cache_dir={cache}"]


def composed(*extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(extra))


def start_sampling(args: list[str], run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "Error executing job" not in out, out[-3000:]
    return out


def test_killed_sampling_resumes_to_the_same_file(tmp_path: Path) -> None:
    # an uninterrupted run
    finish(start_sampling(overrides(tmp_path / "a"), tmp_path / "run_a"))
    (reference,) = (tmp_path / "a" / "pairs").glob("*.jsonl")

    # the same run, SIGKILLed once some chunks are on disk, then started again
    args = overrides(tmp_path / "b")
    proc = start_sampling(args, tmp_path / "run_b1")
    partial = tmp_path / "b" / "pairs" / (reference.name + ".partial")
    deadline = time.monotonic() + 600
    while len(list(partial.glob("chosen-*.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "sampling ended before it could be killed"
    written = len(list(partial.glob("*-*.json")))
    assert written >= 2 and not (tmp_path / "b" / "pairs" / reference.name).exists()

    out = finish(start_sampling(args, tmp_path / "run_b2"))
    assert "chosen: resuming" in out, out[-3000:]
    resumed = tmp_path / "b" / "pairs" / reference.name
    assert resumed.read_bytes() == reference.read_bytes()
    assert not partial.exists()

    rows = [json.loads(line) for line in reference.read_text().splitlines()]
    assert len(rows) == 24 and len({r["uid"] for r in rows}) == 24
    assert all(r["chosen_finish_reason"] in ("eos", "length") for r in rows)


def test_partial_samples_of_other_inputs_are_refused(tmp_path: Path) -> None:
    from mipo.model.generation import Plan

    plan = Plan((), ((0, 1),), 2, 2)
    folder = tmp_path / "x.jsonl.partial"
    ChunkStore(folder, "inputs-a", {"chosen": plan}).open()
    with pytest.raises(PartialSamplesError, match=r"meta.json: field 'inputs' is 'inputs-a'"):
        ChunkStore(folder, "inputs-b", {"chosen": plan}).open()
    (folder / "chosen-00000.json").write_text(json.dumps({"indices": [1, 0], "generations": [{}, {}]}))
    with pytest.raises(PartialSamplesError, match=r"chosen-00000.json: field 'indices'"):
        ChunkStore(folder, "inputs-a", {"chosen": plan}).load("chosen")


def test_pairs_path_changes_with_every_sampling_setting(tmp_path: Path) -> None:
    base = composed("model=tiny-llama", f"paths.cache_dir={tmp_path}")
    seen = {pairs_path(base)}
    for override in ("sampling.top_k=5", "sampling.temperature=0.7", "sampling.batch_size=4",
                     "sampling.chunk_size=8", "sampling.max_batch_tokens=4096", "sampling.overwrite=true",
                     # the numerics of the decode and how prompts are rendered
                     "model.dtype=bfloat16", "device=cuda", "model.attn_implementation=eager",
                     "model.chat_template_kwargs.date_string='01 Jan 2025'"):
        path = pairs_path(composed("model=tiny-llama", f"paths.cache_dir={tmp_path}", override))
        if override.startswith("sampling.overwrite"):
            assert path == pairs_path(base)  # what to do, not what is sampled
        else:
            assert path not in seen, override
            seen.add(path)
    assert pairs_key(base)["seeding"] == "per-prompt-v1"
