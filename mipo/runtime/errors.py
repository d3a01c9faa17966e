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


def is_int(value: object) -> bool:
    """An int and not a bool (YAML's ``true`` is not a batch size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float, not a bool and not a string (``loss.beta='0.1'`` is refused with its type)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def failed(checks: list[tuple[bool, str]]) -> list[str]:
    """The messages of the checks that failed: ``[(condition, message), ...]`` -> ``[message, ...]``."""
    return [message for ok, message in checks if not ok]
