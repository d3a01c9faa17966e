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

The prompt set (``negatives.prompt_set``): ``partial`` serves only the prompts from which the task can
remove something (610 of the 1,172 offline ARC-Challenge questions; 1,303 of GSM8K's 1,319), so a
comparison of strategies would train its arms on different prompts. ``prompt_set: own`` (the default)
lets every strategy keep the prompts it can serve; ``prompt_set: partial`` restricts any strategy to the
prompts ``partial`` serves, found with a copy of the generator's state, so the ``partial`` arm's plan is
the one it is under ``own`` and every arm of one seed trains on the same prompts. The plan records what
it dropped and why (``NegativePlan.prompt_record``: the pairs file's sidecar, ``mipo.data.pairs``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from mipo.data.tasks import Example, Task
from mipo.losses import LOSS_FAMILIES
from mipo.runtime.errors import failed, is_int

STRATEGIES = ("random", "partial", "random_context")
PROMPT_SETS = ("own", "partial")  # ``negatives.prompt_set``: the prompts a strategy keeps (module docstring)


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
    """Which prompt x'_i each kept row i is contrasted with, and which offered rows were dropped and why."""

    examples: list[Example]  # the rows kept, x_i
    negatives: list[Example]  # x'_i, aligned with ``examples``
    source_index: list[int] | None  # random: sigma(i), the row whose response y- is reused
    extra_source_index: list[list[int]] | None = None  # K > 1: the K - 1 further source rows of each row
    dropped_uids: list[str] = field(default_factory=list)  # the offered rows not kept, in the order offered
    drop_reason: str | None = None  # why they were dropped (None: none were)

    @property
    def dropped(self) -> int:
        """How many offered rows were dropped."""
        return len(self.dropped_uids)

    def prompt_record(self) -> dict[str, Any]:
        """How many prompts were offered, kept and dropped, why, and the dropped uids (the pairs' sidecar)."""
        return {"prompts_offered": len(self.examples) + self.dropped, "kept": len(self.examples),
                "dropped": self.dropped, "reason": self.drop_reason, "dropped_uids": list(self.dropped_uids)}


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


def partial_prompts(task: Task, examples: list[Example], rng: random.Random) -> tuple[list[Example], list[Example],
                                                                                   list[str]]:
    """The examples ``task.partial`` can remove information from, their partial prompts (drawn from ``rng``
    in the order offered), and the uids of the others; ValueError if it can serve none."""
    kept, reduced, dropped = [], [], []
    for example in examples:
        partial = task.partial(example, rng)
        if partial is None:
            dropped.append(example.uid)
        else:
            kept.append(example)
            reduced.append(partial)
    if not kept:
        raise ValueError(f"negatives=partial: task {task.name!r} could remove information from none of the "
                         f"{len(examples)} prompts")
    return kept, reduced, dropped


def plan_negatives(task: Task, examples: list[Example], strategy: str, rng: random.Random,
                   num_negatives: int = 1, prompt_set: str = "own") -> NegativePlan:
    """Pick the negative prompt x' of every example according to ``strategy`` (and, for ``random`` with
    ``num_negatives`` = K > 1, K - 1 more source rows each), on the prompts of ``prompt_set``.

    ``prompt_set="partial"`` first keeps the examples ``partial`` serves, probing ``task.partial`` with a
    copy of ``rng`` (the draws ``strategy="partial"`` makes from the same state), then plans ``strategy`` on
    them with ``rng`` itself: the ``partial`` plan is the one it is under ``"own"``.
    """
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown negatives.prompt_set {prompt_set!r}; expected one of {PROMPT_SETS}")
    if num_negatives > 1 and strategy != "random":
        raise ValueError(f"negatives.num_negatives={num_negatives} takes negatives from other prompts: it needs "
                         f"negatives=random, got {strategy}")
    no_partial = (f"task {task.name!r} can remove no information from them (negatives=partial has no x' for "
                  "them)")
    if strategy == "partial":
        kept, negatives, dropped = partial_prompts(task, examples, rng)
        return NegativePlan(kept, negatives, None, dropped_uids=dropped, drop_reason=no_partial if dropped else None)
    dropped = []
    if prompt_set == "partial":
        probe = random.Random()
        probe.setstate(rng.getstate())
        examples, _, dropped = partial_prompts(task, examples, probe)
    plan = _other_prompts_plan(task, examples, strategy, rng, num_negatives)
    plan.dropped_uids = dropped
    plan.drop_reason = f"negatives.prompt_set=partial: {no_partial}" if dropped else None
    return plan


def _other_prompts_plan(task: Task, examples: list[Example], strategy: str, rng: random.Random,
                        num_negatives: int) -> NegativePlan:
    """``random`` and ``random_context``: x' is built from another row (its prompt, or its user's context)."""
    if strategy == "random":
        keys = [e.question if e.context is None else f"{e.context}\n{e.question}" for e in examples]
        sigma = derangement(keys, rng)
        extra = extra_sources(keys, sigma, num_negatives - 1, rng) if num_negatives > 1 else None
        return NegativePlan(examples, [examples[j] for j in sigma], sigma, extra_source_index=extra)
    if strategy == "random_context":
        if any(e.context is None for e in examples):
            raise ValueError(f"negatives=random_context needs a personalization task whose prompts carry a user context; "
                             f"task {task.name!r} has prompts without one (use negatives=random or partial)")
        sigma = derangement([e.context for e in examples], rng)  # type: ignore[misc]
        return NegativePlan(examples, [task.with_context(e, examples[j].context) for e, j in zip(examples, sigma)], None)
    raise ValueError(f"unknown negatives.strategy {strategy!r}; expected one of {STRATEGIES}")


def negatives_problems(negatives: Mapping[str, Any], loss_type: str | None, task: Task | None) -> list[str]:
    """``negatives.strategy``, ``negatives.num_negatives`` and ``negatives.prompt_set`` against the loss and the
    task (None: not built)."""
    strategy, num_negatives = negatives["strategy"], negatives.get("num_negatives", 1)
    prompt_set = negatives.get("prompt_set", "own")
    checks = [(strategy in STRATEGIES, f"unknown negatives.strategy {strategy!r}; expected one of {STRATEGIES}"),
              (prompt_set in PROMPT_SETS,
               (f"negatives.prompt_set={prompt_set}: expected one of {', '.join(PROMPT_SETS)} (own: the prompts the "
                "strategy serves; partial: only those negatives=partial serves, for comparing strategies)")),
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
