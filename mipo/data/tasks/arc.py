"""AI2 ARC multiple-choice science questions: rows in benchkit or hub layout, lettered choices,
the "The answer is X" grading.

Hub source: ``allenai/ai2_arc`` (https://huggingface.co/datasets/allenai/ai2_arc), configs
``ARC-Challenge`` (train 1,119 / validation 299 / test 1,172) and ``ARC-Easy`` (train 2,251 /
validation 570 / test 2,376). Row schema as ``datasets`` returns it (the card's ``dataset_info``):
``id`` (str), ``question`` (str), ``choices`` (``{"text": [str, ...], "label": [str, ...]}``),
``answerKey`` (str). Labels are letters, or ``"1"``..``"4"`` for some questions.
"""

from __future__ import annotations

import re
from typing import Any

from mipo.data.chat import Messages
from mipo.data.tasks.base import (
    Example,
    Task,
    field_error,
    require_scalar_text,
    require_text,
)
from mipo.data.tasks.text import check_mode

# The offline copy of ARC-Challenge (ARC-Easy has none).
ARC_CHALLENGE_OFFLINE = (("test", "benchkit", "datasets/arc_challenge.jsonl"),)

_LETTER_END = r"(?![A-Za-z0-9])"
_ARC_ANSWER_PATTERN = re.compile(
    r"(?i:answer\s+is)\s*:?\s*[*_(\[\s]*(?i:(?:option|choice)\s+)?[*_(\[\s$]*(?:\\boxed\{)?([A-Z])" + _LETTER_END
)
# Flexible only: explicit statements other than "the answer is X".
_EXPLICIT_PATTERNS = (
    # "Answer: B", "**Answer:** (B)", "Final answer: B"
    re.compile(r"(?i:answer)\s*[*_]*\s*:\s*[*_(\[\s]*([A-Z])" + _LETTER_END),
    # "the correct choice is B", "The correct option is (B)", "the correct answer is: **B**"
    re.compile(r"(?i:correct\s+(?:choice|option|answer)\s+is)\s*:?\s*[*_(\[\s]*([A-Z])" + _LETTER_END),
)
# Flexible only: a lone option letter at the start of the response: "C", "(C)", "**C**", "C.",
# "C)", "C. speed of Earth's rotation", "(C) speed ...", "**C.** speed ...".
_LEADING_LETTER = re.compile(r"\A\s*(?:\*\*|__|\*|_)?\s*(?:\(([A-Z])\)|([A-Z])(?=[.)]|\*|_|\s*\n|\s*\Z))")
# A line that starts like an option of a list: "A. text", "(B) text", "- C) text", "**D.** text".
_OPTION_LINE = re.compile(r"^\s*(?:[-*]\s+)?(?:\*\*)?\(?([A-Z])[.)]", re.MULTILINE)


def _lists_options(text: str) -> bool:
    """True when two or more lines of ``text`` start with different option letters (the response
    restates the options rather than choosing one)."""
    return len(set(_OPTION_LINE.findall(text))) >= 2


def extract_choice_letter(text: str, mode: str = "strict") -> str | None:
    """The chosen option letter of a multiple-choice response, or None (unparsed).

    ``strict``: the letter after the last "the answer is" (case-insensitive phrase; capital
    letter), which is the format the prompt asks for. Tolerates ``"(B)"``, ``"B."``, ``"**B**"``,
    ``": B"``, ``"option B"``, ``"\\boxed{B}"``. A lowercase letter is not accepted (``"the answer
    is a ..."`` is usually an article).

    ``flexible``: the strict answer if there is one, else

    1. an explicit statement, "Answer: X" or "the correct choice/option/answer is X"; when these
       name different letters the response is unparsed; else
    2. a lone option letter at the start of the response, plain, in parentheses or in bold,
       alone or followed by "." or ")" and the option text ("C", "(C)", "**C**", "C. speed of
       Earth's rotation"), unless the response lists the options (two or more lines starting
       with different option letters: "A. ...\\nB. ..."), which is unparsed.
    """
    check_mode(mode)
    matches = list(_ARC_ANSWER_PATTERN.finditer(text))
    if matches:
        return matches[-1].group(1)
    if mode == "strict":
        return None
    explicit = {m.group(1) for pattern in _EXPLICIT_PATTERNS for m in pattern.finditer(text)}
    if explicit:
        return explicit.pop() if len(explicit) == 1 else None
    leading = _LEADING_LETTER.match(text)
    if leading is None or _lists_options(text):
        return None
    return leading.group(1) or leading.group(2)


