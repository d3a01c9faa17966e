"""Checkpoints (mipo/training/checkpoint.py): bitwise round trips through torch.distributed.checkpoint in one
process, RNG states, atomic folders (a failure or a SIGKILL while writing leaves the previous
checkpoint the newest), keeping the newest K, and refusing to resume with other inputs."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mipo.training.checkpoint import (
    CheckpointError,
    check_same_inputs,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    restore_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mipo.training.optim import build_optimizer, build_scheduler
from tests.helpers import ROOT, tiny_config, tiny_model, tiny_tokenizer

TRAINER = {"lr": 1e-3, "weight_decay": 0.01, "warmup_ratio": 0.5, "adam_betas": (0.9, 0.95),
           "lr_scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.1, "master_weights": "device"}
SMALL_TRAINER = {**TRAINER, "lr": 1e-2, "weight_decay": 0.0, "warmup_ratio": 0.0}


def make(tokenizer, tied: bool, dtype=torch.float32):
    cfg = tiny_config()
    cfg["config"]["tie_word_embeddings"] = tied
    model = tiny_model(tokenizer, cfg).to(dtype)
    model.train()
    optimizer = build_optimizer(model, TRAINER)  # bf16 weights: MasterWeightAdamW with fp32 masters
    return model, optimizer, build_scheduler(optimizer, TRAINER, total_steps=8)


def step(model, optimizer, scheduler, i):
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(i))
    loss = model(input_ids=ids, labels=ids).loss * (1 + 0.1 * torch.rand(()))  # draws from the torch RNG
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.float32),  # SmolLM2 ties embeddings
                                         (True, torch.bfloat16)])  # bf16: the fp32 masters resume too
def test_resume_from_a_checkpoint_is_bitwise(tmp_path, tied, dtype):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model, optimizer, scheduler = make(tokenizer, tied, dtype)
    for i in range(4):
        step(model, optimizer, scheduler, i)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_masters = [optimizer.state[p]["master"].clone() for p in model.parameters()] if dtype == torch.bfloat16 else []

    torch.manual_seed(0)
    model, optimizer, scheduler = make(tokenizer, tied, dtype)
    for i in range(2):
        step(model, optimizer, scheduler, i)
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"note": "loop state"})
    assert path == tmp_path / "checkpoints" / "step-2"
    assert {p.name for p in path.iterdir()} >= {".metadata", "trainer_state.json"}

    torch.manual_seed(123)  # a fresh process: other RNG states, other initial weights
    model, optimizer, scheduler = make(tokenizer, tied, dtype)
    state = read_state(path)
    assert state["step"] == 2 and state["note"] == "loop state"
    restore_checkpoint(path, state, model, optimizer, scheduler)
    assert scheduler.last_epoch == 2 and optimizer.state_dict()["state"][0]["step"].item() == 2
    for i in range(2, 4):
        step(model, optimizer, scheduler, i)
    after = model.state_dict()
    assert all(torch.equal(expected[k], after[k]) for k in expected)
    if dtype == torch.bfloat16:
        assert type(optimizer).__name__ == "MasterWeightAdamW"
        masters = [optimizer.state[p]["master"] for p in model.parameters()]
        assert all(m.dtype == torch.float32 for m in masters) and torch.equal(masters[0], expected_masters[0])
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_checkpoint_holds_the_adapters_only_and_resumes_bitwise(tmp_path, dtype):
    """With adapters the checkpoint is the trained parameters and their AdamW states, not the base (which every
    start loads as it was); restored into a fresh model with other adapter values, the run continues bitwise."""
    from torch.distributed.checkpoint import FileSystemReader

    from mipo.model.adapters import apply_lora

    lora = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear",
            "use_rslora": False, "modules_to_save": None, "load_in_4bit": False}
    tokenizer = tiny_tokenizer()

    def make_lora(seed):
        torch.manual_seed(seed)  # the adapters' A is drawn from the torch RNG
        model = apply_lora(tiny_model(tokenizer).to(dtype), lora)
        model.train()
        optimizer = build_optimizer(model, TRAINER)
        return model, optimizer, build_scheduler(optimizer, TRAINER, total_steps=8)

    model, optimizer, scheduler = make_lora(0)
    for i in range(4):
        step(model, optimizer, scheduler, i)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, optimizer, scheduler = make_lora(0)
    for i in range(2):
        step(model, optimizer, scheduler, i)
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {})
    saved = FileSystemReader(path).read_metadata().state_dict_metadata
    weights = {key.removeprefix("model.") for key in saved if key.startswith("model.")}
    assert weights == {name for name, p in model.named_parameters() if p.requires_grad}  # adapters only
    assert all(".lora_A." in key or ".lora_B." in key for key in saved if not key.startswith("optimizer.param_groups"))

    model, optimizer, scheduler = make_lora(123)  # other adapters and RNG states
    restore_checkpoint(path, read_state(path), model, optimizer, scheduler)
    for i in range(2, 4):
        step(model, optimizer, scheduler, i)
    after = model.state_dict()
    assert expected.keys() == after.keys() and all(torch.equal(expected[k], after[k]) for k in expected)


def test_every_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    model, optimizer, scheduler = make(tiny_tokenizer(), tied=False)
    for n in (2, 4, 6, 8):
        save_checkpoint(tmp_path, n, model, optimizer, scheduler, {}, keep=2)
    assert [n for n, _ in list_checkpoints(tmp_path)] == [6, 8]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-8"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-6", "step-8"]


def test_failed_write_leaves_the_previous_checkpoint_newest(tmp_path, monkeypatch):
    model, optimizer, scheduler = make(tiny_tokenizer(), tied=False)
    save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {})
    import mipo.training.checkpoint

    def fail_midway(state_dict, checkpoint_id):
        (checkpoint_id / "__0_0.distcp").write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mipo.training.checkpoint.dcp, "save", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {})
    assert [n for n, _ in list_checkpoints(tmp_path)] == [2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


KILLED_WHILE_WRITING = textwrap.dedent("""
    import os, signal, sys
    import torch
    import mipo.training.checkpoint as ckpt
    from mipo.training.optim import build_optimizer, build_scheduler
    from tests.training.test_checkpoint import SMALL_TRAINER

    run_dir = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = build_optimizer(model, SMALL_TRAINER)
    scheduler = build_scheduler(optimizer, SMALL_TRAINER, total_steps=4)
    def step():
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
    step(); step()
    ckpt.save_checkpoint(run_dir, 2, model, optimizer, scheduler, {"step_params": [p.tolist() for p in model.parameters()]})
    step(); step()
    save = ckpt.dcp.save
    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)                    # the tensors are on disk, the folder is not renamed yet
        os.kill(os.getpid(), signal.SIGKILL)
    ckpt.dcp.save = save_then_die
    ckpt.save_checkpoint(run_dir, 4, model, optimizer, scheduler, {})
