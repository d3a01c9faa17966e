"""The training stage: DPO (or a baseline) of the policy on MIPO pairs, in two parts: ``setup`` then ``train``.

``train(cfg, output_dir, pairs_file)`` reads top to bottom:

1. ``setup`` prepares everything before the first step and gathers it in a ``TrainingRun``: the
   pairs, encoded once (``encode_training_rows``), the number of steps and their batches
   (``batch_order``), the newest checkpoint to resume from, the policy, its ``TrainingForward``
   (behind ``trainer.strategy``), AdamW and the learning-rate schedule; then log pi_ref, from the
   cache or from that very forward before any update (``ReferencePass``; DPO only: the other losses
   are reference-free), so that at step 0 every implicit reward is 0 by construction; the metrics logger.
2. the loop: for each optimizer step ``optimizer_step`` (``mipo/training/step.py``: the
   micro-batches, each one prompt-shared forward of y+ and y- (and of whatever else
   ``loss.loss_type`` needs: K negatives, x') and the loss of its objective
   (``mipo/training/objectives.py``), backward, clipping, the AdamW and scheduler steps), then the
   metrics line and the checkpoint when they are due.
3. ``finish``: ``train.json`` and the policy (its fp32 master weights when the optimizer kept them)
   in Hugging Face format.

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
import random
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mipo.data.encoding import add_truncation_counts, truncation_counts, warn_truncation
from mipo.data.pairs import (
    PairsFile,
    PreferencePair,
    read_pairs,
    read_pairs_meta,
    truncation_summary,
)
from mipo.model import adapters
from mipo.model.loading import (
    enable_activation_checkpointing,
    load_model,
    resolve_device,
    run_tokenizer,
)
from mipo.model.precision import ForwardPrecision, training_precision
from mipo.runtime import distributed, preemption
from mipo.runtime.files import write_json
from mipo.runtime.tracking import MetricsLogger
from mipo.stages.keys import train_key
from mipo.stages.reference import ReferencePass, training_micro_batches
from mipo.training import parallel
from mipo.training.checkpoint import (
    CheckpointError,
    check_same_inputs,
    check_world_size,
    checkpoints_dir,
    clear_checkpoints,
    latest_checkpoint,
    read_state,
    restore_checkpoint,
    save_checkpoint,
)
from mipo.training.forward import TrainingForward, encode_training_rows
from mipo.training.objectives import objective
from mipo.training.optim import build_optimizer, build_scheduler, final_weights
from mipo.training.step import (
    LoopState,
    NonFiniteError,
    StepData,
    StepModel,
    StepSettings,
    optimizer_step,
)

__all__ = ["RESUME_MAY_CHANGE", "RESUME_MUST", "NonFiniteError", "TrainingRun", "batch_order", "build_step_model", "count_steps",
           "finish", "flush_denormal", "resume_point", "setup", "train"]

log = logging.getLogger(__name__)

# may change when a run resumes: it only decides what happens at a non-finite step
RESUME_MAY_CHANGE = ("skip_nonfinite",)


@dataclass
class TrainingRun:
    """Everything ``train``'s loop needs, built by ``setup``."""

    cfg: DictConfig
    output_dir: Path
    strategy: str  # trainer.strategy, resolved (parallel.resolve_strategy)
    inputs: dict[str, Any]  # keys.train_key: what the run is keyed by, saved in every checkpoint
    total_steps: int
    first_step: int  # 1, or the step after the checkpoint resumed from
    tokenizer: Any
    model: StepModel  # policy, forward, optimizer, scheduler
    data: StepData  # pairs, encoded rows, reference log-probs
    settings: StepSettings
    state: LoopState  # batch order, metrics so far, skipped steps
    logger: Any  # MetricsLogger on rank 0, distributed.NoLogger on the others
    pairs_meta: dict[str, Any] | None = None  # the pairs' sidecar: prompts offered, kept and dropped (read_pairs_meta)
    truncation: dict[str, int] | None = None  # what the lengths cut from the rows trained on (truncation_counts)


