"""Text helpers shared by the tasks: numbers (grading), sentences (the "partial" negative) and
the user turn of a personalized prompt. Plain string functions; no task or row knowledge."""

from __future__ import annotations

import random
import re

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
