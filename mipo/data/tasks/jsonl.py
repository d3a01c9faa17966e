"""A task over any local JSONL file, with configurable question/answer/context fields."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from mipo.data.chat import Messages
from mipo.data.tasks.base import (
    Example,
    Task,
    optional_text,
    require_context,
    require_scalar_text,
    require_text,
)
from mipo.data.tasks.sources import SOURCE_AUTO, SOURCE_HUB, SOURCE_OFFLINE
from mipo.data.tasks.text import (
    check_mode,
    extract_number,
    normalize_number,
    user_turn_with_context,
)


def _normalize_text_answer(text: str) -> str:
    return " ".join(text.split()).strip().rstrip(".").casefold()


class JsonlTask(Task):
    """Any local JSONL file.

    Options: ``path`` (used for source 'auto'/'offline'; a path given as ``source`` overrides it),
    ``question_field``, ``answer_field`` (None = open-ended, ``has_answers`` False),
    ``context_field`` (None = no user context; else a string or list of facts per row),
    ``system_prompt`` (optional system message), ``reference_field`` (None = no reference
    response; else the response an LLM judge compares the model's with, ``Example.reference``).

    Prompt: ``[system_prompt]`` + one user message (context block if any, then the question).
    ``partial`` drops the context when the task has a context field, otherwise one sentence
    (as for GSM8K). Grading: if the gold answer is a number, numeric match of
    :func:`extract_number` (strict: after ``####``; flexible: else the last number); otherwise case-
    and whitespace-insensitive match of :meth:`extract_answer` (strict: text after the last
    ``####``; flexible: else the last non-empty line). Ask for
    ``#### <answer>`` in ``system_prompt`` or the questions.
    """

    name = "jsonl"
    max_new_tokens = 512

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        question_field: str = "question",
        answer_field: str | None = "answer",
        context_field: str | None = None,
        system_prompt: str | None = None,
        max_new_tokens: int | None = None,
        reference_field: str | None = None,
    ) -> None:
        super().__init__(max_new_tokens)
        self.path = os.fspath(path) if path is not None else None
        self.question_field = question_field
        self.answer_field = answer_field
        self.context_field = context_field
        self.system_prompt = system_prompt
        self.reference_field = reference_field
        self.has_answers = answer_field is not None
        self.supports_context = context_field is not None

    def resolve_source(self, source: str | os.PathLike[str]) -> str:
        """'auto'/'offline' mean the ``path`` option; 'hub' is not supported."""
        source = os.fspath(source)
        if source == SOURCE_HUB:
            raise ValueError("jsonl has no hub source; pass the file as path= or as source")
        if source in (SOURCE_AUTO, SOURCE_OFFLINE):
            if self.path is None:
                raise ValueError("jsonl: no file given; set the path option or pass the file path as source")
            source = self.path
        if not Path(source).is_file():
            raise FileNotFoundError(f"jsonl: {source}: no such file")
        return source

    def offline_available(self) -> bool:
        """True when the ``path`` option names an existing file."""
        return self.path is not None and Path(self.path).is_file()

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        question = require_text(row, self.question_field, where)
        answer = None
        if self.answer_field is not None:
            expected = "a string or a number (or set answer_field=None for open-ended data)"
            answer = require_scalar_text(row, self.answer_field, where, expected)
            answer = normalize_number(answer) or answer
        context = require_context(row, self.context_field, where) if self.context_field else None
        reference = (optional_text(row, self.reference_field, where, "a string (the reference response)")
                     if self.reference_field else None)
        return Example(uid=uid, question=question, answer=answer, context=context, reference=reference)

    def messages(self, ex: Example) -> Messages:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": user_turn_with_context(ex.context, ex.question)})
        return messages

    def partial(self, ex: Example, rng: random.Random) -> Example | None:
        if not self.supports_context:
            return super().partial(ex, rng)
        return self._without_context(ex)

    def extract_answer(self, text: str, mode: str = "strict") -> str | None:
        """Strict: the text after the last ``####`` (to the end of that line); flexible: else the
        last non-empty line."""
        check_mode(mode)
        if "####" in text:
            tail = text.rsplit("####", 1)[1].strip()
            if tail:
                return tail.splitlines()[0].strip()
        if mode == "strict":
            return None
        lines = [line.strip() for line in text.splitlines() if line.strip() and line.strip() != "####"]
        return lines[-1] if lines else None

    def is_correct(self, response: str, ex: Example, mode: str = "strict") -> bool:
        self._require_answers(ex)
        gold_number = normalize_number(ex.answer)
        if gold_number is not None:
            return extract_number(response, mode) == gold_number
        predicted = self.extract_answer(response, mode)
        return predicted is not None and _normalize_text_answer(predicted) == _normalize_text_answer(ex.answer)
