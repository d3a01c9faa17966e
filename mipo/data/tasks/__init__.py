"""Task registry: loading prompts, building chat messages, making "partial" prompts, grading.

A :class:`Task` turns a data source into :class:`Example` objects and knows how to

* build the chat messages of a prompt (:meth:`Task.messages`; the caller applies the
  tokenizer's chat template),
* remove information from a prompt for MIPO's "partial" negative (:meth:`Task.partial`),
* swap the user's context for another user's (:meth:`Task.with_context`, personalization only),
* extract and grade a final answer (:meth:`Task.extract_answer`, :meth:`Task.is_correct`).

Registered tasks (see :func:`available_tasks`): math ``gsm8k`` and ``svamp``; multiple choice
``arc_challenge`` and ``arc_easy``; personalization ``prism``, ``community_alignment``,
``multifaceted_bench`` and ``persistbench``; and ``jsonl`` (any local JSONL file).

Sources (``"auto"``, ``"hub"``, ``"offline"`` or a local ``.jsonl`` path) are described in
:mod:`mipo.data.tasks.sources`, which also holds :func:`load_splits`.

Modules: ``base`` (Example, Task, PersonalizationTask, row validation), ``sources`` (where rows
come from, splits), ``text`` (numbers, sentences), one module per task family (``gsm8k``,
``svamp``, ``arc``, ``prism``, ``community_alignment``, ``multifaceted``, ``persistbench``,
``jsonl``); this module holds the registry.
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mipo.data.tasks.arc import ARC_CHALLENGE_OFFLINE, ArcTask
from mipo.data.tasks.base import Example, PersonalizationTask, Task, format_context
from mipo.data.tasks.community_alignment import CommunityAlignmentTask
from mipo.data.tasks.gsm8k import GSM8K_COT_EXEMPLARS, Gsm8kTask
from mipo.data.tasks.jsonl import JsonlTask
from mipo.data.tasks.multifaceted import MultifacetedBenchTask
from mipo.data.tasks.persistbench import PERSISTBENCH_SUBSETS, PersistBenchTask
from mipo.data.tasks.prism import PrismTask
from mipo.data.tasks.splits import load_splits
from mipo.data.tasks.svamp import SvampTask
from mipo.data.tasks.text import extract_number, normalize_number, split_sentences

__all__ = [
    "Example",
    "Task",
    "PersonalizationTask",
    "Gsm8kTask",
    "SvampTask",
    "ArcTask",
    "PrismTask",
    "CommunityAlignmentTask",
    "MultifacetedBenchTask",
    "PersistBenchTask",
    "JsonlTask",
    "get_task",
    "available_tasks",
    "load_splits",
    "normalize_number",
    "extract_number",
    "split_sentences",
    "format_context",
    "GSM8K_COT_EXEMPLARS",
    "PERSISTBENCH_SUBSETS",
]

_REGISTRY: dict[str, tuple[type[Task], dict[str, Any]]] = {
    "gsm8k": (Gsm8kTask, {}),
    "svamp": (SvampTask, {}),
    "arc_challenge": (
        ArcTask,
        {"name": "arc_challenge", "hub_config": "ARC-Challenge", "offline_files": ARC_CHALLENGE_OFFLINE},
    ),
    "arc_easy": (ArcTask, {"name": "arc_easy", "hub_config": "ARC-Easy", "offline_files": ()}),
    "prism": (PrismTask, {}),
    "community_alignment": (CommunityAlignmentTask, {}),
    "multifaceted_bench": (MultifacetedBenchTask, {}),
    "persistbench": (PersistBenchTask, {}),
    "jsonl": (JsonlTask, {}),
}


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with its ``options``.

    Raises:
        ValueError: unknown name (lists the registered ones) or an option the task does not take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
    task_class, fixed = _REGISTRY[name]
    accepted = [
        parameter
        for parameter in inspect.signature(task_class.__init__).parameters
        if parameter != "self" and parameter not in fixed
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} got unknown option(s) {unknown}; accepted options: {accepted}")
    return task_class(**fixed, **options)


def build_task(cfg: DictConfig) -> Task:
    """The task of ``cfg.task`` with its options."""
    options = cfg.task.get("options")
    return get_task(cfg.task.name, **(OmegaConf.to_container(options, resolve=True) if options else {}))


def task_splits(cfg: DictConfig, task: Task | None = None) -> tuple[list[Example], list[Example]]:
    """The disjoint training and evaluation prompts of this config."""
    task = task or build_task(cfg)
    return load_splits(task, cfg.data.source, cfg.data.num_train, cfg.data.num_eval, cfg.seed)
