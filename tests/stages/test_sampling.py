"""The sampling stage: pairs metadata, content-addressed path, and resuming after SIGKILL byte for byte."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mipo.data.pairs import PairsFile, pairs_meta_path, read_pairs_meta
from mipo.stages.keys import pairs_key, pairs_path
from mipo.stages.sample import ChunkStore, PartialSamplesError, sample_pairs
from tests.helpers import compose_config, tiny_overrides

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
    settings = {"sampling": {"top_p": 0.9, "temperature": 0.1}, "seed": 0}
    ChunkStore(folder, settings, {"chosen": plan}).open()
    other = {"sampling": {"top_p": 0.8, "temperature": 0.1}, "seed": 0}
    with pytest.raises(PartialSamplesError, match=r"meta.json: these partial samples were written for other settings "
                                                  r"\(sampling.top_p was 0.9, now 0.8\); delete the folder"):
        ChunkStore(folder, other, {"chosen": plan}).open()
    (folder / "chosen-00000.json").write_text(json.dumps({"indices": [1, 0], "generations": [{}, {}]}))
    with pytest.raises(PartialSamplesError, match=r"chosen-00000.json: field 'indices'"):
        ChunkStore(folder, settings, {"chosen": plan}).load("chosen")


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
    # the attention a model actually runs: auto is eager for a class without sdpa (Bloom), as load_model picks
    bloom = composed("model=tiny-llama", f"paths.cache_dir={tmp_path}", "model.attn_implementation=auto",
                     "model.config.model_type=bloom")
    assert pairs_key(bloom)["inference"]["attn_implementation"] == "eager"
    assert pairs_key(base)["inference"]["attn_implementation"] == "sdpa"


# --------------------------------------------------------------------------------------------
# The prompts a strategy keeps: negatives.prompt_set and the pairs file's sidecar
# --------------------------------------------------------------------------------------------

def _sample(tmp_path: Path, *extra: str) -> tuple[Path, list[dict]]:
    cfg = compose_config(*tiny_overrides(tmp_path), "data.num_train=12", "sampling.max_new_tokens=2", *extra)
    path = sample_pairs(cfg, pairs_path(cfg))
    return path, [json.loads(line) for line in path.read_text().splitlines()]


def test_prompt_set_partial_gives_every_strategy_the_partial_prompts_and_the_sidecar_counts_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mipo.stages.sample")
    _, own_random = _sample(tmp_path, "negatives=random")
    assert not [r for r in caplog.records if r.name == "mipo.stages.sample" and r.levelno >= logging.WARNING]
    caplog.clear()
    partial_path, partial = _sample(tmp_path, "negatives=partial")
    drops = [r for r in caplog.records if r.name == "mipo.stages.sample" and "dropped" in r.getMessage()]
    assert drops and all(r.levelno == logging.WARNING for r in drops), [r.getMessage() for r in caplog.records]
    random_path, random_rows = _sample(tmp_path, "negatives=random", "negatives.prompt_set=partial")
    _, partial_again = _sample(tmp_path, "negatives=partial", "negatives.prompt_set=partial")

    assert len(own_random) == 12 and 0 < len(partial) < 12  # offline ARC-Challenge: some questions have one sentence
    assert [r["uid"] for r in random_rows] == [r["uid"] for r in partial]  # the same prompts, in the same order
    assert partial_again == partial  # the partial arm's pairs do not change under prompt_set=partial

    meta = read_pairs_meta(PairsFile.hashed(random_path))
    dropped = sorted({r["uid"] for r in own_random} - {r["uid"] for r in partial})
    assert meta["strategy"] == "random" and meta["prompt_set"] == "partial"
    assert (meta["prompts_offered"], meta["kept"], meta["dropped"]) == (12, len(partial), 12 - len(partial))
    assert sorted(meta["dropped_uids"]) == dropped and "prompt_set=partial" in meta["reason"]
    partial_meta = read_pairs_meta(PairsFile.hashed(partial_path))
    assert sorted(partial_meta["dropped_uids"]) == dropped and partial_meta["prompt_set"] == "own"

    # a sidecar that describes other pairs is not trusted
    pairs_meta_path(partial_path).write_text(pairs_meta_path(random_path).read_text())
    assert read_pairs_meta(PairsFile.hashed(partial_path)) is None
    assert read_pairs_meta(partial_path)["strategy"] == "random"  # a bare path: read as it is


def test_prompt_set_is_in_the_pairs_key_and_checked(tmp_path: Path) -> None:
    from mipo.stages.config import config_problems

    own = composed("model=tiny-llama", f"paths.cache_dir={tmp_path}")
    restricted = composed("model=tiny-llama", f"paths.cache_dir={tmp_path}", "negatives.prompt_set=partial")
    assert pairs_path(own) != pairs_path(restricted)
    bad = composed("model=tiny-llama", f"paths.cache_dir={tmp_path}", "negatives.prompt_set=shared")
    assert any("negatives.prompt_set=shared" in p for p in config_problems(bad))
    assert not any("prompt_set" in p for p in config_problems(restricted))
