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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from mipo.data.chat import Messages
from mipo.runtime.errors import InputError
from mipo.runtime.files import atomic_path, read_jsonl, sha256_file

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


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


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    """Read and validate a pairs file. Raises ``PairsFileError`` naming file, line and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pairs file {path} does not exist (run sample.py first, or set data.pairs_path)")
    pairs = []
    for where, row in read_jsonl(path, error_type=PairsFileError):
        for name in REQUIRED_FIELDS:
            if name not in row:
                raise PairsFileError(f"{where}: field {name!r} is missing (expected fields {REQUIRED_FIELDS})")
        prompt = _prompt_messages(row["prompt"], where)
        chosen = _response_text(row["chosen"], where, "chosen")
        rejected = _response_text(row["rejected"], where, "rejected")
        metadata = {k: v for k, v in row.items() if k not in REQUIRED_FIELDS}
        if row.get("negative_prompt") is not None:
            metadata["negative_prompt"] = _prompt_messages(row["negative_prompt"], where, "negative_prompt")
        if "extra_negatives" in row:
            _check_extra_negatives(row["extra_negatives"], where)
        pairs.append(PreferencePair(prompt, chosen, rejected, metadata, where=where))
    return pairs


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
        if not isinstance(message["content"], str):
            raise PairsFileError(f"{where}: field {name!r}[{i}].content must be a string")
    if not any(m["content"].strip() for m in value if m["role"] != "assistant"):
        raise PairsFileError(f"{where}: field {name!r} is empty (expected a non-empty user message)")
    return value


def _response_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise PairsFileError(f"{where}: field {name!r} must be a list with one assistant message")
        value = value[0].get("content")
    if not isinstance(value, str):
        raise PairsFileError(f"{where}: field {name!r} must be a string or an assistant message, got {type(value).__name__}")
    return value
