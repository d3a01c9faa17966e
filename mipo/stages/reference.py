"""Reference-model log-probs, computed once with the frozen base model and cached on disk.

DPO needs log pi_ref(y+|x) and log pi_ref(y-|x) for every pair. They never change during
training, so they are computed once, before training, and stored in
``<cache_dir>/reference/<key>.pt``. The key hashes everything they depend on:

- the identity of the reference weights (``mipo.model.loading.model_identity``),
- the tokenizer (vocabulary, special tokens, chat template),
- the content of the pairs file (sha256),
- ``max_length`` and ``max_prompt_length`` (truncation changes the sums),
- with K > 1 negatives per prompt (``negatives.num_negatives``), K (the file then also holds the
  K - 1 extra rejected responses' log-probs, (N, K - 1); for K = 1 the key and file are as before),

so a cache computed for other inputs is never reused. The file also stores those inputs and
is checked against them on load. Writes are atomic. When the cache is valid the reference
model is not even loaded. Reference-free losses (SFT, SimPO, SAMI, InfoNCE: ``mipo.losses.LOSS_FAMILIES``)
never call this module.

Under torchrun every rank calls ``reference_logps``: the ``Scorer`` shares the scoring out
between the ranks and gathers it in input order (``mipo.model.logprobs``), and rank 0 writes the
file. A cache built by N ranks has the same key and the same numbers as one built by 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from mipo.data.encoding import EncodedRow, encode_pairs
from mipo.data.pairs import PreferencePair, read_pairs
from mipo.model.loading import load_model, model_identity, tokenizer_identity
from mipo.model.logprobs import Scorer
from mipo.model.precision import ForwardPrecision
from mipo.runtime import distributed
from mipo.runtime.files import atomic_path, sha256_file, stable_hash
from mipo.training.forward import ReferenceLogps

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: the numerics are part of the key
FP32 = ForwardPrecision(torch.float32)


def reference_inputs(model_cfg: Mapping[str, Any], tokenizer, pairs_path: str | Path, max_length: int,
                     max_prompt_length: int, precision: ForwardPrecision = FP32, device_type: str = "cpu",
                     kernel: str = "auto", fused_lm_head: bool = False, num_negatives: int = 1) -> dict[str, Any]:
    inputs = {
        "model": model_identity(model_cfg),
        "tokenizer": tokenizer_identity(tokenizer),
        "pairs_sha256": sha256_file(pairs_path),
        "max_length": int(max_length),
        "max_prompt_length": int(max_prompt_length),
        "precision": precision.describe(),
        "device_type": device_type,
        "attn_implementation": str(model_cfg.get("attn_implementation", "auto")),
        "kernel": kernel,
        "fused_lm_head": bool(fused_lm_head),
        "format": FORMAT_VERSION,
    }
    if num_negatives > 1:  # K = 1 keeps the key (and the cache) it always had
        inputs["num_negatives"] = int(num_negatives)
    return inputs


def reference_cache_path(cache_dir: str | Path, inputs: Mapping[str, Any]) -> Path:
    return Path(cache_dir) / "reference" / f"{stable_hash(dict(inputs), 20)}.pt"


def load_cached(path: Path, inputs: Mapping[str, Any], num_pairs: int, num_negatives: int = 1) -> ReferenceLogps | None:
    """The cached log-probs at ``path`` if they exist and were computed for exactly ``inputs``."""
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file is recomputed, never trusted
        log.warning("reference cache %s is unreadable (%s); recomputing", path, e)
        return None
    valid = (
        isinstance(stored, dict)
        and stored.get("inputs") == dict(inputs)
        and all(isinstance(stored.get(k), torch.Tensor) and stored[k].shape == (num_pairs,) for k in ("chosen", "rejected"))
        and (num_negatives == 1 or (isinstance(stored.get("extra_rejected"), torch.Tensor)
                                    and stored["extra_rejected"].shape == (num_pairs, num_negatives - 1)))
    )
    if not valid:
        log.warning("reference cache %s was computed for other inputs; recomputing", path)
        return None
    return ReferenceLogps(stored["chosen"], stored["rejected"], path, cache_hit=True,
                          extra_rejected=stored.get("extra_rejected") if num_negatives > 1 else None)


def reference_logps(
    model_cfg: Mapping[str, Any],
    tokenizer,
    pairs_path: str | Path,
    cache_dir: str | Path,
    max_length: int,
    max_prompt_length: int,
    device: torch.device,
    batch_size: int = 8,
    kernel: str = "auto",
    pairs: list[PreferencePair] | None = None,
    encoded: tuple[list[EncodedRow], ...] | None = None,
    precision: ForwardPrecision = FP32,
    fused_lm_head: bool = False,
) -> ReferenceLogps:
    """log pi_ref(y+|x) and log pi_ref(y-|x) for every pair, from the cache or computed once.

    ``precision`` and ``fused_lm_head``: the policy's training forward's (fp32 without autocast
    by default); the trainer passes its own.

    ``pairs``: the contents of ``pairs_path`` when the caller has already read them;
    ``encoded``: their rows from ``mipo.data.encoding.encode_pairs`` with these lengths, which the
    trainer passes so that the reference scores exactly the tokens the policy will: (chosen,
    rejected) rows, then the K - 1 extra rejected rows' lists for K > 1 negatives per prompt
    (``mipo.training.forward.TrainingRows``).
    """
    if pairs is None:
        pairs = read_pairs(pairs_path)
    rows = encoded or encode_pairs(tokenizer, pairs, max_length, max_prompt_length)
    num_negatives = len(rows) - 1
    inputs = reference_inputs(model_cfg, tokenizer, pairs_path, max_length, max_prompt_length, precision,
                              device.type, kernel, fused_lm_head, num_negatives)
    path = reference_cache_path(cache_dir, inputs)
    cached = load_cached(path, inputs, len(pairs), num_negatives)
    if distributed.broadcast_object(cached is not None) != (cached is not None):
        raise RuntimeError(f"{path}: rank 0 and rank {distributed.rank()} disagree on whether this reference cache is "
                           "valid (was it written meanwhile by another process?); run the command again")
    if cached is not None:
        log.info("reference cache hit: %s (the reference model is not loaded)", path)
        return cached

    log.info("reference cache miss: computing log pi_ref for %d pairs (%s) -> %s", len(pairs), precision.describe(), path)
    model = load_model(model_cfg, device=device, dtype=precision.weights, cache_dir=cache_dir, vocab_size=len(tokenizer))
    model.requires_grad_(False)
    scorer = Scorer(model, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                    batch_size=batch_size, kernel=kernel, fused_lm_head=fused_lm_head)
    # y+ and the y- of a pair share the prompt x: one call lets the scorer run each prompt once
    with precision.context(device.type):
        logps = scorer.score_rows([row for column in rows for row in column], desc="reference log pi(y|x)")
    columns = logps.view(len(rows), len(pairs))  # (1 + K, N)
    chosen, rejected = columns[0].clone(), columns[1].clone()
    extra = columns[2:].T.contiguous() if num_negatives > 1 else None  # (N, K - 1)
    del model, scorer
    stored = {"inputs": dict(inputs), "chosen": chosen, "rejected": rejected}
    if extra is not None:
        stored["extra_rejected"] = extra
    if distributed.is_main():
        with atomic_path(path) as tmp:
            torch.save(stored, tmp)
    distributed.barrier()
    return ReferenceLogps(chosen, rejected, path, cache_hit=False, extra_rejected=extra)
