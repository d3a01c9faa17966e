"""From chat messages and response strings to token ids: the one tokenisation path.

Training, the reference cache and the MI estimator all score (prompt, response) rows, and
they must score exactly the same tokens: DPO's implicit reward compares log pi(y|x) under
the policy with log pi_ref(y|x) from the cache, so one extra or missing token on one side
is a bias in every reward. Every row therefore goes through ``encode_rows``:

    prompt messages --chat template--> prompt ids      (``encode_prompt``)
    response string --tokenizer------> response ids [+ end-of-turn if it finished]  (``encode_response``)
    (prompt ids, response ids) --truncation--> ``EncodedRow``         (``encode_pair``)

What a finished response ends with is ``data.response_suffix`` (``RESPONSE_SUFFIXES``), attached to the
tokenizer by ``mipo.model.loading.load_tokenizer`` (``set_response_suffix``):

    end_of_turn (default)  y + [the template's end-of-turn token]  (``mipo.data.chat.turn_end``)
    template               y + everything the chat template writes after the assistant's content

With ChatML (SmolLM2, Qwen) ``end_of_turn`` is y + ``<|im_end|>`` and ``template`` is y + ``<|im_end|>`` + ``\\n``.
``end_of_turn`` is what the paper's released code trains on: OpenRLHF's reward dataset
(``openrlhf/datasets/reward_dataset.py``, ``RewardDataset.__getitem__``) renders prompt + response
with the template, strips the trailing newline (``(prompt + chosen).rstrip("\\n")``) and appends
``" " + eos_token`` unless the text already ends with the eos (SmolLM2's does: y + ``<|im_end|>``).
``template`` is what TRL trains on: its ``apply_chat_template`` (``trl/data_utils.py``) renders the
prompt and the prompt + response and keeps all the latter writes after the former, so a TRL
baseline and mipo score the same ids (``tests/data/test_encoding.py`` checks it).
A response cut at ``max_new_tokens`` gets neither.

An ``EncodedRow`` keeps the prompt ids and the response ids apart, so a consumer that runs a
prompt once for several responses (``mipo.model.logprobs``) never has to recover where the prompt
ends, and the loss mask is the response by construction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from mipo.data.chat import Messages, prompt_key, render_prompt, turn_end
from mipo.runtime.errors import failed, is_int

if TYPE_CHECKING:  # pairs.py imports Messages from here
    from mipo.data.pairs import PreferencePair

IGNORE_INDEX = -100
RESPONSE_SUFFIXES = ("end_of_turn", "template")  # ``data.response_suffix``: what a finished response ends with
DEFAULT_RESPONSE_SUFFIX = "end_of_turn"
RESPONSE_SUFFIX_ATTRIBUTE = "mipo_response_suffix"
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------

def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Token ids of a prompt rendered by ``mipo.data.chat.render_prompt``, ready for the reply."""
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


def set_response_suffix(tokenizer, response_suffix: str = DEFAULT_RESPONSE_SUFFIX) -> None:
    """Attach ``data.response_suffix`` to the tokenizer: every ``encode_response`` with it follows it."""
    if response_suffix not in RESPONSE_SUFFIXES:
        raise ValueError(f"data.response_suffix={response_suffix!r}: expected one of {', '.join(RESPONSE_SUFFIXES)}")
    setattr(tokenizer, RESPONSE_SUFFIX_ATTRIBUTE, response_suffix)


def response_suffix(tokenizer) -> str:
    """The tokenizer's ``data.response_suffix`` (``set_response_suffix``; the default when none is attached)."""
    return getattr(tokenizer, RESPONSE_SUFFIX_ATTRIBUTE, None) or DEFAULT_RESPONSE_SUFFIX


