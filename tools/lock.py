"""The lock files: what `make demo`, `make test` and `make bench` install, exactly.

    python tools/lock.py freeze > requirements.lock      # the current environment, one `name==version` a line
    python tools/lock.py diff requirements.lock          # which installed versions differ from a lock

`make lock` (and `make lock-bench`) build a fresh environment from pyproject.toml's ranges, torch pinned
first, and freeze it; `make test-latest` runs the suite on the newest releases and prints `diff` against the
lock. The lock is for CPython 3.11 on Linux x86-64 (this project's machines); on another platform install
from pyproject's ranges (`pip install -e .[test]`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

# Not part of a lock: the project itself and the installer's own tools.
SKIP = {"mipo", "pip", "setuptools", "wheel"}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{normalized name: version} of every distribution in this environment, less ``SKIP``."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in SKIP:
            found[normalize(name)] = dist.version
    return found


def public_version(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: a local label names the build, and ``==2.13.0`` matches it (PEP 440)."""
    return version.split("+", 1)[0]


def read_lock(path: str | Path) -> dict[str, str]:
    """{normalized name: version} of a lock file; comments and blank lines skipped."""
    pins = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"{path}:{number}: expected `name==version`, got {line!r}")
        pins[normalize(name.strip())] = version.strip()
    return pins


def freeze() -> str:
    lines = [
        "# Every package that `make demo` and `make test` install, at the versions the suite and the demo ran on.",
        "# Written by `make lock` (python tools/lock.py freeze); installed with --no-deps after torch (Makefile).",
        f"# CPython {sys.version_info.major}.{sys.version_info.minor}, Linux x86-64.",
    ]
    lines += [f"{name}=={public_version(version)}" for name, version in sorted(installed().items())]
    return "\n".join(lines) + "\n"


def diff(lock: dict[str, str], current: dict[str, str]) -> list[str]:
    """One line per package whose version differs from the lock, or that only one side has."""
    lines = []
    for name in sorted(set(lock) | set(current)):
        locked, now = lock.get(name), current.get(name)
        now = public_version(now) if now else None
        if locked != now:
            lines.append(f"{name}: {locked or '(not in lock)'} -> {now or '(not installed)'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("freeze", help="print this environment as a lock")
    compare = sub.add_parser("diff", help="print the installed versions that differ from a lock")
    compare.add_argument("lock")
    args = parser.parse_args(argv)
    if args.command == "freeze":
        sys.stdout.write(freeze())
        return 0
    lines = diff(read_lock(args.lock), installed())
    print(f"{len(lines)} package(s) differ from {args.lock}" + (":" if lines else ""))
    for line in lines:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
