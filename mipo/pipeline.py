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
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mipo.config import train_dtype
from mipo.evaluation import evaluate
from mipo.files import sha256_file, stable_hash, write_json
from mipo.models import model_identity
from mipo.sampling import sample_pairs
from mipo.trainer import train

log = logging.getLogger(__name__)
TRAIN_OUTPUTS = ("train.json", "metrics.jsonl")


def train_inputs(cfg: DictConfig, pairs_file: Path) -> dict[str, Any]:
    """Everything a trained policy depends on (logging settings excluded)."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer.pop("log_every", None)
    return {
        "pairs_sha256": sha256_file(pairs_file),
        "model": model_identity(cfg.model),
        "train_dtype": train_dtype(cfg),
        "loss": OmegaConf.to_container(cfg.loss, resolve=True),
        "trainer": trainer,
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "seed": cfg.seed,
        "format": 1,
    }


def train_stage(cfg: DictConfig, pairs_file: Path) -> Path:
    """Train unless a policy for exactly these inputs exists; returns its directory."""
    key = stable_hash(train_inputs(cfg, pairs_file), 16)
    stage_dir = Path(cfg.paths.cache_dir) / "runs" / key
    if (stage_dir / "train.json").exists() and (stage_dir / "model").exists():
        log.info("train stage: outputs exist for these inputs, skipping (%s)", stage_dir)
        return stage_dir
    partial = stage_dir.with_name(f"{key}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    summary = train(cfg, partial)
    summary["model_dir"] = str(stage_dir / "model")
    write_json(partial / "train.json", summary)
    shutil.rmtree(stage_dir, ignore_errors=True)
    os.replace(partial, stage_dir)
    return stage_dir


def run_pipeline(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run the three stages of ``cfg``; returns the evaluation results."""
    if not cfg.trainer.save_model:
        raise ValueError("pipeline.py evaluates the trained model, so it needs trainer.save_model=true")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pairs_file = sample_pairs(cfg)
    stage_dir = train_stage(cfg, pairs_file)
    for name in TRAIN_OUTPUTS:
        shutil.copy2(stage_dir / name, output_dir / name)
    model_link = output_dir / "model"
    if model_link.is_symlink() or model_link.exists():
        model_link.unlink() if model_link.is_symlink() else shutil.rmtree(model_link)
    model_link.symlink_to((stage_dir / "model").resolve(), target_is_directory=True)
    return evaluate(cfg, output_dir, model_path=stage_dir / "model", trained_id=stage_dir.name)
