"""Community Alignment (Zhang et al., 2025, "Cultivating Pluralism In Algorithmic Monoculture: The
Community Alignment Dataset", arXiv 2507.09650): each conversation's first prompt, the annotator's
demographics as context, and the response they preferred as reference.

Hub source: ``facebook/community-alignment-dataset``
(https://huggingface.co/datasets/facebook/community-alignment-dataset), CSV files read through
``datasets``; splits ``filtered`` (conversations without missing turns, the one used here) and
``full``. One row per conversation of up to four turns; the columns read here:

* ``first_turn_prompt`` (str), ``first_turn_response_a`` ... ``first_turn_response_d`` (str, the
  four candidate responses), ``first_turn_preferred_response`` (str: ``"response_a"`` ...
  ``"response_d"``; empty when the annotator gave none);
* the annotator: ``annotator_id``, ``annotator_country``, ``annotator_age``,
  ``annotator_gender``, ``annotator_education_level``, ``annotator_ethnicity``,
  ``annotator_political`` (str; an empty CSV cell comes back as None);
* ``assigned_lang`` (str: ``"en"``, ``"fr"``, ``"it"``, ``"pt"``, ``"hi"``);
* and more that are not read (``conversation_id``, ``is_pregenerated_first_prompt``, the
  ``second_`` to ``fourth_turn_*`` columns, ``*_feedback``).

The codebook is Appendix I of the paper; the column names, the ``filtered`` split, the
``assigned_lang`` filter, the ``"response_x"`` values and the ``<|end_of_text|>`` markers left in
some responses follow public code that loads the dataset (``spectrum``'s Community Alignment
loader, which also uses these six annotator fields as "user demographics").

The MIPO paper's released code does not show how it built Community Alignment prompts, so the
context (the annotator's demographics) is this module's choice.
"""

from __future__ import annotations

from typing import Any, Sequence

from mipo.data.tasks import sources
from mipo.data.tasks.base import (
    Example,
    PersonalizationTask,
    check_choices,
    field_error,
    labelled_facts,
    optional_text,
    require_text,
)

# Annotator fields that can make up the user's context, with the label each fact gets.
COMMUNITY_ALIGNMENT_PROFILE_FIELDS = {
    "annotator_country": "Country",
    "annotator_age": "Age",
    "annotator_gender": "Gender",
    "annotator_education_level": "Education",
    "annotator_ethnicity": "Ethnicity",
    "annotator_political": "Political leaning",
}
COMMUNITY_ALIGNMENT_LANGUAGES = ("en", "fr", "it", "pt", "hi")
_RESPONSE_LABELS = ("response_a", "response_b", "response_c", "response_d")
_END_OF_TEXT = "<|end_of_text|>"


class CommunityAlignmentTask(PersonalizationTask):
    """Community Alignment first turns as personalization prompts.

    One example per conversation whose ``assigned_lang`` is in ``languages`` (default English
    only; None keeps all): ``question`` = ``first_turn_prompt``; ``context`` = the annotator fields
    named by ``profile_fields`` that have a value, one ``"- <label>: <value>"`` line each (None
    when none has); ``reference`` = the preferred first-turn response without
    ``<|end_of_text|>`` markers (None when no preference was given). Prompt, ``partial`` and
    ``with_context``: :class:`PersonalizationTask`. Uids: ``community_alignment/<split>/<index
    among the kept rows>``.
    """

    name = "community_alignment"
    hub_dataset = "facebook/community-alignment-dataset"
    hub_config = None
    hub_splits = ("filtered", "full")
    hub_eval_split = "filtered"

    def __init__(
        self,
        languages: Sequence[str] | None = ("en",),
        profile_fields: Sequence[str] = tuple(COMMUNITY_ALIGNMENT_PROFILE_FIELDS),
        max_new_tokens: int | None = None,
    ) -> None:
        super().__init__(max_new_tokens)
        self.languages = (
            None if languages is None else check_choices(self.name, "languages", languages, COMMUNITY_ALIGNMENT_LANGUAGES)
        )
        chosen = check_choices(self.name, "profile_fields", profile_fields, tuple(COMMUNITY_ALIGNMENT_PROFILE_FIELDS))
        self.profile_fields = tuple((field, COMMUNITY_ALIGNMENT_PROFILE_FIELDS[field]) for field in chosen)

    def read_rows(self, resolved_source: str, split: str) -> list[tuple[str, list[sources.Row]]]:
        """The rows whose ``assigned_lang`` is one of ``languages`` (all rows if None)."""
        groups = super().read_rows(resolved_source, split)
        if self.languages is None:
            return groups
        return [
            (group, [(where, row) for where, row in rows if require_text(row, "assigned_lang", where) in self.languages])
            for group, rows in groups
        ]

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Rows: the first-turn prompt, responses and preference, and the annotator fields."""
        return Example(
            uid=uid,
            question=require_text(row, "first_turn_prompt", where),
            context=labelled_facts(row, self.profile_fields, where, required=False),
            reference=self._preferred_response(row, where),
        )

    @staticmethod
    def _preferred_response(row: dict[str, Any], where: str) -> str | None:
        field = "first_turn_preferred_response"
        preferred = optional_text(row, field, where, f"one of {list(_RESPONSE_LABELS)} or empty")
        if preferred is None:
            return None
        if preferred not in _RESPONSE_LABELS:
            raise field_error(where, field, f"is {preferred!r}", f"one of {list(_RESPONSE_LABELS)} or empty")
        response = require_text(row, f"first_turn_{preferred}", where).replace(_END_OF_TEXT, "").strip()
        if not response:
            raise field_error(where, f"first_turn_{preferred}", "is only end-of-text markers", "the preferred response")
        return response
