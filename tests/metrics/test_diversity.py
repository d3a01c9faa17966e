"""Self-BLEU (sacrebleu) and distinct-n against hand-computed cases."""

from __future__ import annotations

import builtins

import pytest

from mipo.metrics import diversity


def test_distinct_n_by_hand():
    responses = ["the cat sat", "the cat ran", "a"]
    # unigrams: the cat sat the cat ran a -> 7 in all, 5 distinct
    assert diversity.distinct_n(responses, 1) == pytest.approx(5 / 7)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 4 in all, 3 distinct; "a" has none
    assert diversity.distinct_n(responses, 2) == pytest.approx(3 / 4)
    assert diversity.distinct_n(["The Cat", "the cat"], 2) == pytest.approx(1 / 2)  # lowercased
    assert diversity.distinct_n(["", "x"], 2) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        diversity.distinct_n(["x"], 0)


def test_distinct_n_over_tokens_is_li_et_al_s_definition():
    responses = ["the cat sat", "the cat ran", "a"]  # 7 tokens
    # bigrams: 3 distinct (the cat, cat sat, cat ran) over 7 generated tokens, not over 4 bigrams
    assert diversity.distinct_n(responses, 2, denominator="tokens") == pytest.approx(3 / 7)
    assert diversity.distinct_n(responses, 2, denominator="ngrams") == pytest.approx(3 / 4)
    assert diversity.distinct_n(responses, 1, denominator="tokens") == diversity.distinct_n(responses, 1)  # 5 / 7
    assert diversity.distinct_n(["x"], 2, denominator="tokens") == 0.0  # a token but no bigram
    assert diversity.distinct_n([""], 1, denominator="tokens") == 0.0
    with pytest.raises(ValueError, match="denominator"):
        diversity.distinct_n(responses, 2, denominator="words")


def test_self_bleu_by_hand():
    pytest.importorskip("sacrebleu")
    assert diversity.self_bleu(["the same long sentence here"] * 3) == pytest.approx(100.0)
    # no shared n-gram at all: every precision is 0, BLEU 0
    assert diversity.self_bleu(["alpha beta gamma delta", "one two three four", "red green blue yellow"]) == 0.0
    # one copy of another response among several distinct ones raises self-BLEU
    distinct = ["the cat sat on the mat today", "a dog ran in the park fast", "birds sing loudly every morning"]
    assert diversity.self_bleu(distinct + [distinct[0]]) > diversity.self_bleu(distinct)
    with pytest.raises(ValueError, match="at least 2"):
        diversity.self_bleu(["one"])


def test_without_sacrebleu_self_bleu_is_left_out_with_a_warning(monkeypatch, caplog):
    real_import = builtins.__import__

    def no_sacrebleu(name, *args, **kwargs):
        if name.startswith("sacrebleu"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sacrebleu)
    with caplog.at_level("WARNING"):
        metrics = diversity.diversity_metrics(["a b", "c d"])
    assert metrics["self_bleu"] is None and metrics["distinct_1"] == 1.0
    assert "sacrebleu is not installed" in caplog.text
