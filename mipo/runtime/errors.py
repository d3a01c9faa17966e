"""The one error type for "the input is wrong": entry points report it in one clean message, without a traceback.

Every failure a user can mend by changing their input (a config value, a pairs file, a checkpoint, a busy
cache lock, a partial sampling folder, a training step that went non-finite on their data) raises a subclass
of ``InputError``. ``mipo.stages.cli`` catches the base class: a new kind of bad input needs no change there.
"""

from __future__ import annotations

from collections.abc import Mapping


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


def type_name(value: object) -> str:
    """How a message names a value's type: ``the string '0.1'``, ``the int 4``, ``a list``, ``null``."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (bool, int, float)):
        return f"the {type(value).__name__} {value}"
    return f"a {type(value).__name__}"


def flatten_settings(tree: object, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other values are leaves (settings compared key by key:
    ``describe_changes``, a checkpoint against its run, ``mipo.training.checkpoint.check_same_inputs``)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat.update(flatten_settings(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _shown(value: object, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_changes(old: dict, new: dict, limit: int = 5) -> str:
    """What differs between two nested settings dicts, one clause per setting, in one line.

    ``describe_changes({"sampling": {"top_p": 0.9}}, {"sampling": {"top_p": 0.8}})`` ->
    ``"sampling.top_p was 0.9, now 0.8"``. A setting present on one side only is "added" or
    "removed"; after ``limit`` clauses the rest are counted. Empty when nothing differs.
    """
    before, after = flatten_settings(old), flatten_settings(new)
    clauses = []
    for key in [*before, *(k for k in after if k not in before)]:
        if key not in after:
            clauses.append(f"{key} was {_shown(before[key])}, now unset")
        elif key not in before:
            clauses.append(f"{key} was unset, now {_shown(after[key])}")
        elif before[key] != after[key]:
            clauses.append(f"{key} was {_shown(before[key])}, now {_shown(after[key])}")
    if len(clauses) > limit:
        clauses = [*clauses[:limit], f"and {len(clauses) - limit} more"]
    return "; ".join(clauses)
