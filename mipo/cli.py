"""What every Hydra entry point shares: logging set-up and the run directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger("mipo")


def run_dir() -> Path:
    """This job's output directory (``outputs/<date>/<time>`` or ``multirun/<date>/<time>/<job>``)."""
    return Path(HydraConfig.get().runtime.output_dir)


def setup(cfg: DictConfig) -> Path:
    """Quiet third-party noise, default wandb to no account, and return the run directory."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    out = run_dir()
    log.info("run directory: %s", out)
    return out
