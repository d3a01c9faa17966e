"""Metrics: always to ``metrics.jsonl`` in the run directory, and to wandb when enabled.

wandb defaults to ``mode=disabled`` so that nothing needs an account; ``wandb.mode=offline``
writes a run that ``wandb sync`` can upload later, ``online`` logs live.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

WANDB_MODES = ("disabled", "offline", "online")


class MetricsLogger:
    def __init__(self, output_dir: str | Path, wandb_cfg: Mapping[str, Any] | None = None,
                 run_config: Mapping[str, Any] | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self._start = time.time()
        self._wandb = None
        mode = (wandb_cfg or {}).get("mode", "disabled")
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb.mode={mode!r}; expected one of {', '.join(WANDB_MODES)}")
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), name=wandb_cfg.get("name"),
                tags=list(wandb_cfg.get("tags") or []), mode=mode, dir=str(output_dir),
                config=dict(run_config or {}),
            )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record = {"step": step, "time": round(time.time() - self._start, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(dict(metrics))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
