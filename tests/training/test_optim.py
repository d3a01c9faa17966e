"""The optimizer, its schedule and fp32 master weights for bf16 models (mipo/training/optim.py)."""

from __future__ import annotations

import pytest
import torch

from mipo.data.encoding import encode_rows, pad_batch
from mipo.model.logprobs import sequence_logps
from mipo.training.optim import (
    MasterWeightAdamW,
    build_optimizer,
    build_scheduler,
    final_weights,
)
from tests.helpers import tiny_model, tiny_tokenizer, user

TRAINER = {"lr": 5e-7, "adam_betas": [0.9, 0.95], "weight_decay": 0.0, "master_weights": "device",
           "lr_scheduler": "cosine_with_min_lr", "warmup_ratio": 0.03, "min_lr_ratio": 0.1}


def test_master_weight_adamw_is_torch_adamw_on_fp32_weights():
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(11)]
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt_ours = MasterWeightAdamW(ours, **kwargs)
    opt_theirs = torch.optim.AdamW(theirs, foreach=False, **kwargs)
    for step in range(10):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def _train(dtype: torch.dtype, master: bool, steps: int = 100):
    """``steps`` AdamW steps at lr 5e-7 raising log pi(y|x) of a fixed batch; returns (initial, final) fp32 weights."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, dtype=torch.float32)
    with torch.no_grad():  # hub checkpoints hold bf16-exact weights
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    model.to(dtype)
    rows = encode_rows(tokenizer, [user("Name a fruit."), user("What is 2+2?")], ["Apple.", "4"], 128, 64)
    batch = pad_batch(rows, tokenizer.pad_token_id)
    config = {**TRAINER, "master_weights": "device" if master else "none"}
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, MasterWeightAdamW) == (master and dtype != torch.float32)
    for _ in range(steps):
        (-sequence_logps(model, batch, kernel="torch").sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    final_weights(model, optimizer)
    final = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    return initial, final


def test_bf16_with_master_weights_follows_the_fp32_trajectory():
    w0, fp32 = _train(torch.float32, master=False)
    _, pure_bf16 = _train(torch.bfloat16, master=False)
    _, master_bf16 = _train(torch.bfloat16, master=True)
    moved = (fp32 - w0).norm()
    ratio_master = float((master_bf16 - w0).norm() / moved)
    ratio_pure = float((pure_bf16 - w0).norm() / moved)
    cosine = float(torch.nn.functional.cosine_similarity(master_bf16 - w0, fp32 - w0, dim=0))
    changed = float((pure_bf16 != w0).float().mean())
    print(f"weight movement / fp32's after 100 steps at lr 5e-7: bf16 + fp32 masters {ratio_master:.3f} "
          f"(cosine {cosine:.4f}), pure bf16 {ratio_pure:.3f} ({changed:.2%} of weights changed)")
    assert 0.9 < ratio_master < 1.1 and cosine > 0.95, (ratio_master, cosine)
    assert ratio_pure < 0.3, ratio_pure
    assert changed < 0.05


def test_cosine_with_min_lr_schedule():
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, {**TRAINER, "lr": 1.0, "warmup_ratio": 0.1}, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1.0)  # warmup from 0 over 10 steps
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and min(lrs[10:]) >= 0.1 - 1e-9  # cosine to 10% of the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("name, last", [("constant_with_warmup", 1.0), ("linear", 0.0)])
def test_other_schedules(name, last):
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(optimizer, {**TRAINER, "lr_scheduler": name, "warmup_ratio": 0.0}, total_steps=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(last)
