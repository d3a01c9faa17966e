"""The sampling stage: MIPO preference pairs (x, y+, y-) from the base model.

    y+ ~ pi_base(.|x)        the response to the prompt itself
    y- ~ pi_base(.|x')       the response to a different prompt x' (``mipo/negatives.py``)

The pairs file is content-addressed: its default path is a hash of everything sampling
depends on (model, task, data split, negative strategy, sampling settings, seed), so
``sample.py`` and ``train.py`` run with the same overrides find the same file, and a sweep
over training settings reuses it.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mipo.config import build_task, task_splits
from mipo.files import stable_hash
from mipo.generation import generate
from mipo.models import load_model, load_tokenizer, model_identity, resolve_device
from mipo.negatives import plan_negatives
from mipo.pairs import PreferencePair, write_pairs

log = logging.getLogger(__name__)


def sampling_inputs(cfg: DictConfig) -> dict[str, Any]:
    """Everything the pairs depend on, and nothing else (training settings are not here)."""
    return {
        "model": model_identity(cfg.model),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "data": {k: cfg.data[k] for k in ("source", "num_train", "num_eval")},
        "negatives": OmegaConf.to_container(cfg.negatives, resolve=True),
        "sampling": {k: cfg.sampling[k] for k in ("temperature", "top_p", "max_new_tokens")},
        "max_prompt_length": cfg.data.max_prompt_length,
        "seed": cfg.seed,
        "format": 1,
    }


def pairs_path(cfg: DictConfig) -> Path:
    """``data.pairs_path`` if set, else the content-addressed default under the cache dir."""
    if cfg.data.pairs_path:
        return Path(cfg.data.pairs_path)
    inputs = sampling_inputs(cfg)
    name = f"{cfg.task.name}-{cfg.negatives.strategy}-{stable_hash(inputs, 12)}.jsonl"
    return Path(cfg.paths.cache_dir) / "pairs" / name


def sample_pairs(cfg: DictConfig) -> Path:
    """Sample the pairs of this config and write them; returns the pairs path.

    Skips all work when the file exists (``sampling.overwrite=true`` re-samples).
    """
    path = pairs_path(cfg)
    if path.exists() and not cfg.sampling.overwrite:
        log.info("pairs exist, not re-sampling: %s", path)
        return path

    task = build_task(cfg)
    train_examples, _ = task_splits(cfg, task)
    rng = random.Random(cfg.seed)
    plan = plan_negatives(task, train_examples, cfg.negatives.strategy, rng)
    if plan.dropped:
        log.info("negatives=%s: %d prompts had no information to remove and were dropped", cfg.negatives.strategy, plan.dropped)

    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    model = load_model(cfg.model, device=device, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    settings = dict(
        max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
        top_p=cfg.sampling.top_p, batch_size=cfg.sampling.batch_size,
        max_prompt_length=cfg.data.max_prompt_length,
    )
    prompts = [task.messages(e) for e in plan.examples]
    negative_prompts = [task.messages(e) for e in plan.negatives]

    # Generate once per prompt; random negatives reuse the response of prompt sigma(i).
    chosen = generate(model, tokenizer, prompts, seed=cfg.seed, desc="sampling y+ ~ pi(.|x)", **settings)
    if plan.source_index is not None and cfg.negatives.reuse_positives:
        rejected = [chosen[j] for j in plan.source_index]
    else:
        rejected = generate(model, tokenizer, negative_prompts, seed=cfg.seed + 1, desc="sampling y- ~ pi(.|x')", **settings)

    metadata = {
        "strategy": cfg.negatives.strategy,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "model": model_identity(cfg.model),
        "sampling": {k: cfg.sampling[k] for k in ("temperature", "top_p", "max_new_tokens")},
    }
    pairs = [
        PreferencePair(prompt, y_pos, y_neg, {
            "negative_prompt": neg_prompt, "uid": example.uid, "negative_uid": negative.uid,
            "answer": example.answer, **metadata})
        for prompt, neg_prompt, y_pos, y_neg, example, negative in zip(
            prompts, negative_prompts, chosen, rejected, plan.examples, plan.negatives)
    ]
    write_pairs(path, pairs)
    log.info("wrote %d pairs to %s", len(pairs), path)
    return path
