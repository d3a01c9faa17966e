"""Sampling responses from a chat model: a decode loop of our own over a KV cache of rows in flight.

Why not ``model.generate``:

1. **Hidden settings.** transformers fills every option a call leaves unset from the checkpoint's
   ``generation_config.json`` (Qwen2.5-Instruct ships ``repetition_penalty`` 1.05, many models a
   ``top_k``), even when a ``GenerationConfig`` is passed. MIPO's y+ and y- must be samples from
   pi_base itself, so here the distribution is exactly ``DecodeSettings``: temperature, top-k
   (only if configured), top-p; no repetition penalty, no n-gram blocking, no minimum length.
   ``DecodeSettings.record()`` writes all of them, fixed ones included, into pairs and evaluations.
2. **Throughput.** A ``generate`` batch runs until its longest row ends, finished rows idling as
   padding. Here a row leaves the batch (and its slot of the cache) the step it ends, and the
   next prompt of the chunk takes the slot; the prompts' common prefix (system prompt, task
   instructions) is run once per chunk.
3. **Reproducibility.** A row's randomness comes from its own generator, seeded from
   ``(seed, the prompt's index in the prompt list)`` (``row_seed``), never from the global RNG.

The loop, per chunk of prompts (``Plan``):

    prefix   the chunk's longest common prompt prefix, once (batch of 1), into the KV cache
    prefill  the next prompts' suffixes on top of a copy of the prefix, into free slots
    step     for every row in flight: pick its next token from its logits (``next_tokens``);
             a row that emitted end-of-turn ("eos") or reached max_new_tokens ("length")
             leaves; the rest run one token through the model

What is guaranteed: a chunk's responses depend only on the chunk (its prompts, their indices,
the settings, the seed, the batch size), not on the other chunks, so a run split into chunks
across processes or ranks (``Plan.shard``) or resumed after a crash (``mipo/stages/sample.py``)
produces the same responses as one uninterrupted run, on the same hardware and software. The
rows in flight together do change a row's floating-point numbers in the last bits (batched
matrix products round differently), so with a different batch size or chunking a response is
an equally valid sample from the same distribution but not the same string.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicLayer

from mipo.data.chat import Messages, prompt_key
from mipo.data.encoding import encode_prompt, left_pad, truncate_prompt
from mipo.model.loading import cache_kwargs
from mipo.runtime import distributed
from mipo.runtime.files import stable_hash

SEEDING = "per-prompt-v1"  # the per-row seeding scheme (``row_seed``); part of every sampling cache key
FINISH_REASONS = ("eos", "length")
PREFILL_TOKENS = 4096  # tokens per prefill forward (rows x padded suffix width)
PREFILL_PADDING = 0.125  # at most this fraction of a prefill forward's tokens are padding
SHORTLIST = 64  # top-p looks for the nucleus among this many most likely tokens before sorting the vocabulary


# --------------------------------------------------------------------------------------------
# Settings: the whole sampling distribution, in one place
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeSettings:
    """Everything that shapes a response's distribution. ``temperature == 0`` decodes greedily."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k filtering

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def record(self) -> dict[str, Any]:
        """The settings as written into pairs metadata and evaluations, fixed options included.

        A second backend (e.g. vLLM's ``SamplingParams``) maps exactly these keys.
        """
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0,
                "seeding": SEEDING}


def decode_settings(group: Mapping[str, Any]) -> DecodeSettings:
    """The settings of a config group (``cfg.sampling`` or ``cfg.eval``); ``top_k`` is optional there."""
    top_k = group.get("top_k")
    return DecodeSettings(max_new_tokens=int(group["max_new_tokens"]), temperature=float(group["temperature"]),
                          top_p=float(group["top_p"]), top_k=int(top_k) if top_k else None)


