"""The preference-pairs file: JSONL in the conversational format that TRL and OpenRLHF read.

One line per pair::

    {"prompt":   [{"role": "user", "content": "..."}],        # x
     "chosen":   [{"role": "assistant", "content": "..."}],   # y+ ~ pi_base(.|x)
     "rejected": [{"role": "assistant", "content": "..."}],   # y- ~ pi_base(.|x')
     "negative_prompt": [{"role": "user", "content": "..."}], # x'
     "strategy": "random", "task": "gsm8k", "uid": "gsm8k/test/17", "answer": "18",
     "chosen_finish_reason": "eos", "rejected_finish_reason": "length",
     "seed": 0, "model": "...", "sampling": {"temperature": 0.1, "top_p": 0.9, ...},
     "extra_negatives": [{"negative_prompt": [...], "negative_uid": "...", "rejected": "...",
                          "rejected_finish_reason": "eos"}, ...]}   # only with negatives.num_negatives = K > 1

``extra_negatives`` holds the K - 1 rejected responses beyond ``rejected``, each the response to
another training prompt (K distinct other prompts per pair, ``mipo.negatives.extra_sources``).

Only ``prompt``, ``chosen`` and ``rejected`` are required to train; the rest is metadata.
A ``*_finish_reason`` of ``"length"`` marks a response cut at ``max_new_tokens``: it is
trained and scored without an end-of-turn token (absent means ``"eos"``, a finished response).
``chosen``/``rejected`` may also be plain strings (TRL's "standard" format).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mipo.data.chat import Messages
from mipo.runtime.errors import InputError, is_number, type_name
from mipo.runtime.files import (
    atomic_path,
    file_problem,
    read_jsonl,
    sha256_file,
    write_json,
)

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")  # the roles a prompt message may have
DEFAULT_MAX_IDENTICAL_FRACTION = 0.5  # data.max_identical_fraction: above it, a run refuses the pairs file


@dataclass
class PreferencePair:
    prompt: Messages
    chosen: str
    rejected: str
    metadata: dict[str, Any] = field(default_factory=dict)
    where: str = field(default="", compare=False)  # where it was read: "<file> line <n>" (not written out)

    @property
    def label(self) -> str:
        """How messages name this pair: its ``uid`` metadata, else where it was read."""
        uid = self.metadata.get("uid")
        return str(uid) if uid is not None else self.where or "<pair>"

    @property
    def chosen_finished(self) -> bool:
        """False when y+ was cut at ``max_new_tokens`` instead of ending."""
        return self.metadata.get("chosen_finish_reason", "eos") != "length"

    @property
    def rejected_finished(self) -> bool:
        """False when y- was cut at ``max_new_tokens`` instead of ending."""
        return self.metadata.get("rejected_finish_reason", "eos") != "length"

    @property
    def negative_prompt(self) -> Messages:
        """x', the prompt y- answered (SAMI and InfoNCE score y+ and y- under it)."""
        value = self.metadata.get("negative_prompt")
        if value is None:
            raise PairsFileError(f"{self.where or self.label}: field 'negative_prompt' is missing; loss.loss_type=sami "
                                 "and infonce need x' (pairs written by sample.py carry it)")
        return value

    def extra_rejected(self, k: int, num_negatives: int) -> tuple[str, bool]:
        """(text, finished) of the (k + 2)-th rejected response, from ``extra_negatives[k]``."""
        extras = self.metadata.get("extra_negatives") or []
        if len(extras) < num_negatives - 1:
            raise PairsFileError(f"{self.where or self.label}: field 'extra_negatives' holds {len(extras)} responses, "
                                 f"negatives.num_negatives={num_negatives} needs {num_negatives - 1} (sample the pairs "
                                 "with the same negatives.num_negatives)")
        return extras[k]["rejected"], extras[k].get("rejected_finish_reason", "eos") != "length"

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
            **self.metadata,
        }


