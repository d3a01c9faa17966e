"""Training and evaluation prompts of a task: disjoint by uid and by question text, deterministic for a seed."""

from __future__ import annotations

import os
import random
from typing import Any, Mapping

from mipo.data.tasks.base import Example, Task
from mipo.data.tasks.sources import with_offline_fallback
from mipo.runtime.errors import failed, is_int


def _question_key(ex: Example) -> str:
    return " ".join(ex.question.split()).casefold()


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"load_splits: {name} must be None or an int >= 0, got {value!r}")


def _take(pool: list[Example], count: int | None, what: str, task: Task, source: str) -> list[Example]:
    if count is None:
        return pool
    if count > len(pool):
        raise ValueError(
            f"load_splits: {what}={count} but only {len(pool)} {task.name} examples are available "
            f"from source {source!r} for it; lower {what} (or use None for all)"
        )
    return pool[:count]


def _split_pools(task: Task, resolved_source: str) -> tuple[list[Example] | None, list[Example]]:
    """(train split, evaluation split) of a source with a train split; (None, the only split)
    otherwise."""
    if task.train_split_available(resolved_source):
        return task.load(resolved_source, "train"), task.load(resolved_source, task.hub_eval_split)
    return None, task.load(resolved_source)


def load_splits(
    task: Task,
    source: str,
    num_train: int | None,
    num_eval: int | None,
    seed: int,
) -> tuple[list[Example], list[Example]]:
    """Training and evaluation prompts, disjoint by uid and by question text.

    * Source with a train split (hub GSM8K/SVAMP/ARC): eval = ``num_eval`` examples of the
      shuffled test split; train = ``num_train`` examples of the shuffled train split, after
      removing any whose question text also occurs anywhere in the test split.
    * Single-split source (offline copies, a local JSONL, a hub dataset published as one split):
      the examples are shuffled with ``random.Random(seed)``; eval = the first ``num_eval``;
      train = the next ``num_train``, skipping any whose question text occurs in eval.

    ``None`` means all (so with a single split and ``num_eval=None`` the train set is empty).
    Deterministic for a seed. Raises ValueError when more examples are requested than exist.
    """
    _check_count("num_train", num_train)
    _check_count("num_eval", num_eval)
    requested = os.fspath(source)
    train_split, test_pool = with_offline_fallback(task, requested, lambda resolved: _split_pools(task, resolved))
    rng = random.Random(seed)
    rng.shuffle(test_pool)
    if train_split is not None:
        rng.shuffle(train_split)
    eval_examples = _take(test_pool, num_eval, "num_eval", task, requested)
    if train_split is not None:
        train_pool, held_out = train_split, test_pool
    else:  # a single split: train comes from what eval left over
        train_pool, held_out = test_pool[len(eval_examples) :], eval_examples
    held_out_keys = {_question_key(ex) for ex in held_out}
    train_candidates = [ex for ex in train_pool if _question_key(ex) not in held_out_keys]
    train_examples = _take(train_candidates, num_train, "num_train", task, requested)
    eval_uids = {ex.uid for ex in eval_examples}
    if any(ex.uid in eval_uids for ex in train_examples):  # pragma: no cover - guaranteed above
        raise RuntimeError("load_splits: train and eval share a uid")
    return train_examples, eval_examples


def split_size_problems(data: Mapping[str, Any]) -> list[str]:
    """``data.num_train`` / ``data.num_eval``: null (all) or a count."""
    return failed([(data[key] is None or (is_int(data[key]) and data[key] >= 0),
                    f"data.{key}={data[key]}: expected null (all) or an int >= 0") for key in ("num_train", "num_eval")])