def row_seed(seed: int, index: int) -> int:
    """The seed of the generator of prompt ``index`` (its position in the prompt list) under run seed ``seed``."""
    digest = hashlib.sha256(f"{SEEDING}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch generators take a non-negative int64


# --------------------------------------------------------------------------------------------
# Picking the next token (per row, in fp32)
# --------------------------------------------------------------------------------------------

def nucleus(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
            top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens each row may sample next and their probabilities.

    softmax(logits / temperature), cut to the ``top_k`` most likely tokens (if set) and
    renormalised, then to the smallest set of most likely tokens whose mass reaches ``top_p``
    and renormalised: transformers' TopKLogitsWarper then TopPLogitsWarper (a token is kept
    when the mass of the tokens more likely than it is below ``top_p``; the first always is).

    Args:
        logits: (B, V), any float dtype (computed in fp32).

    Returns:
        token ids (B, K) and their probabilities (B, K) in fp32, zero for tokens outside the set
        and summing to 1 per row. ``K = V`` (vocabulary order) without top-k/top-p, else the
        candidates sorted by probability.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    vocab = probs.shape[-1]
    k = min(top_k, vocab) if top_k else vocab
    if k == vocab and top_p >= 1:
        return torch.arange(vocab, device=probs.device).expand_as(probs), probs
    # The nucleus of a peaked distribution lies in the first few tokens: find it in a shortlist
    # of the most likely ones, and sort the whole vocabulary only for rows whose shortlist is short of top_p.
    width = min(k, SHORTLIST) if top_p < 1 else k
    values, ids = probs.topk(width, dim=-1)  # (B, width), sorted
    if k == vocab:
        mass = probs.sum(-1, keepdim=True)
    else:
        mass = values.sum(-1, keepdim=True) if width == k else probs.topk(k, dim=-1).values.sum(-1, keepdim=True)
    values = values / mass  # renormalised over the top-k (over the vocabulary without top-k)
    if top_p < 1 and width < k and bool((values.sum(-1) < top_p).any()):
        values, ids = probs.topk(k, dim=-1)  # (B, k)
        values = values / values.sum(-1, keepdim=True)
    if top_p < 1:
        before = values.cumsum(-1) - values  # (B, K): mass of the more likely candidates
        values = torch.where(before < top_p, values, torch.zeros_like(values))
        values = values / values.sum(-1, keepdim=True)
    return ids, values


def next_tokens(logits: torch.Tensor, settings: DecodeSettings, uniforms: torch.Tensor | None) -> torch.Tensor:
    """The next token of each row: the argmax when greedy, else an inverse-CDF draw from ``nucleus``.

    Args:
        logits: (B, V) next-token logits.
        uniforms: (B,) float64 in [0, 1), one per row, from the row's own generator (unused when greedy).

    Returns:
        (B,) token ids.
    """
    if settings.greedy:
        return logits.argmax(-1)
    ids, probs = nucleus(logits, settings.temperature, settings.top_p, settings.top_k)  # (B, K)
    cdf = probs.double().cumsum(-1)  # (B, K)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # first candidate with cdf > target
    return ids.gather(-1, pick).squeeze(-1)


# --------------------------------------------------------------------------------------------
# Prompts and the plan: which prompts are decoded together
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RenderedPrompt:
    ids: tuple[int, ...]  # chat template applied, cut by ``truncate_prompt``
    cut: int  # tokens the truncation dropped


def render_prompts(tokenizer, prompts: Sequence[Messages], max_prompt_length: int | None) -> list[RenderedPrompt]:
    """Prompt token ids as the model sees them: chat template, then ``truncate_prompt`` (each distinct prompt once)."""
    rendered: dict[str, RenderedPrompt] = {}
    out = []
    for messages in prompts:
        key = prompt_key(messages)
        if key not in rendered:
            ids = encode_prompt(tokenizer, messages)
            kept = truncate_prompt(ids, max_prompt_length) if max_prompt_length is not None else tuple(ids)
            rendered[key] = RenderedPrompt(tuple(kept), len(ids) - len(kept))
        out.append(rendered[key])
    return out


def auto_batch_size(prompt_lengths: Sequence[int], max_new_tokens: int, max_batch_tokens: int) -> int:
    """Rows in flight when ``batch_size=auto``: as many as fit ``max_batch_tokens`` cached positions with
    the longest prompt and a full response, at least 1, at most 256 and the number of prompts."""
    longest = max(prompt_lengths) + max_new_tokens
    return max(1, min(256, len(prompt_lengths), max_batch_tokens // longest))


@dataclass(frozen=True)
class Plan:
    """How a prompt list is decoded: prompts sorted longest first, cut into chunks of ``chunk_size``.

    A chunk is the unit of work: decoded with at most ``batch_size`` rows in flight, its result
    depends on nothing else, so chunks can be written as they finish, resumed, or shared out
    between ranks (``shard``) without changing a single token.
    """

    prompts: tuple[RenderedPrompt, ...]  # in input order
    chunks: tuple[tuple[int, ...], ...]  # indices into ``prompts``
    batch_size: int  # rows in flight
    chunk_size: int  # prompts per chunk (the last one may have fewer)

    def shard(self, rank: int, world_size: int) -> list[int]:
        """The chunks rank ``rank`` of ``world_size`` decodes: every ``world_size``-th, from ``rank``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        return distributed.shard(len(self.chunks), rank, world_size)

    def fingerprint(self) -> str:
        """A hash of the prompt ids, chunks and batch size: equal plans decode to equal responses."""
        return stable_hash([[p.ids for p in self.prompts], self.chunks, self.batch_size], 20)


def plan_generation(tokenizer, prompts: Sequence[Messages], max_new_tokens: int, batch_size: int | str = "auto",
                    chunk_size: int = 256, max_prompt_length: int | None = None,
                    max_batch_tokens: int = 16384) -> Plan:
    """Render the prompts and cut them into chunks, longest prompts first (ties in input order)."""
    rendered = render_prompts(tokenizer, prompts, max_prompt_length)
    if not rendered:
        return Plan((), (), 1, chunk_size)
    if batch_size == "auto":
        batch_size = auto_batch_size([len(p.ids) for p in rendered], max_new_tokens, max_batch_tokens)
    order = sorted(range(len(rendered)), key=lambda i: (-len(rendered[i].ids), i))
    chunks = tuple(tuple(order[start : start + chunk_size]) for start in range(0, len(order), chunk_size))
    return Plan(tuple(rendered), chunks, int(batch_size), chunk_size)


# --------------------------------------------------------------------------------------------
# The KV cache of the rows in flight
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Decoding one chunk
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Generation:
    """One response and how it ended."""

    text: str  # decoded without special tokens, stripped
    finish_reason: str  # "eos": the model ended its turn; "length": cut at max_new_tokens
    num_tokens: int  # tokens of the response (the end-of-turn token not counted)
    prompt_cut: int = 0  # prompt tokens ``truncate_prompt`` dropped


@dataclass
class _Row:
    index: int  # in the prompt list
    uniforms: torch.Tensor | None  # (max_new_tokens,) float64 from the row's generator; None when greedy
    tokens: list[int] = field(default_factory=list)


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of the sequences, leaving every sequence at least one token."""
    first = sequences[0]
    length = min(len(s) for s in sequences) - 1
    for seq in sequences[1:]:
        length = next((i for i in range(length) if seq[i] != first[i]), length)
    return max(length, 0)


def _prefill(model: torch.nn.Module, prefix: SlotCache | None, suffixes: Sequence[Sequence[int]],
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


def _decode_text(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


@torch.no_grad()
def generate_chunk(model: torch.nn.Module, tokenizer, plan: Plan, chunk: int, settings: DecodeSettings,
                   seed: int = 0, share_prefix: bool = True, progress: tqdm | None = None) -> list[Generation]:
    """Decode chunk ``chunk`` of ``plan``; returns its responses in the chunk's order.

    The rows in flight are a ``SlotCache`` of ``plan.batch_size`` slots. Free slots are filled
    (prefill) once a quarter of them or more are free and prompts are waiting; each step picks
    every live row's next token, removes the rows that ended, and runs the others one token on.
    """
    index = plan.chunks[chunk]
    prompts = [plan.prompts[i].ids for i in index]
    slots = min(plan.batch_size, len(index))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    max_new = settings.max_new_tokens
    was_training = model.training
    model.eval()
    try:
        prefix = None
        start = common_prefix(prompts) if share_prefix and len(prompts) > 1 else 0
        if start > 0:
            prefix = SlotCache(model, 1, start)
            prefix.rows = 1
            device = prefix.mask.device
            prefix.forward(model, torch.tensor([prompts[0][:start]], device=device),
                           torch.ones(1, start, dtype=torch.bool, device=device),
                           torch.arange(start, device=device)[None])
        live = SlotCache(model, slots, max(map(len, prompts)) + max_new + max(64, max_new // 2))
        rows: list[_Row] = []
        logits = None  # (rows, V) next-token logits of the live rows
        waiting = deque(range(len(index)))
        results: dict[int, Generation] = {}
        while waiting or rows:
            free = slots - len(rows)
            if waiting and (not rows or free >= max(1, slots // 4)):
                admitted = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                for group in _prefill_groups([prompts[j][start:] for j in admitted]):
                    batch, batch_logits = _prefill(model, prefix, [prompts[admitted[j]][start:] for j in group], pad)
                    live.admit(batch, reserve=max_new)
                    logits = batch_logits if logits is None else torch.cat([logits, batch_logits])
                    for j in group:
                        position = admitted[j]
                        generator = None
                        if not settings.greedy:
                            generator = torch.Generator().manual_seed(row_seed(seed, index[position]))
                        uniforms = torch.rand(max_new, generator=generator, dtype=torch.float64) if generator else None
                        rows.append(_Row(position, uniforms))
            uniforms = None if settings.greedy else torch.stack([r.uniforms[len(r.tokens)] for r in rows])
            chosen = next_tokens(logits, settings, uniforms).tolist()  # (rows,)
            ended = []
            for slot, (row, token) in enumerate(zip(rows, chosen)):
                if token == eos:
                    ended.append((slot, "eos"))
                    continue
                row.tokens.append(token)
                if len(row.tokens) == max_new:
                    ended.append((slot, "length"))
            for slot, reason in sorted(ended, reverse=True):  # from the last slot: a removal moves the last row in
                row = rows[slot]
                results[row.index] = Generation(_decode_text(tokenizer, row.tokens), reason, len(row.tokens),
                                                plan.prompts[index[row.index]].cut)
                live.remove(slot)
                last = len(rows) - 1
                rows[slot], chosen[slot] = rows[last], chosen[last]
                rows.pop()
                chosen.pop()
            if progress is not None and ended:
                progress.update(len(ended))
            logits = None  # consumed; the rows still in flight get new ones
            if rows:
                live.make_room(1)
                n = len(rows)
                logits = live.forward(model, torch.tensor(chosen, device=live.mask.device)[:, None],
                                      torch.ones(n, 1, dtype=torch.bool, device=live.mask.device),
                                      live.positions[:n, None].clone())
                live.positions[:n] += 1
    finally:
        model.train(was_training)
    return [results[j] for j in range(len(index))]


def _prefill_groups(suffixes: Sequence[Sequence[int]]) -> Iterator[list[int]]:
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


# --------------------------------------------------------------------------------------------
# The whole prompt list
# --------------------------------------------------------------------------------------------

@dataclass
class Generations(Sequence[Generation]):
    """The responses to a prompt list, in its order, and the settings that produced them."""

    items: list[Generation]
    settings: dict[str, Any]  # ``DecodeSettings.record()`` plus seed and batch size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):  # type: ignore[override]
        return self.items[i]

    def __iter__(self) -> Iterator[Generation]:
        return iter(self.items)

    @property
    def texts(self) -> list[str]:
        return [g.text for g in self.items]

    @property
    def finish_reasons(self) -> list[str]:
        return [g.finish_reason for g in self.items]

    def summary(self) -> dict[str, Any]:
        """Counts for logs and metadata: responses cut at max_new_tokens, prompts cut by truncation, tokens."""
        n = len(self.items)
        truncated = sum(g.finish_reason == "length" for g in self.items)
        return {"responses": n, "truncated": truncated, "truncated_fraction": truncated / n if n else 0.0,
                "prompts_truncated": sum(g.prompt_cut > 0 for g in self.items),
                "new_tokens": sum(g.num_tokens for g in self.items)}


def generation_record(settings: DecodeSettings, seed: int, plan: Plan) -> dict[str, Any]:
    """What ``Generations.settings`` holds: the distribution, the seed and the batching."""
    return {**settings.record(), "seed": seed, "batch_size": plan.batch_size, "chunk_size": plan.chunk_size}


def generate_plan(
    model: torch.nn.Module,
    tokenizer,
    plan: Plan,
    settings: DecodeSettings,
    seed: int = 0,
    done: Mapping[int, Sequence[Generation]] | None = None,
    on_chunk: Callable[[int, list[Generation]], None] | None = None,
    desc: str | None = "sampling",
    shard_ranks: bool = True,
) -> Generations:
    """Decode every chunk of ``plan`` not already in ``done`` (chunk -> its responses, e.g. read back
    after a crash), calling ``on_chunk(chunk, responses)`` as each one finishes.

    Under torchrun (``shard_ranks``) every rank must call this with the same plan: rank r decodes
    the chunks ``plan.shard(r, N)`` and the responses are gathered on every rank, the same as
    one process decodes them (each prompt has its own seed, each chunk depends on nothing else).
    """
    done = dict(done or {})
    mine = set(plan.shard(distributed.rank(), distributed.world_size())) if shard_ranks else set(range(len(plan.chunks)))
    decoded: dict[int, list[Generation]] = {}
    with tqdm(total=len(plan.prompts), desc=desc, disable=desc is None or not distributed.is_main(),
              unit="response") as progress:
        progress.update(sum(len(done[c]) for c in done))
        for chunk in range(len(plan.chunks)):
            if chunk in done or chunk not in mine:
                continue
            decoded[chunk] = generate_chunk(model, tokenizer, plan, chunk, settings, seed, progress=progress)
            if on_chunk is not None:
                on_chunk(chunk, decoded[chunk])
    done.update(distributed.gather_dict(decoded) if shard_ranks else decoded)
    return assemble(plan, done, generation_record(settings, seed, plan))


def assemble(plan: Plan, done: Mapping[int, Sequence[Generation]], record: dict[str, Any]) -> Generations:
    """Every chunk's responses (``done``: chunk -> its responses, all chunks) back in the order of the plan's prompts."""
    items: list[Generation | None] = [None] * len(plan.prompts)
    for chunk, generations in done.items():
        for i, generation in zip(plan.chunks[chunk], generations, strict=True):
            items[i] = generation
    return Generations(items, record)  # type: ignore[arg-type]


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Messages],
    max_new_tokens: int,
    temperature: float = 0.1,
    top_p: float = 0.9,
    top_k: int | None = None,
    batch_size: int | str = "auto",
    seed: int = 0,
    max_prompt_length: int | None = None,
    chunk_size: int = 256,
    max_batch_tokens: int = 16384,
    desc: str | None = "sampling",
) -> Generations:
    """One response per prompt, in the order of ``prompts``: ``plan_generation`` then ``generate_plan``.

    ``temperature == 0`` decodes greedily. Prompts are cut by ``mipo.data.encoding.truncate_prompt``
    to ``max_prompt_length`` tokens. Row i samples with the generator of ``row_seed(seed, i)``;
    see the module docstring for what is reproducible. ``batch_size`` is the number of rows in
    flight (``"auto"``: ``auto_batch_size`` with ``max_batch_tokens``).
    """
    plan = plan_generation(tokenizer, prompts, max_new_tokens, batch_size, chunk_size, max_prompt_length,
                           max_batch_tokens)
    settings = DecodeSettings(max_new_tokens, temperature, top_p, top_k)
    return generate_plan(model, tokenizer, plan, settings, seed, desc=desc)