""")


def test_sigkill_while_writing_leaves_the_previous_checkpoint_usable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".step-4.tmp-")]
    assert leftovers, "the process was to be killed while step-4 was being written"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-2"

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = build_optimizer(model, SMALL_TRAINER)
    scheduler = build_scheduler(optimizer, SMALL_TRAINER, total_steps=4)
    state = read_state(tmp_path / "checkpoints" / "step-2")
    restore_checkpoint(tmp_path / "checkpoints" / "step-2", state, model, optimizer, scheduler)
    assert [p.tolist() for p in model.parameters()] == state["step_params"]

    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, {})  # the next write sweeps the leftover
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_resuming_with_other_inputs_names_each_difference(tmp_path):
    saved = {"trainer": {"lr": 1e-3, "batch_size": 4}, "seed": 0, "pairs_sha256": "abc"}
    check_same_inputs(tmp_path, saved, dict(saved))
    with pytest.raises(CheckpointError) as error:
        check_same_inputs(tmp_path, saved, {"trainer": {"lr": 2e-3, "batch_size": 4}, "seed": 1, "pairs_sha256": "abc"})
    message = str(error.value)
    assert str(tmp_path) in message and "trainer.lr: 0.001 -> 0.002" in message and "seed: 0 -> 1" in message
    assert "batch_size" not in message


def test_unreadable_trainer_state_is_named(tmp_path):
    (tmp_path / "step-2").mkdir()
    (tmp_path / "step-2" / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step-2/trainer_state.json: cannot be read"):
        read_state(tmp_path / "step-2")
