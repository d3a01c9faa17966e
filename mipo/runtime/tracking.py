"""Metrics: always to ``metrics.jsonl`` in the run directory, and to wandb when enabled.

wandb defaults to ``mode=disabled`` so that nothing needs an account; ``wandb.mode=offline``
writes a run that ``wandb sync`` can upload later, ``online`` logs live.

A resumed run continues the file where its checkpoint left it: ``position()`` (stored in the
checkpoint) is the file's length and the elapsed time after the checkpoint's step, and a logger
given ``resume=position`` cuts off whatever steps were logged after it, so every step is in
``metrics.jsonl`` exactly once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from mipo.runtime.errors import failed

WANDB_MODES = ("disabled", "offline", "online")


class MetricsLogger:
    """``metrics.jsonl`` (a new file, or with ``resume`` the file cut back to that position) and wandb."""

    def __init__(self, output_dir: str | Path, wandb_cfg: Mapping[str, Any] | None = None,
                 run_config: Mapping[str, Any] | None = None, resume: Mapping[str, Any] | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = (wandb_cfg or {}).get("mode", "disabled")
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb.mode={mode!r}; expected one of {', '.join(WANDB_MODES)}")
        self._start = time.time() - (resume["elapsed"] if resume else 0.0)
        if resume:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size < resume["bytes"]:
                raise ValueError(f"{self.path} has {size} bytes but the checkpoint logged {resume['bytes']}: "
                                 "the file was changed since; start again with overwrite=true")
            self._file = open(self.path, "r+")
            self._file.truncate(resume["bytes"])
            self._file.seek(resume["bytes"])
        else:
            self._file = open(self.path, "w")
        self._wandb = None
        if mode != "disabled":
            import wandb

            run_id = resume.get("wandb_id") if resume else None
            self._wandb = wandb.init(
                project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), name=wandb_cfg.get("name"),
                tags=list(wandb_cfg.get("tags") or []), mode=mode, dir=str(output_dir),
                config=dict(run_config or {}), id=run_id, resume="allow" if run_id else None,
            )

    def position(self) -> dict[str, Any]:
        """Where the log stands, flushed to disk: what a checkpoint stores to resume it."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return {"bytes": self._file.tell(), "elapsed": time.time() - self._start,
                "wandb_id": self._wandb.id if self._wandb is not None else None}

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


def wandb_problems(wandb: Mapping[str, Any]) -> list[str]:
    return failed([(wandb["mode"] in WANDB_MODES, f"wandb.mode={wandb['mode']!r}: expected one of {', '.join(WANDB_MODES)}")])
