"""What a composed config means: checked once, before any model loads, and read in one place.

Every entry point calls ``check_config(cfg)`` (through ``mipo.stages.cli.setup``) right after Hydra
composes ``conf/config.yaml``. It reports every bad value it finds in one ``ConfigError``,
each line naming the override to change and what was expected, so a run never spends minutes
loading a model before failing on a batch size. Code below the entry points then trusts
the config and does not re-check it per row or per micro-batch.

Each check sits beside what it checks (``length_problems`` beside the encoding, ``optimizer_problems``
beside the optimizer, ``negatives_problems`` beside the strategies, ...); this module only gathers them.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mipo.data.encoding import length_problems, response_suffix_problems
from mipo.data.tasks import build_task
from mipo.data.tasks.splits import split_size_problems
from mipo.losses import loss_config_problems
from mipo.model.generation import decode_problems
from mipo.model.loading import model_source_problem
from mipo.model.logprobs import scoring_problems
from mipo.model.precision import precision_problems
from mipo.negatives import negatives_problems
from mipo.runtime.errors import failed, raise_problems
from mipo.runtime.tracking import wandb_problems
from mipo.stages.evaluate import eval_config_problems
from mipo.stages.pipeline import rounds_problems
from mipo.stages.sample import sampling_problems
from mipo.training.checkpoint import checkpoint_problems
from mipo.training.forward import forward_problems
from mipo.training.optim import optimizer_problems
from mipo.training.parallel import batch_problems
from mipo.training.step import step_problems


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem with ``cfg`` as one line each (empty when the config can run).

    Each check sits beside what it checks; this gathers them, in the order a reader of
    ``conf/config.yaml`` meets the keys.
    """
    trainer = cfg.trainer
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's ranks: each takes 1/world of every batch
    loss = [f"loss: {problem}" for problem in loss_config_problems(OmegaConf.to_container(cfg.loss, resolve=True))]
    task, task_problem = _task(cfg)
    return [
        *length_problems(cfg.data), *response_suffix_problems(cfg.data), *split_size_problems(cfg.data),  # data
        *batch_problems(trainer, world), *optimizer_problems(trainer), *checkpoint_problems(trainer),  # trainer
        *step_problems(trainer), *forward_problems(trainer), *_run_problems(cfg),
        *loss, *rounds_problems(cfg),  # the method
        *([task_problem] if task_problem else []), *negatives_problems(cfg.negatives, cfg.loss.get("loss_type"), task),
        *sampling_problems(cfg.sampling), *decode_problems("sampling", cfg.sampling),  # sampling
        *decode_problems("eval", cfg.eval), *eval_config_problems(cfg),  # evaluation
        *_model_problems(cfg), *scoring_problems(cfg), *wandb_problems(cfg.wandb),  # model, numerics, logging
    ]


def _task(cfg: DictConfig) -> tuple[Any, str | None]:
    try:
        return build_task(cfg), None
    except ValueError as error:
        return None, f"task.name={cfg.task.name}: {error}"


def _run_problems(cfg: DictConfig) -> list[str]:
    """The run directory's switches: ``overwrite``, and ``trainer.resume`` against it."""
    return failed([(isinstance(cfg.get("overwrite"), bool), f"overwrite={cfg.get('overwrite')}: expected true or false"),
                   (not (cfg.trainer.get("resume") is True and cfg.get("overwrite") is True),
                    "trainer.resume=true continues the run in the run directory and overwrite=true replaces it: "
                    "choose one")])


def _model_problems(cfg: DictConfig) -> list[str]:
    """The model's source, the dtypes and autocast."""
    source_problem = model_source_problem(cfg.model)
    return [*([f"{source_problem} (model={cfg.model.get('name')})"] if source_problem else []), *precision_problems(cfg)]


def check_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every problem with ``cfg``; return quietly when it can run."""
    raise_problems("the config", config_problems(cfg))
