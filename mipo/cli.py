"""What every Hydra entry point shares: logging set-up and the run directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mipo.config import check_config
from mipo.files import stable_hash

log = logging.getLogger("mipo")
MAX_DIRNAME = 100


def job_dirname(overrides: list[str]) -> str:
    """A short, filesystem-safe name for a multirun job from its overrides.

    Path-valued overrides are left out (they would nest directories) and a long name is cut
    and suffixed with a hash of the full list, so it stays unique and under file-name limits.
    ``.hydra/overrides.yaml`` in the job directory always holds the full list.
    """
    kept = [o for o in overrides if not any(k in o.split("=", 1)[0] for k in ("path", "dir", "hydra."))]
    name = ",".join(kept).replace("/", "_") or "job"
    if len(name) > MAX_DIRNAME:
        name = f"{name[: MAX_DIRNAME - 9]}-{stable_hash(list(overrides), 8)}"
    return name


# Registered at import, before @hydra.main composes conf/config.yaml, which uses it for job names.
if not OmegaConf.has_resolver("mipo_job_dirname"):
    OmegaConf.register_new_resolver("mipo_job_dirname", lambda overrides: job_dirname(list(overrides)))


def run_dir() -> Path:
    """This job's output directory (``outputs/<date>/<time>`` or ``multirun/<date>/<time>/<job>``)."""
    return Path(HydraConfig.get().runtime.output_dir)


def setup(cfg: DictConfig) -> Path:
    """Check the config, quiet third-party noise, and return the run directory."""
    check_config(cfg)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    out = run_dir()
    out.mkdir(parents=True, exist_ok=True)
    # .hydra/config.yaml keeps the interpolations; this copy has every value resolved.
    OmegaConf.save(cfg, out / "config_resolved.yaml", resolve=True)
    log.info("run directory: %s", out)
    return out
