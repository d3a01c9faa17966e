"""LLM-judge scores and win rates for personalization, as the paper reports them.

MIPO's personalization results (arXiv 2603.19294, Sec. 5) are judged by an LLM: for each user
preference stated in the prompt (the user's context or memories), the judge rates 1-5 how well
a response addresses it; a response's score is the mean over its preferences. The policy's
response *wins* against the dataset's reference response (``Example.reference``) when its score
is at least the reference's: ties count as wins, as in the paper. Strict wins (policy score
greater than the reference's) are reported beside it.

The judge is any Hugging Face chat model named by the ``judge/`` config group, decoded greedily
through the project's own decode loop (``mipo.model.generation.generate``), batched. The prompt is the
config's ``judge.prompt`` with ``{preference}``, ``{query}`` and ``{response}`` filled in. A
judgment whose output has no score 1-5 is *unparsed*: it is counted, and left out of its
response's mean; a response none of whose judgments parsed is unscored, counted, and left out
of the win rate. Nothing is dropped silently: every count is in ``eval.json``.

Offline the default judge is the bundled SmolLM2-135M-Instruct (``judge=smollm2``): it makes the
whole path run and testable, and it is far too weak to grade anything, so its results carry
``judge.weak: true`` and a label saying so. The paper's judges are ``judge=qwen2.5-14b-instruct``
and ``judge=llama-3-8b-instruct`` (a GPU and the hub).
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from mipo.data.chat import Messages
from mipo.data.tasks import Example
from mipo.metrics.stats import mean_stderr
from mipo.model.generation import DecodeSettings, PlanSettings, generate

log = logging.getLogger(__name__)

# The first digit 1-5 that is not part of a longer number ("4", "Score: 4/5", "**4**"; not "10", "45").
_SCORE = re.compile(r"(?<![0-9.])([1-5])(?![0-9])")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")
PROMPT_FIELDS = ("preference", "query", "response")


@dataclass(frozen=True)
class JudgeSettings:
    """What shapes a judgment besides the judge's weights: the prompt and the decoding."""

    prompt: str  # with {preference}, {query} and {response}
    max_new_tokens: int = 8
    batch_size: int | str = 16
    system_prompt: str | None = None

    @classmethod
    def from_config(cls, judge_cfg: Mapping[str, Any]) -> "JudgeSettings":
        return cls(prompt=str(judge_cfg["prompt"]), max_new_tokens=int(judge_cfg["max_new_tokens"]),
                   batch_size=judge_cfg["batch_size"], system_prompt=judge_cfg.get("system_prompt"))


def prompt_problems(prompt: str) -> list[str]:
    """What is wrong with a judge prompt template: a missing or unknown ``{field}``."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
    except ValueError as error:
        return [f"judge.prompt is not a valid template ({error}): use {{preference}}, {{query}} and {{response}}"]
    problems = []
    missing = [f for f in PROMPT_FIELDS if f not in names]
    unknown = sorted(names - set(PROMPT_FIELDS))
    if missing:
        problems.append(f"judge.prompt lacks {', '.join('{' + f + '}' for f in missing)}: expected all of "
                        "{preference}, {query} and {response}")
    if unknown:
        problems.append(f"judge.prompt has unknown field(s) {unknown}: only {{preference}}, {{query}} and "
                        "{response} are filled in (write a literal brace as {{ or }})")
    return problems


def preferences_of(context: str | None) -> list[str]:
    """The user's stated preferences: one per non-empty line of the context, list bullets removed
    (``"- I am vegan."`` -> ``"I am vegan."``); a one-line context is one preference; None gives none."""
    if context is None:
        return []
    lines = [_BULLET.sub("", line).strip() for line in context.splitlines()]
    return [line for line in lines if line]


def parse_score(text: str) -> int | None:
    """The judge's score: the first digit 1-5 of its output that is not part of a longer number; None if none."""
    match = _SCORE.search(text)
    return int(match.group(1)) if match else None


def judge_messages(settings: JudgeSettings, preference: str, query: str, response: str) -> Messages:
    """The judge's chat prompt for one (preference, response)."""
    content = settings.prompt.format(preference=preference, query=query, response=response)
    messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    return messages + [{"role": "user", "content": content}]


@dataclass
class JudgeScores:
    """One set of responses judged: per response, its mean score over preferences (None: unscored)."""

    scores: list[float | None]  # (N,) mean 1-5 score over the parsed judgments of each response
    judgments: int  # (response, preference) judgments asked for
    unparsed: int  # of those, outputs with no score 1-5
    unscored: int  # responses with preferences none of whose judgments parsed
    no_preferences: int  # responses whose prompt states no preference (not judged)
    unparsed_examples: list[str] = field(default_factory=list)  # up to 5 raw judge outputs that did not parse


