"""Sequence log-probabilities log pi(y|x) of responses under a causal LM.

Every quantity of the method is a sum of per-token log-probs over the response tokens:
the DPO loss needs log pi(y+|x) and log pi(y-|x) under the policy and the reference, and the
MI estimator needs log pi_ref(y|x') for many prompts x'. Rows come from
``mipo.encoding.encode_rows``; this module sums per-token log-probs gathered by
``kernels.logprob_gather`` (Triton on GPU, a row-chunked PyTorch fallback elsewhere), or by
``kernels.linear_logprob`` that never materialises the (N, V) logits of the LM head.

``Scorer`` holds a model, its tokenizer and the scoring settings; the reference cache and the
MI estimator score through it, without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from kernels import linear_logprob, logprob_gather
from mipo.chat import Messages
from mipo.encoding import IGNORE_INDEX, Batch, EncodedRow, encode_rows, left_pad, pad_batch


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


def prefix_shared_logps(
    model: torch.nn.Module, rows: Sequence[EncodedRow], pad_token_id: int, kernel: str = "auto"
) -> torch.Tensor:
    """log pi(response | prompt) for encoded rows, running each distinct prompt once.

    1. The k distinct prompts, left-padded to (k, P), go through the model once with a KV cache;
       the logits at their last position predict each response's first token.
    2. The cache is expanded to the b rows (row r continues prompt ``which[r]``), and the
       right-padded responses (b, R) run on top of it.
    Position ids are given explicitly so that padding never shifts a token's position.

    Returns (b,) float32 (no gradients are needed: this is for scoring).
    """
    device = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    which = [distinct.setdefault(row.prompt_ids, len(distinct)) for row in rows]
    prompt_ids, prompt_mask = left_pad(list(distinct), pad_token_id)  # (k, P)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (k, P)
    prefix = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                   use_cache=True, logits_to_keep=1)
    which_t = torch.tensor(which, device=device)
    cache = prefix.past_key_values
    cache.reorder_cache(which_t)  # (k, ...) -> (b, ...)
    first_logits = prefix.logits[which_t, -1]  # (b, V): predicts each response's first token

    responses = pad_batch([EncodedRow((), row.response_ids) for row in rows], pad_token_id).to(device)
    response_ids, response_mask = responses.input_ids, responses.attention_mask  # (b, R)
    response_positions = prompt_mask.sum(-1)[which_t, None] + torch.arange(response_ids.shape[1], device=device)
    continued = model(input_ids=response_ids, attention_mask=torch.cat([prompt_mask[which_t], response_mask], dim=1),
                      position_ids=response_positions, past_key_values=cache, use_cache=False)
    # token t of the response is predicted by the prompt's last position (t = 0) or response position t-1
    logits = torch.cat([first_logits[:, None], continued.logits[:, :-1]], dim=1)  # (b, R, V)
    return logprob_gather(logits, responses.labels, ignore_index=IGNORE_INDEX, impl=kernel).sum(-1)


@dataclass
class Scorer:
    """log pi(response | prompt) of many rows under one model, in batches, without gradients.

    Holds what every scoring call shares: the model, its tokenizer, the truncation lengths,
    the batch size and the log-prob kernel. With ``share_prompts`` (the default), rows that
    share a prompt are batched together and each distinct prompt of a batch is run once
    (``prefix_shared_logps``): the MI estimator scores every prompt under K+1 responses and the
    reference cache every prompt under two, so this removes most prompt tokens from the
    forward passes. ``share_prompts=False`` runs every row in full; both give the same numbers
    up to float rounding.
    """

    model: torch.nn.Module
    tokenizer: object
    max_length: int = 2048
    max_prompt_length: int = 1536
    batch_size: int = 8
    kernel: str = "auto"
    share_prompts: bool = True

    def score(self, prompts: Sequence[Messages], responses: Sequence[str], desc: str | None = "scoring") -> torch.Tensor:
        """log pi(responses[i] | prompts[i]) for every row: (N,) float32 on the CPU, in input order."""
        rows = encode_rows(self.tokenizer, prompts, responses, self.max_length, self.max_prompt_length)
        return self.score_rows(rows, desc=desc)

    @torch.no_grad()
    def score_rows(self, rows: Sequence[EncodedRow], desc: str | None = "scoring") -> torch.Tensor:
        """The same for rows already encoded by ``mipo.encoding.encode_rows``."""
        if self.share_prompts:  # rows of one (truncated) prompt next to each other, longest prompts first
            order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].prompt_ids), rows[i].prompt_ids))
        else:
            order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids), reverse=True)
        device = next(self.model.parameters()).device
        pad_token_id = self.tokenizer.pad_token_id
        out = torch.empty(len(rows), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=desc is None, leave=False):
                index = order[start : start + self.batch_size]
                batch_rows = [rows[i] for i in index]
                if self.share_prompts:
                    logps = prefix_shared_logps(self.model, batch_rows, pad_token_id, kernel=self.kernel)
                else:
                    logps = sequence_logps(self.model, pad_batch(batch_rows, pad_token_id).to(device), kernel=self.kernel)
                out[index] = logps.float().cpu()
        finally:
            self.model.train(was_training)
        return out


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
    """``Scorer(model, tokenizer, ...).score(prompts, responses)``: for one-off scoring calls."""
    scorer = Scorer(model, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                    batch_size=batch_size, kernel=kernel, share_prompts=share_prompts)
    return scorer.score(prompts, responses, desc=desc)
