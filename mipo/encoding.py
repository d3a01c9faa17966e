"""From chat messages and response strings to token ids: the one tokenisation path.

Training, the reference cache and the MI estimator all score (prompt, response) rows, and
they must score exactly the same tokens: DPO's implicit reward compares log pi(y|x) under
the policy with log pi_ref(y|x) from the cache, so one extra or missing token on one side
is a bias in every reward. Every row therefore goes through ``encode_rows``:

    prompt messages --chat template--> prompt ids      (``encode_prompt``)
    response string --tokenizer------> response ids + end-of-turn   (``encode_response``)
    (prompt ids, response ids) --truncation--> ``EncodedRow``         (``encode_pair``)

An ``EncodedRow`` keeps the prompt ids and the response ids apart, so a consumer that runs a
prompt once for several responses (``mipo.logprobs``) never has to recover where the prompt
ends, and the loss mask is the response by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from mipo.chat import Messages, prompt_key

if TYPE_CHECKING:  # pairs.py imports Messages from here
    from mipo.pairs import PreferencePair

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------

def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Token ids of a prompt rendered with the tokenizer's chat template, ready for the reply."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Token ids of a response followed by the end-of-turn token."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass(frozen=True)
class EncodedRow:
    """One (prompt, response) row as token ids, the prompt and the response kept apart."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    @property
    def input_ids(self) -> list[int]:
        """The model's input: prompt then response."""
        return [*self.prompt_ids, *self.response_ids]

    @property
    def labels(self) -> list[int]:
        """``input_ids`` on response tokens, ``IGNORE_INDEX`` on the prompt: the loss mask."""
        return [IGNORE_INDEX] * len(self.prompt_ids) + list(self.response_ids)


def encode_pair(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int,
                max_prompt_length: int) -> EncodedRow:
    """The truncation rule: prompt and response ids cut to at most ``max_length`` tokens.

    A row that fits is kept whole. Otherwise the prompt is cut from the left to
    ``max_prompt_length`` first (its end, next to the response, matters most), then the response
    from the right, so at least one response token remains. ``0 < max_prompt_length <
    max_length`` is checked once, by ``mipo.config.check_config``.
    """
    prompt_ids, response_ids = tuple(prompt_ids), tuple(response_ids)
    if len(prompt_ids) + len(response_ids) > max_length:
        prompt_ids = prompt_ids[-min(max_prompt_length, max_length - 1):]
        response_ids = response_ids[: max_length - len(prompt_ids)]
    return EncodedRow(prompt_ids, response_ids)


def encode_rows(tokenizer, prompts: Sequence[Messages], responses: Sequence[str], max_length: int,
                max_prompt_length: int) -> list[EncodedRow]:
    """Encode (prompt messages, response) rows; each distinct prompt is rendered and tokenised once.

    The single function through which policy, reference and MI scoring see their tokens.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_ids: dict[str, list[int]] = {}
    rows = []
    for messages, response in zip(prompts, responses):
        key = prompt_key(messages)
        if key not in prompt_ids:
            prompt_ids[key] = encode_prompt(tokenizer, messages)
        rows.append(encode_pair(prompt_ids[key], encode_response(tokenizer, response), max_length, max_prompt_length))
    return rows


def encode_pairs(tokenizer, pairs: Sequence["PreferencePair"], max_length: int,
                 max_prompt_length: int) -> tuple[list[EncodedRow], list[EncodedRow]]:
    """(x, y+) and (x, y-) rows of preference pairs: what the policy and the reference both score."""
    prompts = [pair.prompt for pair in pairs]
    rows = encode_rows(tokenizer, prompts + prompts, [pair.chosen for pair in pairs] + [pair.rejected for pair in pairs],
                       max_length, max_prompt_length)
    return rows[: len(pairs)], rows[len(pairs):]


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
