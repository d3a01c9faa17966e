"""The sampling stage: MIPO preference pairs (x, y+, y-) from the base model.

    y+ ~ pi_base(.|x)        the response to the prompt itself
    y- ~ pi_base(.|x')       the response to a different prompt x' (``mipo/negatives.py``)

The pairs file is content-addressed: its default path is a hash of everything sampling
depends on (``mipo.stages.keys.pairs_key``: model, task, data split, negative strategy, decode
settings and batching, seed, seeding scheme, backend), so ``sample.py`` and ``train.py`` run with
the same overrides find the same file, and a sweep over training settings reuses it.

Beside it, ``<pairs path>.meta.json`` (``mipo.data.pairs.write_pairs_with_meta``, written before the pairs
file is renamed into place) records the prompts: how many the negative strategy was offered, kept and
dropped, why, and the dropped uids (``negatives=partial`` keeps only prompts with something to remove;
``negatives.prompt_set=partial`` restricts every strategy to those). Dropping is logged as a WARNING.

Resuming. Responses are decoded in chunks (``mipo.model.generation.Plan``); each finished chunk is
written at once to ``<pairs path>.partial/``::

    meta.json               {"inputs": <hash of keys.pairs_key>, "plans": {"chosen": <plan fingerprint>, ...}}
    chosen-00003.json       {"stream": "chosen", "chunk": 3, "indices": [...], "generations": [{...}, ...]}
    rejected-00000.json     (only when y- is sampled separately from y+)

A run killed at any point and started again with the same command reads back the chunks
that are there and decodes only the others; since a chunk's responses depend on nothing but
the chunk, the pairs file is byte for byte the one an uninterrupted run writes. The folder is
removed once the pairs file is in place; ``sampling.overwrite=true`` discards it.

Ranks. Under torchrun every rank runs ``sample_pairs``: rank r decodes the chunks
``Plan.shard(r, N)`` that are not done yet (writing each to the ``.partial`` folder as usual),
the chunks are gathered on every rank, and rank 0 writes the pairs file. Prompt i samples
with its own seed and a chunk depends on nothing else, so the pairs file is byte for byte the
one a single process writes.

Backends. ``sampling.backend=transformers`` decodes with ``mipo.model.generation``;
``sampling.backend=vllm`` with ``mipo.model.vllm_backend`` when vllm is installed (the choice is
logged; without vllm the transformers backend runs).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig
from tqdm.auto import tqdm

from mipo.data.chat import Messages
from mipo.data.pairs import PreferencePair, pairs_meta_path, write_pairs_with_meta
from mipo.data.tasks import build_task, task_splits
from mipo.model.generation import (
    DecodeLoop,
    DecodeSettings,
    Generation,
    Generations,
    Plan,
    PlanSettings,
    assemble,
    decode_settings,
    generation_record,
)
from mipo.model.loading import (
    load_model,
    load_tokenizer,
    model_identity,
    resolve_device,
    resolve_dtype,
)
from mipo.model.vllm_backend import BACKENDS, VLLMGenerator, resolve_backend
from mipo.negatives import NegativePlan, plan_negatives
from mipo.runtime import distributed
from mipo.runtime.errors import InputError, describe_changes, failed, is_int
from mipo.runtime.files import stable_hash, write_json
from mipo.stages.keys import pairs_key

log = logging.getLogger(__name__)

class PartialSamplesError(InputError, ValueError):
    """A ``.partial`` folder that does not belong to this run; the message names the file and field."""


class ChunkStore:
    """The finished chunks of one sampling run, one JSON file each, under ``<pairs path>.partial/``."""

    def __init__(self, folder: Path, settings: Mapping[str, Any], plans: dict[str, Plan]):
        """``settings``: what the samples depend on (``pairs_key``), stored so that a stale folder can say which
        setting changed."""
        self.folder, self.plans = folder, plans
        settings = json.loads(json.dumps(dict(settings), default=str))  # plain JSON values, as read back
        self.meta = {"inputs": stable_hash(settings, 20), "settings": settings,
                     "plans": {name: plan.fingerprint() for name, plan in plans.items()}, "format": 1}

    def open(self) -> None:
        """Check that an existing folder belongs to these inputs, or start one."""
        meta_file = self.folder / "meta.json"
        if meta_file.exists():
            found = json.loads(meta_file.read_text())
            if found.get("format") == self.meta["format"] and found.get("inputs") != self.meta["inputs"]:
                changed = (describe_changes(found["settings"], self.meta["settings"]) if "settings" in found
                           else "written before the settings were stored")
                raise PartialSamplesError(f"{meta_file}: these partial samples were written for other settings "
                                          f"({changed}); delete the folder or set sampling.overwrite=true")
            for key in ("format", "inputs", "plans"):
                if found.get(key) != self.meta[key]:
                    raise PartialSamplesError(
                        f"{meta_file}: field {key!r} is {found.get(key)!r}, expected {self.meta[key]!r}: these partial "
                        "samples were written for other inputs; delete the folder or set sampling.overwrite=true")
        else:
            write_json(meta_file, self.meta)

    def _file(self, stream: str, chunk: int) -> Path:
        return self.folder / f"{stream}-{chunk:05d}.json"

    def load(self, stream: str) -> dict[int, list[Generation]]:
        """The chunks of ``stream`` already written, validated against its plan."""
        plan, done = self.plans[stream], {}
        for chunk, indices in enumerate(plan.chunks):
            path = self._file(stream, chunk)
            if not path.exists():
                continue
            row = json.loads(path.read_text())
            if tuple(row.get("indices", ())) != indices or len(row.get("generations", ())) != len(indices):
                raise PartialSamplesError(f"{path}: field 'indices' does not match chunk {chunk} of the plan "
                                          f"(expected {len(indices)} prompts {list(indices)[:8]}...)")
            done[chunk] = [Generation(**g) for g in row["generations"]]
        return done

    def save(self, stream: str, chunk: int, generations: list[Generation]) -> None:
        write_json(self._file(stream, chunk), {"stream": stream, "chunk": chunk,
                                               "indices": list(self.plans[stream].chunks[chunk]),
                                               "generations": [asdict(g) for g in generations]})

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def sample_pairs(cfg: DictConfig, path: Path) -> Path:
    """Sample the pairs of this config and write them to ``path`` (``mipo.stages.keys.pairs_path(cfg)``, derived
    once by the entry point's inputs check); returns it.

    Skips all work when the file exists (``sampling.overwrite=true`` re-samples, discarding
    any partial samples too); resumes from ``<pairs path>.partial/`` otherwise.
    """
    distributed.init()
    if distributed.broadcast_object(path.exists() and not cfg.sampling.overwrite):  # rank 0 decides
        log.info("pairs exist, not re-sampling: %s", path)
        return path

    task = build_task(cfg)
    train_examples, _ = task_splits(cfg, task)
    plan = plan_negatives(task, train_examples, cfg.negatives.strategy, random.Random(cfg.seed),
                          num_negatives=cfg.negatives.get("num_negatives", 1),
                          prompt_set=cfg.negatives.get("prompt_set", "own"))
    if plan.dropped:
        log.warning("negatives=%s, negatives.prompt_set=%s: %d of %d training prompts dropped (%s); the pairs train "
                    "on %d prompts; the dropped uids are in %s", cfg.negatives.strategy,
                    cfg.negatives.get("prompt_set", "own"), plan.dropped, len(train_examples), plan.drop_reason,
                    len(plan.examples), pairs_meta_path(path))
    prompts = [task.messages(e) for e in plan.examples]
    negative_prompts = [task.messages(e) for e in plan.negatives]
    reuse = plan.source_index is not None and cfg.negatives.reuse_positives

    # Generate once per prompt; random negatives reuse the response of prompt sigma(i).
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    streams: dict[str, tuple[list[Messages], int]] = {"chosen": (prompts, cfg.seed)}
    if not reuse:
        streams["rejected"] = (negative_prompts, cfg.seed + 1)
    planning = PlanSettings(batch_size=cfg.sampling.batch_size, chunk_size=cfg.sampling.chunk_size,
                            max_prompt_length=cfg.data.max_prompt_length,
                            max_batch_tokens=cfg.sampling.max_batch_tokens)
    plans = {name: planning.plan(tokenizer, stream_prompts, cfg.sampling.max_new_tokens)
             for name, (stream_prompts, _) in streams.items()}
    store = ChunkStore(path.with_name(path.name + ".partial"), pairs_key(cfg), plans)
    results, backend = sample_streams(cfg, tokenizer, store, {name: seed for name, (_, seed) in streams.items()})

    pairs = build_pairs(cfg, plan, prompts, negative_prompts, results, backend)
    if distributed.is_main():
        write_pairs_with_meta(path, pairs, prompts_meta(cfg, plan))
        store.remove()
        log.info("wrote %d pairs to %s", len(pairs), path)
    distributed.barrier()
    return path


def sample_streams(cfg: DictConfig, tokenizer, store: ChunkStore,
                   seeds: dict[str, int]) -> tuple[dict[str, Generations], str]:
    """Every stream's responses (``store.plans[stream]``, sampled with ``seeds[stream]``), on every rank,
    and the backend that sampled them.

    This rank decodes its chunks (``Plan.shard``) not in the ``.partial`` folder yet, writing each as it
    finishes; the chunks are then gathered on every rank.
    """
    if distributed.is_main():
        if cfg.sampling.overwrite:
            store.remove()
        store.open()
    distributed.barrier()
    done = {name: store.load(name) for name in seeds}

    settings = decode_settings(cfg.sampling)
    backend = resolve_backend(cfg.sampling.get("backend", "transformers"), cfg.model)
    decoder = None  # a DecodeLoop or VLLMGenerator, loaded when this rank has a chunk to decode
    results: dict[str, Generations] = {}
    rank, world = distributed.rank(), distributed.world_size()
    for name, seed in seeds.items():
        stream_plan = store.plans[name]
        todo = [c for c in stream_plan.shard(rank, world) if c not in done[name]]  # this rank's chunks
        if done[name] and len(done[name]) < len(stream_plan.chunks):
            log.info("%s: resuming, %d of %d chunks already sampled (%s)", name, len(done[name]),
                     len(stream_plan.chunks), store.folder)
        if todo and decoder is None:
            decoder = chunk_decoder(cfg, tokenizer, backend)
        decoded = _decode_chunks(decoder, store, name, todo, settings, seed)
        merged = {**done[name], **distributed.gather_dict(decoded)}  # every rank's chunks, on every rank
        results[name] = assemble(stream_plan, merged, generation_record(settings, seed, stream_plan))
        log_summary(name, results[name])
    return results, backend


def _decode_chunks(decoder: DecodeLoop | VLLMGenerator | None, store: ChunkStore, stream: str, todo: list[int],
                   settings: DecodeSettings, seed: int) -> dict[int, list[Generation]]:
    """Decode chunks ``todo`` of ``stream``, writing each to the store as it finishes; chunk -> its responses."""
    plan = store.plans[stream]
    desc = "sampling y+ ~ pi(.|x)" if stream == "chosen" else "sampling y- ~ pi(.|x')"
    decoded: dict[int, list[Generation]] = {}
    with tqdm(total=sum(len(plan.chunks[c]) for c in todo), desc=desc, unit="response",
              disable=not distributed.is_main()) as progress:
        for chunk in todo:
            decoded[chunk] = decoder.generate_chunk(plan, chunk, settings, seed, progress)
            store.save(stream, chunk, decoded[chunk])
    return decoded


def build_pairs(cfg: DictConfig, plan: NegativePlan, prompts: list[Messages], negative_prompts: list[Messages],
                results: dict[str, Generations], backend: str) -> list[PreferencePair]:
    """Pair i: prompt i, its response y+ and the response y- sampled for its negative prompt (reused from the
    chosen stream where no ``rejected`` stream was sampled), with the metadata every pairs row carries."""
    chosen = results["chosen"]
    rejected = [chosen[j] for j in plan.source_index] if "rejected" not in results else list(results["rejected"])
    metadata = {
        "strategy": cfg.negatives.strategy,
        "task": cfg.task.name,
        "seed": cfg.seed,
        "model": model_identity(cfg.model),
        "sampling": chosen.settings,
        **({"backend": backend} if backend != "transformers" else {}),  # transformers pairs: as before
    }
    pairs = [
        PreferencePair(prompt, y_pos.text, y_neg.text, {
            "negative_prompt": neg_prompt, "uid": example.uid, "negative_uid": negative.uid,
            "answer": example.answer, "chosen_finish_reason": y_pos.finish_reason,
            "rejected_finish_reason": y_neg.finish_reason, **metadata})
        for prompt, neg_prompt, y_pos, y_neg, example, negative in zip(
            prompts, negative_prompts, chosen, rejected, plan.examples, plan.negatives)
    ]
    if plan.extra_source_index is not None:  # K > 1: y-_k is the response sampled for the k-th other prompt
        for pair, sources in zip(pairs, plan.extra_source_index):
            pair.metadata["extra_negatives"] = [
                {"negative_prompt": prompts[j], "negative_uid": plan.examples[j].uid, "rejected": chosen[j].text,
                 "rejected_finish_reason": chosen[j].finish_reason} for j in sources]
    return pairs


def prompts_meta(cfg: DictConfig, plan: NegativePlan) -> dict[str, Any]:
    """The pairs file's sidecar (``mipo.data.pairs.write_pairs_with_meta``): which prompts the negatives kept.

    ``{"strategy", "prompt_set", "task", "seed", "prompts_offered", "kept", "dropped", "reason", "dropped_uids"}``;
    ``prompts_offered``: the training split's prompts; ``kept``: the pairs written.
    """
    return {"strategy": cfg.negatives.strategy, "prompt_set": cfg.negatives.get("prompt_set", "own"),
            "task": cfg.task.name, "seed": cfg.seed, **plan.prompt_record()}


def chunk_decoder(cfg: DictConfig, tokenizer, backend: str) -> DecodeLoop | VLLMGenerator:
    """What decodes this run's chunks for ``backend`` (``resolve_backend``): both have
    ``generate_chunk(plan, chunk, settings, seed, progress) -> list[Generation]``."""
    device = resolve_device(cfg.device)
    if backend == "vllm":
        return VLLMGenerator.load(cfg.model, tokenizer, str(resolve_dtype(cfg.model.dtype, device)).removeprefix(
            "torch."), cfg.seed, cache_dir=cfg.paths.cache_dir)
    model = load_model(cfg.model, device=device, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    return DecodeLoop(model, tokenizer)


def log_summary(stream: str, generations: Generations) -> None:
    """The sampling log's account of a stream: responses cut at max_new_tokens, prompts cut by truncation."""
    s = generations.summary()
    (log.warning if s["prompts_truncated"] else log.info)("%s: %d responses, %d new tokens; %d (%.1f%%) cut at max_new_tokens=%d (finish_reason 'length'); "
             "%d prompts cut to data.max_prompt_length", stream, s["responses"], s["new_tokens"], s["truncated"],
             100 * s["truncated_fraction"], generations.settings["max_new_tokens"], s["prompts_truncated"])


def sampling_problems(sampling: Mapping[str, Any]) -> list[str]:
    """``sampling.chunk_size``, ``sampling.max_batch_tokens`` and ``sampling.backend`` (the decoding settings
    themselves: ``mipo.model.generation.decode_problems``)."""
    backend = sampling.get("backend", "transformers")
    return failed([(is_int(sampling[key]) and sampling[key] > 0, f"sampling.{key}={sampling[key]}: expected an int > 0")
                   for key in ("chunk_size", "max_batch_tokens")]
                  + [(backend in BACKENDS, f"sampling.backend={backend}: expected one of {', '.join(BACKENDS)}")])
