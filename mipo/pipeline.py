"""sample -> train -> evaluate for one config, each stage skipped when its outputs exist."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mipo.evaluation import evaluate
from mipo.sampling import sample_pairs
from mipo.trainer import train

log = logging.getLogger(__name__)


def run_pipeline(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    output_dir = Path(output_dir)
    sample_pairs(cfg)
    summary = train(cfg, output_dir)
    return evaluate(cfg, output_dir, model_path=summary.get("model_dir"))
