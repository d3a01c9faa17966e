"""Every stage's cache key: what its output depends on, and nothing else, with one format version each.

    stage      output                                   key
    sample     <cache>/pairs/<task>-<neg>-<key>.jsonl   ``pairs_key``: model, rendering, decode numerics, task, data
                                                        split, negatives, decode settings, seed, backend
    reference  <cache>/reference/<key>.pt               ``reference_key``: model, tokenizer, pairs content, lengths,
                                                        the training forward as it resolved (layout, attention,
                                                        kernel, output layer, precision, FSDP gathering), K
    train      <cache>/runs/<key>/                      ``train_key``: pairs content, model, dtype, loss, trainer,
                                                        lengths, seed, K
    evaluate   <cache>/eval/<key>.json (per model)      ``eval_key``: the evaluated and reference models, tokenizer,
                                                        task, data split and lengths, eval settings, judge, seed

A key is a dict of plain values; its ``stable_hash`` names the file. The dict is also stored beside the output
(reference and evaluation caches) and checked on load, so a hash collision or a hand-copied file is never
trusted. Raising a stage's ``*_FORMAT`` retires every cache of that stage at once.

The pairs file's content enters the reference and train keys as its sha256, which ``mipo.data.pairs.PairsFile``
computes once per run and the stages hand on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from mipo.data.encoding import DEFAULT_RESPONSE_SUFFIX
from mipo.data.pairs import PairsFile
from mipo.kernels.logprob import default_impl
from mipo.model.adapters import lora_identity
from mipo.model.generation import SEEDING
from mipo.model.loading import (
    model_class,
    model_identity,
    resolve_attn_implementation,
    resolve_device,
    resolve_dtype,
)
from mipo.model.precision import train_dtype
from mipo.model.tokenizer import tokenizer_identity
from mipo.model.vllm_backend import resolve_backend
from mipo.runtime.files import stable_hash

PAIRS_FORMAT = 5  # 5: the attention implementation as it resolved (4: the backend and K, every end-of-turn id)
REFERENCE_FORMAT = 4  # 4: computed by the training forward, keyed by its resolved identity (3: K in the key)
TRAIN_FORMAT = 3  # 3: log pi_ref from the training forward itself (2: K and loss.multi_negative in the key)
EVAL_FORMAT = 4  # 4: the resolved kernel and attention in the key (3: strict/flexible/loglik accuracy, per-token pmi, ...)

DECODE_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")  # the distribution
BATCH_KEYS = ("batch_size", "chunk_size", "max_batch_tokens")  # which rows share a forward: the last bits
# trainer keys that do not change the trained weights: left out of what a run is keyed by
NOT_TRAIN_INPUTS = ("log_every", "checkpoint_every", "keep_checkpoints", "resume")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------

def pairs_key(cfg: DictConfig) -> dict[str, Any]:
    """Everything the pairs depend on, and nothing else (training settings are not here).

    Besides the weights, the data and the decode settings: how prompts are rendered (the tokenizer comes
    with the weights; ``model.tokenizer`` and ``model.chat_template_kwargs`` can change it), the numerics of
    the decode (inference dtype, device type, attention implementation) and the backend, which change the
    sampled strings.
    """
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    return {
        "model": model_identity(cfg.model),
        "rendering": {"tokenizer": cfg.model.get("tokenizer"),
                      "chat_template_kwargs": _plain(cfg.model.get("chat_template_kwargs") or {})},
        "inference": {"dtype": str(dtype).removeprefix("torch."), "device_type": device.type,
                      "attn_implementation": resolve_attn_implementation(
                          str(cfg.model.get("attn_implementation") or "auto"), device, dtype,
                          model_class(cfg.model, cfg.paths.cache_dir))},
        "task": _plain(cfg.task),
        "data": {k: cfg.data[k] for k in ("source", "num_train", "num_eval")},
        "negatives": {"num_negatives": 1, "prompt_set": "own", **_plain(cfg.negatives)},
        "sampling": {k: cfg.sampling.get(k) for k in (*DECODE_KEYS, *BATCH_KEYS)},
        "backend": resolve_backend(cfg.sampling.get("backend", "transformers"), cfg.model, announce=False),
        "max_prompt_length": cfg.data.max_prompt_length,
        "seed": cfg.seed,
        "seeding": SEEDING,
        "format": PAIRS_FORMAT,
    }


def pairs_path(cfg: DictConfig) -> Path:
    """``data.pairs_path`` if set, else the content-addressed default under the cache dir."""
    if cfg.data.pairs_path:
        return Path(cfg.data.pairs_path)
    name = f"{cfg.task.name}-{cfg.negatives.strategy}-{stable_hash(pairs_key(cfg), 12)}.jsonl"
    return Path(cfg.paths.cache_dir) / "pairs" / name


# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------

def reference_key(model_cfg: Mapping[str, Any], tokenizer, pairs_file: PairsFile, lengths: tuple[int, int],
                  forward: Mapping[str, Any], num_negatives: int) -> dict[str, Any]:
    """What log pi_ref of a pairs file depends on: the reference weights and tokenizer, the pairs' content, the
    truncation ``lengths`` (``max_length``, ``max_prompt_length``), K, and the ``forward`` that scores them: the
    training forward's identity with every setting resolved (``mipo.training.parallel.ParallelForward.identity``:
    layout, attention implementation, kernel, output layer, autocast, how the parameters are gathered; plus the
    weights' dtype, the device type and the adapters)."""
    return {
        "model": model_identity(model_cfg),
        "tokenizer": tokenizer_identity(tokenizer),
        "pairs_sha256": pairs_file.sha256,
        "max_length": int(lengths[0]),
        "max_prompt_length": int(lengths[1]),
        "forward": dict(forward),
        "num_negatives": int(num_negatives),
        "format": REFERENCE_FORMAT,
    }


