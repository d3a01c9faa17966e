"""sample -> train -> evaluate for one config, each stage skipped when its outputs exist.

Every stage's output is addressed by a hash of its inputs, so one multirun line can sweep
the whole method and only the stages whose inputs changed are run:

    stage      output                                  keyed by
    sample     <cache>/pairs/<key>.jsonl               model, task, data split, negatives, sampling, seed
    reference  <cache>/reference/<key>.pt              model, tokenizer, pairs content, lengths
    train      <cache>/runs/<key>/{model,metrics...}   pairs content, model, loss, trainer, lengths, seed
    evaluate   <cache>/eval/<key>.json (per model)     the evaluated model, task, eval split, eval settings

A sweep over ``loss.beta`` therefore samples once, computes reference log-probs once and
evaluates the base model once. The run directory of each job receives copies of the small
outputs (``train.json``, ``metrics.jsonl``, ``eval.json``, ...) and a ``model`` link to the
trained weights.

The train stage trains into ``<cache>/runs/<key>.partial`` and renames it to ``<key>`` when
done. The partial folder's name is stable, so a pipeline killed while training continues
from that folder's newest checkpoint when it is run again (``trainer.checkpoint_every``); a
lock (``<key>.lock``) refuses a second process that would train the same key at the same time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mipo import distributed
from mipo.checkpoint import clear_checkpoints
from mipo.evaluation import evaluate
from mipo.files import exclusive_lock, stable_hash, write_json
from mipo.pairs import PreferencePair
from mipo.sampling import sample_pairs
from mipo.trainer import train, train_inputs

log = logging.getLogger(__name__)
TRAIN_OUTPUTS = ("train.json", "metrics.jsonl")


def train_stage(cfg: DictConfig, pairs_file: Path, pairs: list[PreferencePair] | None = None) -> Path:
    """Train unless a policy for exactly these inputs exists; returns its directory.

    A run of the same key that was killed is resumed from its newest checkpoint.
    """
    key = stable_hash(train_inputs(cfg, pairs_file), 16)
    runs = Path(cfg.paths.cache_dir) / "runs"
    stage_dir = runs / key

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
        summary = train(cfg, partial, pairs=pairs, resume=True)
        if main:
            clear_checkpoints(partial)  # the cache keeps the trained policy, not its optimizer states
            summary["model_dir"] = str(stage_dir / "model")
            write_json(partial / "train.json", summary)
            shutil.rmtree(stage_dir, ignore_errors=True)
            os.replace(partial, stage_dir)
        distributed.barrier()
    return stage_dir


def run_pipeline(cfg: DictConfig, output_dir: str | Path, pairs: list[PreferencePair] | None = None) -> dict[str, Any]:
    """Run the three stages of ``cfg``; returns the evaluation results.

    ``pairs``: the contents of the pairs file when it existed before and was read already.
    The run directory receives the training outputs after the evaluation, so that a run killed
    while evaluating left nothing in it that would stop it from being run again.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pairs_file = sample_pairs(cfg)
    stage_dir = train_stage(cfg, pairs_file, pairs)
    results = evaluate(cfg, output_dir, model_path=stage_dir / "model", trained_id=stage_dir.name)
    if not distributed.is_main():
        return results
    for name in TRAIN_OUTPUTS:
        shutil.copy2(stage_dir / name, output_dir / name)
    model_link = output_dir / "model"
    if model_link.is_symlink() or model_link.exists():
        model_link.unlink() if model_link.is_symlink() else shutil.rmtree(model_link)
    model_link.symlink_to((stage_dir / "model").resolve(), target_is_directory=True)
    return results
