"""Step 0 is exact by construction: log pi_ref is the training forward itself, before the first update.

At step 0 DPO's policy and reference are the same model, so every implicit reward is 0 and the loss is
log 2. The reference pass (``mipo.stages.reference.ReferencePass``) runs the policy's own forward (same
module and wrapping, same layout, attention, kernel and autocast), so that holds in every configuration,
not only where two code paths happen to agree. These runs use bf16 autocast on CPU, where any second path
(another layout, another attention, FSDP2's bf16 parameters) moves the log-probs by 1e-3 to 1e-1, and all
share one cache directory, so a cache written by one forward must never be read by another.

The torchrun half (DDP and FSDP2 on 2 gloo ranks) is slow: ``make dist-cpu``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mipo.data.pairs import PairsFile
from mipo.stages.train import setup as setup_training  # as `setup`, pytest 8.0 calls it before the tests
from mipo.stages.train import train
from mipo.training import parallel
from tests.helpers import compose_config, write_pairs_file

TOLERANCE = 2e-5
LAYOUTS = {"tree": ["trainer.share_prompt=auto"], "rows": ["trainer.share_prompt=false"],
           "dense": ["trainer.share_prompt=true", "trainer.shared_attention=dense"]}


def step1_overrides(pairs: Path, cache: Path, autocast: str = "bfloat16", model: str = "tiny-llama",
                    batch_size: int = 8) -> list[str]:
    """One step of ``batch_size`` pairs (micro-batches of 2) at lr 1e-9: the step-1 metrics are step 0's."""
    return [f"model={model}", f"data.pairs_path={pairs}", f"paths.cache_dir={cache}", f"trainer.autocast={autocast}",
            f"trainer.batch_size={batch_size}", "trainer.micro_batch_size=2", "trainer.lr=1e-9", "trainer.max_steps=1",
            "trainer.warmup_ratio=0", "trainer.save_model=false", "data.max_length=256", "data.max_prompt_length=128"]


def step1_metrics(run_dir: Path) -> dict[str, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[0])


def assert_step0(metrics: dict[str, float], what: str) -> None:
    assert metrics["train/loss"] == pytest.approx(math.log(2), abs=TOLERANCE), (what, metrics)
    assert abs(metrics["train/reward_chosen"]) <= TOLERANCE, (what, metrics)
    assert abs(metrics["train/reward_rejected"]) <= TOLERANCE, (what, metrics)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs_file(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 16)


def test_step_1_is_log_2_in_every_layout_with_bf16_autocast(tmp_path: Path, pairs: Path) -> None:
    cache = tmp_path / "cache"  # one cache for all: each forward must get its own reference file
    for name, layout in LAYOUTS.items():
        summary = train(compose_config(*step1_overrides(pairs, cache), *layout), tmp_path / name, PairsFile.hashed(pairs))
        assert summary["reference_cache_hit"] is False, name  # no layout reads another's log-probs
        assert_step0(step1_metrics(tmp_path / name), name)
    assert len(list((cache / "reference").glob("*.pt"))) == len(LAYOUTS)
    again = train(compose_config(*step1_overrides(pairs, cache)), tmp_path / "again", PairsFile.hashed(pairs))
    assert again["reference_cache_hit"] is True
    assert_step0(step1_metrics(tmp_path / "again"), "tree, from the cache")


@pytest.mark.parametrize("layout", ["tree", "rows"])
def test_every_pair_has_reward_0_at_step_0(tmp_path: Path, pairs: Path, layout: str) -> None:
    """Not only the batch means: each pair's step-0 log pi is its log pi_ref, bit for bit. The rows layout pads a
    micro-batch to its longest row, which moves bf16 log-probs by up to ~1e-4 nats: the reference is scored in
    the micro-batches the first epoch trains (``training_micro_batches``), not in file order."""
    cfg = compose_config(*step1_overrides(pairs, tmp_path / "cache"), *LAYOUTS[layout], "trainer.micro_batch_size=4")
    run = setup_training(cfg, tmp_path / "run", PairsFile.hashed(pairs))
    reference = run.data.reference.stacked()  # (N, 2), scored in file order, 2 pairs per forward
    order = [i for batch in run.state.order for i in batch]  # shuffled: other micro-batches than the reference's
    assert order != sorted(order)
    for start in range(0, len(order), 4):
        index = order[start : start + 4]
        batch = run.model.forward.collate_rows(run.data.rows, index, run.data.reference, run.data.pad_token_id,
                                               "sigmoid").to("cpu")
        logps = run.model.forward.logps(batch).float()  # (4, 2)
        torch.testing.assert_close(logps, reference[index], atol=0, rtol=0)  # the same forward on the same rows


