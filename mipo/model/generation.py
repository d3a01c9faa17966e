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

The loop (``DecodeLoop``), per chunk of prompts (``Plan``), over the KV cache of the rows in flight
(``mipo.model.kv_cache.SlotCache``):

    prefix   the chunk's longest common prompt prefix, once (batch of 1), into the KV cache
    prefill  the next prompts' suffixes on top of a copy of the prefix, into free slots
    step     for every row in flight: pick its next token from its logits (``next_tokens``);
             a row that emitted a stop id ("eos") or reached max_new_tokens ("length")
             leaves; the rest run one token through the model

The stop ids (``mipo.data.chat.stop_token_ids``, read by ``mipo.model.loading.load_tokenizer``): the
generation config's ``eos_token_id`` (int or list; all ``model.generate`` stops at), the eos and the
template's end-of-turn token (Gemma: ``<end_of_turn>``, its eos is ``<eos>``). Nothing else of it is read.

What a call is given: the distribution (``DecodeSettings``, checked by ``decode_problems``) and
how the prompt list is cut into chunks and batches (``PlanSettings``); ``generate`` takes both.

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

from mipo.data.chat import Messages, prompt_key, stop_token_ids
from mipo.data.encoding import encode_prompt, truncate_prompt
from mipo.model import kv_cache
from mipo.runtime import distributed
from mipo.runtime.errors import failed, is_int, is_number
from mipo.runtime.files import stable_hash

SEEDING = "per-prompt-v1"  # the per-row seeding scheme (``row_seed``); part of every sampling cache key
FINISH_REASONS = ("eos", "length")
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


def decode_problems(group: str, settings: Mapping[str, Any]) -> list[str]:
    """The problems of decoding config group ``group`` (``sampling`` or ``eval``), one line each (empty when
    ``decode_settings`` and ``PlanSettings.batch_size`` can take it); ``mipo.stages.config`` lists them."""
    temperature, top_p, max_new_tokens = settings["temperature"], settings["top_p"], settings["max_new_tokens"]
    batch_size, top_k = settings["batch_size"], settings.get("top_k")
    return failed([
        (is_number(temperature) and temperature >= 0,
         f"{group}.temperature={temperature}: expected a number >= 0 (0 = greedy)"),
        (is_number(top_p) and 0 < top_p <= 1, f"{group}.top_p={top_p}: expected (0, 1]"),
        (is_int(max_new_tokens) and max_new_tokens > 0,
         f"{group}.max_new_tokens={max_new_tokens}: expected an int > 0"),
        (batch_size == "auto" or (is_int(batch_size) and batch_size > 0),
         f"{group}.batch_size={batch_size}: expected auto or an int > 0"),
        (top_k is None or (is_int(top_k) and top_k > 0),
         f"{group}.top_k={top_k}: expected null (no top-k) or an int > 0"),
    ])


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


@dataclass(frozen=True)
class PlanSettings:
    """How a prompt list is cut into a ``Plan`` (``plan_generation``'s options besides the prompts).

    They decide which rows share a forward: a response's last bits, never its distribution
    (that is ``DecodeSettings``).
    """

    batch_size: int | str = "auto"  # rows in flight; "auto": ``auto_batch_size`` with ``max_batch_tokens``
    chunk_size: int = 256  # prompts per chunk (the unit of work: written, resumed, shared out between ranks)
    max_prompt_length: int | None = None  # prompts cut by ``mipo.data.encoding.truncate_prompt``; None: not cut
    max_batch_tokens: int = 16384  # cached positions ``batch_size="auto"`` fills

    def plan(self, tokenizer, prompts: Sequence[Messages], max_new_tokens: int) -> Plan:
        """``plan_generation`` of ``prompts`` with these settings."""
        return plan_generation(tokenizer, prompts, max_new_tokens, self.batch_size, self.chunk_size,
                               self.max_prompt_length, self.max_batch_tokens)


# --------------------------------------------------------------------------------------------
# Decoding one chunk
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Generation:
    """One response and how it ended."""

    text: str  # decoded without special tokens, stripped
    finish_reason: str  # "eos": the model ended its turn (a stop id); "length": cut at max_new_tokens
    num_tokens: int  # tokens of the response (the stop id not counted)
    prompt_cut: int = 0  # prompt tokens ``truncate_prompt`` dropped


