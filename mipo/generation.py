"""Batched sampling from a chat model: left padding, KV cache, never one prompt at a time."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from mipo.chat import Messages
from mipo.encoding import encode_prompt, left_pad, truncate_prompt


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Messages],
    max_new_tokens: int,
    temperature: float = 0.1,
    top_p: float = 0.9,
    batch_size: int = 16,
    seed: int = 0,
    max_prompt_length: int | None = None,
    desc: str | None = "sampling",
) -> list[str]:
    """One response per prompt, sampled in batches sorted by prompt length.

    ``temperature == 0`` decodes greedily. Sampling is reproducible for a given ``seed``
    and batch composition (the generator is re-seeded before every batch from ``seed``
    and the batch's position, so a resumed or re-ordered run draws the same numbers for
    the same batch).

    Returns the decoded responses, in the order of ``prompts``, without special tokens.
    """
    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, messages) for messages in prompts]
    if max_prompt_length is not None:
        encoded = [list(truncate_prompt(ids, max_prompt_length)) for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    responses: list[str] = [""] * len(encoded)
    sampling = temperature > 0
    was_training = model.training
    model.eval()
    try:
        for batch_index, start in enumerate(
            tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, unit="batch")
        ):
            index = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in index], tokenizer.pad_token_id)  # (b, width)
            width = input_ids.shape[1]
            torch.manual_seed(seed * 1_000_003 + batch_index)
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                temperature=temperature if sampling else None,
                top_p=top_p if sampling else None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )  # (b, width + new)
            for row, i in enumerate(index):
                responses[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return responses