def train(cfg: DictConfig, output_dir: str | Path, pairs_file: PairsFile, pairs: list[PreferencePair] | None = None,
          resume: bool | None = None) -> dict[str, Any]:
    """Train the policy of ``cfg`` on ``pairs_file``'s pairs; writes ``model/``, ``metrics.jsonl`` and ``train.json``.

    Args:
        pairs_file: the pairs JSONL file and its sha256 (hashed once by the caller: the run's key and the
            reference cache's hold it).
        pairs: the contents of ``pairs_file`` when the caller has read them already.
        resume: continue from the newest checkpoint in ``output_dir`` if there is one
            (default ``trainer.resume``); otherwise the run starts at step 0 and removes the
            checkpoints and metrics an earlier run left in ``output_dir``.

    Returns:
        The summary written to ``train.json`` (``finish``).
    """
    run = setup(cfg, output_dir, pairs_file, pairs=pairs, resume=resume)
    tcfg, state = cfg.trainer, run.state
    with tqdm(total=run.total_steps, initial=run.first_step - 1, desc="training", unit="step",
              disable=not distributed.is_main()) as progress, flush_denormal(bool(tcfg.get("flush_denormal", True))), \
            preemption.deferred():  # submitit's checkpoint signal waits for the end of a step (mipo/runtime/preemption.py)
        for step in range(run.first_step, run.total_steps + 1):
            # micro-batches, backward, clipping, AdamW and scheduler steps; {} for a step skipped as non-finite
            record = optimizer_step(step, run.model, run.data, run.settings, state)
            if step % tcfg.log_every == 0 or step == run.total_steps or not record:
                run.logger.log({**{f"train/{k}": v for k, v in record.items()},
                                "train/skipped_nonfinite": len(state.skipped)}, step=step)
            preempted = preemption.requested()  # on any rank: every rank saves, then the job is requeued
            if preempted or (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0):
                save_checkpoint(run.output_dir, step, run.model.policy, run.model.optimizer, run.model.scheduler,
                                keep=tcfg.keep_checkpoints,
                                loop_state={"inputs": run.inputs, "order": state.order, "history": state.history,
                                            "skipped_steps": state.skipped, "logger": run.logger.position()})
            progress.update(1)
            if record:
                progress.set_postfix(loss=f"{record['loss']:.4f}",
                                     acc=f"{record.get('reward_accuracy', float('nan')):.2f}")
            if preempted:
                preemption.stop()  # rank 0 hands the signal to submitit (requeue); every rank exits
    return finish(run)


# --------------------------------------------------------------------------------------------
# Before the first step
# --------------------------------------------------------------------------------------------

