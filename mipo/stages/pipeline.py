"""sample -> train -> evaluate for one config, each stage skipped when its outputs exist.

Every stage's output is addressed by a hash of its inputs (``mipo.stages.keys``, one module for all
four keys), so one multirun line can sweep the whole method and only the stages whose inputs changed
are run:

    stage      output                                  keyed by
    sample     <cache>/pairs/<key>.jsonl               model, task, data split, negatives, sampling, seed
    reference  <cache>/reference/<key>.pt              model, tokenizer, pairs content, lengths, numerics
    train      <cache>/runs/<key>/{model,metrics...}   pairs content, model, loss, trainer, lengths, seed
    evaluate   <cache>/eval/<key>.json (per model)     the evaluated model, task, eval split, eval settings

Values are handed on, not derived again: the pairs path comes from the entry point's inputs check, and
the pairs file is hashed once after sampling (``PairsFile``); the digest goes to the train key and the
reference key.

A sweep over ``loss.beta`` therefore samples once, computes reference log-probs once and
evaluates the base model once. The run directory of each job receives copies of the small
outputs (``train.json``, ``metrics.jsonl``, ``eval.json``, ...) and a ``model`` link to the
trained weights.

The train stage trains into ``<cache>/runs/<key>.partial`` and renames it to ``<key>`` when
done. The partial folder's name is stable, so a pipeline killed while training continues
from that folder's newest checkpoint when it is run again (``trainer.checkpoint_every``); a
lock (``<key>.lock``) refuses a second process that would train the same key at the same time.

Iterative MIPO (``rounds=R``, R > 1): after round r, round r's trained policy samples the next
round's pairs and is its reference (``next_round_config``: the model config points at round r's
``model`` folder, so every key above changes with it and the rounds' pairs, reference caches and
policies are kept apart in the cache). Each round is evaluated against the original base model
and gets ``<run dir>/round-<r>/`` (``eval.json``, ``train.json``, ``metrics.jsonl``, links ``model``
and ``pairs.jsonl``); the run directory itself receives the last round's outputs and
``rounds.json``, one row per round. Run again, a finished round is skipped stage by stage (all are
content-addressed) and an unfinished one resumes where its stages stopped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from mipo.data.pairs import (
    PairsFile,
    PreferencePair,
    identical_pairs_problem,
    max_identical_fraction,
    read_pairs,
)
from mipo.runtime import distributed
from mipo.runtime.errors import failed, is_int, raise_problems
from mipo.runtime.files import exclusive_lock, write_json
from mipo.stages import keys
from mipo.stages.evaluate import evaluate
from mipo.stages.sample import sample_pairs
from mipo.stages.train import train
from mipo.training.checkpoint import clear_checkpoints

log = logging.getLogger(__name__)
TRAIN_OUTPUTS = ("train.json", "metrics.jsonl")
EVAL_OUTPUTS = ("eval.json", "responses.jsonl", "eval_table.md", "identity.png")


def train_stage(cfg: DictConfig, pairs_file: PairsFile, pairs: list[PreferencePair] | None = None) -> Path:
    """Train unless a policy for exactly these inputs exists; returns its directory.

    A run of the same key that was killed is resumed from its newest checkpoint.
    """
    stage_dir = keys.train_dir(cfg, keys.train_key(cfg, pairs_file))
    runs, key = stage_dir.parent, stage_dir.name

    def done() -> bool:
        return (stage_dir / "train.json").exists() and (stage_dir / "model").exists()

    if distributed.broadcast_object(done()):  # under torchrun rank 0 decides and holds the lock for all ranks
        log.info("train stage: outputs exist for these inputs, skipping (%s)", stage_dir)
        return stage_dir
    main = distributed.is_main()
    with exclusive_lock(runs / f"{key}.lock", what=f"the train stage {key}") if main else contextlib.nullcontext():
        if distributed.broadcast_object(done()):  # finished by another process while this one waited to start
            return stage_dir
        partial = runs / f"{key}.partial"
        summary = train(cfg, partial, pairs_file, pairs=pairs, resume=True)
        if main:
            clear_checkpoints(partial)  # the cache keeps the trained policy, not its optimizer states
            summary["model_dir"] = str(stage_dir / "model")
            if (partial / "adapter").is_dir():  # LoRA: the adapter in peft's format beside the merged model
                summary["adapter_dir"] = str(stage_dir / "adapter")
            write_json(partial / "train.json", summary)
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.replace(partial, stage_dir)
        distributed.barrier()
    return stage_dir


def run_pipeline(cfg: DictConfig, output_dir: str | Path, pairs_path: Path,
                 pairs: list[PreferencePair] | None = None) -> dict[str, Any]:
    """Run the three stages of ``cfg`` (``rounds`` times for iterative MIPO); returns the (last round's) evaluation.

    ``pairs_path``: where the (first round's) pairs are (``mipo.stages.keys.pairs_path``, from the inputs check);
    ``pairs``: the contents of that file when it existed before and was read already. The file is hashed
    once, after sampling, and the digest handed to the train stage's key and the reference cache's.
    The run directory receives the training outputs after the evaluation, so that a run killed
    while evaluating left nothing in it that would stop it from being run again.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rounds = int(cfg.get("rounds", 1))
    if rounds == 1:
        pairs_file, pairs = sampled_pairs(cfg, pairs_path, pairs)
        stage_dir = train_stage(cfg, pairs_file, pairs)
        results = evaluate(cfg, output_dir, model_path=stage_dir / "model", trained_id=stage_dir.name)
        _publish_training(stage_dir, output_dir)
        return results

    round_cfg, summary = cfg, []
    for r in range(1, rounds + 1):
        round_dir = output_dir / f"round-{r}"
        log.info("iterative MIPO: round %d of %d (policy and reference: %s)", r, rounds, round_cfg.model.name_or_path
                 if r > 1 else "the base model")
        pairs_file, round_pairs = sampled_pairs(round_cfg, pairs_path if r == 1 else keys.pairs_path(round_cfg),
                                                pairs if r == 1 else None)
        stage_dir = train_stage(round_cfg, pairs_file, round_pairs)
        results = evaluate(cfg, round_dir, model_path=stage_dir / "model", trained_id=stage_dir.name)  # vs the base
        _publish_training(stage_dir, round_dir)
        if distributed.is_main():
            _link(round_dir / "pairs.jsonl", pairs_file.path.resolve(), directory=False)
        summary.append({"round": r, "pairs": str(pairs_file.path), "model_dir": str(stage_dir / "model"),
                        "sampled_and_reference_by": "base" if r == 1 else str(round_cfg.model.name_or_path),
                        "models": results["models"]})
        round_cfg = next_round_config(cfg, stage_dir / "model")
    if not distributed.is_main():  # under torchrun rank 0 writes the files
        return results
    for name in EVAL_OUTPUTS:
        if (round_dir / name).exists():
            shutil.copy2(round_dir / name, output_dir / name)
    _publish_training(stage_dir, output_dir)
    write_json(output_dir / "rounds.json", {"rounds": rounds, "per_round": summary})
    return results


def sampled_pairs(cfg: DictConfig, path: Path,
                  pairs: list[PreferencePair] | None) -> tuple[PairsFile, list[PreferencePair]]:
    """The pairs the train stage trains on: sampled unless ``path`` exists, hashed once, and (where the inputs
    check did not read them: ``pairs`` is None) read and checked as train.py's inputs check would, so that
    pairs of which too many have chosen == rejected (``data.max_identical_fraction``) stop here, one line."""
    pairs_file = PairsFile.hashed(sample_pairs(cfg, path))
    if pairs is None:
        pairs = read_pairs(pairs_file.path)
        identical = identical_pairs_problem(pairs, pairs_file.path, max_identical_fraction(cfg.data))
        raise_problems("the sampled pairs", [identical] if identical else [])
    return pairs_file, pairs


def next_round_config(cfg: DictConfig, model_dir: Path) -> DictConfig:
    """The config of the next round of iterative MIPO: ``cfg`` with the previous round's policy as the model.

    That policy samples the next round's pairs and is its frozen reference; the trained policy
    starts from it too. Its tokenizer is the one saved with it (a byte tokenizer stays a byte
    tokenizer). Everything else, including the evaluation's base model (the original ``cfg``'s), is
    unchanged.
    """
    next_cfg = copy.deepcopy(cfg)
    with open_dict(next_cfg):
        model = next_cfg.model
        model.name_or_path = str(Path(model_dir).resolve())
        model.gguf_package = None
        model.gguf_file = None
        model.random_init = False
        model.revision = None
        next_cfg.data.pairs_path = None
    return next_cfg


def _publish_training(stage_dir: Path, output_dir: Path) -> None:
    """Copy a train stage's small outputs into ``output_dir`` and link its ``model`` there (rank 0 only)."""
    if not distributed.is_main():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_OUTPUTS:
        shutil.copy2(stage_dir / name, output_dir / name)
    _link(output_dir / "model", (stage_dir / "model").resolve(), directory=True)
    if (stage_dir / "adapter").is_dir():
        _link(output_dir / "adapter", (stage_dir / "adapter").resolve(), directory=True)


def _link(link: Path, target: Path, directory: bool) -> None:
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() or not link.is_dir() else shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=directory)


def rounds_problems(cfg: DictConfig) -> list[str]:
    """``rounds``: pipeline.py's rounds of iterative MIPO, each sampling new pairs."""
    rounds = cfg.get("rounds", 1)
    checks = [(is_int(rounds) and rounds >= 1, f"rounds={rounds}: expected an int >= 1 (pipeline.py's rounds of iterative MIPO)")]
    if is_int(rounds) and rounds > 1:
        checks.append((not cfg.data.pairs_path, f"rounds={rounds} samples new pairs every round, but data.pairs_path="
                       f"{cfg.data.pairs_path} fixes one pairs file: leave data.pairs_path unset"))
    return failed(checks)
