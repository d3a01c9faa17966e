"""Sequence log-probabilities log pi(y|x) of responses under a causal LM.

Every quantity of the method is a sum of per-token log-probs over the response tokens:
the DPO loss needs log pi(y+|x) and log pi(y-|x) under the policy and the reference, and the
MI estimator needs log pi_ref(y|x') for many prompts x'. Rows come from
``mipo.data.encoding.encode_rows``; this module sums per-token log-probs gathered by
``mipo.kernels.logprob_gather`` (Triton on GPU, a row-chunked PyTorch fallback elsewhere), or by
``mipo.kernels.linear_logprob`` that never materialises the (N, V) logits of the LM head.

Two layouts: ``sequence_logps`` scores right-padded (prompt, response) rows; ``continuation_logps``
scores a prompt tree (``mipo.model.prompt_tree``: each prompt, and the prefix prompts share, run once for
all their continuations) and sends only the positions that predict a response token through the
output layer (``output_layer_logps``). Training uses the tree (``mipo.training.forward``); so does
``Scorer`` (``prompt_tree_logps``, rows grouped by ``mipo.model.prompt_tree.group_by_prompt``) unless
``share_prompts=False`` or the tree is not exact for the model (``mipo.model.architecture.prompt_tree_problem``:
a sliding window, softcapped attention logits, ALiBi, ...), where it scores rows.

``Scorer`` holds a model, its tokenizer and the scoring settings; the reference cache and the
MI estimator score through it, without gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from tqdm.auto import tqdm

from mipo.data.chat import Messages
from mipo.data.encoding import IGNORE_INDEX, Batch, EncodedRow, encode_rows, pad_batch
from mipo.kernels.logprob import IMPLS, linear_logprob, logprob_gather
from mipo.model import segment_attention
from mipo.model.architecture import prompt_tree_problem
from mipo.model.prompt_tree import (
    PackedGroups,
    block_mask,
    dense_mask,
    group_by_prompt,
    pack_groups,
)
from mipo.model.segment_attention import use_segment_attention
from mipo.runtime import distributed
from mipo.runtime.errors import failed

log = logging.getLogger(__name__)

KERNELS = ("auto", *IMPLS)  # the config key `kernel` (mipo.kernels.logprob)


def output_layer_logps(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, kernel: str = "auto",
                       fused_lm_head: bool = True) -> torch.Tensor:
    """log p(target | hidden state) for N selected positions: the output layer and the log-softmax.

    Args:
        hidden: (N, H) last hidden states of the positions that predict ``targets`` (only those:
            a prompt position that predicts nothing never reaches the output layer).
        targets: (N,) token ids.
        fused_lm_head: ``mipo.kernels.linear_logprob``, which holds at most a chunk of the (N, V)
            logits at a time; otherwise the (N, V) logits are materialised and gathered.

    Returns:
        (N,) float32.
    """
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    if fused_lm_head and softcap:
        raise ValueError("fused_lm_head does not implement final-logit softcapping; set fused_lm_head=false")
    # logits = scale * (h W^T) = (scale * h) W^T: Granite divides by logits_scaling, Cohere multiplies by logit_scale
    scale = getattr(config, "logit_scale", None) or 1.0
    scale /= getattr(config, "logits_scaling", None) or 1.0
    hidden = hidden * scale if scale != 1.0 else hidden  # (N, H)
    lm_head = model.get_output_embeddings()
    if fused_lm_head:
        return linear_logprob(hidden, lm_head.weight, targets, bias=lm_head.bias, impl=kernel)  # (N,)
    logits = lm_head(hidden)  # (N, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logprob_gather(logits, targets, ignore_index=IGNORE_INDEX, impl=kernel)  # (N,)


def sequence_logps(
    model: torch.nn.Module, batch: Batch, kernel: str = "auto", fused_lm_head: bool = False
) -> torch.Tensor:
    """log pi(y|x): the sum of per-token log-probs over the response tokens of each row.

    Args:
        batch: right-padded rows, labels set to ``IGNORE_INDEX`` outside the response.
        kernel: ``auto``, ``triton``, ``torch`` or ``naive`` (see ``mipo.kernels.logprob``).
        fused_lm_head: compute log-probs from the last hidden states with
            ``output_layer_logps``, only at response positions, so the (B, T, V) logits are
            never materialised.

    Returns:
        (B,) float32, differentiable when the model is.
    """
    targets = batch.labels[:, 1:]  # (B, T-1): token t is predicted at position t-1
    if fused_lm_head:
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        positions = targets != IGNORE_INDEX  # (B, T-1)
        token_logps = hidden.new_zeros(targets.shape, dtype=torch.float32)  # (B, T-1)
        token_logps[positions] = output_layer_logps(model, hidden[:, :-1][positions], targets[positions], kernel=kernel)
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
        token_logps = logprob_gather(logits[:, :-1], targets, ignore_index=IGNORE_INDEX, impl=kernel)  # (B, T-1)
    return token_logps.sum(-1)


def tree_attention_inputs(packed: PackedGroups, attn_implementation: str, dtype: torch.dtype) -> dict:
    """What the model's forward needs, besides the tokens and positions, to follow the prompt tree's mask.

    A 4D mask passes through transformers unchanged, so it must already be the form the
    attention function expects: a bool mask for sdpa, an additive float mask for eager, a
    ``BlockMask`` for flex attention. ``segment_attention`` takes the tree itself.
    """
    if attn_implementation == segment_attention.NAME:
        return {"prompt_tree": packed}
    if attn_implementation == "flex_attention":
        return {"attention_mask": block_mask(packed)}
    if attn_implementation == "sdpa":
        return {"attention_mask": dense_mask(packed)}
    if attn_implementation == "eager":
        allowed = dense_mask(packed)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return {"attention_mask": additive.masked_fill_(~allowed, torch.finfo(dtype).min)}
    raise ValueError(f"prompt sharing needs an attention implementation that follows a custom mask ({segment_attention.NAME}, "
                     f"flex_attention, sdpa, eager); the model uses {attn_implementation!r}: set trainer.share_prompt=false "
                     "or trainer.shared_attention=segments")


def continuation_logps(model: torch.nn.Module, packed: PackedGroups, kernel: str = "auto",
                       fused_lm_head: bool = True) -> torch.Tensor:
    """log pi(y_k | x) for every continuation of prompt-shared groups, each shared prompt token run once.

    One forward of the packed row (``mipo.model.prompt_tree``: positions restart after the prompt for every
    continuation; the attention follows the prompt tree with the model's attention
    implementation, see ``tree_attention_inputs``), then the output layer only at the positions
    that predict a response token, summed per continuation. Differentiable: the gradients of
    all continuations of a prompt meet in its (shared) activations.

    Returns:
        (C,) float32, continuations in ``pack_groups`` order (group by group, in order within a group).
    """
    attention = tree_attention_inputs(packed, model.config._attn_implementation, model.dtype)
    hidden = model.base_model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                              **attention).last_hidden_state  # (1, N, H)
    hidden = hidden[0, packed.sources]  # (M, H): the position before each response token
    token_logps = output_layer_logps(model, hidden, packed.targets, kernel=kernel, fused_lm_head=fused_lm_head)  # (M,)
    return token_logps.new_zeros(packed.num_continuations).index_add(0, packed.owners, token_logps)  # (C,)


def prompt_tree_logps(model: torch.nn.Module, rows: Sequence[EncodedRow], kernel: str = "auto",
                      fused_lm_head: bool = False) -> torch.Tensor:
    """log pi(response | prompt) for encoded rows, running each distinct prompt, and the prefix
    the prompts share, once: the rows become one prompt tree (``mipo.model.prompt_tree``) scored by
    ``continuation_logps`` with ``segment_attention``.

    Returns (b,) float32, in the order of ``rows`` (no gradients are needed: this is for scoring).
    """
    device = next(model.parameters()).device
    groups, packed_order = group_by_prompt(rows)  # packed_order[j]: the row of the j-th packed continuation
    with use_segment_attention(model):
        logps = continuation_logps(model, pack_groups(groups).to(device), kernel=kernel,
                                   fused_lm_head=fused_lm_head)  # (b,)
    order = torch.tensor(packed_order, device=device)
    return torch.empty_like(logps).index_copy_(0, order, logps)


@dataclass(frozen=True)
class ScoringSettings:
    """How rows are scored: the truncation lengths, the batch, the log-prob kernel and the output layer.

    One object that the reference pass (``mipo.stages.reference``), the MI estimator (through its
    ``Scorer``) and the evaluation's log-likelihood accuracy all take. ``share_prompts``: score rows
    that share a prompt as one prompt tree (``prompt_tree_logps``), else every row in full; both give
    the same numbers up to float rounding; only where the tree is exact for the model
    (``mipo.model.architecture.prompt_tree_problem``), rows elsewhere. ``fused_lm_head``: the training forward's output-layer
    path, so the reference scores with the policy's numerics.
    """

    max_length: int = 2048
    max_prompt_length: int = 1536
    batch_size: int = 8
    kernel: str = "auto"
    fused_lm_head: bool = False
    share_prompts: bool = True

    @classmethod
    def of(cls, cfg: Mapping[str, Any], fused_lm_head: bool = False) -> ScoringSettings:
        """The config's: ``data.max_length``/``max_prompt_length``, ``eval.score_batch_size``, ``kernel``."""
        return cls(cfg["data"]["max_length"], cfg["data"]["max_prompt_length"], cfg["eval"]["score_batch_size"],
                   cfg["kernel"], fused_lm_head)

    def key(self) -> dict[str, Any]:
        """What of these settings changes the numbers (the batch size and the layout only change the rounding)."""
        return {"max_length": int(self.max_length), "max_prompt_length": int(self.max_prompt_length),
                "kernel": self.kernel, "fused_lm_head": bool(self.fused_lm_head)}


