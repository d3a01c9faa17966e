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

from mipo.data.encoding import length_problems
from mipo.data.tasks import build_task
from mipo.data.tasks.splits import split_size_problems
from mipo.losses import loss_config_problems
from mipo.model.loading import model_source_problem
from mipo.model.precision import precision_problems
from mipo.model.vllm_backend import BACKENDS
from mipo.negatives import negatives_problems
from mipo.runtime.errors import failed, is_int, is_number, raise_problems
from mipo.runtime.tracking import wandb_problems
from mipo.stages.evaluate import eval_config_problems
from mipo.stages.pipeline import rounds_problems
from mipo.training.checkpoint import checkpoint_problems
from mipo.training.optim import optimizer_problems
from mipo.training.parallel import batch_problems

KERNELS = ("auto", "triton", "torch", "naive")
SHARED_ATTENTION = ("auto", "segments", "flex", "dense")


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem with ``cfg`` as one line each (empty when the config can run).

    Each check sits beside what it checks; this gathers them, layer by layer, in the order a reader of
    ``conf/config.yaml`` meets the keys.
    """
    trainer = cfg.trainer
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's ranks: each takes 1/world of every batch
    problems = [*length_problems(cfg.data), *split_size_problems(cfg.data),
                *batch_problems(trainer, world), *_sampling_backend_problems(cfg),
                *optimizer_problems(trainer), *_run_problems(cfg)]
    problems += [f"loss: {problem}" for problem in loss_config_problems(OmegaConf.to_container(cfg.loss, resolve=True))]
    problems += rounds_problems(cfg)
    task, task_problem = _task(cfg)
    problems += [task_problem] if task_problem else []
    problems += negatives_problems(cfg.negatives, cfg.loss.get("loss_type"), task)
    problems += [*_decoding_problems(cfg), *_model_problems(cfg), *wandb_problems(cfg.wandb), *eval_config_problems(cfg)]
    return problems


def _task(cfg: DictConfig) -> tuple[Any, str | None]:
    try:
        return build_task(cfg), None
    except ValueError as error:
        return None, f"task.name={cfg.task.name}: {error}"


def _sampling_backend_problems(cfg: DictConfig) -> list[str]:
    backend = cfg.sampling.get("backend", "transformers")
    return failed([(backend in BACKENDS, f"sampling.backend={backend}: expected one of {', '.join(BACKENDS)}")])


def _run_problems(cfg: DictConfig) -> list[str]:
    """Checkpoints and resume, the loop's switches, the prompt-shared forward, the run directory."""
    trainer = cfg.trainer
    checks = [(isinstance(value, bool), f"{name}={value}: expected true or false")
              for name, value in (("trainer.skip_nonfinite", trainer.get("skip_nonfinite")),
                                  ("trainer.flush_denormal", trainer.get("flush_denormal", True)),
                                  ("overwrite", cfg.get("overwrite")))]
    checks += [(not (trainer.get("resume") is True and cfg.get("overwrite") is True),
                "trainer.resume=true continues the run in the run directory and overwrite=true replaces it: choose one"),
               (trainer.share_prompt in ("auto", True, False),
                f"trainer.share_prompt={trainer.share_prompt}: expected auto, true (one prompt-shared forward) or false"),
               (trainer.shared_attention in SHARED_ATTENTION,
                f"trainer.shared_attention={trainer.shared_attention}: expected one of {', '.join(SHARED_ATTENTION)}")]
    return [*checkpoint_problems(trainer), *failed(checks)]


def _decoding_problems(cfg: DictConfig) -> list[str]:
    """Sampling and evaluation decoding, sampling's chunks, evaluation's scoring batch and MI's K."""
    sampling, ev, data = cfg.sampling, cfg.eval, cfg.data
    checks = []
    for group, settings in (("sampling", sampling), ("eval", ev)):
        top_k = settings.get("top_k")
        checks += [
            (is_number(settings.temperature) and settings.temperature >= 0,
             f"{group}.temperature={settings.temperature}: expected a number >= 0 (0 = greedy)"),
            (is_number(settings.top_p) and 0 < settings.top_p <= 1, f"{group}.top_p={settings.top_p}: expected (0, 1]"),
            (is_int(settings.max_new_tokens) and settings.max_new_tokens > 0,
             f"{group}.max_new_tokens={settings.max_new_tokens}: expected an int > 0"),
            (settings.batch_size == "auto" or (is_int(settings.batch_size) and settings.batch_size > 0),
             f"{group}.batch_size={settings.batch_size}: expected auto or an int > 0"),
            (top_k is None or (is_int(top_k) and top_k > 0), f"{group}.top_k={top_k}: expected null (no top-k) or an int > 0"),
        ]
    checks += [(is_int(sampling[key]) and sampling[key] > 0, f"sampling.{key}={sampling[key]}: expected an int > 0")
               for key in ("chunk_size", "max_batch_tokens")]
    checks += [(is_int(ev.score_batch_size) and ev.score_batch_size > 0,
                f"eval.score_batch_size={ev.score_batch_size}: expected an int > 0"),
               (is_int(ev.mi_k) and ev.mi_k >= 1, f"eval.mi_k={ev.mi_k}: expected an int >= 1")]
    if is_int(ev.mi_k) and is_int(data.num_eval):
        checks.append((ev.mi_k <= data.num_eval - 1,
                       f"eval.mi_k={ev.mi_k} needs at least {ev.mi_k + 1} distinct evaluation prompts (each row's own "
                       f"and K others) but data.num_eval={data.num_eval}: lower eval.mi_k or raise data.num_eval"))
    return failed(checks)


def _model_problems(cfg: DictConfig) -> list[str]:
    """The model's source, the dtypes and autocast, the log-prob kernel and the output layer."""
    source_problem = model_source_problem(cfg.model)
    return [*([f"{source_problem} (model={cfg.model.get('name')})"] if source_problem else []), *precision_problems(cfg),
            *failed([(cfg.kernel in KERNELS, f"kernel={cfg.kernel}: expected one of {', '.join(KERNELS)}"),
                     (isinstance(cfg.fused_lm_head, bool), f"fused_lm_head={cfg.fused_lm_head}: expected true or false")])]


def check_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every problem with ``cfg``; return quietly when it can run."""
    raise_problems("the config", config_problems(cfg))
