"""Reference-model log-probs: the policy's own training forward at step 0, run once and cached on disk.

DPO needs log pi_ref(y+|x) and log pi_ref(y-|x) for every pair (and for the K - 1 extra y- with
``negatives.num_negatives`` = K > 1). At step 0 the policy *is* the reference, so they are computed by the
training forward itself, before the first update and without gradients: the same module, the same
DDP/FSDP2 wrapping and mixed-precision policy, the same prompt layout and attention, the same output layer
and kernel (``ParallelForward.logps``). At step 0 log pi - log pi_ref is then 0 by construction, in every
configuration, and no second copy of the model is ever loaded (under FSDP2 the pass runs sharded).
With LoRA adapters the pass runs with the adapters switched off (``adapters_disabled``): the frozen base.

They never change during training, so they are stored in ``<cache_dir>/reference/<key>.pt``. The key
(``mipo.stages.keys.reference_key``) holds everything they depend on: the reference weights and tokenizer,
the pairs file's content (its sha256, hashed once per run: ``mipo.data.pairs.PairsFile``), the truncation
lengths, K, and the identity of the forward, every setting as it resolved (``ParallelForward.identity``:
layout, attention implementation, kernel, output layer, precision, how FSDP2 gathers the parameters), so a
cache computed by another forward is never reused. The file also stores the key and is checked against it
on load. Writes are atomic. Reference-free losses (SFT, SimPO, SAMI, InfoNCE: ``mipo.losses.LOSS_FAMILIES``)
never call this module.

Under torchrun the micro-batches are shared out between the ranks (each rank runs the same number of
forwards: DDP and FSDP2 forwards are collective) and gathered in input order; rank 0 writes the file.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch

from mipo.data.encoding import EncodedRow
from mipo.data.pairs import PairsFile
from mipo.runtime import distributed
from mipo.runtime.files import atomic_path, stable_hash
from mipo.stages.keys import reference_key, reference_path
from mipo.training.forward import ReferenceLogps, collate_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferencePass:
    """log pi_ref of the pairs through the policy's training forward (see the module docstring).

    ``forward``: the policy's ``ParallelForward`` (``mipo.training.parallel.wrap``), before the first step;
    ``lengths``: ``(max_length, max_prompt_length)`` the rows were encoded with; ``micro_batches``: the pairs
    of each forward (``training_micro_batches``: the ones the trainer runs them in); ``base_weights``: a
    context under which the policy is the reference (LoRA: adapters off; default: the policy as it is).
    """

    forward: Any
    model_cfg: Mapping[str, Any]
    tokenizer: Any
    lengths: tuple[int, int]
    micro_batches: Sequence[Sequence[int]]
    device: torch.device
    cache_dir: Path
    base_weights: Callable[[], ContextManager] = field(default=nullcontext)
    adapters: Mapping[str, Any] | None = None  # the LoRA settings, for the key (None: full weights)

    def key(self, pairs_file: PairsFile, num_negatives: int) -> dict[str, Any]:
        forward = {**self.forward.identity(), "device_type": self.device.type, "adapters": self.adapters,
                   "micro_batches": stable_hash([list(b) for b in self.micro_batches], 16)}
        return reference_key(self.model_cfg, self.tokenizer, pairs_file, self.lengths, forward, num_negatives)

    def logps(self, pairs_file: PairsFile, rows: Sequence[Sequence[EncodedRow]]) -> ReferenceLogps:
        """log pi_ref of every row of ``rows``, from the cache or computed once.

        ``rows``: the (chosen, rejected, *extra rejected) row lists the policy will train on
        (``mipo.training.forward.TrainingRows``), each one row per pair.
        """
        num_pairs, num_negatives = len(rows[0]), len(rows) - 1
        key = self.key(pairs_file, num_negatives)
        path = reference_path(self.cache_dir, key)
        cached = load_cached(path, key, num_pairs, num_negatives)
        if distributed.broadcast_object(cached is not None) != (cached is not None):
            raise RuntimeError(f"{path}: rank 0 and rank {distributed.rank()} disagree on whether this reference cache "
                               "is valid (was it written meanwhile by another process?); run the command again")
        if cached is not None:
            log.info("reference cache hit: %s", path)
            return cached
        log.info("reference cache miss: log pi_ref of %d pairs through the training forward at step 0 (%s) -> %s",
                 num_pairs, key["forward"], path)
        columns = self._score(rows)  # (N, 1 + K)
        chosen, rejected = columns[:, 0].contiguous(), columns[:, 1].contiguous()
        extra = columns[:, 2:].contiguous() if num_negatives > 1 else None  # (N, K - 1)
        stored = {"inputs": dict(key), "chosen": chosen, "rejected": rejected}
        if extra is not None:
            stored["extra_rejected"] = extra
        if distributed.is_main():
            with atomic_path(path) as tmp:
                torch.save(stored, tmp)
        distributed.barrier()
        return ReferenceLogps(chosen, rejected, path, cache_hit=False, extra_rejected=extra)

    def _score(self, rows: Sequence[Sequence[EncodedRow]]) -> torch.Tensor:
        """(N, 1 + K) float32 log-probs of every pair's rows, ``micro_batches`` in the training forward's layout,
        shared round-robin over the ranks (each runs as many forwards)."""
        num_pairs, batches = len(rows[0]), [list(b) for b in self.micro_batches]
        if sorted(i for b in batches for i in b) != list(range(num_pairs)):
            raise ValueError(f"the reference's micro-batches must hold each of the {num_pairs} pairs once")
        mine = distributed.shard(len(batches))
        rounds = -(-len(batches) // distributed.world_size())  # forwards per rank: the same on every rank
        policy = self.forward.policy
        was_training = policy.training
        policy.eval()  # no dropout: the reference is deterministic
        results: dict[int, torch.Tensor] = {}
        try:
            with self.base_weights():
                for turn in range(rounds):
                    b = mine[turn] if turn < len(mine) else mine[-1] if mine else 0  # a repeat keeps the ranks in step
                    batch = collate_groups(rows, batches[b], None, self.tokenizer.pad_token_id,
                                           share_prompt=self.forward.share_prompt).to(self.device)
                    results[b] = self.forward.logps(batch).float().cpu()  # (b, 1 + K)
        finally:
            policy.train(was_training)
        ordered = distributed.gather_in_order({b: results[b] for b in mine}, len(batches))
        columns = torch.empty(num_pairs, len(rows))
        columns[[i for b in batches for i in b]] = torch.cat(ordered)  # back to pair order
        return columns


def training_micro_batches(order: Sequence[Sequence[int]], num_pairs: int, micro_batch_size: int) -> list[list[int]]:
    """Every pair in the micro-batch it is first trained in, then the pairs no step trains, in file order.

    A forward's numbers depend a little on what else is in its micro-batch (the padded length of the rows,
    the prefix a prompt tree shares), by an ulp in fp32 and up to ~1e-4 nats in bf16. Scored in the very
    micro-batches of the run's first epoch (``order``: the pair indices of each step, ``batch_order``), each
    pair's log pi_ref is the step-0 log pi of the forward that trains it, bit for bit. The micro-batches are
    the same on any number of ranks: a rank's share of a batch is a contiguous slice of whole micro-batches
    (``parallel.local_batch``)."""
    batches, seen = [], set()
    for batch in order:
        for start in range(0, len(batch), micro_batch_size):
            fresh = [i for i in batch[start : start + micro_batch_size] if i not in seen]
            if len(fresh) < micro_batch_size:  # a later epoch: every pair of the first has its place
                break
            batches.append(fresh)
            seen.update(fresh)
    rest = [i for i in range(num_pairs) if i not in seen]
    return batches + [rest[start : start + micro_batch_size] for start in range(0, len(rest), micro_batch_size)]


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
