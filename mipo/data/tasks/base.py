"""The :class:`Example` record, the :class:`Task` base class and the helpers that validate raw
rows (every error names the file/row and the field)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

from mipo.data.chat import Messages
from mipo.data.tasks import sources
from mipo.data.tasks.sources import SOURCE_AUTO, SOURCE_HUB
from mipo.data.tasks.text import (
    check_mode,
    drop_one_sentence,
    normalize_number,
    user_turn_with_context,
)

PARTIAL_SUFFIX = "#partial"


@dataclass(frozen=True)
class Example:
    """One prompt of a task.

    Attributes:
        uid: Stable identifier, unique within a task (``"gsm8k/test/17"``). Derived examples get a
            suffix (``"#partial"``, ``"#context-<hash>"``).
        question: The task input: math question, ARC question stem or the user's query.
        answer: Gold answer: normalised number (``"18"``), ARC letter (``"B"``), or ``None`` for
            open-ended tasks and for partial prompts.
        context: Personalization only: the user's context (memories, a profile or a system
            message, as text).
        choices: ARC only: ``((label, text), ...)`` with letter labels.
        reference: Personalization only: the dataset's reference response to the query, the one an
            LLM judge compares a model's response with for a win rate (PRISM's highest-rated
            first-turn response, Community Alignment's preferred first-turn response,
            Multifaceted-Bench's ``reference_answer``); None when the dataset has none.
    """

    uid: str
    question: str
    answer: str | None = None
    context: str | None = None
    choices: tuple[tuple[str, str], ...] | None = None
    reference: str | None = None


# ---------------------------------------------------------------------------------------------
# Validating fields of raw rows
# ---------------------------------------------------------------------------------------------


def field_error(where: str, field: str, problem: str, expected: str) -> ValueError:
    """The error for a bad field: ``<where>: field "<field>" <problem> (expected <expected>)``."""
    return ValueError(f'{where}: field "{field}" {problem} (expected {expected})')


def _required_value(row: dict[str, Any], field: str, where: str, expected: str) -> Any:
    """``row[field]``; raise a located ValueError when the field is missing or null."""
    if field not in row or row[field] is None:
        raise field_error(where, field, "is missing", expected)
    return row[field]


def require_text(row: dict[str, Any], field: str, where: str) -> str:
    """Return ``row[field]`` stripped; raise a located ValueError unless it is a non-empty string."""
    expected = "a non-empty string"
    value = _required_value(row, field, where, expected)
    if not isinstance(value, str):
        raise field_error(where, field, f"has type {type(value).__name__}", expected)
    if not value.strip():
        raise field_error(where, field, "is empty", expected)
    return value.strip()


def require_scalar_text(row: dict[str, Any], field: str, where: str, expected: str) -> str:
    """Return ``row[field]`` as a stripped string; numbers are accepted and converted."""
    value = _required_value(row, field, where, expected)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise field_error(where, field, f"has type {type(value).__name__}", expected)
    text = str(value).strip()
    if not text:
        raise field_error(where, field, "is empty", expected)
    return text


def parse_gold_number(row: dict[str, Any], field: str, where: str) -> str:
    """Gold number from a bare number (``"1,234"``, ``18``) or a worked solution ending ``#### N``."""
    expected = 'a number or a worked solution ending "#### <number>"'
    text = require_scalar_text(row, field, where, expected)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    number = normalize_number(text)
    if number is None:
        raise field_error(where, field, f"is {text.strip()[:60]!r}", expected)
    return number


def require_context(row: dict[str, Any], field: str, where: str) -> str | None:
    """Return the user's context from ``row[field]`` (list of facts or a string) as text.

    An empty list gives ``None`` (no context); a list is rendered with :func:`format_context`.
    """
    expected = "a list of non-empty strings or a string"
    value = _required_value(row, field, where, expected)
    if isinstance(value, str):
        if not value.strip():
            raise field_error(where, field, "is empty", expected)
        return value.strip()
    if not isinstance(value, list):
        raise field_error(where, field, f"has type {type(value).__name__}", expected)
    for position, item in enumerate(value, start=1):
        if not isinstance(item, str) or not item.strip():
            raise field_error(where, field, f"item {position} is {item!r}", expected)
    return format_context(value) if value else None


def format_context(facts: Sequence[str]) -> str:
    """Render facts about the user as a bulleted list (``"- fact"`` per line)."""
    return "\n".join(f"- {fact.strip()}" for fact in facts)


