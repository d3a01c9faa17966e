"""The training stage: DPO of the policy on MIPO pairs against cached reference log-probs.

Read top to bottom: ``train`` loads the pairs, encodes them once (``encode_training_rows``: the
rows the reference was scored on, and whatever else the loss needs), gets log pi_ref from the cache
or one pass in the policy's precision (DPO only: the other losses are reference-free), loads the
policy, then runs the loop: for each optimizer step, micro-batches through ``TrainingForward``
(``mipo.training.forward``: one prompt-shared forward of y+ and y- (and of whatever else ``loss.loss_type``
needs: K negatives, x'), the loss), backward, clip, AdamW
step, learning-rate schedule; finally it saves the policy (its fp32 master weights when the
optimizer kept them) in Hugging Face format.

Two things guard a long run. A step whose loss or gradient is not finite stops the run with
the step and the pairs of its batch (``NonFiniteError``), or with ``trainer.skip_nonfinite``
is skipped and counted: nothing is ever trained on NaN. With ``trainer.checkpoint_every`` the
loop writes checkpoints (``mipo/training/checkpoint.py``) and ``resume`` continues from the newest one,
bit for bit as if the run had never stopped.

Under torchrun (``trainer.strategy=ddp|fsdp``, ``mipo/training/parallel.py``) each rank trains on its
slice of every global batch through the wrapped forward, metrics are averaged over ranks and
rank 0 writes the logs, ``train.json`` and the consolidated model.
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mipo.data.pairs import PreferencePair, read_pairs, truncation_summary
from mipo.losses import loss_family
from mipo.model.loading import (
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    model_identity,
    resolve_device,
)
from mipo.model.precision import train_dtype, training_precision
from mipo.runtime import distributed
from mipo.runtime.errors import InputError
from mipo.runtime.files import sha256_file, write_json
from mipo.runtime.tracking import MetricsLogger
from mipo.stages.reference import reference_logps
from mipo.stages.sample import pairs_path
from mipo.training import parallel
from mipo.training.checkpoint import (
    check_same_inputs,
    check_world_size,
    clear_checkpoints,
    latest_checkpoint,
    read_state,
    restore_checkpoint,
    save_checkpoint,
)
from mipo.training.forward import TrainingForward, encode_training_rows
from mipo.training.optim import build_optimizer, build_scheduler, final_weights

log = logging.getLogger(__name__)

# trainer keys that do not change the trained weights: left out of what a run is keyed by
NOT_INPUTS = ("log_every", "checkpoint_every", "keep_checkpoints", "resume")
# may change when a run resumes: it only decides what happens at a non-finite step
RESUME_MAY_CHANGE = ("skip_nonfinite",)


class NonFiniteError(InputError, FloatingPointError):
    """A step's loss or gradient is not finite; the message names the step and the pairs of its batch."""