def _arc_choices(row: dict[str, Any], where: str) -> tuple[list[str], list[str], str]:
    """Labels, texts and answer from a benchkit row (choices list + labels list + answer) or a hub
    row (choices {text, label} + answerKey)."""
    expected_choices = 'a list of strings, or {"text": [...], "label": [...]}'
    if "choices" not in row:
        raise field_error(where, "choices", "is missing", expected_choices)
    choices = row["choices"]
    if isinstance(choices, dict):
        texts, labels = choices.get("text"), choices.get("label")
    elif isinstance(choices, list):
        texts = choices
        labels = row.get("labels", [chr(ord("A") + index) for index in range(len(choices))])
    else:
        raise field_error(where, "choices", f"has type {type(choices).__name__}", expected_choices)
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or len(texts) < 2:
        raise field_error(where, "choices", "does not pair texts with labels", "2 or more texts with as many labels")
    if not all(isinstance(item, str) and item.strip() for item in texts):
        raise field_error(where, "choices", "has an empty or non-string text", "non-empty strings")
    labels = [str(label).strip() for label in labels]
    answer_field = "answerKey" if "answerKey" in row else "answer"
    answer = require_scalar_text(row, answer_field, where, f"one of the labels {labels}")
    if answer not in labels:
        raise field_error(where, answer_field, f"is {answer!r}", f"one of the labels {labels}")
    return labels, [text.strip() for text in texts], answer


def _letter_labels(labels: list[str], answer: str, where: str) -> tuple[list[str], str]:
    """Map numeric labels "1".."n" to "A".. (same map for the answer); check labels are letters."""
    if all(label.isdigit() for label in labels):
        mapping = {label: chr(ord("A") + int(label) - 1) for label in labels}
        if any(not 1 <= int(label) <= 26 for label in labels):
            raise field_error(where, "labels", f"is {labels}", "numeric labels from 1 to 26")
        labels, answer = [mapping[label] for label in labels], mapping[answer]
    if any(len(label) != 1 or not "A" <= label <= "Z" for label in labels) or len(set(labels)) != len(labels):
        raise field_error(where, "labels", f"is {labels}", 'distinct capital letters or numbers "1".."n"')
    return labels, answer


class ArcTask(Task):
    """AI2 ARC multiple-choice science questions (Challenge or Easy).

    Prompt: one user message with the instruction, the question stem and the lettered choices;
    the model should reason briefly and finish with "The answer is X". Numeric labels ``1..4``
    become ``A..D`` in both the choices and the gold answer.
    """

    max_new_tokens = 256
    hub_dataset = "allenai/ai2_arc"
    hub_splits = ("train", "validation", "test")
    instruction = (
        "Answer the following multiple-choice science question. Reason briefly, then finish your "
        'response with "The answer is X", where X is the letter of the correct choice.'
    )

    def __init__(
        self,
        name: str,
        hub_config: str,
        offline_files: tuple[tuple[str, str, str], ...] = (),
        max_new_tokens: int | None = None,
    ) -> None:
        self.name = name
        self.hub_config = hub_config
        self.offline_files = offline_files
        super().__init__(max_new_tokens)

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Rows: ``question``, choices (benchkit or hub layout) and ``answer``/``answerKey``."""
        question = require_text(row, "question", where)
        labels, texts, answer = _arc_choices(row, where)
        labels, answer = _letter_labels(labels, answer, where)
        return Example(uid=uid, question=question, answer=answer, choices=tuple(zip(labels, texts)))

    def messages(self, ex: Example) -> Messages:
        """One user message: instruction, question, ``A. text`` lines."""
        if not ex.choices:
            raise ValueError(f"{ex.uid}: an ARC example needs choices")
        choice_lines = "\n".join(f"{label}. {text}" for label, text in ex.choices)
        content = f"{self.instruction}\n\nQuestion: {ex.question}\n{choice_lines}"
        return [{"role": "user", "content": content}]

    def loglik_messages(self, ex: Example) -> Messages:
        """The prompt each option's text is scored after for log-likelihood accuracy: lm-evaluation-
        harness's ARC prompt (``doc_to_text: "Question: {{question}}\\nAnswer:"``) as one user message;
        the options are not listed (lm-eval's ``acc``/``acc_norm`` for ARC)."""
        return [{"role": "user", "content": f"Question: {ex.question}\nAnswer:"}]

    def extract_answer(self, text: str, mode: str = "strict") -> str | None:
        """See :func:`extract_choice_letter`."""
        return extract_choice_letter(text, mode)