@dataclass
class Scorer:
    """log pi(response | prompt) of many rows under one model, in batches, without gradients.

    Holds what every scoring call shares: the model, its tokenizer and the ``ScoringSettings``. With
    ``settings.share_prompts`` (the default), rows that share a prompt are batched together and each
    distinct prompt of a batch, and the prefix the prompts of a batch share (a system prompt, a
    few-shot block), is run once (``prompt_tree_logps``): the MI estimator scores every prompt under
    K+1 responses and the reference cache every prompt under two, so this removes most prompt tokens
    from the forward passes. Where the tree is not exact for the model (``prompt_tree_problem``: a sliding
    window, softcapped attention logits, ALiBi, ...) every row runs in full, and one INFO line says why.

    Under torchrun (``shard_ranks``, on by default) every rank must call ``score_rows`` with the
    same rows: the batches are formed as in one process and dealt out round-robin (batch k to
    rank k mod N), and the results are gathered in input order on every rank. Each batch is
    the same forward pass it is in one process, so the numbers do not depend on N.
    """

    model: torch.nn.Module
    tokenizer: object
    settings: ScoringSettings = ScoringSettings()
    shard_ranks: bool = True

    @cached_property
    def shares_prompts(self) -> bool:
        """``settings.share_prompts`` where the prompt tree is exact for the model: decided (and logged when
        refused) once per Scorer."""
        if not self.settings.share_prompts:
            return False
        problem = prompt_tree_problem(self.model)
        if problem is not None:
            log.info("scoring every row in full, not as prompt trees, which are not exact for this model: %s", problem)
        return problem is None

    def score(self, prompts: Sequence[Messages], responses: Sequence[str], desc: str | None = "scoring",
              finished: Sequence[bool] | None = None) -> torch.Tensor:
        """log pi(responses[i] | prompts[i]) for every row: (N,) float32 on the CPU, in input order.

        ``finished[i]`` False scores response i without the end-of-turn token (a response cut at
        ``max_new_tokens``, or a continuation such as a multiple-choice option); default: all finished.
        """
        rows = encode_rows(self.tokenizer, prompts, responses, self.settings.max_length,
                           self.settings.max_prompt_length, finished=finished)
        return self.score_rows(rows, desc=desc)

    @torch.no_grad()
    def score_rows(self, rows: Sequence[EncodedRow], desc: str | None = "scoring") -> torch.Tensor:
        """The same for rows already encoded by ``mipo.data.encoding.encode_rows``."""
        settings, share = self.settings, self.shares_prompts
        if share:  # rows of one (truncated) prompt next to each other, longest prompts first
            order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].prompt_ids), rows[i].prompt_ids))
        else:
            order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids), reverse=True)
        device = next(self.model.parameters()).device
        pad_token_id = self.tokenizer.pad_token_id
        out = torch.empty(len(rows), dtype=torch.float32)
        batches = [order[start : start + settings.batch_size] for start in range(0, len(order), settings.batch_size)]
        mine = distributed.shard(len(batches)) if self.shard_ranks else range(len(batches))
        was_training = self.model.training
        self.model.eval()
        try:
            for k in tqdm(mine, desc=desc, disable=desc is None or not distributed.is_main(), leave=False):
                index = batches[k]
                batch_rows = [rows[i] for i in index]
                if share:
                    logps = prompt_tree_logps(self.model, batch_rows, kernel=settings.kernel,
                                              fused_lm_head=settings.fused_lm_head)
                else:
                    logps = sequence_logps(self.model, pad_batch(batch_rows, pad_token_id).to(device),
                                           kernel=settings.kernel, fused_lm_head=settings.fused_lm_head)
                out[index] = logps.float().cpu()
        finally:
            self.model.train(was_training)
        if self.shard_ranks and distributed.active():
            gathered = distributed.gather_in_order({k: out[batches[k]] for k in mine}, len(batches))
            for index, logps in zip(batches, gathered):
                out[index] = logps
        return out


def scoring_problems(cfg: Mapping[str, Any]) -> list[str]:
    """``kernel`` (the per-token log-prob implementation) and ``fused_lm_head`` (the output layer's path)."""
    return failed([(cfg["kernel"] in KERNELS, f"kernel={cfg['kernel']}: expected one of {', '.join(KERNELS)}"),
                   (isinstance(cfg["fused_lm_head"], bool), f"fused_lm_head={cfg['fused_lm_head']}: expected true or false")])
