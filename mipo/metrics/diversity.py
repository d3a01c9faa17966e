"""Diversity of a model's responses: self-BLEU and distinct-n.

Training towards prompt-specific responses could also collapse them onto a few templates; these
corpus-level numbers show whether it did. Both are computed over one model's responses to the
evaluation prompts.

* self-BLEU (Zhu et al., 2018, "Texygen: A Benchmarking Platform for Text Generation Models"):
  each response scored by BLEU against all the others as references, averaged; higher is *less*
  diverse. BLEU is sacrebleu's (Post, 2018), the maintained implementation, with its default
  ``13a`` tokenisation and exponential smoothing of sentence-level BLEU.
* distinct-n: distinct n-grams over all responses, on whitespace tokens, divided by all n-grams
  (the default, a type-token ratio of n-grams in [0, 1]) or, as Li et al. (2016, "A Diversity-
  Promoting Objective Function for Neural Conversation Models") define it, by the number of
  generated tokens; higher is more diverse.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)
SACREBLEU_MISSING = "sacrebleu is not installed (pip install sacrebleu, or the project's eval extra): self-BLEU not computed"
DISTINCT_DENOMINATORS = ("ngrams", "tokens")


def distinct_n(responses: Sequence[str], n: int, denominator: str = "ngrams") -> float:
    """distinct-n over all responses (whitespace tokens, lowercased): |distinct n-grams| / ``denominator``, where

    * ``"ngrams"`` (the default, what ``eval.json`` reports): |n-grams|, the n-gram type-token ratio, in
      [0, 1] for every n;
    * ``"tokens"``: |tokens| generated, Li et al.'s (2016) definition: distinct unigrams and bigrams
      "scaled by total number of generated tokens to avoid favoring long sentences". For n = 1 the two
      agree; for n > 1 each response has n - 1 fewer n-grams than tokens, so this is the smaller.

    A response shorter than n contributes no n-gram (its tokens still count under ``"tokens"``); 0.0
    when the denominator is 0.
    """
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1, got {n}")
    if denominator not in DISTINCT_DENOMINATORS:
        raise ValueError(f"distinct-n denominator must be one of {DISTINCT_DENOMINATORS}, got {denominator!r}")
    total_grams = total_tokens = 0
    seen: set[tuple[str, ...]] = set()
    for response in responses:
        tokens = response.lower().split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total_grams += len(grams)
        total_tokens += len(tokens)
        seen.update(grams)
    total = total_grams if denominator == "ngrams" else total_tokens
    return len(seen) / total if total else 0.0


def self_bleu(responses: Sequence[str]) -> float | None:
    """Mean over responses of sentence BLEU (0-100) of each response against all the others.

    Zhu et al. (2018), Texygen's self-BLEU, with sacrebleu's ``sentence_bleu`` (13a tokenisation,
    exponential smoothing). Returns None, with a warning, when sacrebleu is not installed;
    needs at least two responses.
    """
    if len(responses) < 2:
        raise ValueError(f"self-BLEU needs at least 2 responses, got {len(responses)}")
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        log.warning(SACREBLEU_MISSING)
        return None
    bleu = BLEU(effective_order=True)  # sentence-level: n-gram orders longer than the hypothesis are skipped
    scores = [bleu.sentence_score(response, [other for j, other in enumerate(responses) if j != i]).score
              for i, response in enumerate(responses)]
    return sum(scores) / len(scores)


def diversity_metrics(responses: Sequence[str]) -> dict[str, Any]:
    """``self_bleu`` (None without sacrebleu), ``distinct_1`` and ``distinct_2`` of one model's responses."""
    return {"self_bleu": self_bleu(responses) if len(responses) > 1 else None,
            "distinct_1": distinct_n(responses, 1), "distinct_2": distinct_n(responses, 2)}