def test_the_reference_key_is_the_resolved_forward(tmp_path: Path, pairs: Path) -> None:
    cfg = compose_config(*step1_overrides(pairs, tmp_path / "cache"))
    run = setup_training(cfg, tmp_path / "run", PairsFile.hashed(pairs))
    stored = torch.load(run.data.reference.path, weights_only=True)["inputs"]["forward"]
    assert len(stored.pop("micro_batches")) == 16  # the hash of the micro-batches the pairs were scored in
    assert stored == {"weights": "float32", "layout": "prompt_tree", "attention": "mipo_segments", "kernel": "torch", "fused_lm_head": True,
                      "autocast": "bfloat16", "parameters": "as stored", "device_type": "cpu", "adapters": None}
    assert '"auto"' not in json.dumps(stored)  # every setting as it resolved
    identity = parallel.ParallelForward(run.model.forward.inner, run.model.policy, run.model.forward.module, "fsdp",
                                        torch.bfloat16).identity()
    assert identity["parameters"] == "bfloat16"  # FSDP2's bf16 all-gather is another forward: another key


@pytest.mark.slow
def test_step_1_is_log_2_under_ddp_and_fsdp_with_bf16(tmp_path: Path, pairs: Path) -> None:
    """2 gloo ranks (``make dist-cpu``), bf16 autocast, one cache with the one-process run's file in it. FSDP2
    all-gathers the parameters in bf16: its forward is another one, so it computes (and keys) its own."""
    from tests.training.test_distributed import torchrun

    cache = tmp_path / "cache"
    from_one = train(compose_config(*step1_overrides(pairs, cache)), tmp_path / "single", PairsFile.hashed(pairs))
    assert_step0(step1_metrics(tmp_path / "single"), "single")
    for strategy, hit in (("ddp", True), ("fsdp", False)):
        proc = torchrun("train.py", [*step1_overrides(pairs, cache), f"trainer.strategy={strategy}"], tmp_path / strategy)
        assert ("reference cache hit" in proc.stdout) is hit, (strategy, proc.stdout[-3000:])
        assert_step0(step1_metrics(tmp_path / strategy), strategy)
        summary = json.loads((tmp_path / strategy / "train.json").read_text())
        assert (summary["reference_cache"] == from_one["reference_cache"]) is hit


# --------------------------------------------------------------------------------------------
# Every architecture of the gate's list (tests/model/test_architectures.py)
# --------------------------------------------------------------------------------------------

def with_architecture(cfg, name: str):
    """``cfg`` with the tiny random model of family ``name`` (its vocabulary: the byte tokenizer's)."""
    from omegaconf import OmegaConf, open_dict

    from tests.model.test_architectures import ARCHITECTURES

    model_type, overrides, _ = ARCHITECTURES[name]
    arch = {k: v for k, v in overrides.items() if k != "vocab_size"}  # the byte tokenizer's, set by load_model
    with open_dict(cfg):
        cfg.model.config = OmegaConf.create({"model_type": model_type, **arch, "max_position_embeddings": 512}
                                            if model_type != "bloom" else {"model_type": model_type, **arch})
        if model_type in ("gemma2", "bloom"):
            cfg.model.attn_implementation = "eager"  # no sdpa attention for these in transformers
    return cfg


ARCHITECTURE_NAMES = ["mistral", "qwen2", "gemma2", "gemma3", "phi3", "gpt_neox", "bloom"]


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_step_1_is_log_2_for_every_architecture(tmp_path: Path, pairs: Path, name: str) -> None:
    """bf16 autocast, ``share_prompt=auto``: the tree where it is exact, plain rows where it is not (window,
    softcapping, ALiBi), and in both cases the reference is the forward that trains."""
    cfg = with_architecture(compose_config(*step1_overrides(pairs, tmp_path / "cache")), name)
    train(cfg, tmp_path / "run", PairsFile.hashed(pairs))
    assert_step0(step1_metrics(tmp_path / "run"), name)


def test_a_sliding_window_model_trains_with_auto_as_with_rows(tmp_path: Path, pairs: Path) -> None:
    """Mistral with a window of 6 tokens on ~60-token rows: ``auto`` must not run the tree (it would attend
    past the window); 3 fp32 steps at lr 1e-3 end at the weights of ``share_prompt=false``."""
    from tests.helpers import load_weights

    weights = {}
    for share in ("auto", "false"):
        overrides = [*step1_overrides(pairs, tmp_path / "cache", autocast="none"), "trainer.max_steps=3",
                     "trainer.lr=1e-3", "trainer.batch_size=4", "trainer.save_model=true",
                     f"trainer.share_prompt={share}"]
        train(with_architecture(compose_config(*overrides), "mistral"), tmp_path / share, PairsFile.hashed(pairs))
        weights[share] = load_weights(tmp_path / share / "model")
    initial_moved = False
    for key, value in weights["false"].items():
        torch.testing.assert_close(weights["auto"][key], value, atol=1e-5, rtol=0)
        initial_moved |= bool(value.abs().sum() > 0)
    assert initial_moved
