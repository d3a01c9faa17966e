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

import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mipo.data.encoding import length_problems, response_suffix_problems
from mipo.data.pairs import pairs_config_problems
from mipo.data.tasks import build_task
from mipo.data.tasks.splits import split_size_problems
from mipo.losses import loss_config_problems
from mipo.model.adapters import lora_problems
from mipo.model.generation import decode_problems
from mipo.model.loading import attention_problem, device_problem, model_source_problem
from mipo.model.logprobs import scoring_problems
from mipo.model.precision import precision_problems
from mipo.negatives import negatives_problems
from mipo.runtime.errors import failed, raise_problems, type_name
from mipo.runtime.files import folder_problem
from mipo.runtime.tracking import wandb_problems
from mipo.stages.evaluate import eval_config_problems
from mipo.stages.pipeline import rounds_problems
from mipo.stages.sample import sampling_problems
from mipo.stages.train import RESUME_MUST
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
    resume_as_bool = {**OmegaConf.to_container(trainer, resolve=True), "resume": trainer.get("resume") in (True, RESUME_MUST)}
    problems = [
        *([device] if (device := device_problem(cfg.get("device"))) else []),
        *([cache] if (cache := folder_problem(cfg.paths.cache_dir, "paths.cache_dir")) else []),
        *length_problems(cfg.data), *response_suffix_problems(cfg.data), *split_size_problems(cfg.data),  # data
        *pairs_config_problems(cfg.data),
        *batch_problems(trainer, world), *optimizer_problems(trainer), *checkpoint_problems(resume_as_bool),  # trainer
        *step_problems(trainer), *forward_problems(trainer), *_run_problems(cfg),
        *loss, *loss_settings_problems(cfg.loss), *rounds_problems(cfg),  # the method
        *([task_problem] if task_problem else []), *negatives_problems(cfg.negatives, cfg.loss.get("loss_type"), task),
        *sampling_problems(cfg.sampling), *decode_problems("sampling", cfg.sampling),  # sampling
        *decode_problems("eval", cfg.eval), *eval_config_problems(cfg),  # evaluation
        *_model_problems(cfg), *scoring_problems(cfg), *wandb_problems(cfg.wandb),  # model, numerics, logging
        *lora_problems(cfg),  # adapters (QLoRA refused without CUDA)
    ]
    return with_type_problems(cfg, problems)


def _task(cfg: DictConfig) -> tuple[Any, str | None]:
    try:
        return build_task(cfg), None
    except ValueError as error:
        return None, f"task.name={cfg.task.name}: {error}"


def _run_problems(cfg: DictConfig) -> list[str]:
    """The run directory's switches: ``overwrite``, and ``trainer.resume`` (true, false or must) against it."""
    resume = cfg.trainer.get("resume")
    return failed([(isinstance(cfg.get("overwrite"), bool), f"overwrite={cfg.get('overwrite')}: expected true or false"),
                   (resume in (True, False, RESUME_MUST),
                    (f"trainer.resume={resume}: expected true or false, or {RESUME_MUST} (continue from the newest "
                    "checkpoint, refusing to start without one)")),
                   (not (resume in (True, RESUME_MUST) and cfg.get("overwrite") is True),
                    (f"trainer.resume={str(resume).lower()} continues the run in the run directory and overwrite=true "
                    "replaces it: choose one"))])


# --------------------------------------------------------------------------------------------
# Settings the chosen loss ignores
# --------------------------------------------------------------------------------------------

@functools.cache
def loss_settings() -> dict[str, frozenset[str]]:
    """loss_type -> the settings its shipped configs (``conf/loss/*.yaml``) give it: what that loss reads."""
    settings: dict[str, set[str]] = {}
    for path in sorted(LOSS_CONFIGS.glob("*.yaml")):
        config = OmegaConf.to_container(OmegaConf.load(path))
        if isinstance(config, dict) and isinstance(config.get("loss_type"), str):
            settings.setdefault(config["loss_type"], set()).update(config)
    return {loss_type: frozenset(keys) for loss_type, keys in settings.items()}


def loss_settings_problems(loss: DictConfig) -> list[str]:
    """A ``loss.*`` setting the chosen ``loss.loss_type`` does not read (``loss=sft +loss.beta=0.5``) is refused,
    never dropped in silence. What a loss reads is what its shipped ``conf/loss/*.yaml`` sets, so a new option
    added to one is known here at once."""
    loss_type = loss.get("loss_type")
    used = loss_settings().get(loss_type) if isinstance(loss_type, str) else None
    if used is None:  # an unknown loss_type is reported by loss_config_problems
        return []
    return [f"loss.{key}={loss[key]}: loss.loss_type={loss_type} does not use {key} (its settings: "
            f"{', '.join(sorted(used - {'name', 'loss_type'})) or 'none'}); remove it, or choose a loss that uses it"
            for key in loss if key not in used]


