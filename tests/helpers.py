"""Shared helpers for the unit tests: a tiny random Llama with the built-in byte tokenizer.

Import from test modules with ``from tests.helpers import ...`` (pytest runs with the
repository root on ``sys.path``; see ``[tool.pytest.ini_options] pythonpath``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from mipo.models import load_model, load_tokenizer

TINY_CONFIG: dict[str, Any] = {
    "random_init": True,
    "tokenizer": "byte",
    "config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    },
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A deep copy of the tiny model config with top-level keys overridden."""
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg.update(overrides)
    return cfg


def tiny_tokenizer():
    return load_tokenizer({"tokenizer": "byte", "random_init": True})


def tiny_model(tokenizer, cfg: dict[str, Any] | None = None, dtype: torch.dtype | None = None):
    return load_model(cfg or TINY_CONFIG, device="cpu", dtype=dtype, vocab_size=len(tokenizer))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]