def setup(cfg: DictConfig, output_dir: str | Path, pairs_file: PairsFile, pairs: list[PreferencePair] | None = None,
          resume: bool | None = None) -> TrainingRun:
    """Everything before the first step (``train``'s arguments), in the order that fixes the random
    draws and the collectives of every rank: seed, pairs, resume point, policy and optimizer, the
    reference (the policy's forward before any update), logger, and last the checkpoint's states
    (weights and RNG included) when resuming."""
    output_dir, tcfg = Path(output_dir), cfg.trainer
    resume = tcfg.resume if resume is None else resume
    distributed.init()  # under torchrun: every rank takes 1/world of each global batch (mipo/training/parallel.py)
    world, rank = distributed.world_size(), distributed.rank()
    strategy = parallel.resolve_strategy(tcfg.get("strategy", "single"))
    accumulation_steps = parallel.accumulation_steps(tcfg.batch_size, tcfg.micro_batch_size, world)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # ---- data -------------------------------------------------------------------------------
    if pairs is None:
        pairs = read_pairs(pairs_file.path)
    tokenizer = run_tokenizer(cfg)
    rows = encode_training_rows(tokenizer, pairs, cfg.loss.loss_type, cfg.data.max_length, cfg.data.max_prompt_length,
                                num_negatives=cfg.negatives.get("num_negatives", 1))
    # what data.max_prompt_length / data.max_length cut from the (x, y) rows trained on: y+, y- and K - 1 extra y-
    truncation = add_truncation_counts(*map(truncation_counts, (rows.chosen, rows.rejected, *rows.extra_rejected)))
    warn_truncation(truncation, f"training on {pairs_file.path}")
    total_steps = count_steps(len(pairs), tcfg, pairs_file.path)

    # ---- where to start: the newest checkpoint of this run, or step 0 ------------------------
    inputs = train_key(cfg, pairs_file)
    checkpoint, saved = resume_point(output_dir, inputs, total_steps, world, resume)
    if saved:
        state = LoopState(saved["order"], saved["history"], saved["skipped_steps"])
    else:
        order = list(batch_order(len(pairs), tcfg.batch_size, tcfg.epochs, seed=cfg.seed))[:total_steps]
        state = LoopState(order, history=[], skipped=[])

    # ---- policy, forward, optimizer; log pi_ref: that forward at step 0 ----------------------------
    precision = training_precision(cfg, device)
    model = build_step_model(cfg, len(tokenizer), device, precision, strategy, total_steps)
    reference = None  # reference-free losses (SFT, SimPO, SAMI, InfoNCE) skip the reference pass and its cache
    if objective(cfg.loss.loss_type).family.needs_reference:  # before any update, and before a checkpoint is restored
        micro_batches = training_micro_batches(state.order, len(pairs), tcfg.micro_batch_size)
        reference_pass = ReferencePass(model.forward, cfg.model, tokenizer, (cfg.data.max_length,
                                       cfg.data.max_prompt_length), micro_batches, device, Path(cfg.paths.cache_dir),
                                       base_weights=partial(adapters.adapters_disabled, model.policy),  # LoRA: the base
                                       adapters=inputs.get("lora"))  # lora_identity, in the train key
        reference = reference_pass.logps(pairs_file, (rows.chosen, rows.rejected, *rows.extra_rejected))
    logger = (MetricsLogger(output_dir, cfg.wandb, OmegaConf.to_container(cfg, resolve=True),
                            resume=saved["logger"] if saved else None)
              if distributed.is_main() else distributed.NoLogger())
    log.info("training on %d pairs: %d steps of %d pairs (%d x %d accumulation x %d ranks, %s), lr %.2g, loss %s (%s)",
             len(pairs), total_steps, tcfg.batch_size, tcfg.micro_batch_size, accumulation_steps, world, strategy,
             tcfg.lr, cfg.loss.loss_type, OmegaConf.to_container(cfg.loss, resolve=True))
    if saved:  # last before the loop: it sets the RNG states
        restore_checkpoint(checkpoint, saved, model.policy, model.optimizer, model.scheduler)
    data = StepData(pairs, pairs_file.path, rows, reference, tokenizer.pad_token_id, device)
    settings = StepSettings(cfg.loss, tcfg.micro_batch_size, accumulation_steps, tcfg.max_grad_norm,
                            tcfg.skip_nonfinite, world, rank)
    first_step = saved["step"] + 1 if saved else 1
    return TrainingRun(cfg, output_dir, strategy, inputs, total_steps, first_step, tokenizer, model, data, settings,
                       state, logger, pairs_meta=read_pairs_meta(pairs_file), truncation=truncation)


def count_steps(num_pairs: int, tcfg: DictConfig, pairs_file: Path) -> int:
    """Optimizer steps of the run: full batches per epoch x ``trainer.epochs``, at most ``trainer.max_steps``."""
    steps_per_epoch = num_pairs // tcfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{num_pairs} pairs in {pairs_file} are fewer than one batch "
                         f"(trainer.batch_size={tcfg.batch_size})")
    total_steps = steps_per_epoch * tcfg.epochs
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    return total_steps


RESUME_MUST = "must"  # trainer.resume=must: resume, and refuse to start without a checkpoint (checked up front too)


