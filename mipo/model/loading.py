"""Loading models and tokenizers: Hugging Face ids, local folders, the bundled GGUF, tiny random models.

A model is described by the ``model`` config group (``conf/model/*.yaml``):

    name_or_path:  Hugging Face id or local folder (for GGUF: the folder or installed package holding it)
    gguf_file:     file name inside that folder, to load a GGUF checkpoint (dequantised to dense weights)
    gguf_package:  an installed Python package whose folder holds ``gguf_file`` (the bundled SmolLM2)
    revision:      hub revision (branch, tag or commit)
    random_init:   build the architecture from ``config`` with random weights (tests, benchmarks)
    config:        architecture kwargs for ``random_init`` (``model_type`` picks the class)
    tokenizer:     ``null`` (load with the model) or ``"byte"`` (a built-in byte-level tokenizer)
    dtype:         ``auto`` (fp32 on CPU, bf16 on GPU), ``float32``, ``bfloat16``, ``float16``
    attn_implementation: ``auto`` (flash_attention_2 if flash-attn imports and a GPU is present, else sdpa;
                   each only where the model's class has it: eager for Bloom)

GGUF checkpoints take ~25 s to dequantise, so the first load converts the checkpoint once to a
safetensors folder under ``<cache_dir>/models/`` keyed by the package version and the transformers
major version (a converted folder is tied to the transformers version that wrote it); later
loads read that folder in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
)

from mipo.data.chat import TEMPLATE_KWARGS_ATTRIBUTE
from mipo.data.encoding import DEFAULT_RESPONSE_SUFFIX, set_response_suffix
from mipo.model import adapters
from mipo.model.sources import (  # noqa: F401 - resolve_device, device_problem, model_source_problem: imported from here too
    ModelDescription,
    config_architecture,
    device_problem,
    folder_description,
    model_source_problem,
    package_dir,
    resolve_device,
)
from mipo.model.tokenizer import attach_turn_end, byte_tokenizer, eos_ids
from mipo.runtime.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_attn_implementation(requested: str, device: torch.device, dtype: torch.dtype | None = None,
                                model_class: type | None = None) -> str:
    """The attention implementation ``model.attn_implementation`` asks for; ``auto`` resolves here.

    ``auto``: ``flash_attention_2`` when flash-attn imports, a GPU is present, the weights are bf16/fp16
    (flash-attn has no fp32 kernels: fp32 master weights use ``sdpa``) and the model class supports it; else
    ``sdpa``, or ``eager`` for a class without an SDPA path (Bloom, ALiBi; Gemma2 in transformers 5.25), as
    transformers itself picks. ``model_class``: ``causal_lm_class`` of the model (None: unknown, assumed
    to support both). An explicit value is returned as is (``attention_problem`` checks it up front).
    """
    if requested != "auto":
        return requested
    half = dtype in (None, torch.bfloat16, torch.float16)
    flash = model_class is None or getattr(model_class, "_supports_flash_attn", False)
    if device.type == "cuda" and half and flash and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa" if model_class is None or getattr(model_class, "_supports_sdpa", False) else "eager"


def causal_lm_class(model_type: str | None) -> type | None:
    """The class ``AutoModelForCausalLM`` builds for ``model_type`` (config.json's), or None when it is unknown
    here (no such model type in this transformers, or remote code)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if model_type else None
    try:
        return getattr(transformers, name) if name else None
    except (AttributeError, ImportError):  # a class this install cannot import (a missing optional dependency)
        return None


def _loaded_class(source: str, kwargs: Mapping[str, Any]) -> type | None:
    """``causal_lm_class`` of the checkpoint ``from_pretrained`` is about to load (its config.json, downloaded
    first for a hub id); None where no config says."""
    try:
        return causal_lm_class(AutoConfig.from_pretrained(source, **kwargs).model_type)
    except Exception as error:  # noqa: BLE001 - e.g. a GGUF file: transformers decides
        log.debug("no model class from %s: %s", source, error)
        return None


def model_class(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike | None) -> type | None:
    """``causal_lm_class`` of ``model_cfg``'s model, read from its config without loading weights (None: unknown)."""
    found = base_config(model_cfg, cache_dir)
    return causal_lm_class(found[0].get("model_type")) if found else None


ATTENTION_SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                     "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}


def attention_problem(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike | None) -> str | None:
    """Why ``model.attn_implementation`` names an implementation the model's class has no path for, or None.

    Asked up front (``mipo.stages.config``): transformers refuses it only once the weights load.
    """
    requested = str(_get(model_cfg, "attn_implementation", "auto"))
    if requested not in ATTENTION_SUPPORT:
        return None
    cls = model_class(model_cfg, cache_dir)
    if cls is None or getattr(cls, ATTENTION_SUPPORT[requested], False):
        return None
    fallback = resolve_attn_implementation("auto", torch.device("cpu"), model_class=cls)
    return (f"model.attn_implementation={requested}: {cls.__name__} has no {requested} attention; "
            f"use auto (here: {fallback}) or eager")


# --------------------------------------------------------------------------------------------
# Identity: what the reference cache and the pairs cache are keyed by.
# --------------------------------------------------------------------------------------------

def model_identity(model_cfg: Mapping[str, Any]) -> str:
    """A string that changes whenever the weights a config loads could change.

    Hub id: id and the commit its revision resolves to (``hub_commit``; the revision name
    only when no commit can be resolved, offline without a local copy). Local folder: the names, sizes and modification times of its
    files. GGUF package: package name and version and file name. Random init: the
    architecture config and seed.
    """
    if _get(model_cfg, "random_init", False):
        arch = json.dumps(_to_dict(_get(model_cfg, "config", {})), sort_keys=True)
        return f"random:{arch}:seed={_get(model_cfg, 'init_seed', 0)}:tok={_get(model_cfg, 'tokenizer', 'auto')}"
    gguf_file = _get(model_cfg, "gguf_file")
    package = _get(model_cfg, "gguf_package")
    if package:
        package_dir(package)  # a missing package gets the install hint, not a metadata error
        return f"gguf-package:{package}=={importlib.metadata.version(package.replace('_', '-'))}/{gguf_file}"
    name = str(_get(model_cfg, "name_or_path", ""))
    path = Path(name).expanduser()
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        digest = hashlib.sha256()
        for f in files:
            st = f.stat()
            digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return f"local:{path.resolve()}:{gguf_file}:{digest.hexdigest()[:16]}"
    revision = _get(model_cfg, "revision", "main")
    return f"hub:{name}@{hub_commit(name, revision) or revision}:{gguf_file}"


@functools.lru_cache(maxsize=None)
def hub_commit(repo_id: str, revision: str = "main") -> str | None:
    """The commit sha a hub model's ``revision`` (branch, tag or sha) points to, or None if unknown.

    Online: asked of the hub. Offline (``HF_HUB_OFFLINE``) or when the hub cannot be reached:
    read from the local Hugging Face cache (``refs/<revision>``), which is what
    ``from_pretrained`` would load. Caches keyed by ``@main`` would silently reuse results of
    older weights after the repository moves on; keyed by the commit, they cannot.
    """
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import HfApi, constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
        except Exception as error:  # no network, gated, unknown id: fall back to the local cache
            log.debug("could not resolve %s@%s on the hub: %s", repo_id, revision, error)
    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else None


def _to_dict(obj: Any) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(obj)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

def load_tokenizer(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike | None = None,
                   response_suffix: str = DEFAULT_RESPONSE_SUFFIX) -> PreTrainedTokenizerBase:
    """The tokenizer of a model config, with a pad token and left padding (for generation).

    Attached to it, for every later use: ``model.chat_template_kwargs`` (``mipo.data.chat.render_prompt``),
    the template's end of an assistant turn (``mipo.data.chat.turn_end``), the ids sampling stops at
    (``attach_turn_end``) and ``data.response_suffix`` (``mipo.data.encoding.encode_response``).
    """
    source, kwargs = None, {}
    if _get(model_cfg, "tokenizer") == "byte":
        tok = byte_tokenizer()
    else:
        source, kwargs = _pretrained_source(model_cfg, cache_dir)
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError(
            f"the tokenizer of model {_get(model_cfg, 'name_or_path')!r} has no chat template; "
            "MIPO formats prompts as chat messages: use an instruction-tuned model or set one")
    tok.padding_side = "left"
    setattr(tok, TEMPLATE_KWARGS_ATTRIBUTE, _to_dict(_get(model_cfg, "chat_template_kwargs", {})))
    set_response_suffix(tok, response_suffix)
    generation_eos = generation_eos_ids(model_cfg, source, kwargs)
    attach_turn_end(tok, generation_eos, str(_get(model_cfg, "name_or_path", _get(model_cfg, "name", "model"))))
    return tok


def run_tokenizer(cfg: Mapping[str, Any]) -> PreTrainedTokenizerBase:
    """The tokenizer a run scores and trains with: ``model``'s, cached under ``paths.cache_dir``, encoding
    responses as ``data.response_suffix`` says (training, the reference pass, MI scoring, evaluation)."""
    return load_tokenizer(cfg["model"], cfg["paths"]["cache_dir"],
                          response_suffix=cfg["data"].get("response_suffix", DEFAULT_RESPONSE_SUFFIX))


def generation_eos_ids(model_cfg: Mapping[str, Any], source: str | None,
                       kwargs: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The ``eos_token_id`` of the model's generation config (what ``model.generate`` stops at), or None.

    A checkpoint: its ``generation_config.json``, else its ``config.json`` (as transformers derives a
    generation config from it). A random model: ``model.config.eos_token_id`` only when the config sets
    one (the architecture's default, e.g. Llama's 2, is no token of the byte tokenizer).
    """
    if _get(model_cfg, "random_init", False):
        return eos_ids(_to_dict(_get(model_cfg, "config", {})).get("eos_token_id"))
    if source is None:
        return None
    for reader in (GenerationConfig.from_pretrained, AutoConfig.from_pretrained):
        try:
            return eos_ids(getattr(reader(source, **kwargs), "eos_token_id", None))
        except Exception as error:  # no such file in the checkpoint (or a GGUF file): try the next, else none
            log.debug("no eos_token_id from %s(%s): %s", reader.__qualname__, source, error)
    return None


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def load_model(
    model_cfg: Mapping[str, Any],
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    quantization_config: Any = None,
) -> transformers.PreTrainedModel:
    """Load the causal LM described by ``model_cfg`` onto ``device``.

    Args:
        dtype: overrides ``model_cfg.dtype`` (the reference model is always loaded in fp32).
        vocab_size: for ``random_init``, the tokenizer's size (the config's is used otherwise).
        quantization_config: QLoRA's 4-bit base (``adapters.quantization_config``). A LoRA ``<run>/adapter/``
            folder as ``name_or_path``: its base, loaded with these arguments, with the adapter merged.
    """
    if adapters.is_adapter_folder(folder := _get(model_cfg, "name_or_path")):
        return adapters.load_adapter_folder(folder, lambda base: load_model(base, device, dtype, cache_dir, vocab_size))
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if dtype is None:
        dtype = str(_get(model_cfg, "dtype", "auto"))
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    requested = str(_get(model_cfg, "attn_implementation", "auto"))
    if problem := attention_problem(model_cfg, cache_dir):
        raise ConfigError(problem)

    if _get(model_cfg, "random_init", False):
        arch = _to_dict(_get(model_cfg, "config", {}))
        model_type = arch.pop("model_type", "llama")
        attn = resolve_attn_implementation(requested, device, torch_dtype, causal_lm_class(model_type))
        if vocab_size is not None:
            arch["vocab_size"] = vocab_size
        config = AutoConfig.for_model(model_type, **arch)
        config._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(_get(model_cfg, "init_seed", 0)))
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        source, kwargs = _pretrained_source(model_cfg, cache_dir)
        attn = resolve_attn_implementation(requested, device, torch_dtype, _loaded_class(source, kwargs))
        if quantization_config is not None:  # bitsandbytes places the 4-bit weights itself (no .to below)
            kwargs.update(quantization_config=quantization_config, device_map={"": device})
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn, **kwargs)
    model.to(device) if quantization_config is None else None
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the model's embedding has "
                         f"{model.get_input_embeddings().num_embeddings}")
    return model


def enable_activation_checkpointing(model: torch.nn.Module, checkpoint_kwargs: dict | None = None) -> None:
    """Recompute each decoder layer's activations in backward (transformers' activation checkpointing).

    transformers 5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and warns
    that the old name goes in v6; the new name is used where the installed release has it. ``checkpoint_kwargs``
    go to ``torch.utils.checkpoint.checkpoint`` (e.g. ``{"use_reentrant": False}``).
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    model.config.use_cache = False


