"""Shared helpers for the unit tests: a tiny random Llama with the built-in byte tokenizer.

Import from test modules with ``from tests.helpers import ...`` (pytest runs with the
repository root on ``sys.path``; see ``[tool.pytest.ini_options] pythonpath``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from hydra import compose, initialize_config_dir

from mipo.data.chat import Messages
from mipo.data.encoding import EncodedRow
from mipo.model.loading import load_model, load_tokenizer
from mipo.model.prompt_tree import PromptGroup, group_by_prompt

if TYPE_CHECKING:  # imported where used: they pull in segment attention (~1 s), which most tests never need
    from mipo.training.forward import ContinuationBatch, ReferenceLogps

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG: dict[str, Any] = {
    "random_init": True,
    "tokenizer": "byte",
    "config": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    },
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A deep copy of the tiny model config with top-level keys overridden."""
    cfg = copy.deepcopy(TINY_CONFIG)
    cfg.update(overrides)
    return cfg


def tiny_tokenizer():
    return load_tokenizer({"tokenizer": "byte", "random_init": True})


def tiny_model(tokenizer, cfg: dict[str, Any] | None = None, dtype: torch.dtype | None = None):
    return load_model(cfg or TINY_CONFIG, device="cpu", dtype=dtype, vocab_size=len(tokenizer))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------------
# Shortcuts the tests use: one-off scoring, prompt groups, DPO micro-batches
# --------------------------------------------------------------------------------------------

def score_responses(model: torch.nn.Module, tokenizer, prompts: Sequence[Messages], responses: Sequence[str],
                    desc: str | None = "scoring", **settings: Any) -> torch.Tensor:
    """``Scorer(model, tokenizer, ScoringSettings(**settings)).score(prompts, responses)``: for one-off scoring calls.

    ``settings``: ``Scorer``'s fields (``batch_size``, ``max_length``, ``max_prompt_length``, ``kernel``,
    ``share_prompts``, ...), its defaults otherwise.
    """
    from mipo.model.logprobs import Scorer, ScoringSettings

    return Scorer(model, tokenizer, ScoringSettings(**settings)).score(prompts, responses, desc=desc)


def group_rows(rows_per_continuation: Sequence[Sequence[EncodedRow]]) -> list[PromptGroup]:
    """Group i: the prompt of ``rows[i]`` with the responses of every row list at i, in list order.

    ``group_rows([chosen_rows, rejected_rows])`` gives DPO's (x, [y+, y-]) groups. The rows of a
    group must share their (truncated) prompt (``mipo.model.prompt_tree.group_by_prompt`` gives them
    one group): ``encode_pair`` cuts a prompt independently of its response, so rows of one prompt
    always do.
    """
    groups = []
    for rows in zip(*rows_per_continuation, strict=True):
        prompt_groups, _ = group_by_prompt(rows)
        if len(prompt_groups) != 1:
            raise ValueError("rows grouped under one prompt have different prompt ids; encode them with "
                             "mipo.data.encoding.encode_rows/encode_pairs, which cut a prompt the same way for every response")
        groups.append(prompt_groups[0])
    return groups


def collate_pairs(chosen_rows: Sequence[EncodedRow], rejected_rows: Sequence[EncodedRow], index: Sequence[int],
                  reference: ReferenceLogps, pad_token_id: int, share_prompt: bool = True) -> ContinuationBatch:
    """DPO's micro-batch: the pairs ``index`` as prompts with two continuations (y+, y-)."""
    from mipo.training.forward import collate_groups

    reference_logps = torch.stack([reference.chosen, reference.rejected], dim=1)  # (N, 2)
    return collate_groups([chosen_rows, rejected_rows], index, reference_logps, pad_token_id, share_prompt)


def single_forward(model: torch.nn.Module, share_prompt: Any = "auto", autocast: torch.dtype | None = None,
                   kernel: str = "torch", fused_lm_head: bool = True):
    """The trainer's forward of ``model`` in one process (``parallel.wrap`` with ``single``), as the reference
    pass and the training step call it."""
    from mipo.training import parallel
    from mipo.training.forward import TrainingForward

    settings = {"trainer": {"share_prompt": share_prompt, "shared_attention": "auto"}, "kernel": kernel,
                "fused_lm_head": fused_lm_head}
    return parallel.wrap(model, TrainingForward.prepare(settings, model, autocast), "single", torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# The entry points and their config
# --------------------------------------------------------------------------------------------

def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides for a fast run of any entry point on the tiny model and offline ARC-Challenge."""
    return [
        "model=tiny-llama", "task=arc_challenge", "data.source=offline",
        "data.num_train=8", "data.num_eval=6", "data.max_length=768", "data.max_prompt_length=700",
        "sampling.max_new_tokens=12", "sampling.batch_size=8",
        "eval.max_new_tokens=12", "eval.mi_k=2", "eval.batch_size=6", "eval.score_batch_size=6",
        "trainer.batch_size=4", "trainer.micro_batch_size=2", "trainer.lr=1e-3",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]


def entry_env() -> dict[str, str]:
    """The environment of an entry point run by a test (offline; one thread, from conftest.py)."""
    return {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HYDRA_FULL_ERROR": "0"}


def entry_command(script: str, overrides: list[str], run_dir: Path | None = None) -> list[str]:
    return [sys.executable, str(ROOT / script), *overrides, *([f"hydra.run.dir={run_dir}"] if run_dir else [])]


def run_entry(script: str, overrides: list[str], run_dir: Path | None, expect_ok: bool = True,
              merge_stderr: bool = True) -> subprocess.CompletedProcess:
    """Run an entry point; ``stdout`` of the result holds its stdout and stderr (Hydra logs to stdout)
    unless ``merge_stderr=False``."""
    proc = subprocess.run(
        entry_command(script, overrides, run_dir), cwd=ROOT, env=entry_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, text=True, timeout=300,
    )
    if expect_ok:
        assert proc.returncode == 0 and "Error executing job" not in proc.stdout, \
            proc.stdout[-3000:] + (proc.stderr or "")[-3000:]
    return proc


def compose_config(*overrides: str):
    """``conf/config.yaml`` composed with ``overrides``, as an entry point sees it (without Hydra's run)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def write_pairs_file(path: Path, n: int, uids: bool = True) -> Path:
    """``n`` distinct synthetic preference pairs (short, so the tiny model trains them fast)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {3 * i}?"}],
                   "chosen": [{"role": "assistant", "content": f"It is {4 * i}. " * (1 + i % 3)}],
                   "rejected": [{"role": "assistant", "content": f"Something about topic {(7 * i) % n}."}]}
            if uids:
                row["uid"] = f"q{i}"
            f.write(json.dumps(row) + "\n")
    return path


def tree_hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under ``roots``: compare before and after."""
    hashes = {}
    for root in roots:
        for p in sorted([root, *root.rglob("*")] if root.is_dir() else [root]):
            if p.is_symlink():
                hashes[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                hashes[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                hashes[str(p)] = "dir"
    return hashes


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")
