"""The KV cache of the decode loop's rows in flight (``mipo.model.generation``), and the prefills that fill it.

``SlotCache`` holds the keys and values of up to ``slots`` rows, preallocated, and hands the
transformers attention code one ``_SlotLayer`` view per layer. Rows are right-aligned: every
live row's next token goes to the same column ``width`` (``step`` runs one token per row); a
row that ends gives its slot to the last live row (``remove``), and new rows prefilled
elsewhere are copied into the free slots (``admit``). Columns no live row uses any more are
dropped from the left when the buffer runs out of room (``make_room``).

Filling it: ``prefix_cache`` runs a chunk's common prompt prefix once (a batch of 1, as long as
``shared_prefix_length``); ``prefill`` runs a group of prompt suffixes (``prefill_groups``: little
padding per forward) on top of a copy of it, as a cache of their own that ``SlotCache.admit`` takes in.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from mipo.data.encoding import left_pad
from mipo.model.loading import cache_kwargs
from mipo.model.prompt_tree import common_prefix_length

PREFILL_TOKENS = 4096  # tokens per prefill forward (rows x padded suffix width)
PREFILL_PADDING = 0.125  # at most this fraction of a prefill forward's tokens are padding


class _SlotLayer(DynamicLayer):
    """One layer's view of a ``SlotCache`` for the transformers attention code."""

    def __init__(self, owner: "SlotCache", index: int):
        super().__init__()
        self.owner, self.index = owner, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new positions at columns [width, width + T) of the live rows; return all columns so far."""
        owner = self.owner
        n, end = owner.rows, owner.width + key_states.shape[-2]
        keys, values = owner.keys[self.index], owner.values[self.index]
        keys[:n, :, owner.width : end] = key_states
        values[:n, :, owner.width : end] = value_states
        self.keys, self.values = keys[:n, :, :end], values[:n, :, :end]  # (n, H, end, D) views
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.width

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache:
    """Keys and values of up to ``slots`` rows, preallocated: (slots, H, capacity, D) per layer.

    Rows [0, rows) are live; every live row's next token goes to column ``width`` (rows are
    right-aligned: a shorter row has masked columns on its left). A row that ends is replaced by
    the last live row (``remove``: one row copied, never the cache); new rows are copied into
    the free slots after the live ones (``admit``). Columns no live row uses any more are
    dropped from the left when the buffer runs out of room (``make_room``).
    """

    def __init__(self, model: torch.nn.Module, slots: int, capacity: int):
        config = model.config.get_text_config(decoder=True)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        if any(kind != "full_attention" for kind in layer_types):
            raise NotImplementedError(
                f"mipo.model.generation decodes models whose layers all use full attention; {config.model_type} has "
                f"layer types {sorted(set(layer_types))}")
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        parameter = next(model.parameters())
        shape = (slots, heads, capacity, head_dim)
        # zero-filled: masked columns must hold finite numbers (attention multiplies them by 0)
        self.keys = [parameter.new_zeros(shape) for _ in layer_types]  # L x (slots, H, C, D)
        self.values = [parameter.new_zeros(shape) for _ in layer_types]
        self.mask = torch.zeros(slots, capacity, dtype=torch.bool, device=parameter.device)  # (slots, C)
        self.positions = torch.zeros(slots, dtype=torch.long, device=parameter.device)  # (slots,) next position id
        self.rows = 0
        self.width = 0
        self.view = Cache(layers=[_SlotLayer(self, i) for i in range(len(layer_types))])

    @property
    def slots(self) -> int:
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def forward(self, model: torch.nn.Module, input_ids: torch.Tensor, input_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        """Run (rows, T) new tokens of the live rows at columns [width, width + T); returns (rows, V) next-token logits."""
        n, t = input_ids.shape
        self.mask[:n, self.width : self.width + t] = input_mask
        output = model(input_ids=input_ids, attention_mask=self.mask[:n, : self.width + t], position_ids=position_ids,
                       use_cache=True, logits_to_keep=1, **cache_kwargs(model, self.view))
        self.width += t
        return output.logits[:, -1].float()  # (n, V)

    def step(self, model: torch.nn.Module, tokens: Sequence[int]) -> torch.Tensor:
        """Run one token per live row (``tokens``: (rows,)) at its next position; returns (rows, V) next-token logits."""
        self.make_room(1)
        n, device = self.rows, self.mask.device
        logits = self.forward(model, torch.tensor(tokens, device=device)[:, None],
                              torch.ones(n, 1, dtype=torch.bool, device=device), self.positions[:n, None].clone())
        self.positions[:n] += 1
        return logits

    def remove(self, row: int) -> None:
        """Drop live row ``row``: the last live row moves into its slot."""
        last = self.rows - 1
        if row != last:
            for buffer in (*self.keys, *self.values):
                buffer[row, :, : self.width] = buffer[last, :, : self.width]
            self.mask[row] = self.mask[last]
            self.positions[row] = self.positions[last]
        self.mask[last] = False
        self.rows = last

    def make_room(self, columns: int, width: int | None = None) -> None:
        """Ensure ``columns`` free columns after ``width`` (default: the current width), dropping columns
        that no live row uses from the left if needed."""
        needed = lambda: max(self.width, width or 0) + columns  # noqa: E731
        if needed() <= self.capacity:
            return
        used = self.mask[: self.rows, : self.width].any(0).nonzero()
        self._shift(-(int(used[0]) if len(used) else self.width))
        if needed() > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} columns cannot hold {needed()}")

    def admit(self, other: "SlotCache", reserve: int) -> None:
        """Copy the live rows of ``other`` (a prefilled batch) into the free slots, right-aligned at ``width``,
        with room for ``reserve`` more columns."""
        k = other.rows
        if self.rows + k > self.slots:
            raise RuntimeError(f"{self.rows} + {k} rows do not fit {self.slots} slots")
        self.make_room(reserve, width=other.width)
        if other.width > self.width:
            self._shift(other.width - self.width)
        rows, start = slice(self.rows, self.rows + k), self.width - other.width
        for mine, theirs in zip((*self.keys, *self.values), (*other.keys, *other.values)):
            mine[rows, :, :start] = 0
            mine[rows, :, start : self.width] = theirs[:k, :, : other.width]
        self.mask[rows] = False
        self.mask[rows, start : self.width] = other.mask[:k, : other.width]
        self.positions[rows] = other.positions[:k]
        self.rows += k

    def _shift(self, offset: int) -> None:
        """Move the live rows' columns by ``offset`` (right if positive, left if negative)."""
        if offset == 0:
            return
        n, old = self.rows, self.width
        new = old + offset
        if new > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} columns cannot hold {new}")
        source = slice(max(0, -offset), old)
        target = slice(max(0, offset), new)
        for buffer in (*self.keys, *self.values):
            buffer[:n, :, target] = buffer[:n, :, source].clone()
        self.mask[:n, target] = self.mask[:n, source].clone()
        if offset > 0:
            self.mask[:n, :offset] = False
            for buffer in (*self.keys, *self.values):
                buffer[:n, :, :offset] = 0
        else:
            self.mask[:n, new:old] = False
        self.width = new


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens of a chunk's prompts that run once, as a prefix: their longest common prefix
    (``mipo.model.prompt_tree.common_prefix_length``) short of every prompt's last token, since each
    row prefills at least one token of its own (the logits its response starts from)."""
    return max(0, min(common_prefix_length(prompts), min(map(len, prompts)) - 1))


def prefix_cache(model: torch.nn.Module, prefix: Sequence[int]) -> SlotCache:
    """The cache of one row holding ``prefix`` (a chunk's common prompt prefix, run once)."""
    length = len(prefix)
    cache = SlotCache(model, 1, length)
    cache.rows = 1
    device = cache.mask.device
    cache.forward(model, torch.tensor([list(prefix)], device=device), torch.ones(1, length, dtype=torch.bool, device=device),
                  torch.arange(length, device=device)[None])
    return cache


def prefill_groups(suffixes: Sequence[Sequence[int]]) -> Iterator[list[int]]:
    """Consecutive groups of suffixes (longest first) to prefill together: at most ``PREFILL_TOKENS``
    padded tokens, and at most ``PREFILL_PADDING`` of them padding (a group has at least one suffix)."""
    group: list[int] = []
    width = real = 0
    for j, suffix in enumerate(suffixes):
        grown_width, grown_real = max(width, len(suffix)), real + len(suffix)
        padded = grown_width * (len(group) + 1)
        if group and (padded > PREFILL_TOKENS or padded > (1 + PREFILL_PADDING) * grown_real):
            yield group
            group, grown_width, grown_real = [], len(suffix), len(suffix)
        group.append(j)
        width, real = grown_width, grown_real
    if group:
        yield group


def prefill(model: torch.nn.Module, prefix: SlotCache | None, suffixes: Sequence[Sequence[int]],
            pad_token_id: int) -> tuple[SlotCache, torch.Tensor]:
    """Run prompt suffixes (left-padded) on top of a copy of ``prefix``; returns their cache and (k, V) logits."""
    device = next(model.parameters()).device
    input_ids, input_mask = left_pad(suffixes, pad_token_id)  # (k, S)
    input_ids, input_mask = input_ids.to(device), input_mask.to(device).bool()
    k, width = input_ids.shape
    start = prefix.width if prefix is not None else 0
    batch = SlotCache(model, k, start + width)
    if prefix is not None:
        for mine, theirs in zip((*batch.keys, *batch.values), (*prefix.keys, *prefix.values)):
            mine[:, :, :start] = theirs[:1, :, :start]
        batch.mask[:, :start] = True
        batch.width = start
    batch.rows = k
    position_ids = start + (input_mask.long().cumsum(-1) - 1).clamp(min=0)  # (k, S)
    logits = batch.forward(model, input_ids, input_mask, position_ids)
    batch.positions[:k] = start + input_mask.sum(-1)
    return batch, logits