def reference_path(cache_dir: str | Path, key: Mapping[str, Any]) -> Path:
    return Path(cache_dir) / "reference" / f"{stable_hash(dict(key), 20)}.pt"


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def train_key(cfg: DictConfig, pairs_file: PairsFile) -> dict[str, Any]:
    """Everything a trained policy depends on (logging and checkpointing settings excluded).

    ``data.response_suffix`` (the tokens a response is trained with) only where it is not the default, so the
    runs trained before it existed keep their keys; the reference and evaluation keys have it through
    ``tokenizer_identity``.
    """
    trainer = _plain(cfg.trainer)
    for key in NOT_TRAIN_INPUTS:
        trainer.pop(key, None)
    suffix = cfg.data.get("response_suffix") or DEFAULT_RESPONSE_SUFFIX
    return {
        "pairs_sha256": pairs_file.sha256,
        "model": model_identity(cfg.model),
        "train_dtype": train_dtype(cfg),
        "loss": _plain(cfg.loss),
        "trainer": trainer,
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "num_negatives": cfg.negatives.get("num_negatives", 1),
        "seed": cfg.seed,
        **({"response_suffix": suffix} if suffix != DEFAULT_RESPONSE_SUFFIX else {}),
        **({"lora": adapters} if (adapters := lora_identity(cfg.get("lora"))) else {}),  # full fine-tuning: no entry
        "format": TRAIN_FORMAT,
    }


def train_dir(cfg: DictConfig, key: Mapping[str, Any]) -> Path:
    """Where the train stage keeps the policy of ``key``: ``<cache>/runs/<hash>``."""
    return Path(cfg.paths.cache_dir) / "runs" / stable_hash(dict(key), 16)


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------

def eval_key(cfg: DictConfig, evaluated_model: str, tokenizer, judged: bool = False) -> dict[str, Any]:
    """Everything one model's evaluation results depend on (the judge only where it runs)."""
    device = resolve_device(cfg.device)
    settings = _plain(cfg.eval)
    settings.pop("model_path", None)
    settings.pop("bootstrap_resamples", None)  # the comparisons are recomputed from the cached per-prompt values
    key = {
        "evaluated_model": evaluated_model,
        "reference_model": model_identity(cfg.model),
        "tokenizer": tokenizer_identity(tokenizer),  # how prompts are rendered and tokenised
        "task": _plain(cfg.task),
        "data": {k: cfg.data[k] for k in ("source", "num_train", "num_eval", "max_length", "max_prompt_length")},
        "eval": settings,
        "device_type": device.type,
        # the forward's numerics as they resolve on this machine: the log-prob kernel (MI, log-likelihood accuracy)
        # and the attention implementation the evaluated models run
        "numerics": {"kernel": default_impl(device) if cfg.kernel == "auto" else str(cfg.kernel),
                     "attn_implementation": resolve_attn_implementation(
                         str(cfg.model.get("attn_implementation") or "auto"), device,
                         resolve_dtype(str(cfg.eval.dtype), device), model_class(cfg.model, cfg.paths.cache_dir))},
        "seed": cfg.seed,
        "format": EVAL_FORMAT,
    }
    if judged:
        key["judge"] = {**_plain(cfg.judge), "model": model_identity(cfg.judge.model)}
    return key


def eval_path(cfg: DictConfig, key: Mapping[str, Any]) -> Path:
    return Path(cfg.paths.cache_dir) / "eval" / f"{stable_hash(dict(key), 20)}.json"
