"""Negative prompts x' for MIPO pairs: the rejected response is y- ~ pi_base(.|x').

Strategies (the Hydra group ``negatives``):

- ``random``: x' is another training prompt. By default the response already sampled for
  that prompt is reused as y- (``reuse_positives: true``): y+_sigma(i) ~ pi(.|x_sigma(i)) has
  exactly the distribution of a fresh sample from pi(.|x'), and generating once per prompt
  halves the sampling cost. sigma is a derangement, so no prompt gets its own response back.
- ``partial``: x' is x with information removed, by the task (one sentence of a math or
  science question dropped; the user's context dropped for personalization). Rows where the
  task can remove nothing are dropped.
- ``random_context``: personalization only: the same query with another user's context.

K negatives per prompt (``negatives.num_negatives`` = K > 1, ``random`` only): besides sigma(i),
each row gets K - 1 more source rows (``extra_sources``), so its K rejected responses answer K
distinct other prompts. K = 1 draws nothing more from the generator: the plan is the one it was.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

from mipo.data.tasks import Example, Task
from mipo.losses import LOSS_FAMILIES
from mipo.runtime.errors import failed, is_int

STRATEGIES = ("random", "partial", "random_context")


def derangement(keys: list[str], rng: random.Random) -> list[int]:
    """A random permutation sigma of range(len(keys)) with keys[sigma(i)] != keys[i] for every i.

    ``keys`` are what must differ (prompt texts, user contexts), so that duplicates in the
    data cannot hand a row its own prompt back. Rejection sampling first: for distinct keys
    the acceptance rate tends to 1/e, so a few tries suffice. Heavily repeated keys can make
    acceptance vanishingly rare, so after that a direct construction is used: rows grouped by
    key (largest group first, shuffled within groups) are shifted by the largest group's size,
    which moves every row out of its own group.
    """
    n = len(keys)
    counts = Counter(keys)
    if n < 2 or len(counts) < 2:
        raise ValueError(f"a derangement needs at least 2 distinct prompts, got {len(counts)}")
    largest = max(counts.values())
    if largest > n - largest:
        raise ValueError(f"{largest} of {n} rows share one prompt: no permutation can give each row a different one")
    for _ in range(100):
        sigma = list(range(n))
        rng.shuffle(sigma)
        if all(keys[sigma[i]] != keys[i] for i in range(n)):
            return sigma
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        rng.shuffle(members)
    order = [i for members in sorted(groups.values(), key=len, reverse=True) for i in members]
    sigma = [0] * n
    for position, i in enumerate(order):
        sigma[i] = order[(position + largest) % n]
    return sigma


@dataclass
class NegativePlan:
    """Which prompt x'_i each kept row i is contrasted with."""

    examples: list[Example]  # the rows kept, x_i
    negatives: list[Example]  # x'_i, aligned with ``examples``
    source_index: list[int] | None  # random: sigma(i), the row whose response y- is reused
    dropped: int = 0  # rows for which the strategy had nothing to remove
    extra_source_index: list[list[int]] | None = None  # K > 1: the K - 1 further source rows of each row


def extra_sources(keys: list[str], sigma: list[int], num_extra: int, rng: random.Random) -> list[list[int]]:
    """For each row i, ``num_extra`` rows j whose keys differ from keys[i], keys[sigma(i)] and each other's.

    Together with sigma(i) they give row i K = 1 + num_extra negatives from K distinct other prompts.
    Drawn by rejection (a uniform row, kept if its key is new for row i): with many more distinct keys
    than K a few draws suffice; ValueError if there are not K + 1 distinct keys.
    """
    distinct = len(set(keys))
    if distinct < num_extra + 2:
        raise ValueError(f"negatives.num_negatives={num_extra + 1} needs at least {num_extra + 2} distinct prompts "
                         f"(each prompt's own and {num_extra + 1} others), got {distinct}: lower "
                         "negatives.num_negatives or raise data.num_train")
    n = len(keys)
    by_key: dict[str, list[int]] = {}
    for j, key in enumerate(keys):
        by_key.setdefault(key, []).append(j)
    extras = []
    for i in range(n):
        used = {keys[i], keys[sigma[i]]}
        chosen: list[int] = []
        for _ in range(64 * (num_extra + 1)):
            if len(chosen) == num_extra:
                break
            j = rng.randrange(n)
            if keys[j] not in used:
                used.add(keys[j])
                chosen.append(j)
        if len(chosen) < num_extra:  # few distinct keys: draw among the keys left
            left = sorted(k for k in by_key if k not in used)
            for key in rng.sample(left, num_extra - len(chosen)):
                chosen.append(rng.choice(by_key[key]))
        extras.append(chosen)
    return extras


