"""The results of ``make gpu-check``: one record per check, the machine they ran on, the Markdown file.

The file is rewritten after every check, so a run cut off (by the budget, or by the end of the
GPU window) still holds the checks that finished, at the top.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

import torch


@dataclass
class Result:
    """One check's outcome: ``passed`` is None while it has not run (or was not run), ``figures`` its numbers."""

    title: str
    passed: bool | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    tables: list[str] = field(default_factory=list)  # Markdown lines shown under the figures
    cut_off: bool = False  # the budget ran out while it ran

    @property
    def status(self) -> str:
        if self.passed is None:
            return "not run"
        if self.cut_off:
            return "cut off"
        return "passed" if self.passed else "FAILED"

    def attempt(self, label: str, step: Callable[[], T]) -> T | None:
        """``step()``, or None when it raises: the error becomes the figure ``label``, and the check goes on
        with its next part (a failing layout must not hide the others' figures)."""
        try:
            return step()
        except Exception as error:
            traceback.print_exc()
            self.figures[label] = f"**{one_line(error)}**"
            return None


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception as one line for a Markdown table."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:limit]}".replace("|", "\\|")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def driver_version() -> str:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it ("unknown" without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_line(device: torch.device) -> str:
    if device.type != "cuda":
        threads = torch.get_num_threads()
        cpu = platform.processor() or platform.machine()
        return f"CPU ({cpu}), {threads} thread{'s' * (threads != 1)}: the dry run"
    props = torch.cuda.get_device_properties(device)
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; driver "
            f"{driver_version()}, CUDA {torch.version.cuda}")


def software_line() -> str:
    packages = ("torch", "triton", "transformers", "liger-kernel", "hydra-core", "omegaconf", "pytest")
    return f"Python {platform.python_version()}; " + ", ".join(f"{name} {version(name)}" for name in packages)


@dataclass
class Report:
    """The results file: the run's header lines, then every check's result."""

    path: Path
    command: str
    device: torch.device
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    measured: dict[str, str] = field(default_factory=dict)  # rates measured in the run, for the header
    results: list[Result] = field(default_factory=list)

    def header(self) -> list[str]:
        dry = self.device.type != "cuda"
        lines = [f"# mipo GPU check{' (dry run: tiny sizes on CPU, not a result)' if dry else ''}", "",
                 f"`{self.command}`: {time.strftime('%Y-%m-%d %H:%M')}, budget {self.budget_s:.0f} s, "
                 f"{time.monotonic() - self.started:.0f} s so far", "",
                 f"* device: {device_line(self.device)}", f"* software: {software_line()}"]
        lines += [f"* {name}: {value}" for name, value in self.measured.items()]
        return lines

    def summary(self) -> list[str]:
        lines = ["", "## Summary", "", "| check | result | seconds | note |", "|---|---|---|---|"]
        lines += [f"| {r.title} | **{r.status}** | {r.seconds:.1f} | {r.note} |" for r in self.results]
        return lines

    def write(self) -> None:
        lines = self.header() + self.summary()
        for r in self.results:
            lines += ["", f"## {r.title}", "", f"**{r.status}** in {r.seconds:.1f} s. {r.note}".rstrip(), ""]
            if r.figures:
                lines += ["| figure | value |", "|---|---|"]
                lines += [f"| {name} | {value} |" for name, value in r.figures.items()]
            if r.tables:
                lines += [""] + r.tables
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines) + "\n")


def fmt(value: float, digits: int = 3) -> str:
    """A figure in scientific notation (small differences) or plain (everything else)."""
    return f"{value:.{digits - 1}e}" if value != 0 and abs(value) < 1e-2 else f"{value:.{digits}g}"