def train_inputs(cfg: DictConfig, pairs_file: Path) -> dict[str, Any]:
    """Everything a trained policy depends on (logging and checkpointing settings excluded)."""
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in NOT_INPUTS:
        trainer.pop(key, None)
    inputs = {
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
    num_negatives = cfg.negatives.get("num_negatives", 1)
    if num_negatives > 1:
        inputs["num_negatives"] = num_negatives
    else:  # K = 1 keeps the key it always had: loss.multi_negative changes nothing then
        inputs["loss"].pop("multi_negative", None)
    return inputs


def train(cfg: DictConfig, output_dir: str | Path, pairs: list[PreferencePair] | None = None,
          resume: bool | None = None) -> dict[str, Any]:
    """Train the policy of ``cfg`` on its pairs; writes ``model/``, ``metrics.jsonl`` and ``train.json``.

    Args:
        pairs: the contents of the pairs file when the caller has read them already.
        resume: continue from the newest checkpoint in ``output_dir`` if there is one
            (default ``trainer.resume``); otherwise the run starts at step 0 and removes the
            checkpoints and metrics an earlier run left in ``output_dir``.
    """
    output_dir = Path(output_dir)
    tcfg = cfg.trainer
    resume = tcfg.resume if resume is None else resume
    distributed.init()  # under torchrun: every rank takes 1/world of each global batch (mipo/training/parallel.py)
    world, rank = distributed.world_size(), distributed.rank()
    strategy = parallel.resolve_strategy(tcfg.get("strategy", "single"))
    accumulation_steps = parallel.accumulation_steps(tcfg.batch_size, tcfg.micro_batch_size, world)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # ---- data and reference log-probs -------------------------------------------------------
    path = pairs_path(cfg)
    if pairs is None:
        pairs = read_pairs(path)
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    rows = encode_training_rows(tokenizer, pairs, cfg.loss.loss_type, cfg.data.max_length, cfg.data.max_prompt_length,
                                num_negatives=cfg.negatives.get("num_negatives", 1))
    precision = training_precision(cfg, device)  # the policy's forward; the reference is computed in it too
    reference = None  # reference-free losses (SFT, SimPO, SAMI, InfoNCE) skip the reference pass and its cache
    if loss_family(cfg.loss.loss_type).needs_reference:
        reference = reference_logps(
            cfg.model, tokenizer, path, cfg.paths.cache_dir, cfg.data.max_length, cfg.data.max_prompt_length,
            device=device, batch_size=cfg.eval.score_batch_size, kernel=cfg.kernel, pairs=pairs,
            encoded=(rows.chosen, rows.rejected, *rows.extra_rejected), precision=precision,
            fused_lm_head=cfg.fused_lm_head,
        )
    steps_per_epoch = len(pairs) // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(pairs)} pairs in {path} are fewer than one batch (trainer.batch_size={tcfg.batch_size})")
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)

    # ---- where to start: the newest checkpoint of this run, or step 0 ------------------------
    inputs = train_inputs(cfg, path)
    checkpoint = latest_checkpoint(output_dir) if resume else None
    state = read_state(checkpoint) if checkpoint else None
    if state:
        check_same_inputs(checkpoint, _resume_view(state["inputs"]), _resume_view(inputs))
        check_world_size(checkpoint, state, world)
        log.info("resuming from %s (step %d of %d)", checkpoint, state["step"], total_steps)
    elif distributed.is_main():
        clear_checkpoints(output_dir)
    distributed.barrier()
    order = state["order"] if state else list(batch_order(len(pairs), tcfg.batch_size, tcfg.epochs, seed=cfg.seed))[:total_steps]
    history: list[dict[str, float]] = state["history"] if state else []
    skipped: list[int] = state["skipped_steps"] if state else []

    # ---- policy and optimizer -----------------------------------------------------------------
    policy = load_model(cfg.model, device=device, dtype=precision.weights, cache_dir=cfg.paths.cache_dir,
                        vocab_size=len(tokenizer))
    if tcfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    policy.train()
    forward = TrainingForward.prepare(cfg, policy, precision.autocast)
    forward = parallel.wrap(policy, forward, strategy, device, mixed_precision=precision.autocast,
                            cpu_offload=bool(tcfg.get("cpu_offload", False)))  # build the optimizer after this
    optimizer = build_optimizer(policy, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, total_steps)

    logger = (MetricsLogger(output_dir, cfg.wandb, OmegaConf.to_container(cfg, resolve=True),
                            resume=state["logger"] if state else None)
              if distributed.is_main() else distributed.NoLogger())
    log.info("training on %d pairs: %d steps of %d pairs (%d x %d accumulation x %d ranks, %s), lr %.2g, loss %s (%s)",
             len(pairs), total_steps, tcfg.batch_size, tcfg.micro_batch_size, accumulation_steps, world, strategy,
             tcfg.lr, cfg.loss.loss_type, OmegaConf.to_container(cfg.loss, resolve=True))
    if state:  # last before the loop: it sets the RNG states
        restore_checkpoint(checkpoint, state, policy, optimizer, scheduler)

    # ---- the loop -------------------------------------------------------------------------------
    first_step = state["step"] + 1 if state else 1
    progress = tqdm(total=total_steps, initial=first_step - 1, desc="training", unit="step",
                    disable=not distributed.is_main())
    with flush_denormal(bool(tcfg.get("flush_denormal", True))):
        for step in range(first_step, total_steps + 1):
            batch_index = order[step - 1]
            metrics: dict[str, float] = {}
            local_index = parallel.local_batch(batch_index, world, rank)  # this rank's share of the global batch
            for start in range(0, len(local_index), tcfg.micro_batch_size):
                index = local_index[start : start + tcfg.micro_batch_size]
                forward.sync_gradients(last=start + tcfg.micro_batch_size >= len(local_index))
                micro_batch = forward.collate_rows(rows, index, reference, tokenizer.pad_token_id,
                                                   cfg.loss.loss_type).to(device)
                loss, micro_metrics = forward(policy, micro_batch, cfg.loss)
                (loss / accumulation_steps).backward()
                for name, value in micro_metrics.items():
                    metrics[name] = metrics.get(name, 0.0) + float(value) / accumulation_steps
            metrics = distributed.mean_over_ranks(metrics)  # the global batch's means, as one process computes them
            metrics["grad_norm"] = parallel.grad_norm_value(torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                                                           tcfg.max_grad_norm))
            metrics["lr"] = scheduler.get_last_lr()[0]

            if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
                optimizer.step()
                scheduler.step()
                history.append(metrics)
                record = metrics
            else:
                message = (f"step {step}: the loss ({metrics['loss']}) or the gradient norm "
                           f"({metrics['grad_norm']}) is not finite for the batch of pairs "
                           f"{[pairs[i].label for i in batch_index]} of {path}")
                if not tcfg.skip_nonfinite:
                    progress.close()
                    raise NonFiniteError(f"{message}; nothing was trained on it. trainer.skip_nonfinite=true skips "
                                         "such steps (no update, counted in metrics.jsonl and train.json)")
                skipped.append(step)
                log.warning("%s: skipped (no optimizer or scheduler step), %d so far", message, len(skipped))
                record = {}
            optimizer.zero_grad(set_to_none=True)

            if step % tcfg.log_every == 0 or step == total_steps or not record:
                logger.log({**{f"train/{k}": v for k, v in record.items()}, "train/skipped_nonfinite": len(skipped)},
                           step=step)
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0:
                save_checkpoint(output_dir, step, policy, optimizer, scheduler, keep=tcfg.keep_checkpoints,
                                loop_state={"inputs": inputs, "order": order, "history": history,
                                            "skipped_steps": skipped, "logger": logger.position()})
            progress.update(1)
            if record:
                progress.set_postfix(loss=f"{record['loss']:.4f}",
                                     acc=f"{record.get('reward_accuracy', float('nan')):.2f}")
    progress.close()

    last = history[-5:]
    summary = {
        "steps": total_steps, "optimizer_steps": len(history), "skipped_nonfinite": len(skipped),
        "skipped_steps": skipped, "pairs": len(pairs), "pairs_path": str(path),
        "reference_cache": str(reference.path) if reference is not None else None,
        "reference_cache_hit": reference.cache_hit if reference is not None else None, **truncation_summary(pairs),
        **{f"final_{k}": sum(m[k] for m in last) / len(last) if last and k in last[0] else None
           for k in ("loss", "reward_margin", "reward_accuracy", "pmi_margin", "pmi_accuracy")},
        "length_chosen": float(rows.pair_lengths[:, 0].float().mean()),  # response tokens trained on, all pairs
        "length_rejected": float(rows.pair_lengths[:, 1].float().mean()),
    }
    logger.summary(summary)
    logger.close()
    if tcfg.save_model:
        model_dir = output_dir / "model"
        # one consolidated Hugging Face folder, written by rank 0 (FSDP: the shards gathered first)
        parallel.save_consolidated(final_weights(policy, optimizer), tokenizer, model_dir, strategy)
        summary["model_dir"] = str(model_dir)
    if distributed.is_main():
        write_json(output_dir / "train.json", summary)
    distributed.barrier()
    return summary


@contextmanager
def flush_denormal(enabled: bool) -> Iterator[None]:
    """``trainer.flush_denormal``: CPU float ops flush subnormal numbers (below 1.2e-38) to zero inside the block.

    CPU arithmetic on subnormals is about 20x slower. A saturated loss sends the gradients there:
    SAMI's summed log-probs differ by ~70 nats on SmolLM2's random-negative pairs, so its gradients
    are ~exp(-70) (one SmolLM2 backward took 58 s instead of 2.7 s). GPU kernels are unaffected.
    The previous mode is restored after (torch has no getter: it is read off a multiplication).
    """
    previous = (torch.tensor([1e-39]) * 1.0).item() == 0.0
    torch.set_flush_denormal(enabled)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


def _resume_view(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs a resumed run must share with its checkpoint."""
    return {**inputs, "trainer": {k: v for k, v in inputs["trainer"].items() if k not in RESUME_MAY_CHANGE}}


def batch_order(num_pairs: int, batch_size: int, epochs: int, seed: int) -> Iterator[list[int]]:
    """Pair indices of each optimizer step: every epoch a fresh shuffle, cut into full batches."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(num_pairs))
        rng.shuffle(order)
        for start in range(0, num_pairs - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
