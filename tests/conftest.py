"""Shared test setup.

TRITON_INTERPRET must be set before any ``triton.jit`` decorator runs, so it is set here,
before the test modules (and through them ``kernels``) are imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
