"""What a composed config means: checked once, before any model loads, and read in one place.

Every entry point calls ``check_config(cfg)`` (through ``mipo.stages.cli.setup``) right after Hydra
composes ``conf/config.yaml``. It reports every bad value it finds in one ``ConfigError``,
each line naming the override to change and what was expected, so a run never spends minutes
loading a model before failing on a batch size. Code below the entry points then trusts
the config and does not re-check it per row or per micro-batch.

The other functions here turn config values into objects: the task and its train/eval
splits, and the dtype of the policy weights while training.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mipo.data.tasks import build_task
from mipo.losses import LOSS_FAMILIES, loss_config_problems
from mipo.model.loading import DTYPES, model_source_problem
from mipo.model.precision import AUTOCAST
from mipo.model.vllm_backend import BACKENDS
from mipo.negatives import STRATEGIES
from mipo.runtime.errors import raise_problems
from mipo.runtime.tracking import WANDB_MODES
from mipo.training.optim import LR_SCHEDULERS, MASTER_WEIGHTS
from mipo.training.parallel import STRATEGIES as TRAIN_STRATEGIES
from mipo.training.parallel import batch_split_problem

KERNELS = ("auto", "triton", "torch", "naive")
SHARED_ATTENTION = ("auto", "segments", "flex", "dense")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem with ``cfg`` as one line each (empty when the config can run)."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    data, trainer, loss, sampling, ev = cfg.data, cfg.trainer, cfg.loss, cfg.sampling, cfg.eval

    # lengths: the prompt is cut to max_prompt_length inside max_length tokens
    need(_is_int(data.max_length) and data.max_length > 1, f"data.max_length={data.max_length}: expected an int > 1")
    need(_is_int(data.max_prompt_length) and data.max_prompt_length > 0,
         f"data.max_prompt_length={data.max_prompt_length}: expected an int > 0")
    if _is_int(data.max_length) and _is_int(data.max_prompt_length):
        need(data.max_prompt_length < data.max_length,
             f"data.max_prompt_length={data.max_prompt_length} must be < data.max_length={data.max_length} "
             "(the response needs room after the prompt)")
    for key in ("num_train", "num_eval"):
        value = data[key]
        need(value is None or (_is_int(value) and value >= 0), f"data.{key}={value}: expected null (all) or an int >= 0")

    # batches and optimisation
    for key in ("batch_size", "micro_batch_size", "epochs"):
        need(_is_int(trainer[key]) and trainer[key] > 0, f"trainer.{key}={trainer[key]}: expected an int > 0")
    if _is_int(trainer.batch_size) and _is_int(trainer.micro_batch_size) and trainer.micro_batch_size > 0:
        need(trainer.batch_size % trainer.micro_batch_size == 0,
             f"trainer.batch_size={trainer.batch_size} must be a multiple of "
             f"trainer.micro_batch_size={trainer.micro_batch_size} (pairs per step = micro-batch x accumulation)")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's ranks: each takes 1/world of every batch
    if world > 1 and _is_int(trainer.batch_size) and _is_int(trainer.micro_batch_size) and trainer.micro_batch_size > 0:
        problem = batch_split_problem(trainer.batch_size, trainer.micro_batch_size, world)
        need(problem is None, problem)
    strategy = trainer.get("strategy", "single")
    need(strategy in TRAIN_STRATEGIES, f"trainer.strategy={strategy}: expected one of {', '.join(TRAIN_STRATEGIES)}")
    need(isinstance(trainer.get("cpu_offload", False), bool),
         f"trainer.cpu_offload={trainer.get('cpu_offload')}: expected true or false")
    backend = cfg.sampling.get("backend", "transformers")
    need(backend in BACKENDS, f"sampling.backend={backend}: expected one of {', '.join(BACKENDS)}")
    need(_is_number(trainer.lr) and trainer.lr > 0, f"trainer.lr={trainer.lr}: expected a learning rate > 0")
    need(_is_number(trainer.warmup_ratio) and 0 <= trainer.warmup_ratio <= 1,
         f"trainer.warmup_ratio={trainer.warmup_ratio}: expected a fraction in [0, 1]")
    need(_is_number(trainer.max_grad_norm) and trainer.max_grad_norm > 0,
         f"trainer.max_grad_norm={trainer.max_grad_norm}: expected a number > 0")
    need(trainer.max_steps is None or (_is_int(trainer.max_steps) and trainer.max_steps > 0),
         f"trainer.max_steps={trainer.max_steps}: expected null or an int > 0")
    need(trainer.lr_scheduler in LR_SCHEDULERS,
         f"trainer.lr_scheduler={trainer.lr_scheduler}: expected one of {', '.join(LR_SCHEDULERS)}")
    need(_is_number(trainer.min_lr_ratio) and 0 <= trainer.min_lr_ratio <= 1,
         f"trainer.min_lr_ratio={trainer.min_lr_ratio}: expected a fraction in [0, 1]")
    betas = list(trainer.adam_betas) if OmegaConf.is_list(trainer.adam_betas) else None
    need(betas is not None and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
         f"trainer.adam_betas={trainer.adam_betas}: expected [beta1, beta2], each in [0, 1)")
    need(trainer.master_weights in MASTER_WEIGHTS,
         f"trainer.master_weights={trainer.master_weights}: expected one of {', '.join(MASTER_WEIGHTS)}")
    need(str(trainer.autocast) in AUTOCAST if trainer.autocast is not None else True,
         f"trainer.autocast={trainer.autocast}: expected one of {', '.join(AUTOCAST)}")
    need(str(trainer.autocast) not in ("float16", "fp16"),
         f"trainer.autocast={trainer.autocast}: float16 autocast needs a gradient scaler, which this trainer does "
         "not use; use trainer.autocast=bfloat16 (fp32's exponent range, no scaler needed)")

    # checkpoints, resume, numerics, the run directory
    for key in ("checkpoint_every", "keep_checkpoints"):
        value = trainer.get(key)
        need(value is None or (_is_int(value) and value > 0), f"trainer.{key}={value}: expected null or an int > 0")
    for name, value in (("trainer.resume", trainer.get("resume")),
                        ("trainer.skip_nonfinite", trainer.get("skip_nonfinite")),
                        ("trainer.flush_denormal", trainer.get("flush_denormal", True)),
                        ("overwrite", cfg.get("overwrite"))):
        need(isinstance(value, bool), f"{name}={value}: expected true or false")
    need(not (trainer.get("resume") is True and cfg.get("overwrite") is True),
         "trainer.resume=true continues the run in the run directory and overwrite=true replaces it: choose one")
    need(trainer.share_prompt in ("auto", True, False),
         f"trainer.share_prompt={trainer.share_prompt}: expected auto, true (one prompt-shared forward) or false")
    need(trainer.shared_attention in SHARED_ATTENTION,
         f"trainer.shared_attention={trainer.shared_attention}: expected one of {', '.join(SHARED_ATTENTION)}")

    # the loss
    problems += [f"loss: {problem}" for problem in loss_config_problems(OmegaConf.to_container(loss, resolve=True))]

    rounds = cfg.get("rounds", 1)
    need(_is_int(rounds) and rounds >= 1, f"rounds={rounds}: expected an int >= 1 (pipeline.py's rounds of iterative MIPO)")
    if _is_int(rounds) and rounds > 1:
        need(not data.pairs_path, f"rounds={rounds} samples new pairs every round, but data.pairs_path={data.pairs_path} "
             "fixes one pairs file: leave data.pairs_path unset")

    # negatives against the task
    strategy = cfg.negatives.strategy
    need(strategy in STRATEGIES, f"unknown negatives.strategy {strategy!r}; expected one of {STRATEGIES}")
    num_negatives = cfg.negatives.get("num_negatives", 1)
    need(_is_int(num_negatives) and num_negatives >= 1,
         f"negatives.num_negatives={num_negatives}: expected an int >= 1 (rejected responses per prompt)")
    if _is_int(num_negatives) and num_negatives > 1:
        need(strategy == "random" and cfg.negatives.get("reuse_positives") is True,
             f"negatives.num_negatives={num_negatives} takes the K negatives from K distinct other training prompts' "
             f"responses: it needs negatives=random with negatives.reuse_positives=true, got negatives.strategy="
             f"{strategy}, reuse_positives={cfg.negatives.get('reuse_positives')}")
        family = LOSS_FAMILIES.get(loss.get("loss_type"))
        need(family is None or family.multi_negative,
             f"negatives.num_negatives={num_negatives}: loss.loss_type={loss.get('loss_type')} trains on one negative "
             "per prompt; K > 1 needs a DPO loss (loss=dpo, cdpo, ipo or hinge)")
    try:
        task = build_task(cfg)
    except ValueError as error:
        problems.append(f"task.name={cfg.task.name}: {error}")
        task = None
    if task is not None and strategy == "random_context" and not task.supports_context:
        problems.append(f"negatives=random_context needs a personalization task whose prompts carry a user context; "
                        f"task {task.name!r} has none (use negatives=random or negatives=partial)")

    # sampling and evaluation
    for group, settings in (("sampling", sampling), ("eval", ev)):
        need(_is_number(settings.temperature) and settings.temperature >= 0,
             f"{group}.temperature={settings.temperature}: expected a number >= 0 (0 = greedy)")
        need(_is_number(settings.top_p) and 0 < settings.top_p <= 1, f"{group}.top_p={settings.top_p}: expected (0, 1]")
        need(_is_int(settings.max_new_tokens) and settings.max_new_tokens > 0,
             f"{group}.max_new_tokens={settings.max_new_tokens}: expected an int > 0")
        need(settings.batch_size == "auto" or (_is_int(settings.batch_size) and settings.batch_size > 0),
             f"{group}.batch_size={settings.batch_size}: expected auto or an int > 0")
        top_k = settings.get("top_k")
        need(top_k is None or (_is_int(top_k) and top_k > 0), f"{group}.top_k={top_k}: expected null (no top-k) or an int > 0")
    for key in ("chunk_size", "max_batch_tokens"):
        need(_is_int(sampling[key]) and sampling[key] > 0, f"sampling.{key}={sampling[key]}: expected an int > 0")
    need(_is_int(ev.score_batch_size) and ev.score_batch_size > 0,
         f"eval.score_batch_size={ev.score_batch_size}: expected an int > 0")
    need(_is_int(ev.mi_k) and ev.mi_k >= 1, f"eval.mi_k={ev.mi_k}: expected an int >= 1")
    if _is_int(ev.mi_k) and _is_int(data.num_eval):
        need(ev.mi_k <= data.num_eval - 1,
             f"eval.mi_k={ev.mi_k} needs at least {ev.mi_k + 1} distinct evaluation prompts (each row's own and "
             f"K others) but data.num_eval={data.num_eval}: lower eval.mi_k or raise data.num_eval")

    # model, numerics, logging
    source_problem = model_source_problem(cfg.model)
    need(source_problem is None, f"{source_problem} (model={cfg.model.get('name')})")
    for key, value in (("model.dtype", cfg.model.get("dtype")), ("model.train_dtype", cfg.model.get("train_dtype")),
                       ("eval.dtype", ev.get("dtype"))):
        need(value is None or value == "auto" or value in DTYPES, f"{key}={value}: expected auto or one of {', '.join(DTYPES)}")
    need(cfg.kernel in KERNELS, f"kernel={cfg.kernel}: expected one of {', '.join(KERNELS)}")
    need(isinstance(cfg.fused_lm_head, bool), f"fused_lm_head={cfg.fused_lm_head}: expected true or false")
    need(cfg.wandb.mode in WANDB_MODES, f"wandb.mode={cfg.wandb.mode!r}: expected one of {', '.join(WANDB_MODES)}")
    from mipo.stages.evaluate import (
        eval_config_problems,  # evaluation imports this module
    )
    problems += eval_config_problems(cfg)
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every problem with ``cfg``; return quietly when it can run."""
    raise_problems("the config", config_problems(cfg))
