"""The one error type for "the input is wrong": entry points report it in one clean message, without a traceback.

Every failure a user can mend by changing their input (a config value, a pairs file, a checkpoint, a busy
cache lock, a partial sampling folder, a training step that went non-finite on their data) raises a subclass
of ``InputError``. ``mipo.stages.cli`` catches the base class: a new kind of bad input needs no change there.
"""

from __future__ import annotations


class InputError(Exception):
    """The input cannot work; the message names the file, row, field or override to change."""


class ConfigError(InputError, ValueError):
    """One or more config values that cannot work; each line names the override and what it expects."""


def raise_problems(what: str, problems: list[str]) -> None:
    """Raise one ``ConfigError`` listing ``problems`` one per line, if there are any."""
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"{what} cannot run ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")