def plan_negatives(task: Task, examples: list[Example], strategy: str, rng: random.Random,
                   num_negatives: int = 1) -> NegativePlan:
    """Pick the negative prompt x' of every example according to ``strategy`` (and, for ``random`` with
    ``num_negatives`` = K > 1, K - 1 more source rows each)."""
    if num_negatives > 1 and strategy != "random":
        raise ValueError(f"negatives.num_negatives={num_negatives} takes negatives from other prompts: it needs "
                         f"negatives=random, got {strategy}")
    if strategy == "random":
        keys = [e.question if e.context is None else f"{e.context}\n{e.question}" for e in examples]
        sigma = derangement(keys, rng)
        extra = extra_sources(keys, sigma, num_negatives - 1, rng) if num_negatives > 1 else None
        return NegativePlan(examples, [examples[j] for j in sigma], sigma, extra_source_index=extra)
    if strategy == "partial":
        kept, negatives = [], []
        for example in examples:
            reduced = task.partial(example, rng)
            if reduced is not None:
                kept.append(example)
                negatives.append(reduced)
        if not kept:
            raise ValueError(f"negatives=partial: task {task.name!r} could remove information from none of the {len(examples)} prompts")
        return NegativePlan(kept, negatives, None, dropped=len(examples) - len(kept))
    if strategy == "random_context":
        if any(e.context is None for e in examples):
            raise ValueError(f"negatives=random_context needs a personalization task whose prompts carry a user context; "
                             f"task {task.name!r} has prompts without one (use negatives=random or partial)")
        sigma = derangement([e.context for e in examples], rng)  # type: ignore[misc]
        return NegativePlan(examples, [task.with_context(e, examples[j].context) for e, j in zip(examples, sigma)], None)
    raise ValueError(f"unknown negatives.strategy {strategy!r}; expected one of {STRATEGIES}")


def negatives_problems(negatives: Mapping[str, Any], loss_type: str | None, task: Task | None) -> list[str]:
    """``negatives.strategy`` and ``negatives.num_negatives`` against the loss and the task (None: not built)."""
    strategy, num_negatives = negatives["strategy"], negatives.get("num_negatives", 1)
    checks = [(strategy in STRATEGIES, f"unknown negatives.strategy {strategy!r}; expected one of {STRATEGIES}"),
              (is_int(num_negatives) and num_negatives >= 1,
               f"negatives.num_negatives={num_negatives}: expected an int >= 1 (rejected responses per prompt)")]
    if is_int(num_negatives) and num_negatives > 1:
        family = LOSS_FAMILIES.get(loss_type)
        checks += [(strategy == "random" and negatives.get("reuse_positives") is True,
                    f"negatives.num_negatives={num_negatives} takes the K negatives from K distinct other training "
                    f"prompts' responses: it needs negatives=random with negatives.reuse_positives=true, got "
                    f"negatives.strategy={strategy}, reuse_positives={negatives.get('reuse_positives')}"),
                   (family is None or family.multi_negative,
                    f"negatives.num_negatives={num_negatives}: loss.loss_type={loss_type} trains on one negative "
                    "per prompt; K > 1 needs a DPO loss (loss=dpo, cdpo, ipo or hinge)")]
    if task is not None and strategy == "random_context":
        checks.append((task.supports_context, f"negatives=random_context needs a personalization task whose prompts "
                       f"carry a user context; task {task.name!r} has none (use negatives=random or negatives=partial)"))
    return failed(checks)