@dataclass
class _Row:
    index: int  # in the chunk
    uniforms: torch.Tensor | None  # (max_new_tokens,) float64 from the row's generator; None when greedy
    tokens: list[int] = field(default_factory=list)


def _decode_text(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


class _ChunkDecode:
    """One chunk in the middle of its decode: the rows in flight (``rows[i]`` in slot i of ``live``),
    their next-token ``logits`` (rows, V), the chunk's prompts waiting for a slot and the responses
    of the rows that ended (``results``: position in the chunk -> ``Generation``)."""

    def __init__(self, model: torch.nn.Module, tokenizer, plan: Plan, chunk: int, settings: DecodeSettings,
                 seed: int, share_prefix: bool):
        self.model, self.tokenizer, self.plan, self.settings, self.seed = model, tokenizer, plan, settings, seed
        self.stops = frozenset(stop_token_ids(tokenizer))  # a row ends its turn at any of these
        self.index = plan.chunks[chunk]
        self.prompts = [plan.prompts[i].ids for i in self.index]
        self.slots = min(plan.batch_size, len(self.index))
        self.start = kv_cache.shared_prefix_length(self.prompts) if share_prefix and len(self.prompts) > 1 else 0
        self.prefix = kv_cache.prefix_cache(model, self.prompts[0][: self.start]) if self.start > 0 else None
        max_new = settings.max_new_tokens
        self.live = kv_cache.SlotCache(model, self.slots, max(map(len, self.prompts)) + max_new + max(64, max_new // 2))
        self.rows: list[_Row] = []
        self.logits: torch.Tensor | None = None
        self.waiting = deque(range(len(self.index)))
        self.results: dict[int, Generation] = {}

    def admit(self) -> None:
        """Prefill waiting prompts into the free slots, when none is live or a quarter of the slots or more are free."""
        free = self.slots - len(self.rows)
        if not self.waiting or (self.rows and free < max(1, self.slots // 4)):
            return
        admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        suffixes = [self.prompts[j][self.start :] for j in admitted]
        for group in kv_cache.prefill_groups(suffixes):
            batch, logits = kv_cache.prefill(self.model, self.prefix, [suffixes[j] for j in group],
                                             self.tokenizer.pad_token_id)
            self.live.admit(batch, reserve=self.settings.max_new_tokens)
            self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
            self.rows += [self._new_row(admitted[j]) for j in group]

    def _new_row(self, position: int) -> _Row:
        """A row for prompt ``position`` of the chunk, with its uniforms drawn from its own generator (``row_seed``)."""
        if self.settings.greedy:
            return _Row(position, None)
        generator = torch.Generator().manual_seed(row_seed(self.seed, self.index[position]))
        return _Row(position, torch.rand(self.settings.max_new_tokens, generator=generator, dtype=torch.float64))

    def pick(self) -> tuple[list[int], list[tuple[int, str]]]:
        """Every live row's next token (rows,), and the rows that end with it: (slot, "eos" or "length")."""
        settings = self.settings
        uniforms = None if settings.greedy else torch.stack([r.uniforms[len(r.tokens)] for r in self.rows])
        chosen = next_tokens(self.logits, settings, uniforms).tolist()  # (rows,)
        ended = []
        for slot, (row, token) in enumerate(zip(self.rows, chosen)):
            if token in self.stops:
                ended.append((slot, "eos"))
                continue
            row.tokens.append(token)
            if len(row.tokens) == settings.max_new_tokens:
                ended.append((slot, "length"))
        return chosen, ended

    def retire(self, chosen: list[int], ended: list[tuple[int, str]]) -> None:
        """Write the responses of the rows that ended and free their slots (``chosen`` follows the rows)."""
        for slot, reason in sorted(ended, reverse=True):  # from the last slot: a removal moves the last row in
            row = self.rows[slot]
            self.results[row.index] = Generation(_decode_text(self.tokenizer, row.tokens), reason, len(row.tokens),
                                                 self.plan.prompts[self.index[row.index]].cut)
            self.live.remove(slot)
            last = len(self.rows) - 1
            self.rows[slot], chosen[slot] = self.rows[last], chosen[last]
            self.rows.pop()
            chosen.pop()

    def advance(self, chosen: list[int]) -> None:
        """Run the rows still in flight one token (``chosen``) on: their next-token logits replace the
        consumed ones (None once no row is left)."""
        self.logits = self.live.step(self.model, chosen) if self.rows else None


class DecodeLoop:
    """This repository's decode loop on one model: ``generate_chunk`` decodes a chunk of a ``Plan``,
    ``generate_plan`` all of them (``mipo.model.vllm_backend.VLLMGenerator`` is the same for a vLLM engine)."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def generate_chunk(self, plan: Plan, chunk: int, settings: DecodeSettings, seed: int = 0,
                       progress: tqdm | None = None, share_prefix: bool = True) -> list[Generation]:
        """Decode chunk ``chunk`` of ``plan``; returns its responses in the chunk's order.

        The rows in flight are a ``SlotCache`` of ``plan.batch_size`` slots. Free slots are filled
        (prefill) once a quarter of them or more are free and prompts are waiting; each step picks
        every live row's next token, removes the rows that ended, and runs the others one token on.
        ``share_prefix=False`` runs every prompt whole (the prefix is a speed-up, tested against it).
        """
        was_training = self.model.training
        self.model.eval()
        try:
            state = _ChunkDecode(self.model, self.tokenizer, plan, chunk, settings, seed, share_prefix)
            while state.waiting or state.rows:
                state.admit()
                chosen, ended = state.pick()
                state.retire(chosen, ended)
                if progress is not None and ended:
                    progress.update(len(ended))
                state.advance(chosen)
        finally:
            self.model.train(was_training)
        return [state.results[j] for j in range(len(state.index))]

    def generate_plan(self, plan: Plan, settings: DecodeSettings, seed: int = 0,
                      done: Mapping[int, Sequence[Generation]] | None = None,
                      on_chunk: Callable[[int, list[Generation]], None] | None = None, desc: str | None = "sampling",
                      shard_ranks: bool = True) -> Generations:
        """Decode every chunk of ``plan`` not already in ``done`` (chunk -> its responses, e.g. read back
        after a crash), calling ``on_chunk(chunk, responses)`` as each one finishes.

        Under torchrun (``shard_ranks``) every rank must call this with the same plan: rank r decodes
        the chunks ``plan.shard(r, N)`` and the responses are gathered on every rank, the same as
        one process decodes them (each prompt has its own seed, each chunk depends on nothing else).
        """
        done = dict(done or {})
        every = range(len(plan.chunks))
        mine = set(plan.shard(distributed.rank(), distributed.world_size())) if shard_ranks else set(every)
        decoded: dict[int, list[Generation]] = {}
        with tqdm(total=len(plan.prompts), desc=desc, disable=desc is None or not distributed.is_main(),
                  unit="response") as progress:
            progress.update(sum(len(done[c]) for c in done))
            for chunk in every:
                if chunk in done or chunk not in mine:
                    continue
                decoded[chunk] = self.generate_chunk(plan, chunk, settings, seed, progress=progress)
                if on_chunk is not None:
                    on_chunk(chunk, decoded[chunk])
        done.update(distributed.gather_dict(decoded) if shard_ranks else decoded)
        return assemble(plan, done, generation_record(settings, seed, plan))


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


def assemble(plan: Plan, done: Mapping[int, Sequence[Generation]], record: dict[str, Any]) -> Generations:
    """Every chunk's responses (``done``: chunk -> its responses, all chunks) back in the order of the plan's prompts."""
    items: list[Generation | None] = [None] * len(plan.prompts)
    for chunk, generations in done.items():
        for i, generation in zip(plan.chunks[chunk], generations, strict=True):
            items[i] = generation
    return Generations(items, record)  # type: ignore[arg-type]


def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[Messages], settings: DecodeSettings,
             planning: PlanSettings = PlanSettings(), seed: int = 0, desc: str | None = "sampling") -> Generations:
    """One response per prompt, in the order of ``prompts``: ``PlanSettings.plan`` then ``DecodeLoop.generate_plan``.

    ``settings`` is the distribution (``temperature == 0`` decodes greedily); ``planning`` cuts the
    prompts by ``mipo.data.encoding.truncate_prompt`` to ``max_prompt_length`` tokens and sets the
    rows in flight (``batch_size``; ``"auto"``: ``auto_batch_size`` with ``max_batch_tokens``) and the
    chunks. Row i samples with the generator of ``row_seed(seed, i)``; see the module docstring for
    what is reproducible.
    """
    plan = planning.plan(tokenizer, prompts, settings.max_new_tokens)
    return DecodeLoop(model, tokenizer).generate_plan(plan, settings, seed, desc=desc)
