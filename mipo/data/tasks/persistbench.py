"""PersistBench personalization prompts: the user's memories as context, no gold answers."""

from __future__ import annotations

from typing import Any, Sequence

from mipo.data.tasks import sources
from mipo.data.tasks.base import (
    Example,
    PersonalizationTask,
    check_choices,
    require_context,
    require_text,
)

PERSISTBENCH_SUBSETS = ("beneficial_samples", "cross_domain", "sycophancy")


class PersistBenchTask(PersonalizationTask):
    """Personalization prompts from PersistBench (query + memories about the user).

    ``context`` is the memories as a bulleted list, ``question`` the query, no gold answer; the
    prompt, ``partial`` and ``with_context`` are those of :class:`PersonalizationTask`.
    Uids: ``persistbench/<subset>/<row index>`` (local file: the file stem instead of the subset).
    """

    name = "persistbench"

    def __init__(self, subsets: Sequence[str] = PERSISTBENCH_SUBSETS, max_new_tokens: int | None = None) -> None:
        super().__init__(max_new_tokens)
        self.subsets = check_choices("persistbench", "subsets", subsets, PERSISTBENCH_SUBSETS)
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
