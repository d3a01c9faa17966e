"""Shared test setup.

TRITON_INTERPRET must be set before any ``triton.jit`` decorator runs, so it is set here,
before the test modules (and through them ``kernels``) are imported. OMP_NUM_THREADS=1 (unless
set) is read when torch is imported, here and in the entry points the tests run: the tiny test
models gain nothing from more threads, and on busy shared cores spinning threads make each step
up to a hundred times slower.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
