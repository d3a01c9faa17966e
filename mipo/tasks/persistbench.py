"""PersistBench personalization prompts: the user's memories as context, no gold answers."""

from __future__ import annotations

import random
from typing import Any, Sequence

from mipo.chat import Messages
from mipo.tasks import sources
from mipo.tasks.base import Example, Task, require_context, require_text
from mipo.tasks.text import user_turn_with_context

PERSISTBENCH_SUBSETS = ("beneficial_samples", "cross_domain", "sycophancy")


class PersistBenchTask(Task):
    """Personalization prompts from PersistBench (query + memories about the user).

    ``context`` is the memories as a bulleted list, ``question`` the query, no gold answer.
    Prompt: one user message ``"Here is what you know about me:\\n- ...\\n\\n<query>"``, or just the
    query when the context is None. ``partial`` drops the context; ``with_context`` swaps it.
    Uids: ``persistbench/<subset>/<row index>`` (local file: the file stem instead of the subset).
    """

    name = "persistbench"
    max_new_tokens = 512
    has_answers = False
    supports_context = True

    def __init__(self, subsets: Sequence[str] = PERSISTBENCH_SUBSETS, max_new_tokens: int | None = None) -> None:
        super().__init__(max_new_tokens)
        if isinstance(subsets, str):
            subsets = [subsets]
        subsets = list(subsets)
        unknown = [subset for subset in subsets if subset not in PERSISTBENCH_SUBSETS]
        if unknown or not subsets or len(set(subsets)) != len(subsets):
            raise ValueError(
                f"persistbench: subsets must be distinct names from {list(PERSISTBENCH_SUBSETS)}, got {subsets}"
            )
        self.subsets = tuple(subsets)
        self.offline_files = tuple(
            (subset, "inspect_evals", f"persistbench/benchmark_samples/{subset}.jsonl") for subset in self.subsets
        )

    def offline_available(self) -> bool:
        """True only when every selected subset file is installed."""
        return len(sources.offline_paths(self)) == len(self.subsets)

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Rows: ``query`` (string) and ``memories`` (list of strings, or a string)."""
        query = require_text(row, "query", where)
        return Example(uid=uid, question=query, context=require_context(row, "memories", where))

    def messages(self, ex: Example) -> Messages:
        """One user message: the context block (only when present), then the query."""
        return [{"role": "user", "content": user_turn_with_context(ex.context, ex.question)}]

    def partial(self, ex: Example, rng: random.Random) -> Example | None:
        """The same query without the user's context; None if it has none already."""
        return self._without_context(ex)

    def is_correct(self, response: str, ex: Example) -> bool:
        """Always raises: PersistBench is open-ended."""
        self._require_answers(ex)
        return False  # pragma: no cover - _require_answers raises