def encode_response(tokenizer, response: str, finished: bool = True) -> list[int]:
    """Token ids of a response, followed by the end of the turn only if the model ``finished`` it.

    The end of the turn is the template's end-of-turn token (``mipo.data.chat.turn_end``; the
    tokenizer's eos when the template has none), or with ``data.response_suffix=template`` all the
    template writes after the content (``TurnEnd.suffix``, tokenised with the response: the ids
    TRL trains on). A response cut at ``max_new_tokens`` did not end: scoring or training it with
    an end-of-turn token would credit the model with stopping where it did not.
    """
    if not finished:
        return tokenizer(response, add_special_tokens=False)["input_ids"]
    end = turn_end(tokenizer)
    if response_suffix(tokenizer) == "template":
        return tokenizer(response + end.suffix, add_special_tokens=False)["input_ids"]
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [end.token_id]


@dataclass(frozen=True)
class EncodedRow:
    """One (prompt, response) row as token ids, the prompt and the response kept apart."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    prompt_cut: int = 0  # prompt tokens dropped from the left by the truncation rule
    response_cut: int = 0  # response tokens dropped from the right

    @property
    def input_ids(self) -> list[int]:
        """The model's input: prompt then response."""
        return [*self.prompt_ids, *self.response_ids]

    @property
    def labels(self) -> list[int]:
        """``input_ids`` on response tokens, ``IGNORE_INDEX`` on the prompt: the loss mask."""
        return [IGNORE_INDEX] * len(self.prompt_ids) + list(self.response_ids)


def truncate_prompt(prompt_ids: Sequence[int], max_prompt_length: int) -> tuple[int, ...]:
    """The prompt rule, the same for generation and scoring: keep the last ``max_prompt_length`` tokens.

    The end of a prompt (the question, the generation prompt) sits next to the response and
    matters most; a long few-shot or context block loses its beginning first.
    """
    return tuple(prompt_ids[-max_prompt_length:])


def encode_pair(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int,
                max_prompt_length: int) -> EncodedRow:
    """The truncation rule for a scored row: at most ``max_length`` tokens, the prompt as generation saw it.

    The prompt is cut by ``truncate_prompt`` (exactly what ``mipo.model.generation`` feeds the model,
    so a response is scored under the prompt it answered), then the response is cut from the
    right to the room left, ``max_length - len(prompt)``. ``0 < max_prompt_length <
    max_length`` is checked once, by ``mipo.stages.config.check_config``; the prompt keeps at most
    ``max_length - 1`` tokens here so that a row always has a response token.
    """
    prompt = truncate_prompt(prompt_ids, min(max_prompt_length, max_length - 1))
    response = tuple(response_ids[: max_length - len(prompt)])
    return EncodedRow(prompt, response, prompt_cut=len(prompt_ids) - len(prompt),
                      response_cut=len(response_ids) - len(response))


