"""PRISM (Kirk et al., 2024, "The PRISM Alignment Project"): each conversation's opening prompt,
the participant's survey answers as context, and the response they rated highest as reference.

Hub source: ``HannahRoseKirk/prism-alignment`` (https://huggingface.co/datasets/HannahRoseKirk/prism-alignment),
one ``train`` split per config; two configs are read and joined on ``user_id``:

* ``conversations`` (8,011 rows, one per conversation): ``conversation_id`` (str), ``user_id``
  (str), ``conversation_type`` (str), ``opening_prompt`` (str), ``conversation_turns`` (int),
  ``conversation_history`` (list of messages: ``turn`` (int, 0 = opening turn), ``role``
  (``"user"`` or ``"model"``), ``content`` (str), and for model messages ``model_provider``,
  ``model_name``, ``score`` (1-100 rating), ``if_chosen`` (bool, the highest-rated response of the
  turn) and ``within_turn_id``; ``datasets`` fills a key a message lacks with None), plus feedback
  fields (``performance_attributes``, ``choice_attributes``, ``open_feedback``...).
* ``survey`` (1,500 rows, one per participant): ``user_id``, ``self_description`` (str, "your
  values, core beliefs, guiding principles..."), ``system_string`` (str, "instructing an AI
  language model how to behave"), demographics and stated preferences.

Field names and meanings: the dataset card and the PRISM codebook
(https://github.com/HannahKirk/prism-alignment, ``notebooks/pre-release processing/04_codebooks.ipynb``);
the join and the ``if_chosen`` reading follow ``facebookresearch/LoRe``, ``PRISM/prepare.py``.

A local copy of the hub files works as a source too: the path of ``conversations.jsonl`` with
``survey.jsonl`` beside it.

How the MIPO paper's released code (``nam630/mutual_information_preference_optimization``) built
its PRISM prompts is not in that repository (it reads preprocessed JSON with ``augmented_prompt``
/ ``base_prompt`` fields, the prompt with and without the user's information), so the choice of
context fields here is this module's: the participant's own two texts, which state who they are
and how they want an assistant to behave.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mipo.data.tasks import sources
from mipo.data.tasks.base import (
    Example,
    PersonalizationTask,
    check_choices,
    field_error,
    labelled_facts,
    require_scalar_text,
    require_text,
)
from mipo.data.tasks.sources import SOURCE_HUB
from mipo.runtime.files import read_jsonl

# Survey fields that can make up the user's context, with the label each fact gets.
PRISM_PROFILE_FIELDS = {
    "self_description": "About me",
    "system_string": "How I want an AI assistant to behave",
}
PRISM_SURVEY_CONFIG = "survey"
_HISTORY = "conversation_history"


def chosen_opening_response(row: dict[str, Any], where: str) -> str | None:
    """The model response of turn 0 with ``if_chosen`` true (the participant's highest-rated of the
    opening turn's responses); None when no opening response is marked chosen."""
    expected = "a list of messages with turn, role and content"
    history = row.get(_HISTORY)
    if not isinstance(history, list):
        problem = "is missing" if history is None else f"has type {type(history).__name__}"
        raise field_error(where, _HISTORY, problem, expected)
    for position, message in enumerate(history, start=1):
        if not isinstance(message, dict):
            raise field_error(where, _HISTORY, f"item {position} has type {type(message).__name__}", expected)
        if message.get("role") == "model" and message.get("turn") == 0 and message.get("if_chosen") is True:
            return require_text(message, "content", f"{where}, {_HISTORY} item {position}")
    return None


class PrismTask(PersonalizationTask):
    """PRISM conversations as personalization prompts.

    One example per conversation: ``question`` = ``opening_prompt``; ``context`` = the
    participant's survey texts named by ``profile_fields`` (default both), one
    ``"- <label>: <text>"`` line each; ``reference`` = the chosen opening-turn response
    (:func:`chosen_opening_response`). Prompt, ``partial`` and ``with_context``:
    :class:`PersonalizationTask`. Uids: ``prism/train/<row index>`` (local file: its stem).
    """

    name = "prism"
    hub_dataset = "HannahRoseKirk/prism-alignment"
    hub_config = "conversations"
    hub_splits = ("train",)
    hub_eval_split = "train"

    def __init__(self, profile_fields: Sequence[str] = tuple(PRISM_PROFILE_FIELDS), max_new_tokens: int | None = None):
        super().__init__(max_new_tokens)
        chosen = check_choices("prism", "profile_fields", profile_fields, tuple(PRISM_PROFILE_FIELDS))
        self.profile_fields = tuple((field, PRISM_PROFILE_FIELDS[field]) for field in chosen)

    def read_rows(self, resolved_source: str, split: str) -> list[tuple[str, list[sources.Row]]]:
        """Conversation rows, each joined with its participant's context:
        ``{"conversation": row, "context": text}``."""
        contexts = self._survey_contexts(resolved_source)
        joined = []
        for group, rows in super().read_rows(resolved_source, split):
            group_rows = []
            for where, row in rows:
                user = require_scalar_text(row, "user_id", where, "the user_id of a survey row")
                if user not in contexts:
                    raise field_error(where, "user_id", f"is {user!r}, which no survey row has", "the user_id of a survey row")
                group_rows.append((where, {"conversation": row, "context": contexts[user]}))
            joined.append((group, group_rows))
        return joined

    def _survey_contexts(self, resolved_source: str) -> dict[str, str | None]:
        """``user_id`` -> context text for every survey row."""
        if resolved_source == SOURCE_HUB:
            rows = sources.load_hub_rows(self.hub_dataset, PRISM_SURVEY_CONFIG, "train")  # type: ignore[arg-type]
        else:
            survey = Path(resolved_source).with_name("survey.jsonl")
            if not survey.is_file():
                raise FileNotFoundError(
                    f"prism: {survey}: no such file; a local PRISM copy is conversations.jsonl with the "
                    "hub's survey.jsonl in the same folder"
                )
            rows = read_jsonl(survey)
        contexts: dict[str, str | None] = {}
        for where, row in rows:
            user = require_scalar_text(row, "user_id", where, "a participant id")
            if user in contexts:
                raise field_error(where, "user_id", f"is {user!r} again", "one survey row per participant")
            contexts[user] = labelled_facts(row, self.profile_fields, where, required=True)
        return contexts

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Rows from :meth:`read_rows`: the conversation row and its participant's context."""
        conversation = row["conversation"]
        return Example(
            uid=uid,
            question=require_text(conversation, "opening_prompt", where),
            context=row["context"],
            reference=chosen_opening_response(conversation, where),
        )
