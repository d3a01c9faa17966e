"""Sequence log-probabilities log pi(y|x) of responses under a causal LM.

Every quantity of the method is a sum of per-token log-probs over the response tokens:
the DPO loss needs log pi(y+|x) and log pi(y-|x) under the policy and the reference, and the
MI estimator needs log pi_ref(y|x') for many prompts x'. This module turns chat messages and
response strings into token ids with a loss mask, and sums per-token log-probs gathered by
``kernels.logprob_gather`` (Triton on GPU, a row-chunked PyTorch fallback elsewhere), or by
``kernels.linear_logprob`` that never materialises the (N, V) logits of the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from kernels import linear_logprob, logprob_gather

IGNORE_INDEX = -100
Messages = list[dict[str, str]]


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


def encode_pair(
    prompt_ids: list[int], response_ids: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int]]:
    """Concatenate prompt and response ids, truncating to ``max_length``.

    The prompt is cut from the left to ``max_prompt_length`` first (its end, next to the
    response, matters most), then the response from the right. Labels are the input ids on
    response tokens and ``IGNORE_INDEX`` on the prompt.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < data.max_prompt_length < data.max_length, got {max_prompt_length} and {max_length}")
    if len(prompt_ids) + len(response_ids) > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        response_ids = response_ids[: max(max_length - len(prompt_ids), 1)]
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return input_ids, labels


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX outside the response

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def pad_batch(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> Batch:
    """Right-pad (input_ids, labels) rows into a batch."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return Batch(input_ids, attention_mask, labels)


def left_pad(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), each (B, T): every row ends in the last column."""
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    return input_ids, attention_mask


# --------------------------------------------------------------------------------------------
# Log-probs
# --------------------------------------------------------------------------------------------

def sequence_logps(
    model: torch.nn.Module, batch: Batch, kernel: str = "auto", fused_lm_head: bool = False
) -> torch.Tensor:
    """log pi(y|x): the sum of per-token log-probs over the response tokens of each row.

    Args:
        batch: right-padded rows, labels set to ``IGNORE_INDEX`` outside the response.
        kernel: ``auto``, ``triton``, ``torch`` or ``naive`` (see ``kernels.logprob``).
        fused_lm_head: compute log-probs from the last hidden states with
            ``kernels.linear_logprob``, only at response positions, so the (B, T, V) logits
            are never materialised.

    Returns:
        (B,) float32, differentiable when the model is.
    """
    targets = batch.labels[:, 1:]  # (B, T-1): token t is predicted at position t-1
    if fused_lm_head:
        config = getattr(model, "config", None)
        if getattr(config, "final_logit_softcapping", None):
            raise ValueError("fused_lm_head does not implement final-logit softcapping; set fused_lm_head=false")
        # logits = scale * (h W^T) = (scale * h) W^T: Granite divides by logits_scaling, Cohere multiplies by logit_scale
        scale = getattr(config, "logit_scale", None) or 1.0
        scale /= getattr(config, "logits_scaling", None) or 1.0
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        hidden = hidden[:, :-1] * scale if scale != 1.0 else hidden[:, :-1]  # (B, T-1, H)
        positions = targets != IGNORE_INDEX  # (B, T-1)
        lm_head = model.get_output_embeddings()
        token_logps = hidden.new_zeros(targets.shape, dtype=torch.float32)  # (B, T-1)
        token_logps[positions] = linear_logprob(
            hidden[positions], lm_head.weight, targets[positions], bias=lm_head.bias, impl=kernel
        )  # (N_response,)
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
        token_logps = logprob_gather(logits[:, :-1], targets, ignore_index=IGNORE_INDEX, impl=kernel)  # (B, T-1)
    return token_logps.sum(-1)


@torch.no_grad()
def score_responses(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Messages],
    responses: Sequence[str],
    batch_size: int = 8,
    max_length: int = 2048,
    max_prompt_length: int = 1536,
    kernel: str = "auto",
    desc: str | None = "scoring",
    share_prompts: bool = True,
) -> torch.Tensor:
    """log pi(responses[i] | prompts[i]) for every row, in batches, without gradients.

    With ``share_prompts`` (the default), rows that share a prompt are batched together and
    each distinct prompt of a batch is run through the model once; its KV cache is then
    expanded to the rows that continue it (``prefix_shared_logps``). The MI estimator scores
    every prompt under K+1 responses and the reference cache every prompt under two, so this
    removes most of the prompt tokens from the forward passes. ``share_prompts=False`` runs
    every (prompt, response) row in full; both give the same numbers up to float rounding.

    Returns (N,) float32 on the CPU, in the input order.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    prompt_cache: dict[str, list[int]] = {}
    rows = []
    for messages, response in zip(prompts, responses):
        key = repr(messages)
        if key not in prompt_cache:
            prompt_cache[key] = encode_prompt(tokenizer, messages)
        rows.append(encode_pair(prompt_cache[key], encode_response(tokenizer, response), max_length, max_prompt_length))
    prompt_lengths = [sum(1 for label in labels if label == IGNORE_INDEX) for _, labels in rows]
    if share_prompts:  # rows of one (truncated) prompt next to each other, longest prompts first
        order = sorted(range(len(rows)), key=lambda i: (-prompt_lengths[i], rows[i][0][: prompt_lengths[i]]))
    else:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)
    out = torch.empty(len(rows), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
            index = order[start : start + batch_size]
            if share_prompts:
                split = [(rows[i][0][: prompt_lengths[i]], rows[i][0][prompt_lengths[i]:]) for i in index]
                logps = prefix_shared_logps(model, split, tokenizer.pad_token_id, kernel=kernel)
            else:
                batch = pad_batch([rows[i] for i in index], tokenizer.pad_token_id).to(device)
                logps = sequence_logps(model, batch, kernel=kernel)
            out[index] = logps.float().cpu()
    finally:
        model.train(was_training)
    return out


def prefix_shared_logps(
    model: torch.nn.Module, rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int, kernel: str = "auto"
) -> torch.Tensor:
    """log pi(response | prompt) for (prompt ids, response ids) rows, running each distinct prompt once.

    1. The k distinct prompts, left-padded to (k, P), go through the model once with a KV cache;
       the logits at their last position predict each response's first token.
    2. The cache is expanded to the b rows (row r continues prompt ``which[r]``), and the
       right-padded responses (b, R) run on top of it.
    Position ids are given explicitly so that padding never shifts a token's position.

    Returns (b,) float32 (no gradients are needed: this is for scoring).
    """
    device = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    which = [distinct.setdefault(tuple(prompt), len(distinct)) for prompt, _ in rows]
    prompt_ids, prompt_mask = left_pad([list(prompt) for prompt in distinct], pad_token_id)  # (k, P)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (k, P)
    prefix = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                   use_cache=True, logits_to_keep=1)
    which_t = torch.tensor(which, device=device)
    cache = prefix.past_key_values
    cache.reorder_cache(which_t)  # (k, ...) -> (b, ...)
    first_logits = prefix.logits[which_t, -1]  # (b, V): predicts each response's first token

    response_batch = pad_batch([(response, response) for _, response in rows], pad_token_id).to(device)
    response_ids, response_mask = response_batch.input_ids, response_batch.attention_mask  # (b, R)
    response_positions = prompt_mask.sum(-1)[which_t, None] + torch.arange(response_ids.shape[1], device=device)
    continued = model(input_ids=response_ids, attention_mask=torch.cat([prompt_mask[which_t], response_mask], dim=1),
                      position_ids=response_positions, past_key_values=cache, use_cache=False)
    # token t of the response is predicted by the prompt's last position (t = 0) or response position t-1
    logits = torch.cat([first_logits[:, None], continued.logits[:, :-1]], dim=1)  # (b, R, V)
    targets = response_ids.masked_fill(response_mask == 0, IGNORE_INDEX)  # (b, R)
    return logprob_gather(logits, targets, ignore_index=IGNORE_INDEX, impl=kernel).sum(-1)