def resume_point(output_dir: Path, inputs: dict[str, Any], total_steps: int, world: int,
                 resume: bool | str) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint of this run and its saved state, checked against ``inputs`` and the world size;
    ``(None, None)`` for a run from step 0, whose earlier checkpoints are removed (rank 0).

    ``resume``: false, true (the newest checkpoint if there is one; one line says when there is none) or
    ``RESUME_MUST`` (a run without a checkpoint is refused: ``CheckpointError``).
    """
    checkpoint = latest_checkpoint(output_dir) if resume else None
    saved = read_state(checkpoint) if checkpoint else None
    if saved:
        check_same_inputs(checkpoint, _resume_view(saved["inputs"]), _resume_view(inputs))
        check_world_size(checkpoint, saved, world)
        log.info("resuming from %s (step %d of %d)", checkpoint, saved["step"], total_steps)
    elif resume == RESUME_MUST:
        raise CheckpointError(f"trainer.resume={RESUME_MUST}: no checkpoint in {checkpoints_dir(output_dir)}; "
                              "trainer.resume=true starts at step 0 when there is none")
    else:
        if resume:
            log.info("trainer.resume: no checkpoint in %s: starting at step 0", checkpoints_dir(output_dir))
        if distributed.is_main():
            clear_checkpoints(output_dir)
    distributed.barrier()
    return checkpoint, saved


def build_step_model(cfg: DictConfig, vocab_size: int, device: torch.device, precision: ForwardPrecision,
                     strategy: str, total_steps: int) -> StepModel:
    """The policy in its training precision (with ``lora.enabled``: LoRA adapters on a frozen base,
    ``mipo.model.adapters``), its forward behind ``strategy`` (``parallel.wrap``), then AdamW over the trainable
    parameters and the learning-rate schedule (built after the wrap: FSDP2 replaces the parameters)."""
    tcfg, lora = cfg.trainer, cfg.get("lora")
    policy = load_model(cfg.model, device=device, dtype=precision.weights, cache_dir=cfg.paths.cache_dir,
                        vocab_size=vocab_size, quantization_config=adapters.quantization_config(lora))
    if adapters.lora_enabled(lora):  # the frozen base is the reference: adapters_disabled(policy)
        policy = adapters.apply_lora(policy, lora)
    if tcfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
        if adapters.has_adapters(policy):
            adapters.enable_input_gradients(policy)
    policy.train()
    forward = TrainingForward.prepare(cfg, policy, precision.autocast)
    forward = parallel.wrap(policy, forward, strategy, device, mixed_precision=precision.autocast,
                            cpu_offload=bool(tcfg.get("cpu_offload", False)))  # build the optimizer after this
    optimizer = build_optimizer(policy, tcfg)
    return StepModel(policy, forward, optimizer, build_scheduler(optimizer, tcfg, total_steps))


# --------------------------------------------------------------------------------------------
# After the last step
# --------------------------------------------------------------------------------------------

def finish(run: TrainingRun) -> dict[str, Any]:
    """The run's summary (``train.json``, and the logger's), then the consolidated policy in ``model/``."""
    data, history = run.data, run.state.history
    last = history[-5:]
    summary = {
        "pairs_meta": run.pairs_meta,  # which prompts the negatives strategy kept and dropped, and why
        "steps": run.total_steps, "optimizer_steps": len(history), "skipped_nonfinite": len(run.state.skipped),
        "skipped_steps": run.state.skipped, "pairs": len(data.pairs), "pairs_path": str(data.pairs_file),
        "reference_cache": str(data.reference.path) if data.reference is not None else None,
        "reference_cache_hit": data.reference.cache_hit if data.reference is not None else None,
        **truncation_summary(data.pairs), **{f"truncation_{key}": value for key, value in run.truncation.items()},
        **{f"final_{k}": sum(m[k] for m in last) / len(last) if last and k in last[0] else None
           for k in ("loss", "reward_margin", "reward_accuracy", "pmi_margin", "pmi_accuracy")},
        "length_chosen": float(data.rows.pair_lengths[:, 0].float().mean()),  # response tokens trained on, all pairs
        "length_rejected": float(data.rows.pair_lengths[:, 1].float().mean()),
    }
    run.logger.summary(summary)
    run.logger.close()
    if run.cfg.trainer.save_model:
        model_dir = run.output_dir / "model"
        # one consolidated Hugging Face folder, written by rank 0 (FSDP: the shards gathered first); with LoRA
        # also adapter/ (peft's format), and model/ is the merged model (what the next round loads)
        adapter_dir = run.output_dir / "adapter" if adapters.lora_enabled(run.cfg.get("lora")) else None
        base_model = OmegaConf.to_container(run.cfg.model, resolve=True)
        parallel.save_consolidated(final_weights(run.model.policy, run.model.optimizer), run.tokenizer, model_dir,
                                   run.strategy, adapter_dir=adapter_dir, base_model=base_model,
                                   load_base=partial(load_model, base_model, "cpu", torch.float32,
                                                     run.cfg.paths.cache_dir))
        summary["model_dir"] = str(model_dir)
        if adapter_dir is not None:
            summary["adapter_dir"] = str(adapter_dir)
    if distributed.is_main():
        write_json(run.output_dir / "train.json", summary)
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