# --------------------------------------------------------------------------------------------
# Values of the wrong type: loss.beta='0.1'
# --------------------------------------------------------------------------------------------

CONF = Path(__file__).resolve().parents[2] / "conf"
LOSS_CONFIGS = CONF / "loss"
FREE_TEXT = ("name", "revision", "project", "entity", "tags", "prompt", "date_string", "name_or_path", "source",
             "gguf_file", "gguf_package", "tokenizer", "cache_dir", "pairs_path", "model_path", "chat_template_kwargs",
             "hydra", "defaults")  # keys (any level) under which a string may look like a number
NUMBER = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|nan)", re.IGNORECASE)
KINDS = {"a number": (int, float), "true or false": (bool,)}
WORDS = {"trainer.resume": (RESUME_MUST,)}  # the strings a key takes besides the kind its shipped values have


def _leaves(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain config tree; ``FREE_TEXT`` subtrees left out."""
    if isinstance(node, dict):
        for name, value in node.items():
            if str(name) not in FREE_TEXT:
                yield from _leaves(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, f"{key}[{i}]")
    else:
        yield key, node


INTERPOLATION = re.compile(r"\$\{([\w.]+)\}")  # ``${model.gradient_checkpointing}``


@functools.cache
def shipped_kinds() -> dict[str, str]:
    """Dotted key -> "a number" or "true or false" for every key to which the shipped configs (``conf/**.yaml``)
    give values of that kind only (nulls aside): a string there is the wrong type, whatever it reads as."""
    seen: dict[str, set[str]] = {}
    links: dict[str, set[str]] = {}  # a key shipped as ``${other.key}`` only: the kind of what it reads
    for path in sorted(CONF.glob("*/*.yaml")) + [CONF / "config.yaml"]:
        text = path.read_text()
        group = "" if path.parent == CONF or "@package _global_" in text.split("\n", 1)[0] else path.parent.name
        for key, value in _leaves(OmegaConf.to_container(OmegaConf.create(text)), group):
            if isinstance(value, str) and (link := INTERPOLATION.fullmatch(value)):
                links.setdefault(key, set()).add(link.group(1))
                continue
            kind = next((k for k, types in KINDS.items() if isinstance(value, types) and
                         not (k == "a number" and isinstance(value, bool))), "other" if value is not None else None)
            if kind:
                seen.setdefault(key, set()).add(kind)
    for key, targets in links.items():
        for target in targets:
            seen.setdefault(key, set()).update(seen.get(target, {"other"}))
    return {key: kinds.pop() for key, kinds in seen.items() if len(kinds) == 1 and "other" not in kinds}


def _wrong_types(cfg: DictConfig) -> Iterator[tuple[str, str, str]]:
    """(key, value as given, expected) for every string given where a number or a boolean is expected: a quoted
    number or boolean anywhere (``loss.beta='0.1'``), and any string where the shipped configs hold only numbers
    or only booleans (``trainer.lr=abc``)."""
    kinds = shipped_kinds()
    for key, value in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        if not isinstance(value, str) or value.startswith("${"):
            continue
        words = "".join(f", or {word}" for word in WORDS.get(key, ()))
        if NUMBER.fullmatch(value.strip()):
            yield key, repr(value), "a number"
        elif value.strip().lower() in ("true", "false"):
            yield key, repr(value), "true or false" + words
        elif key in kinds and value not in WORDS.get(key, ()):
            yield key, value, kinds[key] + words


def with_type_problems(cfg: DictConfig, problems: list[str]) -> list[str]:
    """``problems`` with every value of the wrong type (``loss.beta='0.1'``: a string) reported by its type first,
    and the other checks' lines about that same value left out (they would say "beta must be > 0, got 0.1")."""
    wrong = list(_wrong_types(cfg))
    typed = []
    for key, given, expected in wrong:
        value = given[1:-1] if given.startswith("'") else given
        hint = f" (quotes make a value a string: write {key}={value.strip()} without them)" if given != value else ""
        typed.append(f"{key}={given}: expected {expected}, got {type_name(value)}{hint}")
    shown = [f"{key}={given[1:-1] if given.startswith(chr(39)) else given}" for key, given, _ in wrong]
    return [*typed, *(p for p in problems if not any(s in p for s in shown))]


def _model_problems(cfg: DictConfig) -> list[str]:
    """The model's source, its attention implementation, the dtypes and autocast."""
    source_problem = model_source_problem(cfg.model, with_tokenizer=True)  # the run's tokenizer is the model's
    attention = None if source_problem else attention_problem(cfg.model, cfg.paths.cache_dir)
    return [*([f"{source_problem} (model={cfg.model.get('name')})"] if source_problem else []),
            *([attention] if attention else []), *precision_problems(cfg)]


def check_config(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` listing every problem with ``cfg``; return quietly when it can run."""
    raise_problems("the config", config_problems(cfg))