def encode_rows(tokenizer, prompts: Sequence[Messages], responses: Sequence[str], max_length: int,
                max_prompt_length: int, finished: Sequence[bool] | None = None) -> list[EncodedRow]:
    """Encode (prompt messages, response) rows; each distinct prompt is rendered and tokenised once.

    The single function through which policy, reference and MI scoring see their tokens.
    ``finished[i]`` is False for a response cut at ``max_new_tokens`` (no end-of-turn token);
    by default every response is finished.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if finished is None:
        finished = [True] * len(responses)
    prompt_ids: dict[str, list[int]] = {}
    rows = []
    for messages, response, done in zip(prompts, responses, finished):
        key = prompt_key(messages)
        if key not in prompt_ids:
            prompt_ids[key] = encode_prompt(tokenizer, messages)
        rows.append(encode_pair(prompt_ids[key], encode_response(tokenizer, response, done), max_length,
                                max_prompt_length))
    return rows


def encode_pairs(tokenizer, pairs: Sequence["PreferencePair"], max_length: int,
                 max_prompt_length: int) -> tuple[list[EncodedRow], list[EncodedRow]]:
    """(x, y+) and (x, y-) rows of preference pairs: what the policy and the reference both score."""
    prompts = [pair.prompt for pair in pairs]
    rows = encode_rows(tokenizer, prompts + prompts, [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs],
                       max_length, max_prompt_length,
                       finished=[pair.chosen_finished for pair in pairs] + [pair.rejected_finished for pair in pairs])
    return rows[: len(pairs)], rows[len(pairs):]


def truncation_counts(rows: Sequence[EncodedRow]) -> dict[str, int]:
    """What the truncation rule (``encode_pair``) cut from ``rows``: the rows whose prompt lost its beginning to
    ``data.max_prompt_length`` and the tokens it lost, the rows whose response lost its end to ``data.max_length``
    and the tokens it lost (``train.json``'s and ``eval.json``'s ``truncation``)."""
    return {"rows": len(rows),
            "prompts_cut": sum(row.prompt_cut > 0 for row in rows),
            "prompt_tokens_cut": sum(row.prompt_cut for row in rows),
            "responses_cut": sum(row.response_cut > 0 for row in rows),
            "response_tokens_cut": sum(row.response_cut for row in rows)}


def add_truncation_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    """The sum of several ``truncation_counts`` (row lists of one run: y+ and y- rows, ...)."""
    return {key: sum(c[key] for c in counts) for key in ("rows", "prompts_cut", "prompt_tokens_cut", "responses_cut",
                                                         "response_tokens_cut")}


def warn_truncation(counts: Mapping[str, int], what: str) -> None:
    """A WARNING when ``counts`` (``truncation_counts``) says the truncation rule cut anything from ``what``."""
    if counts["prompts_cut"] or counts["responses_cut"]:
        log.warning("%s: the truncation rule cut %d of %d prompts (%d tokens from their start: data.max_prompt_length) "
                    "and %d of %d responses (%d tokens from their end: data.max_length); a cut prompt loses context, "
                    "a cut response is scored on part of itself: raise the lengths to keep them whole", what,
                    counts["prompts_cut"], counts["rows"], counts["prompt_tokens_cut"], counts["responses_cut"],
                    counts["rows"], counts["response_tokens_cut"])


# --------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX outside the response

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def pad_batch(rows: Sequence[EncodedRow], pad_token_id: int) -> Batch:
    """Right-pad encoded rows into a batch; labels mark the response tokens."""
    width = max(len(row.prompt_ids) + len(row.response_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = row.input_ids
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, len(row.prompt_ids): len(ids)] = torch.tensor(row.response_ids, dtype=torch.long)
    return Batch(input_ids, attention_mask, labels)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), each (B, T): every row ends in the last column."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, width - len(ids):] = 1
    return input_ids, attention_mask


def response_suffix_problems(data: Mapping[str, Any]) -> list[str]:
    """``data.response_suffix``: one of ``RESPONSE_SUFFIXES`` (absent: the default, ``end_of_turn``)."""
    value = data.get("response_suffix", DEFAULT_RESPONSE_SUFFIX)
    return failed([(isinstance(value, str) and value in RESPONSE_SUFFIXES,
                    f"data.response_suffix={value}: expected one of {', '.join(RESPONSE_SUFFIXES)} "
                    "(end_of_turn: y + the end-of-turn token, as the paper's code; template: y + all the chat "
                    "template writes after it, as TRL)")])


def length_problems(data: Mapping[str, Any]) -> list[str]:
    """``data.max_length`` / ``data.max_prompt_length``: the prompt is cut to max_prompt_length inside max_length tokens."""
    max_length, max_prompt_length = data["max_length"], data["max_prompt_length"]
    problems = failed([
        (is_int(max_length) and max_length > 1, f"data.max_length={max_length}: expected an int > 1"),
        (is_int(max_prompt_length) and max_prompt_length > 0,
         f"data.max_prompt_length={max_prompt_length}: expected an int > 0"),
    ])
    if is_int(max_length) and is_int(max_prompt_length) and max_prompt_length >= max_length:
        problems.append(f"data.max_prompt_length={max_prompt_length} must be < data.max_length={max_length} "
                        "(the response needs room after the prompt)")
    return problems
