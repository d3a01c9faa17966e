"""Text helpers shared by the tasks: numbers (grading), sentences (the "partial" negative) and
the user turn of a personalized prompt. Plain string functions; no task or row knowledge."""

from __future__ import annotations

import random
import re

# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

_CANONICAL_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})  # the minus sign; an en dash typed for one
# An en or em dash between two numbers separates them (a score "35–28", a range "10 — 12", "$10–$20"): it is
# no sign of the second, so it becomes " to " before the minus signs are read.
_SEPARATOR_DASH = re.compile(r"(?<=\d)\s*[\u2013\u2014]\s*(?=\$?\d)")


def _ascii_minus(text: str) -> str:
    """``text`` with its minus signs as ``-``: U+2212, and an en dash that is not between two numbers
    (``"\u22123"``, ``"\u20133"``, ``"is \u20133"`` -> ``-3``); an en or em dash between two numbers is a
    separator and becomes ``" to "`` (``"Lions 35\u201328"`` -> ``"Lions 35 to 28"``, whose last number is 28).
    An ASCII hyphen is left alone: ``"35-28"`` reads as 35 and -28, as lm-eval's regexes read it."""
    return _SEPARATOR_DASH.sub(" to ", text).translate(_MINUS_SIGNS)


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: no commas, ``$`` or spaces, no trailing ``.``/zero decimals.

    ``"$1,234.50"`` -> ``"1234.5"``, ``"18.0"`` -> ``"18"``, ``"-0"`` -> ``"0"``, ``"007"`` -> ``"7"``.
    Returns None when ``text`` is not a plain decimal number.
    """
    cleaned = _ascii_minus(text)
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


ANSWER_MODES = ("strict", "flexible")

# lm-evaluation-harness, gsm8k.yaml (tasks/gsm8k): "strict-match" regex ``#### (\-?[0-9\.\,]+)`` and
# "flexible-extract" regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` with group_select -1 (the last match).
# Here the strict pattern also allows a ``$`` and no space after ``####``, as the model is asked
# for ``#### <number>`` and ``"####$18"`` states the same answer.
_STRICT_NUMBER = re.compile(r"####\s*\$?(-?[0-9.,]+)")
_FLEXIBLE_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`ANSWER_MODES`; else a ValueError naming the choices."""
    if mode not in ANSWER_MODES:
        raise ValueError(f"answer extraction mode must be one of {list(ANSWER_MODES)}, got {mode!r}")
    return mode


def extract_number_strict(text: str) -> str | None:
    """The number right after the last ``####`` (lm-eval's gsm8k "strict-match"), normalised.

    Only whitespace and a ``$`` may separate it from ``####``: ``"#### 18 dollars"`` gives
    ``"18"``, ``"####\nThe answer is 18"`` gives None. lm-eval takes the *first* ``####`` match;
    the last is taken here, so a response that corrects itself is graded on its final answer.
    """
    matches = _STRICT_NUMBER.findall(_ascii_minus(text))
    return normalize_number(matches[-1]) if matches else None


def extract_number_flexible(text: str) -> str | None:
    """The strict answer if there is one, else the last number in the text, normalised.

    The fallback is lm-eval's gsm8k "flexible-extract": the last match of
    ``(-?[$0-9.,]{2,})|(-?[0-9]+)``; a match that is not a number (``".."``) gives None, as it
    does there.
    """
    strict = extract_number_strict(text)
    if strict is not None:
        return strict
    matches = _FLEXIBLE_NUMBER.findall(_ascii_minus(text))
    if not matches:
        return None
    return normalize_number("".join(matches[-1]))


def extract_number(text: str, mode: str = "flexible") -> str | None:
    """The final numeric answer of a response, normalised: :func:`extract_number_strict` or
    :func:`extract_number_flexible` (the default, for callers that want the most lenient grade)."""
    check_mode(mode)
    return extract_number_strict(text) if mode == "strict" else extract_number_flexible(text)


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


# ---------------------------------------------------------------------------------------------
# Personalized prompts
# ---------------------------------------------------------------------------------------------


def user_turn_with_context(context: str | None, question: str) -> str:
    """The user message of a personalized prompt: the user's context (if any), then the query."""
    if context is None:
        return question
    return f"Here is what you know about me:\n{context}\n\n{question}"
