"""Diversity of a model's responses: self-BLEU and distinct-n.

Training towards prompt-specific responses could also collapse them onto a few templates; these
corpus-level numbers show whether it did. Both are computed over one model's responses to the
evaluation prompts.

* self-BLEU (Zhu et al., 2018, "Texygen: A Benchmarking Platform for Text Generation Models"):
  each response scored by BLEU against all the others as references, averaged; higher is *less*
  diverse. BLEU is sacrebleu's (Post, 2018), the maintained implementation, with its default
  ``13a`` tokenisation and exponential smoothing of sentence-level BLEU.
* distinct-n (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models"): distinct n-grams / all n-grams over all responses, on whitespace
  tokens; higher is more diverse.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger(__name__)
SACREBLEU_MISSING = "sacrebleu is not installed (pip install sacrebleu, or the project's eval extra): self-BLEU not computed"


def distinct_n(responses: Sequence[str], n: int) -> float:
    """distinct-n = |distinct n-grams| / |n-grams| over all responses (whitespace tokens, lowercased).

    Li et al. (2016), Sec. 4.3. A response shorter than n contributes no n-gram; 0.0 when there
    is no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1, got {n}")
    total = 0
    seen: set[tuple[str, ...]] = set()
    for response in responses:
        tokens = response.lower().split()
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
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
