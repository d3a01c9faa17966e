"""Attention over a prompt tree, segment by segment: only the blocks a query may attend to.

``mipo.model.prompt_tree`` lays a micro-batch out as a tree of segments (a shared prompt prefix, prompt
tails, continuations) in one row. A dense mask over that row makes attention cost N^2 whatever
it masks: y+ attending to y-, one group to another, the upper triangle. Here each segment's
queries attend to the keys of its ancestors (in full) and to its own (causally), one sdpa call
per segment:

    root segment:   sdpa(q_s, k_s, v_s, is_causal)
    other segments: sdpa(q_s, [k_ancestors; k_s], [v_ancestors; v_s], mask = ones(L, A + L).tril(A))

where A is the length of its ancestors, so ``tril(A)`` lets row i see every ancestor key and its
own keys 0..i. That is ``packing.may_attend`` exactly, with the masked blocks never computed.

It is registered with transformers' ``AttentionInterface`` under ``NAME``, so a model whose
attention implementation is set to it (``use_segment_attention``) runs it in every attention
layer; the tree reaches it as the ``prompt_tree`` keyword of the model's forward, which
transformers passes down to the attention function. The modules' forwards stay plain module
calls (nothing is patched or hooked), so gradient checkpointing, which re-runs a layer's
forward with the same keywords, and FSDP, which wraps modules, see an ordinary model.

Exact for models whose every layer is full causal attention (``mipo.model.architecture.prompt_tree_problem``
decides where the tree is used); a layer that passes a ``sliding_window``, ``softcap`` or ``s_aux`` (sinks) is
refused rather than silently attended in full.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from mipo.model.prompt_tree import PackedGroups

NAME = "mipo_segments"


class MissingPromptTree(ValueError):
    """``segment_attention`` ran without the ``prompt_tree`` keyword: called outside a tree forward, or by a model
    whose decoder layers do not pass the forward's keywords on to attention (``mipo.model.architecture``)."""


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, N, D)
    key: torch.Tensor,  # (1, H_kv, N, D)
    value: torch.Tensor,  # (1, H_kv, N, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    prompt_tree: PackedGroups | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls in each layer; returns (1, N, H, D) and no weights."""
    if prompt_tree is None:
        raise MissingPromptTree(f"attention implementation {NAME!r} needs the prompt_tree= keyword (a packed micro-batch "
                         "from mipo.model.prompt_tree.pack_groups); score rows through mipo.model.logprobs.continuation_logps, "
                         "or set the model's attention implementation back to sdpa")
    unsupported = [name for name in ("sliding_window", "softcap", "s_aux") if kwargs.get(name) is not None]
    if unsupported:  # the architecture gate (mipo.model.architecture.prompt_tree_problem) keeps such models on rows
        raise ValueError(f"{NAME} does not implement {', '.join(unsupported)} (a window, softcapped logits or sinks): "
                         "the prompt tree is not exact for this model; set trainer.share_prompt=false")
    gqa = query.shape[1] != key.shape[1]
    sizes = [len(segment) for segment in prompt_tree.segments]
    # split, not slice: the backward of a split is one concatenation, where each slice's would
    # write its gradient into a zero-filled tensor of the whole row
    queries, keys, values = (x.split(sizes, dim=2) for x in (query, key, value))  # S x (1, H or H_kv, L_s, D)
    outputs = []
    for s, segment in enumerate(prompt_tree.segments):
        if not segment.ancestors:
            out = F.scaled_dot_product_attention(queries[s], keys[s], values[s], dropout_p=dropout, is_causal=True,
                                                 scale=scaling, enable_gqa=gqa)
        else:
            lineage = [*segment.ancestors, s]
            context_keys = torch.cat([keys[a] for a in lineage], dim=2)  # (1, H_kv, A + L, D)
            context_values = torch.cat([values[a] for a in lineage], dim=2)
            out = F.scaled_dot_product_attention(queries[s], context_keys, context_values,
                                                 attn_mask=prompt_tree.context_mask(s, query.device),
                                                 dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        outputs.append(out)  # (1, H, L_s, D)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, segment_attention)


@contextmanager
def use_segment_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s attention layers through ``segment_attention`` inside the block (restored after).

    For no-grad scoring. Training sets it for the whole run instead
    (``model.set_attn_implementation(NAME)``): gradient checkpointing re-runs layers during
    the backward, after any block would have restored the previous implementation.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