def optional_text(row: dict[str, Any], field: str, where: str, expected: str) -> str | None:
    """``row[field]`` as stripped text, or None when it is missing, null, empty or NaN (an empty
    CSV cell read through pandas); numbers are converted; any other type is a located error."""
    value = row.get(field)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return require_scalar_text(row, field, where, expected)


def labelled_facts(
    row: dict[str, Any], fields: Sequence[tuple[str, str]], where: str, required: bool
) -> str | None:
    """A user profile from ``(field, label)`` pairs of ``row``, one ``"- label: value"`` line each
    (:func:`format_context`); None when no field has a value.

    ``required``: every field must be a non-empty string (:func:`require_text`); otherwise
    missing or empty fields are left out (:func:`optional_text`).
    """
    facts = []
    for field, label in fields:
        if required:
            text: str | None = require_text(row, field, where)
        else:
            text = optional_text(row, field, where, "a string, a number or an empty value")
        if text is not None:
            facts.append(f"{label}: {text}")
    return format_context(facts) if facts else None


def check_choices(name: str, option: str, chosen: Sequence[str] | str, allowed: Sequence[str]) -> tuple[str, ...]:
    """``chosen`` (one name or a list) as a tuple; raise ValueError unless it is a non-empty list
    of distinct names from ``allowed`` (the message names the task and the option)."""
    chosen = [chosen] if isinstance(chosen, str) else list(chosen)
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"{name}: {option} must be distinct names from {list(allowed)}, got {chosen}")
    return tuple(chosen)


def _context_suffix(context: str | None) -> str:
    if context is None:
        return "#no-context"
    digest = hashlib.sha1(context.encode("utf-8")).hexdigest()[:10]
    return f"#context-{digest}"


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