@functools.lru_cache(maxsize=None)
def _cache_argument(forward_class: type) -> str:
    import inspect

    parameters = inspect.signature(forward_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)``: ``cache`` from transformers 5.24 on (``past_key_values`` warns that it
    goes in 5.40), ``past_key_values`` for older releases and for architectures not yet moved to the new name."""
    return {_cache_argument(type(model)): cache}


def _pretrained_source(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike | None) -> tuple[str, dict]:
    """Where ``from_pretrained`` should read from, converting a GGUF checkpoint once if needed."""
    problem = model_source_problem(model_cfg)
    if problem:
        raise FileNotFoundError(problem)
    name = str(_get(model_cfg, "name_or_path", ""))
    gguf_file = _get(model_cfg, "gguf_file")
    package = _get(model_cfg, "gguf_package")
    revision = _get(model_cfg, "revision")
    kwargs: dict[str, Any] = {}
    if revision:
        kwargs["revision"] = revision
    if _get(model_cfg, "trust_remote_code", False):
        kwargs["trust_remote_code"] = True

    if package:
        name = package_dir(package)
    if gguf_file:
        if cache_dir is None:
            return name, {"gguf_file": gguf_file, **kwargs}
        return str(_converted_gguf(model_cfg, Path(name), gguf_file, Path(cache_dir))), kwargs

    if not Path(name).expanduser().exists():  # a hub id: load the commit the caches are keyed by (model_identity)
        commit = hub_commit(name, revision or "main")
        if commit:
            kwargs["revision"] = commit
    return name, kwargs


def converted_gguf_folder(model_cfg: Mapping[str, Any], gguf_file: str, cache_dir: Path) -> Path:
    """Where ``_converted_gguf`` writes (or wrote) the safetensors folder of a GGUF checkpoint."""
    key = hashlib.sha256(model_identity(model_cfg).encode()).hexdigest()[:12]
    tf_major = transformers.__version__.split(".")[0]
    return cache_dir / "models" / f"{Path(gguf_file).stem}-{key}-transformers{tf_major}"


def base_config(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike | None
                ) -> tuple[dict[str, Any], Path | None, str] | None:
    """``model_cfg``'s model config (config.json's dict), the folder holding it (None for a random model) and
    how to name it, read without loading the model, where files say: a random model's config, a local
    folder, a GGUF checkpoint's converted folder once it exists, a hub model's files in the local Hugging
    Face cache; else None."""
    name = str(_get(model_cfg, "name_or_path", ""))
    where = f"model.name_or_path={name}"
    if _get(model_cfg, "random_init", False):
        arch = _to_dict(_get(model_cfg, "config", {}))
        config = AutoConfig.for_model(arch.pop("model_type", "llama"), **arch)
        return config.to_dict(), None, f"model={_get(model_cfg, 'name', 'random')} (random_init)"
    gguf_file = _get(model_cfg, "gguf_file")
    if gguf_file:
        if cache_dir is None:
            return None
        folder = converted_gguf_folder(model_cfg, gguf_file, Path(cache_dir))
        where = f"model={_get(model_cfg, 'name', name)} (converted: {folder})"
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            config_file = try_to_load_from_cache(name, "config.json", revision=_get(model_cfg, "revision"))
        except Exception:  # noqa: BLE001 - not a hub id the local cache knows
            return None
        if not isinstance(config_file, str):
            return None
        folder = Path(config_file).parent
    try:
        return json.loads((folder / "config.json").read_text()), folder, where
    except (OSError, ValueError):
        return None


def base_description(model_cfg: Mapping[str, Any], cache_dir: str | os.PathLike) -> ModelDescription | None:
    """The architecture and vocabulary of ``model_cfg``'s model (``base_config``; a random model's vocabulary
    is the byte tokenizer's), read without loading it; None where no file says."""
    if _get(model_cfg, "random_init", False):
        byte = _get(model_cfg, "tokenizer") == "byte"
        vocabulary = byte_tokenizer().get_vocab() if byte else None
        config, _, where = base_config(model_cfg, cache_dir)
        return ModelDescription(where, config_architecture({**config, **({"vocab_size": len(vocabulary)}
                                                                          if vocabulary else {})}), vocabulary)
    found = base_config(model_cfg, cache_dir)
    return folder_description(found[1], found[2]) if found else None


def _converted_gguf(model_cfg: Mapping[str, Any], folder: Path, gguf_file: str, cache_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors folder and return that folder."""
    target = converted_gguf_folder(model_cfg, gguf_file, cache_dir)
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors under %s (once; later loads take seconds)", gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    # transformers refuses to save a GGUF-loaded model while it still carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race
            raise
    return target