def truncation_summary(pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Fractions of y+ and of y- cut at ``max_new_tokens`` (``*_finish_reason == "length"``): for ``train.json``."""
    n = max(len(pairs), 1)
    return {"chosen_truncated_fraction": sum(not p.chosen_finished for p in pairs) / n,
            "rejected_truncated_fraction": sum(not p.rejected_finished for p in pairs) / n}


class PairsFileError(InputError, ValueError):
    """A pairs file that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class PairsFile:
    """A pairs file and the sha256 of its content: hashed once per run, then handed from stage to stage
    (the reference and train cache keys hold the digest, ``mipo.stages.keys``)."""

    path: Path
    sha256: str

    @classmethod
    def hashed(cls, path: str | os.PathLike) -> "PairsFile":
        return cls(Path(path), sha256_file(path))


def write_pairs(path: str | os.PathLike, pairs: Iterable[PreferencePair]) -> None:
    """Write pairs as JSONL, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")


def pairs_meta_path(path: str | os.PathLike) -> Path:
    """The sidecar of a pairs file: ``<pairs path>.meta.json`` beside it (same content-addressed name)."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def write_pairs_with_meta(path: str | os.PathLike, pairs: Iterable[PreferencePair], meta: Mapping[str, Any]) -> None:
    """Write the pairs file and its sidecar ``pairs_meta_path(path)``: ``meta`` and the pairs' ``pairs_sha256``.

    The sidecar is the record of how the pairs file came to be that does not fit one row: how many prompts
    the negative strategy was offered, kept and dropped, why, and the dropped uids (``mipo.negatives.
    NegativePlan.prompt_record``). Both files are written atomically, the sidecar first: the pairs go to a
    staging file, are hashed, the sidecar is written, and only then is the staging file renamed into place,
    so a pairs file never exists without its sidecar. A crash before that rename leaves a sidecar whose
    digest no pairs file has (``read_pairs_meta`` then ignores it).
    """
    with atomic_path(path) as staged:
        write_pairs(staged, pairs)
        write_json(pairs_meta_path(path), {**meta, "pairs_sha256": sha256_file(staged)})


def read_pairs_meta(pairs: PairsFile | str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar of a pairs file (``write_pairs_with_meta``), or None when it has none.

    Given a ``PairsFile`` (its digest computed once per run), a sidecar written for other content (a pairs
    file replaced by hand, or a re-sampling that died before its rename) is not trusted: a WARNING, and None.
    Given a path, the sidecar is read as it is. Pairs files written before the sidecar existed, and files
    set with ``data.pairs_path`` that ``sample.py`` did not write, have none.
    """
    path = pairs.path if isinstance(pairs, PairsFile) else Path(pairs)
    meta_path = pairs_meta_path(path)
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise PairsFileError(f"{meta_path}: not valid JSON ({error}); delete it or re-sample with "
                             "sampling.overwrite=true") from error
    if not isinstance(meta, dict):
        raise PairsFileError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if isinstance(pairs, PairsFile) and meta.get("pairs_sha256") != pairs.sha256:
        log.warning("%s: field 'pairs_sha256' is %r, the pairs file's is %r: this sidecar describes other pairs "
                    "and is ignored", meta_path, meta.get("pairs_sha256"), pairs.sha256)
        return None
    return meta


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Read and validate a pairs file. Raises ``PairsFileError`` naming file, line and field.

    Refused: a missing field, a prompt message whose role is not one of ``ROLES`` or a prompt without a
    user message, an empty or whitespace-only response (unless the row records that the model sampled it:
    ``<field>_finish_reason``), a ``uid`` seen on an earlier line. Pairs whose y+ equals y- are legal rows;
    how many a run accepts is ``identical_pairs_problem``'s question (``data.max_identical_fraction``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pairs file {path} does not exist (run sample.py first, or set data.pairs_path)")
    pairs, uids = [], {}
    for where, row in read_jsonl(path, error_type=PairsFileError):
        for name in REQUIRED_FIELDS:
            if name not in row:
                raise PairsFileError(f"{where}: field {name!r} is missing (expected fields {REQUIRED_FIELDS})")
        prompt = _prompt_messages(row["prompt"], where)
        chosen, rejected = (_response_text(row[name], where, name, sampled=f"{name}_finish_reason" in row)
                            for name in ("chosen", "rejected"))
        metadata = {k: v for k, v in row.items() if k not in REQUIRED_FIELDS}
        if row.get("negative_prompt") is not None:
            metadata["negative_prompt"] = _prompt_messages(row["negative_prompt"], where, "negative_prompt")
        if "extra_negatives" in row:
            _check_extra_negatives(row["extra_negatives"], where)
        uid = row.get("uid")
        if uid is not None:
            if not isinstance(uid, (str, int)) or isinstance(uid, bool):
                raise PairsFileError(f"{where}: field 'uid' must be a string or an int, got {type(uid).__name__}")
            if uid in uids:
                raise PairsFileError(f"{where}: field 'uid' is {uid!r}, the uid of line {uids[uid].rsplit(' ', 1)[-1]} "
                                     "too: expected one pair per uid (a file written twice into one, or pairs copied?)")
            uids[uid] = where
        pairs.append(PreferencePair(prompt, chosen, rejected, metadata, where=where))
    return pairs


def identical_pairs_problem(pairs: Sequence[PreferencePair], path: str | os.PathLike,
                            max_fraction: float) -> str | None:
    """Pairs whose y+ equals y- (after stripping whitespace): their DPO loss is log 2 whatever the policy,
    so they train nothing. Any such pair is logged (a WARNING with the count); more than ``max_fraction`` of
    the pairs (``data.max_identical_fraction``) is a problem, returned as one line naming the file."""
    identical = [pair for pair in pairs if pair.chosen.strip() == pair.rejected.strip()]
    if not identical:
        return None
    fraction = len(identical) / len(pairs)
    log.warning("%s: %d of %d pairs (%.0f%%) have chosen == rejected (first: %s); they add nothing to the loss",
                path, len(identical), len(pairs), 100 * fraction, identical[0].where or identical[0].label)
    if fraction <= max_fraction:
        return None
    return (f"{path}: {len(identical)} of {len(pairs)} pairs have field 'chosen' equal to field 'rejected' (first: "
            f"{identical[0].where or identical[0].label}), more than data.max_identical_fraction={max_fraction}: "
            "such pairs train nothing (their DPO loss stays log 2); re-sample them, or raise data.max_identical_fraction")


def max_identical_fraction(data: Mapping[str, Any]) -> float:
    """``data.max_identical_fraction`` (absent: ``DEFAULT_MAX_IDENTICAL_FRACTION``)."""
    return float(data.get("max_identical_fraction", DEFAULT_MAX_IDENTICAL_FRACTION))


def pairs_config_problems(data: Mapping[str, Any]) -> list[str]:
    """``data.pairs_path``: a path where a file can be (not a folder, not under a file); ``data.max_identical_fraction``:
    a number in [0, 1] (absent: the default, 0.5)."""
    pairs_path = data.get("pairs_path")
    where = file_problem(pairs_path, "data.pairs_path", "a pairs JSONL file") if isinstance(pairs_path, str) else None
    value = data.get("max_identical_fraction", DEFAULT_MAX_IDENTICAL_FRACTION)
    if is_number(value) and 0.0 <= value <= 1.0:
        return [where] if where else []
    return [*([where] if where else []),
            (f"data.max_identical_fraction={value}: expected a number in [0, 1] (the largest fraction of pairs whose "
             f"chosen equals rejected that a run accepts){'' if is_number(value) else ', got ' + type_name(value)}")]


def _check_extra_negatives(value: Any, where: str) -> None:
    if not isinstance(value, list):
        raise PairsFileError(f"{where}: field 'extra_negatives' must be a list of objects, got {type(value).__name__}")
    for i, extra in enumerate(value):
        if not isinstance(extra, dict) or not isinstance(extra.get("rejected"), str):
            raise PairsFileError(f"{where}: field 'extra_negatives'[{i}] must be an object with a string 'rejected'")


def _prompt_messages(value: Any, where: str, name: str = "prompt") -> Messages:
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise PairsFileError(f"{where}: field {name!r} must be a non-empty list of messages or a string, got {value!r:.80}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise PairsFileError(f"{where}: field {name!r}[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise PairsFileError(f"{where}: field {name!r}[{i}].role is {message['role']!r}: expected one of "
                                 f"{', '.join(ROLES)} (a chat template renders any other role as it is, or not at all)")
        if not isinstance(message["content"], str):
            raise PairsFileError(f"{where}: field {name!r}[{i}].content must be a string")
    if not any(m["content"].strip() for m in value if m["role"] == "user"):
        raise PairsFileError(f"{where}: field {name!r} is empty (expected a non-empty user message)")
    return value


def _response_text(value: Any, where: str, name: str, sampled: bool = False) -> str:
    """The text of a response field; empty only where the row records that the model sampled it (``sampled``:
    a ``<name>_finish_reason``: a model that ends its turn at once answered with nothing)."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise PairsFileError(f"{where}: field {name!r} must be a list with one assistant message")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise PairsFileError(f"{where}: field {name!r} must be a string or an assistant message, got {type(value).__name__}")
    if not value.strip() and not sampled:
        raise PairsFileError(f"{where}: field {name!r} is {'empty' if not value else 'whitespace only'} "
                             "(expected a non-empty response)")
    return value
