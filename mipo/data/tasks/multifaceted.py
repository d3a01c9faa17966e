"""Multifaceted-Bench (Lee et al., 2024, "Aligning to Thousands of Preferences via System Message
Generalization", arXiv 2405.17977): instructions paired with a system message that states a
user's preferences, and a reference answer written for that system message.

Hub source: ``kaist-ai/Multifaceted-Bench`` (https://huggingface.co/datasets/kaist-ai/Multifaceted-Bench),
config ``default``, one split ``train`` (921 rows). Row schema from the dataset card's
``dataset_info``: ``source`` (str), ``preference_set`` (list of ``{dimension, subdimension,
preference, description}``, four per row), ``system`` (str, the system message), ``prompt``
(str, the instruction), ``reference_answer`` (str), ``rubrics`` (list of ``{criteria,
score_descriptions: {"1".."5"}}``). The same instruction appears with different system messages.

The system message is the user's context, as in the Janus paper, where the preferences reach
the model only through it; it is sent as the system turn. The MIPO paper's released code does not
show how it built these prompts.
"""

from __future__ import annotations

from typing import Any

from mipo.data.chat import Messages
from mipo.data.tasks.base import Example, PersonalizationTask, require_text


class MultifacetedBenchTask(PersonalizationTask):
    """Multifaceted-Bench as personalization prompts.

    ``question`` = ``prompt``; ``context`` = ``system``; ``reference`` = ``reference_answer``.
    Prompt: a system message with the context (left out when the context is None), then the
    query as the user message. ``partial`` drops the system message; ``with_context`` swaps in
    another row's. Uids: ``multifaceted_bench/train/<row index>``.
    """

    name = "multifaceted_bench"
    hub_dataset = "kaist-ai/Multifaceted-Bench"
    hub_config = None
    hub_splits = ("train",)
    hub_eval_split = "train"

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Rows: ``prompt``, ``system`` and ``reference_answer`` (non-empty strings)."""
        return Example(
            uid=uid,
            question=require_text(row, "prompt", where),
            context=require_text(row, "system", where),
            reference=require_text(row, "reference_answer", where),
        )

    def messages(self, ex: Example) -> Messages:
        """``[system: context]`` + ``user: query``."""
        messages = [] if ex.context is None else [{"role": "system", "content": ex.context}]
        return [*messages, {"role": "user", "content": ex.question}]
