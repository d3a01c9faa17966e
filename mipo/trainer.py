"""The training stage: DPO of the policy on MIPO pairs against cached reference log-probs.

Read top to bottom: load pairs -> reference log-probs (cache or one fp32 pass) -> policy ->
for each optimizer step: micro-batches with chosen and rejected concatenated into one forward,
``dpo_loss``, backward, clip, AdamW step, linear warmup -> save in Hugging Face format.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mipo.files import write_json
from mipo.logprobs import encode_pair, encode_prompt, encode_response, pad_batch, sequence_logps
from mipo.losses import dpo_loss
from mipo.models import load_model, load_tokenizer, resolve_device, resolve_dtype
from mipo.pairs import read_pairs
from mipo.reference import reference_logps
from mipo.sampling import pairs_path
from mipo.tracking import MetricsLogger

log = logging.getLogger(__name__)


def train(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train the policy of ``cfg`` on its pairs; writes ``model/``, ``metrics.jsonl`` and ``train.json``."""
    output_dir = Path(output_dir)
    tcfg, lcfg = cfg.trainer, cfg.loss
    if tcfg.batch_size % tcfg.micro_batch_size:
        raise ValueError(f"trainer.batch_size={tcfg.batch_size} must be a multiple of "
                         f"trainer.micro_batch_size={tcfg.micro_batch_size}")
    accumulation_steps = tcfg.batch_size // tcfg.micro_batch_size
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # ---- data and reference log-probs -------------------------------------------------------
    path = pairs_path(cfg)
    pairs = read_pairs(path)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    reference = reference_logps(
        cfg.model, tokenizer, path, cfg.paths.cache_dir, cfg.data.max_length, cfg.data.max_prompt_length,
        device=device, batch_size=cfg.eval.score_batch_size, kernel=cfg.kernel, pairs=pairs,
    )
    rows = []  # per pair: ((chosen ids, labels), (rejected ids, labels))
    for pair in pairs:
        prompt_ids = encode_prompt(tokenizer, pair.prompt)
        rows.append(tuple(
            encode_pair(prompt_ids, encode_response(tokenizer, response), cfg.data.max_length, cfg.data.max_prompt_length)
            for response in (pair.chosen, pair.rejected)))

    # ---- policy and optimizer -----------------------------------------------------------------
    policy = load_model(cfg.model, device=device, dtype=cfg.model.get("train_dtype") or cfg.model.dtype,
                        cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    autocast_dtype = resolve_autocast(tcfg.get("autocast"), device, policy.dtype)
    if tcfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.config.use_cache = False
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    steps_per_epoch = len(rows) // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(rows)} pairs in {path} are fewer than one batch (trainer.batch_size={tcfg.batch_size})")
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    warmup_steps = math.ceil(tcfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))

    logger = MetricsLogger(output_dir, cfg.wandb, OmegaConf.to_container(cfg, resolve=True))
    log.info("training on %d pairs: %d steps of %d pairs (%d x %d accumulation), lr %.2g, beta %.3g, loss %s",
             len(rows), total_steps, tcfg.batch_size, tcfg.micro_batch_size, accumulation_steps, tcfg.lr,
             lcfg.beta, lcfg.loss_type)
    order_rng = random.Random(cfg.seed)
    step, history = 0, []
    progress = tqdm(total=total_steps, desc="training", unit="step")
    while step < total_steps:
        order = list(range(len(rows)))
        order_rng.shuffle(order)
        for batch_start in range(0, steps_per_epoch * tcfg.batch_size, tcfg.batch_size):
            if step >= total_steps:
                break
            batch_index = order[batch_start : batch_start + tcfg.batch_size]
            metrics = _optimizer_step(policy, rows, batch_index, reference, tokenizer.pad_token_id,
                                      tcfg.micro_batch_size, lcfg, cfg.kernel, cfg.fused_lm_head, device,
                                      autocast_dtype)
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), tcfg.max_grad_norm))
            metrics["lr"] = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(metrics)
            if step % tcfg.log_every == 0 or step == total_steps:
                logger.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['reward_accuracy']:.2f}")
    progress.close()

    summary = {
        "steps": step, "pairs": len(rows), "pairs_path": str(path), "reference_cache": str(reference.path),
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


def resolve_autocast(setting: str | None, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the forward runs in under autocast, or None for no autocast.

    ``auto``: bf16 on a GPU when the weights are fp32 (mixed precision: fp32 master weights and
    optimizer states, bf16 matmuls), nothing on CPU, where bf16 matmuls are slow.
    """
    if setting in (None, "none", "null"):
        return None
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" and weights_dtype == torch.float32 else None
    return resolve_dtype(setting, device)


def _optimizer_step(policy, rows, batch_index, reference, pad_token_id, micro_batch_size,
                    lcfg, kernel, fused_lm_head, device, autocast_dtype=None) -> dict[str, float]:
    """Forward and backward over the micro-batches of one optimizer step; returns its metrics."""
    totals: dict[str, float] = {}
    accumulation_steps = math.ceil(len(batch_index) / micro_batch_size)
    for start in range(0, len(batch_index), micro_batch_size):
        index = batch_index[start : start + micro_batch_size]
        b = len(index)
        # chosen and rejected in one forward: rows [0, b) are y+, rows [b, 2b) are y-
        batch = pad_batch([rows[i][0] for i in index] + [rows[i][1] for i in index], pad_token_id).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logps = sequence_logps(policy, batch, kernel=kernel, fused_lm_head=fused_lm_head)  # (2b,)
        policy_chosen_logps, policy_rejected_logps = logps[:b], logps[b:]
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen_logps, policy_rejected_logps,
            reference.chosen[index].to(device), reference.rejected[index].to(device),
            beta=lcfg.beta, label_smoothing=lcfg.label_smoothing, loss_type=lcfg.loss_type,
        )
        (losses.mean() / accumulation_steps).backward()
        micro = {
            "loss": losses.mean(),
            "reward_chosen": chosen_rewards.mean(),
            "reward_rejected": rejected_rewards.mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "logps_chosen": policy_chosen_logps.detach().mean(),
            "logps_rejected": policy_rejected_logps.detach().mean(),
        }
        for k, v in micro.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach()) / accumulation_steps
    return totals
