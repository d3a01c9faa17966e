"""The sampling stage: MIPO preference pairs (x, y+, y-) from the base model.

    y+ ~ pi_base(.|x)        the response to the prompt itself
    y- ~ pi_base(.|x')       the response to a different prompt x' (``mipo/negatives.py``)

The pairs file is content-addressed: its default path is a hash of everything sampling
depends on (model, task, data split, negative strategy, decode settings and batching, seed,
seeding scheme), so ``sample.py`` and ``train.py`` run with the same overrides find the same
file, and a sweep over training settings reuses it.

Resuming. Responses are decoded in chunks (``mipo.model.generation.Plan``); each finished chunk is
written at once to ``<pairs path>.partial/``::

    meta.json               {"inputs": <hash of sampling_inputs>, "plans": {"chosen": <plan fingerprint>, ...}}
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
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mipo.data.chat import Messages
from mipo.data.pairs import PreferencePair, write_pairs
from mipo.data.tasks import build_task, task_splits
from mipo.model.generation import (
    SEEDING,
    Generation,
    Generations,
    Plan,
    assemble,
    decode_settings,
    generate_chunk,
    generation_record,
    plan_generation,
)
from mipo.model.loading import (
    load_model,
    load_tokenizer,
    model_identity,
    resolve_device,
    resolve_dtype,
)
from mipo.model.vllm_backend import VLLMGenerator, resolve_backend
from mipo.negatives import plan_negatives
from mipo.runtime import distributed
from mipo.runtime.errors import InputError
from mipo.runtime.files import stable_hash, write_json

log = logging.getLogger(__name__)

DECODE_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")  # the distribution
BATCH_KEYS = ("batch_size", "chunk_size", "max_batch_tokens")  # which rows share a forward: the last bits


def sampling_inputs(cfg: DictConfig) -> dict[str, Any]:
    """Everything the pairs depend on, and nothing else (training settings are not here).

    Besides the weights, the data and the decode settings: how prompts are rendered (the
    tokenizer comes with the weights; ``model.tokenizer`` and ``model.chat_template_kwargs``
    can change it) and the numerics of the decode (inference dtype, device type, attention
    implementation), which change the sampled strings.
    """
    device = resolve_device(cfg.device)
    return {
        "model": model_identity(cfg.model),
        "rendering": {"tokenizer": cfg.model.get("tokenizer"),
                      "chat_template_kwargs": OmegaConf.to_container(cfg.model.get("chat_template_kwargs") or {},
                                                                     resolve=True)},
        "inference": {"dtype": str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch."),
                      "device_type": device.type, "attn_implementation": cfg.model.get("attn_implementation")},
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "data": {k: cfg.data[k] for k in ("source", "num_train", "num_eval")},
        "negatives": _negatives_inputs(cfg),
        "sampling": {k: cfg.sampling.get(k) for k in (*DECODE_KEYS, *BATCH_KEYS)},
        "max_prompt_length": cfg.data.max_prompt_length,
        "seed": cfg.seed,
        "seeding": SEEDING,
        "format": 3,  # 3: rendering and inference numerics in the key
        # the vllm backend samples other strings: in the key when it runs (absent for transformers, as before)
        **({"backend": "vllm"} if resolve_backend(cfg.sampling.get("backend", "transformers"), cfg.model,
                                                  announce=False) == "vllm" else {}),
    }


def _negatives_inputs(cfg: DictConfig) -> dict[str, Any]:
    """``negatives.*``; ``num_negatives`` only when K > 1, so K = 1 pairs keep the path they always had."""
    negatives = OmegaConf.to_container(cfg.negatives, resolve=True)
    if negatives.get("num_negatives", 1) == 1:
        negatives.pop("num_negatives", None)
    return negatives


def pairs_path(cfg: DictConfig) -> Path:
    """``data.pairs_path`` if set, else the content-addressed default under the cache dir."""
    if cfg.data.pairs_path:
        return Path(cfg.data.pairs_path)
    inputs = sampling_inputs(cfg)
    name = f"{cfg.task.name}-{cfg.negatives.strategy}-{stable_hash(inputs, 12)}.jsonl"
    return Path(cfg.paths.cache_dir) / "pairs" / name


class PartialSamplesError(InputError, ValueError):
    """A ``.partial`` folder that does not belong to this run; the message names the file and field."""


class ChunkStore:
    """The finished chunks of one sampling run, one JSON file each, under ``<pairs path>.partial/``."""

    def __init__(self, folder: Path, inputs_hash: str, plans: dict[str, Plan]):
        self.folder, self.plans = folder, plans
        self.meta = {"inputs": inputs_hash, "plans": {name: plan.fingerprint() for name, plan in plans.items()},
                     "format": 1}

    def open(self) -> None:
        """Check that an existing folder belongs to these inputs, or start one."""
        meta_file = self.folder / "meta.json"
        if meta_file.exists():
            found = json.loads(meta_file.read_text())
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


def sample_pairs(cfg: DictConfig) -> Path:
    """Sample the pairs of this config and write them; returns the pairs path.

    Skips all work when the file exists (``sampling.overwrite=true`` re-samples, discarding
    any partial samples too); resumes from ``<pairs path>.partial/`` otherwise.
    """
    path = pairs_path(cfg)
    distributed.init()
    if distributed.broadcast_object(path.exists() and not cfg.sampling.overwrite):  # rank 0 decides
        log.info("pairs exist, not re-sampling: %s", path)
        return path

    task = build_task(cfg)
    train_examples, _ = task_splits(cfg, task)
    rng = random.Random(cfg.seed)
    plan = plan_negatives(task, train_examples, cfg.negatives.strategy, rng,
                          num_negatives=cfg.negatives.get("num_negatives", 1))
    if plan.dropped:
        log.info("negatives=%s: %d prompts had no information to remove and were dropped", cfg.negatives.strategy, plan.dropped)
    prompts = [task.messages(e) for e in plan.examples]
    negative_prompts = [task.messages(e) for e in plan.negatives]
    reuse = plan.source_index is not None and cfg.negatives.reuse_positives

    # Generate once per prompt; random negatives reuse the response of prompt sigma(i).
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    streams: dict[str, tuple[list[Messages], int]] = {"chosen": (prompts, cfg.seed)}
    if not reuse:
        streams["rejected"] = (negative_prompts, cfg.seed + 1)
    batch_size = cfg.sampling.batch_size
    plans = {name: plan_generation(tokenizer, stream_prompts, cfg.sampling.max_new_tokens, batch_size,
                                   cfg.sampling.chunk_size, cfg.data.max_prompt_length, cfg.sampling.max_batch_tokens)
             for name, (stream_prompts, _) in streams.items()}
    store = ChunkStore(path.with_name(path.name + ".partial"), stable_hash(sampling_inputs(cfg), 20), plans)
    if distributed.is_main():
        if cfg.sampling.overwrite:
            store.remove()
        store.open()
    distributed.barrier()
    done = {name: store.load(name) for name in streams}

    settings = decode_settings(cfg.sampling)
    backend = resolve_backend(cfg.sampling.get("backend", "transformers"), cfg.model)
    decoder = None  # decode_chunk(plan, chunk, seed, progress), loaded when this rank has a chunk to decode
    results: dict[str, Generations] = {}
    rank, world = distributed.rank(), distributed.world_size()
    for name, (_, seed) in streams.items():
        stream_plan = plans[name]
        todo = [c for c in stream_plan.shard(rank, world) if c not in done[name]]  # this rank's chunks
        if done[name] and len(done[name]) < len(stream_plan.chunks):
            log.info("%s: resuming, %d of %d chunks already sampled (%s)", name, len(done[name]),
                     len(stream_plan.chunks), store.folder)
        if todo and decoder is None:
            decoder = chunk_decoder(cfg, tokenizer, backend, settings)
        desc = "sampling y+ ~ pi(.|x)" if name == "chosen" else "sampling y- ~ pi(.|x')"
        decoded: dict[int, list[Generation]] = {}
        with tqdm(total=sum(len(stream_plan.chunks[c]) for c in todo), desc=desc, unit="response",
                  disable=not distributed.is_main()) as progress:
            for chunk in todo:
                decoded[chunk] = decoder(stream_plan, chunk, seed, progress)
                store.save(name, chunk, decoded[chunk])
        merged = {**done[name], **distributed.gather_dict(decoded)}  # every rank's chunks, on every rank
        results[name] = assemble(stream_plan, merged, generation_record(settings, seed, stream_plan))
        log_summary(name, results[name])

    chosen = results["chosen"]
    rejected = [chosen[j] for j in plan.source_index] if reuse else list(results["rejected"])
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
    if distributed.is_main():
        write_pairs(path, pairs)
        store.remove()
        log.info("wrote %d pairs to %s", len(pairs), path)
    distributed.barrier()
    return path


def chunk_decoder(cfg: DictConfig, tokenizer, backend: str, settings) -> Any:
    """``decode(plan, chunk, seed, progress) -> list[Generation]`` for ``backend`` (``resolve_backend``)."""
    device = resolve_device(cfg.device)
    if backend == "vllm":
        generator = VLLMGenerator.load(cfg.model, tokenizer, str(resolve_dtype(cfg.model.dtype, device)).removeprefix(
            "torch."), cfg.seed, cache_dir=cfg.paths.cache_dir)
        return lambda plan, chunk, seed, progress: generator.generate_chunk(plan, chunk, settings, seed, progress)
    model = load_model(cfg.model, device=device, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    return lambda plan, chunk, seed, progress: generate_chunk(model, tokenizer, plan, chunk, settings, seed,
                                                               progress=progress)


def log_summary(stream: str, generations: Generations) -> None:
    """The sampling log's account of a stream: responses cut at max_new_tokens, prompts cut by truncation."""
    s = generations.summary()
    log.info("%s: %d responses, %d new tokens; %d (%.1f%%) cut at max_new_tokens=%d (finish_reason 'length'); "
             "%d prompts cut to data.max_prompt_length", stream, s["responses"], s["new_tokens"], s["truncated"],
             100 * s["truncated_fraction"], generations.settings["max_new_tokens"], s["prompts_truncated"])
