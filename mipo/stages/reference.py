"""Reference-model log-probs, computed once with the frozen base model and cached on disk.

DPO needs log pi_ref(y+|x) and log pi_ref(y-|x) for every pair (and for the K - 1 extra y- with
``negatives.num_negatives`` = K > 1). They never change during training, so they are computed once,
before training, and stored in ``<cache_dir>/reference/<key>.pt``. The key (``mipo.stages.keys.reference_key``)
holds everything they depend on: the reference weights and tokenizer, the pairs file's content (its sha256,
hashed once per run: ``mipo.data.pairs.PairsFile``), the truncation lengths, K, and the forward that scores
them (precision, attention, kernel, output layer), so a cache computed for other inputs is never reused.
The file also stores the key and is checked against it on load. Writes are atomic. When the cache is
valid the reference model is not even loaded. Reference-free losses (SFT, SimPO, SAMI, InfoNCE:
``mipo.losses.LOSS_FAMILIES``) never call this module.

Under torchrun every rank calls ``ReferencePass.logps``: the ``Scorer`` shares the scoring out between
the ranks and gathers it in input order (``mipo.model.logprobs``), and rank 0 writes the file. A cache
built by N ranks has the same key and the same numbers as one built by 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mipo.data.encoding import EncodedRow, encode_pairs
from mipo.data.pairs import PairsFile, read_pairs
from mipo.model.loading import load_model
from mipo.model.logprobs import Scorer, ScoringSettings
from mipo.model.precision import ForwardPrecision
from mipo.runtime import distributed
from mipo.runtime.files import atomic_path
from mipo.stages.keys import reference_key, reference_path
from mipo.training.forward import ReferenceLogps

log = logging.getLogger(__name__)
FP32 = ForwardPrecision(torch.float32)


@dataclass(frozen=True)
class ReferencePass:
    """The frozen base model's scoring of the pairs, in the policy's training numerics.

    ``scoring`` and ``precision`` are the policy's training forward's (its lengths, kernel and output
    layer; its weights' dtype and autocast), so log pi_ref is what log pi is at step 0.
    """

    model_cfg: Mapping[str, Any]
    tokenizer: Any
    scoring: ScoringSettings
    precision: ForwardPrecision
    device: torch.device
    cache_dir: Path

    def key(self, pairs_file: PairsFile, num_negatives: int) -> dict[str, Any]:
        return reference_key(self.model_cfg, self.tokenizer, pairs_file,
                             {**self.scoring.key(), "device_type": self.device.type}, self.precision, num_negatives)

    def logps(self, pairs_file: PairsFile, rows: Sequence[Sequence[EncodedRow]] | None = None) -> ReferenceLogps:
        """log pi_ref of every row of ``rows``, from the cache or computed once.

        ``rows``: the (chosen, rejected, *extra rejected) row lists the policy will train on
        (``mipo.training.forward.TrainingRows``), each one row per pair; default: ``pairs_file``'s pairs
        encoded with ``scoring``'s lengths.
        """
        if rows is None:
            rows = encode_pairs(self.tokenizer, read_pairs(pairs_file.path), self.scoring.max_length,
                                self.scoring.max_prompt_length)
        num_pairs, num_negatives = len(rows[0]), len(rows) - 1
        key = self.key(pairs_file, num_negatives)
        path = reference_path(self.cache_dir, key)
        cached = load_cached(path, key, num_pairs, num_negatives)
        if distributed.broadcast_object(cached is not None) != (cached is not None):
            raise RuntimeError(f"{path}: rank 0 and rank {distributed.rank()} disagree on whether this reference cache "
                               "is valid (was it written meanwhile by another process?); run the command again")
        if cached is not None:
            log.info("reference cache hit: %s (the reference model is not loaded)", path)
            return cached
        log.info("reference cache miss: computing log pi_ref for %d pairs (%s) -> %s", num_pairs,
                 self.precision.describe(), path)
        columns = self._score(rows).view(len(rows), num_pairs)  # (1 + K, N)
        chosen, rejected = columns[0].clone(), columns[1].clone()
        extra = columns[2:].T.contiguous() if num_negatives > 1 else None  # (N, K - 1)
        stored = {"inputs": dict(key), "chosen": chosen, "rejected": rejected}
        if extra is not None:
            stored["extra_rejected"] = extra
        if distributed.is_main():
            with atomic_path(path) as tmp:
                torch.save(stored, tmp)
        distributed.barrier()
        return ReferenceLogps(chosen, rejected, path, cache_hit=False, extra_rejected=extra)

    def _score(self, rows: Sequence[Sequence[EncodedRow]]) -> torch.Tensor:
        """((1 + K) * N,) log-probs of the rows, column by column, under the reference model loaded for this."""
        model = load_model(self.model_cfg, device=self.device, dtype=self.precision.weights, cache_dir=self.cache_dir,
                           vocab_size=len(self.tokenizer))
        model.requires_grad_(False)
        scorer = Scorer(model, self.tokenizer, self.scoring)
        # y+ and the y- of a pair share the prompt x: one call lets the scorer run each prompt once
        with self.precision.context(self.device.type):
            return scorer.score_rows([row for column in rows for row in column], desc="reference log pi(y|x)")


def load_cached(path: Path, key: Mapping[str, Any], num_pairs: int, num_negatives: int = 1) -> ReferenceLogps | None:
    """The cached log-probs at ``path`` if they exist and were computed for exactly ``key``."""
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file is recomputed, never trusted
        log.warning("reference cache %s is unreadable (%s); recomputing", path, e)
        return None
    valid = (
        isinstance(stored, dict)
        and stored.get("inputs") == dict(key)
        and all(isinstance(stored.get(k), torch.Tensor) and stored[k].shape == (num_pairs,) for k in ("chosen", "rejected"))
        and (num_negatives == 1 or (isinstance(stored.get("extra_rejected"), torch.Tensor)
                                    and stored["extra_rejected"].shape == (num_pairs, num_negatives - 1)))
    )
    if not valid:
        log.warning("reference cache %s was computed for other inputs; recomputing", path)
        return None
    return ReferenceLogps(stored["chosen"], stored["rejected"], path, cache_hit=True,
                          extra_rejected=stored.get("extra_rejected") if num_negatives > 1 else None)
