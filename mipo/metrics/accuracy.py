"""Accuracy of an evaluation: its mean and standard error, and lm-evaluation-harness's log-likelihood accuracy.

* ``accuracy``: the mean of 0/1 outcomes and its standard error (lm-eval's ``mean_stderr``),
  for the strict and flexible answer extraction (``Task.extract_answer``) and the options below.
* **log-likelihood accuracy** of multiple choice (lm-eval's ``acc`` and ``acc_norm``): the option
  whose text has the highest log-likelihood after the question, summed (``acc``) or per character
  (``acc_norm``) (``choose_option``), scored through a model's ``Scorer`` (``loglik_correct``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mipo.data.chat import Messages
from mipo.data.tasks import Example, Task
from mipo.metrics.stats import mean_stderr
from mipo.model.logprobs import Scorer


def accuracy(correct: Sequence[bool]) -> tuple[float, float]:
    """Mean accuracy and its standard error, std (ddof=1) / sqrt(n), lm-evaluation-harness's
    ``mean_stderr`` (sqrt(p (1 - p) / (n - 1)) for 0/1 values; NaN for n = 1)."""
    return mean_stderr([float(c) for c in correct])


def choose_option(option_logps: Sequence[float], option_chars: Sequence[int]) -> tuple[int, int]:
    """The option a log-likelihood evaluation picks: lm-evaluation-harness's ``acc`` and ``acc_norm``.

    ``acc``: argmax_j log pi(option_j | question); ``acc_norm``: argmax_j log pi(option_j | question)
    / len(option_j in characters) (lm-eval ``ConfigurableTask.process_results``, multiple_choice:
    ``completion_len`` is the character length of each choice). Ties go to the first option, as
    numpy's argmax gives them there.

    Args:
        option_logps: (C,) summed log-likelihood of each option's text.
        option_chars: (C,) each option's length in characters.

    Returns:
        (index by raw log-likelihood, index by per-character log-likelihood).
    """
    logps = np.asarray(option_logps, dtype=np.float64)  # (C,)
    chars = np.maximum(np.asarray(option_chars, dtype=np.float64), 1.0)  # (C,)
    return int(np.argmax(logps)), int(np.argmax(logps / chars))


def loglik_correct(scorer: Scorer, task: Task, examples: Sequence[Example], desc: str | None = None
                   ) -> dict[str, list[int]]:
    """Log-likelihood accuracy of one model on multiple-choice examples, per example.

    Each option's text is scored as the assistant's continuation of ``task.loglik_messages(ex)``
    (lm-eval's ARC prompt ``"Question: ...\nAnswer:"`` in a user turn, as lm-eval's
    ``--apply_chat_template`` renders it), without an end-of-turn token, through the model's
    ``Scorer``: the options of one question share its prompt in one prompt tree.

    Returns:
        ``{"correct_loglik": (N,) 0/1, "correct_loglik_norm": (N,) 0/1}``.
    """
    prompts: list[Messages] = []
    options: list[str] = []
    for ex in examples:
        messages = task.loglik_messages(ex)
        for _, text in ex.choices:
            prompts.append(messages)
            options.append(text)
    logps = scorer.score(prompts, options, desc=desc, finished=[False] * len(options)).tolist()  # (sum_i C_i,)
    raw, norm, start = [], [], 0
    for ex in examples:
        count = len(ex.choices)
        labels = [label for label, _ in ex.choices]
        by_raw, by_norm = choose_option(logps[start : start + count], [len(text) for _, text in ex.choices])
        raw.append(int(labels[by_raw] == ex.answer))
        norm.append(int(labels[by_norm] == ex.answer))
        start += count
    return {"correct_loglik": raw, "correct_loglik_norm": norm}