def score_responses(model, tokenizer, settings: JudgeSettings, examples: Sequence[Example], responses: Sequence[str],
                    max_prompt_length: int | None = None, desc: str | None = "judge") -> JudgeScores:
    """Judge each response against each preference of its example's context, in one batched greedy decode.

    Args:
        model, tokenizer: the judge.
        examples: (N,) the prompts' examples (their ``context`` holds the preferences, ``question`` the query).
        responses: (N,) the responses to judge, ``responses[i]`` for ``examples[i]``.
    """
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses to judge: give one response per example")
    prompts: list[Messages] = []
    owner: list[int] = []  # (J,) which response each judgment belongs to
    for i, (example, response) in enumerate(zip(examples, responses)):
        for preference in preferences_of(example.context):
            prompts.append(judge_messages(settings, preference, example.question, response))
            owner.append(i)
    greedy = DecodeSettings(max_new_tokens=settings.max_new_tokens, temperature=0.0, top_p=1.0)
    planning = PlanSettings(batch_size=settings.batch_size, max_prompt_length=max_prompt_length)
    outputs = generate(model, tokenizer, prompts, settings=greedy, planning=planning, desc=desc).texts if prompts else []
    parsed: list[list[int]] = [[] for _ in responses]
    asked = [0] * len(responses)
    unparsed_examples = []
    for i, text in zip(owner, outputs):
        asked[i] += 1
        score = parse_score(text)
        if score is None:
            if len(unparsed_examples) < 5:
                unparsed_examples.append(text)
        else:
            parsed[i].append(score)
    scores = [sum(s) / len(s) if s else None for s in parsed]
    unparsed = sum(parse_score(text) is None for text in outputs)
    if unparsed:
        log.warning("judge: %d of %d judgments had no score 1-5 (e.g. %r)", unparsed, len(outputs), unparsed_examples[:1])
    return JudgeScores(scores=scores, judgments=len(outputs), unparsed=unparsed,
                       unscored=sum(1 for i in range(len(responses)) if asked[i] and not parsed[i]),
                       no_preferences=sum(1 for n in asked if n == 0), unparsed_examples=unparsed_examples)


def win_outcomes(policy_scores: Sequence[float | None], reference_scores: Sequence[float | None]) -> tuple[list[int], list[int], list[int]]:
    """Per prompt where both responses were scored: (indices, wins with ties, strict wins).

    A win with ties is policy score >= reference score (the paper's win rate); a strict win is >.
    """
    index = [i for i, (p, r) in enumerate(zip(policy_scores, reference_scores)) if p is not None and r is not None]
    wins = [int(policy_scores[i] >= reference_scores[i]) for i in index]
    strict = [int(policy_scores[i] > reference_scores[i]) for i in index]
    return index, wins, strict


def judge_metrics(policy: JudgeScores, reference: JudgeScores) -> tuple[dict[str, Any], dict[str, list]]:
    """The judge's numbers for one model (``models.<name>`` of eval.json) and its per-prompt values.

    Returns:
        metrics: ``judge_score_mean`` (+ ``_stderr``), ``judge_win_rate`` (ties as wins) and
            ``judge_strict_win_rate`` (each + ``_stderr``), ``judge_reference_score_mean``,
            ``judge_compared`` (prompts in the win rate), ``judge_judgments``, ``judge_unparsed``
            (judgments without a score), ``judge_unscored`` (this model's responses with no parsed
            judgment), ``judge_reference_unscored``, ``judge_no_preferences``.
        per_prompt: ``judge_score`` (N,) with None where unscored, and ``judge_win`` /
            ``judge_strict_win`` (N,) with None where either response is unscored.
    """
    index, wins, strict = win_outcomes(policy.scores, reference.scores)
    metrics: dict[str, Any] = {}
    scored = [s for s in policy.scores if s is not None]
    reference_scored = [s for s in reference.scores if s is not None]
    if scored:
        metrics["judge_score_mean"], metrics["judge_score_stderr"] = mean_stderr(scored)
    if reference_scored:
        metrics["judge_reference_score_mean"] = sum(reference_scored) / len(reference_scored)
    if index:
        metrics["judge_win_rate"], metrics["judge_win_rate_stderr"] = mean_stderr(wins)
        metrics["judge_strict_win_rate"], metrics["judge_strict_win_rate_stderr"] = mean_stderr(strict)
    metrics.update(judge_compared=len(index), judge_judgments=policy.judgments, judge_unparsed=policy.unparsed,
                   judge_unscored=policy.unscored, judge_reference_unscored=reference.unscored,
                   judge_no_preferences=policy.no_preferences)
    n = len(policy.scores)
    win, strict_win = [None] * n, [None] * n
    for i, w, s in zip(index, wins, strict):
        win[i], strict_win[i] = w, s
    return metrics, {"judge_score": list(policy.scores), "judge_win": win, "judge_strict_win": strict_win}
