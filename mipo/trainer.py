"""The training stage: DPO of the policy on MIPO pairs against cached reference log-probs.

Read top to bottom: ``train`` loads the pairs, encodes them once (``encode_pairs``: the rows
the reference was scored on), gets log pi_ref from the cache or one fp32 pass, loads the
policy, then runs the loop: for each optimizer step, micro-batches through ``TrainingForward``
(``mipo.forward``: one prompt-shared forward of y+ and y-, ``dpo_loss``), backward, clip, AdamW
step, warmup schedule; finally it saves the policy in Hugging Face format.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mipo.config import train_dtype
from mipo.encoding import encode_pairs
from mipo.files import write_json
from mipo.forward import TrainingForward
from mipo.models import load_model, load_tokenizer, resolve_device
from mipo.optim import build_optimizer, build_scheduler, resolve_autocast
from mipo.pairs import read_pairs
from mipo.reference import reference_logps
from mipo.sampling import pairs_path
from mipo.tracking import MetricsLogger

log = logging.getLogger(__name__)


def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train the policy of ``cfg`` on its pairs; writes ``model/``, ``metrics.jsonl`` and ``train.json``."""
    output_dir = Path(output_dir)
    tcfg = cfg.trainer
    accumulation_steps = tcfg.batch_size // tcfg.micro_batch_size
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # ---- data and reference log-probs -------------------------------------------------------
    path = pairs_path(cfg)
    pairs = read_pairs(path)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    chosen_rows, rejected_rows = encode_pairs(tokenizer, pairs, cfg.data.max_length, cfg.data.max_prompt_length)
    reference = reference_logps(
        cfg.model, tokenizer, path, cfg.paths.cache_dir, cfg.data.max_length, cfg.data.max_prompt_length,
        device=device, batch_size=cfg.eval.score_batch_size, kernel=cfg.kernel, pairs=pairs,
        encoded=(chosen_rows, rejected_rows),
    )
    steps_per_epoch = len(pairs) // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} pairs in {path} are fewer than one batch (trainer.batch_size={tcfg.batch_size})")
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)

    # ---- policy and optimizer -----------------------------------------------------------------
    policy = load_model(cfg.model, device=device, dtype=train_dtype(cfg), cache_dir=cfg.paths.cache_dir,
                        vocab_size=len(tokenizer))
    autocast_dtype = resolve_autocast(tcfg.get("autocast"), device, policy.dtype)
    if tcfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.config.use_cache = False
    policy.train()
    forward = TrainingForward.prepare(cfg, policy, autocast_dtype)
    optimizer = build_optimizer(policy, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, total_steps)

    logger = MetricsLogger(output_dir, cfg.wandb, OmegaConf.to_container(cfg, resolve=True))
    log.info("training on %d pairs: %d steps of %d pairs (%d x %d accumulation), lr %.2g, beta %.3g, loss %s",
             len(pairs), total_steps, tcfg.batch_size, tcfg.micro_batch_size, accumulation_steps, tcfg.lr,
             cfg.loss.beta, cfg.loss.loss_type)

    # ---- the loop -------------------------------------------------------------------------------
    history = []
    progress = tqdm(total=total_steps, desc="training", unit="step")
    batches = batch_order(len(pairs), tcfg.batch_size, tcfg.epochs, seed=cfg.seed)
    for step, batch_index in zip(range(1, total_steps + 1), batches):
        metrics: dict[str, float] = {}
        for start in range(0, len(batch_index), tcfg.micro_batch_size):
            index = batch_index[start : start + tcfg.micro_batch_size]
            micro_batch = forward.collate(chosen_rows, rejected_rows, index, reference, tokenizer.pad_token_id).to(device)
            loss, micro_metrics = forward(policy, micro_batch, cfg.loss)
            (loss / accumulation_steps).backward()
            for name, value in micro_metrics.items():
                metrics[name] = metrics.get(name, 0.0) + float(value) / accumulation_steps
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), tcfg.max_grad_norm))
        metrics["lr"] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        history.append(metrics)
        if step % tcfg.log_every == 0 or step == total_steps:
            logger.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['reward_accuracy']:.2f}")
    progress.close()

    summary = {
        "steps": len(history), "pairs": len(pairs), "pairs_path": str(path), "reference_cache": str(reference.path),
        "reference_cache_hit": reference.cache_hit,
        **{f"final_{k}": sum(m[k] for m in history[-5:]) / len(history[-5:]) for k in ("loss", "reward_margin", "reward_accuracy")},
    }
    logger.summary(summary)
    logger.close()
    if tcfg.save_model:
        model_dir = output_dir / "model"
        policy.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        summary["model_dir"] = str(model_dir)
    write_json(output_dir / "train.json", summary)
    return summary


def batch_order(num_pairs: int, batch_size: int, epochs: int, seed: int) -> Iterator[list[int]]:
    """Pair indices of each optimizer step: every epoch a fresh shuffle, cut into full batches."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(num_pairs))
        rng.shuffle(order)
        for start in range(0, num_pairs - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