class Task:
    """Base class of a task. Subclasses set the class attributes and implement :meth:`parse_row`
    and :meth:`messages`; most override :meth:`extract_answer`/:meth:`is_correct`.

    Attributes:
        name: Registry name.
        max_new_tokens: Default generation length.
        has_answers: False for open-ended tasks (accuracy undefined).
        supports_context: True when examples carry a user context (:meth:`with_context` works).
        hub_dataset, hub_config, hub_splits: Hugging Face source (``None`` if there is none).
        hub_eval_split: The hub split evaluation prompts come from: ``"test"``, or the only split
            of a dataset published as one split (``load_splits`` then carves both sets out of it).
        offline_files: ``(group, package, relative path)`` candidates for the offline copy.
    """

    name: str = "task"
    max_new_tokens: int = 512
    has_answers: bool = True
    supports_context: bool = False
    hub_dataset: str | None = None
    hub_config: str | None = None
    hub_splits: tuple[str, ...] = ()
    hub_eval_split: str = "test"
    offline_split: str = "test"
    offline_files: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, max_new_tokens: int | None = None) -> None:
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"{self.name}: max_new_tokens must be a positive int, got {max_new_tokens!r}")
            self.max_new_tokens = max_new_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # -- sources (the logic lives in mipo.data.tasks.sources) ------------------------------------

    def offline_available(self) -> bool:
        """True when an offline copy of the data is installed."""
        return bool(sources.offline_paths(self))

    def resolve_source(self, source: str | os.PathLike[str]) -> str:
        """Map ``source`` to ``"hub"``, ``"offline"`` or a file path (see
        :func:`mipo.data.tasks.sources.resolve_source`); raise ValueError when the task cannot use it."""
        return sources.resolve_source(self, source)

    def train_split_available(self, resolved_source: str) -> bool:
        """True when the (resolved) source has a training split besides the evaluation split."""
        return resolved_source == SOURCE_HUB and "train" in self.hub_splits and self.hub_eval_split != "train"

    def default_split(self, resolved_source: str) -> str:
        """The split read when none is named: ``hub_eval_split`` on the hub, else ``offline_split``
        (a local file is one split whatever its name)."""
        return self.hub_eval_split if resolved_source == SOURCE_HUB else self.offline_split

    def read_rows(self, resolved_source: str, split: str) -> list[tuple[str, list[sources.Row]]]:
        """Raw rows of ``split`` grouped as ``(group used in uids, rows)``; see
        :func:`mipo.data.tasks.sources.read_rows`. Tasks that join or filter rows override this."""
        return sources.read_rows(self, resolved_source, split)

    def load(self, source: str | os.PathLike[str] = SOURCE_AUTO, split: str | None = None) -> list[Example]:
        """Load the examples of ``split`` (None: :meth:`default_split`) from ``source`` (see
        :mod:`mipo.data.tasks.sources`).

        Raises:
            ValueError: unusable source/split, or a malformed row (message names file, line, field).
            ImportError: ``source='hub'`` without the ``datasets`` package.
        """
        groups = sources.with_offline_fallback(
            self,
            source,
            lambda resolved: self.read_rows(resolved, split or self.default_split(resolved)),
            offline_usable=split is None or split == self.offline_split,
        )
        examples = []
        for group, rows in groups:
            for index, (where, row) in enumerate(rows):
                examples.append(self.parse_row(row, where, f"{self.name}/{group}/{index}"))
        return examples

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Turn one raw row into an Example; raise ValueError naming ``where`` and the field."""
        raise NotImplementedError

    # -- prompts ------------------------------------------------------------------------------

    def messages(self, ex: Example) -> Messages:
        """Chat messages (``{"role", "content"}``) of the prompt for ``ex``, built from its fields."""
        raise NotImplementedError

    def partial(self, ex: Example, rng: random.Random) -> Example | None:
        """``ex`` with information removed (uid + ``"#partial"``), or None if nothing can go.

        Default: one sentence of the question is dropped (:func:`drop_one_sentence`); the gold
        answer is cleared because it no longer follows from the question.
        """
        question = drop_one_sentence(ex.question, rng)
        if question is None:
            return None
        return dataclasses.replace(ex, uid=ex.uid + PARTIAL_SUFFIX, question=question, answer=None)

    @staticmethod
    def _without_context(ex: Example) -> Example | None:
        """The partial prompt of a personalized example: the same query without the user's
        context (uid + ``"#partial"``); None if it has no context already."""
        if ex.context is None:
            return None
        return dataclasses.replace(ex, uid=ex.uid + PARTIAL_SUFFIX, context=None)

    def with_context(self, ex: Example, context: str | None) -> Example:
        """Same query with another user's ``context`` (uid gets a ``#context-<hash>`` suffix)."""
        if not self.supports_context:
            raise ValueError(
                f"{self.name} examples have no user context; with_context() is only for "
                "personalization tasks (persistbench, prism, community_alignment, multifaceted_bench, "
                "or jsonl with context_field set)"
            )
        return dataclasses.replace(ex, uid=ex.uid + _context_suffix(context), context=context)

    # -- grading ------------------------------------------------------------------------------

    def extract_answer(self, text: str, mode: str = "strict") -> str | None:
        """The final answer stated in a model response, or None (always None if no answers).

        ``mode`` (:data:`~mipo.data.tasks.text.ANSWER_MODES`): ``"strict"`` accepts only the format
        the prompt asks for; ``"flexible"`` adds the fallbacks lm-evaluation-harness's
        "flexible-extract" filters use. The evaluation reports both accuracies.
        """
        check_mode(mode)
        return None

    def is_correct(self, response: str, ex: Example, mode: str = "strict") -> bool:
        """Whether ``response`` states the gold answer of ``ex`` (``mode`` as in :meth:`extract_answer`)."""
        self._require_answers(ex)
        return self.extract_answer(response, mode=mode) == ex.answer

    def loglik_messages(self, ex: Example) -> Messages:
        """Multiple choice only: the prompt after which each option's text is scored (log-likelihood accuracy)."""
        raise NotImplementedError(f"{self.name} is not a multiple-choice task: no log-likelihood accuracy (eval.loglik=false)")

    def _require_answers(self, ex: Example) -> None:
        if not self.has_answers:
            raise ValueError(f"{self.name} has no gold answers (has_answers=False); accuracy is undefined")
        if ex.answer is None:
            raise ValueError(f"{ex.uid} has no gold answer (partial examples have none)")


class PersonalizationTask(Task):
    """A task whose prompts are a user's context and a query, with no gold answer (accuracy is
    undefined; the evaluation reports the conditional MI, and :attr:`Example.reference` feeds a
    judge's win rate where the dataset has one).

    Prompt: one user message ``"Here is what you know about me:\\n<context>\\n\\n<query>"``, or
    just the query when the context is None (:func:`~mipo.data.tasks.text.user_turn_with_context`).
    ``partial`` drops the context; ``with_context`` swaps it for another user's.
    """

    max_new_tokens = 512
    has_answers = False
    supports_context = True

    def messages(self, ex: Example) -> Messages:
        """One user message: the context block (only when present), then the query."""
        return [{"role": "user", "content": user_turn_with_context(ex.context, ex.question)}]

    def partial(self, ex: Example, rng: random.Random) -> Example | None:
        """The same query without the user's context; None if it has none already."""
        return self._without_context(ex)
