"""Small file helpers: atomic writes of files and folders, content hashes (used by every cache in
the project), JSONL reading, a lock between processes and the folder of an installed package."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mipo.runtime.errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it into place in one rename.

    Readers never see a half-written file, and a crash leaves the old file (or none).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the final file the usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success fsync it and rename it to ``path``.

    A folder at ``path`` is therefore complete: a crash or a kill while the body writes leaves
    only a hidden ``.<name>.tmp-*`` folder (removed by ``remove_stale``), never a half-written
    ``path``. An existing ``path`` is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the final folder the usual mode
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
        if path.exists():
            remove_tree(path)
        os.rename(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a folder so that a kill midway never leaves a partial folder under its name:
    it is renamed to a hidden ``.<name>.del-*`` first (``remove_stale`` sweeps leftovers)."""
    path = Path(path)
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.del-", dir=path.parent))
    os.rename(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(folder: str | os.PathLike) -> None:
    """Remove what an interrupted ``atomic_dir`` or ``remove_tree`` left in ``folder``."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(".*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in folder.glob(".*.del-*"):
            shutil.rmtree(leftover, ignore_errors=True)


class BusyError(InputError, RuntimeError):
    """Another process holds the lock: the same work is already running."""


@contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` while the body runs, or raise ``BusyError``.

    ``flock`` locks belong to the open file and are released by the kernel when the holder
    exits, however it exits (SIGKILL included), so a lock is never left stale. The file keeps
    the holder's pid for the message of the process that is refused.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BusyError(f"{what} is already running in another process (pid {holder}; lock {path}): "
                            "wait for it to finish, its result is then reused") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hash of a JSON-serialisable object, independent of dict key order."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def read_jsonl(path: str | os.PathLike[str], error_type: type[ValueError] = ValueError) -> list[tuple[str, dict]]:
    """Read a JSONL file into ``(location, row)`` pairs; blank lines are skipped.

    Raises:
        FileNotFoundError: the file does not exist.
        error_type (ValueError by default): a line is not UTF-8, not valid JSON or not a JSON
            object, or the file has no rows; the message names the file and the 1-based line number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    rows: list[tuple[str, dict]] = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path} line {line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise error_type(
                    f"{where}: bytes that are not UTF-8 ({raw[error.start:error.start + 1]!r} at byte "
                    f"{error.start + 1}); expected UTF-8 text"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise error_type(
                    f"{where}: invalid JSON ({error.msg} at column {error.colno}); "
                    "expected one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise error_type(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    if not rows:
        raise error_type(f"{path}: the file has no rows (expected one JSON object per line)")
    return rows


def installed_package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def folder_problem(path: str | os.PathLike, setting: str) -> str | None:
    """Why no folder can be at ``path`` (the override ``setting`` names it), or None.

    ``path`` is a file; a path component above it is a file; the folder it must be made in is not writable;
    a component is a literal ``~`` (a quoted path is not expanded: ``'~/runs'`` is a folder named ``~``).
    """
    path = Path(path)
    if any(part.startswith("~") for part in path.parts):
        return (f"{setting}={path} contains a literal ~ (a quoted path is not expanded, and a folder named "
                f"{path.parts[[p.startswith('~') for p in path.parts].index(True)]!r} would be made): write the "
                "path unquoted or in full")
    if path.exists() and not path.is_dir():
        return f"{setting}={path} is a file, not a folder: expected a folder (or a path where one can be made)"
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor != path and not ancestor.is_dir():
        return f"{setting}={path}: {ancestor} is a file, so no folder can be made under it"
    if ancestor != path and not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{setting}={path}: {ancestor} is not writable, so {path} cannot be made"
    return None


def file_problem(path: str | os.PathLike, setting: str, expected: str) -> str | None:
    """Why no file can be read or written at ``path`` (the override ``setting`` names it), or None.

    ``path`` is a folder; a path component above it is a file; a component is a literal ``~``. ``expected``
    says what the file holds ("a pairs JSONL file"). Whether it must exist is the reader's question.
    """
    path = Path(path)
    if any(part.startswith("~") for part in path.parts):
        return f"{setting}={path} contains a literal ~ (a quoted path is not expanded): write the path unquoted or in full"
    if path.is_dir():
        return f"{setting}={path} is a folder, not a file: expected {expected}"
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{setting}={path}: {ancestor} is a file, so {path} cannot be a file under it (expected {expected})"
    return None


def expand_home(value: Any) -> Any:
    """A path setting with a leading ``~`` expanded (``os.path.expanduser``); any other value as it is."""
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value
