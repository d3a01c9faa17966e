"""LoRA end to end: every objective trains adapters, a killed LoRA run resumes bitwise from its small checkpoint,
DDP and FSDP2 on 2 gloo ranks end with one process's adapters (slow), iterative MIPO's next round starts from
the merged model (slow), and ``evaluate.py`` takes the adapter folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mipo.data.pairs import PairsFile
from mipo.stages.train import train
from tests.helpers import (
    compose_config,
    entry_command,
    load_weights,
    run_entry,
    tiny_overrides,
    write_pairs_file,
)
from tests.stages.test_resume import STEPS, TRAIN, kill_after_step_4, metrics
from tests.stages.test_variants import write_variant_pairs

LORA = ["lora=default", "lora.rank=4", "lora.alpha=8"]


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


OBJECTIVES = {  # name -> overrides: every row of the objective table, K = 2 negatives, and the unshared layout
    "dpo": [], "ipo": ["loss=ipo"], "hinge": ["loss=hinge"], "cdpo": ["loss=cdpo"], "sft": ["loss=sft"],
    "simpo": ["loss=simpo"], "sami": ["loss=sami"], "infonce": ["loss=infonce"],
    "dpo_k2": ["negatives.num_negatives=2"], "dpo_rows": ["trainer.share_prompt=false"],
    "dpo_checkpointing": ["model.gradient_checkpointing=true"],
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_trains_adapters(tmp_path: Path, name: str) -> None:
    pairs = write_variant_pairs(tmp_path / "pairs.jsonl")
    cfg = compose_config(*tiny_overrides(tmp_path), f"data.pairs_path={pairs}", *LORA, *OBJECTIVES[name])
    summary = train(cfg, tmp_path / "run", PairsFile.hashed(pairs))
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == [1, 2] and all(math.isfinite(m["train/loss"]) for m in history)
    if name.startswith("dpo"):
        assert history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # the base is the reference
    b_weights = [v for k, v in adapter_weights(tmp_path / "run").items() if "lora_B" in k]
    assert b_weights and max(v.abs().max().item() for v in b_weights) > 0  # B left 0: the adapters trained
    assert Path(summary["adapter_dir"]).is_dir() and (tmp_path / "run" / "model" / "model.safetensors").is_file()


@pytest.mark.slow  # ~55 s: two entry-point runs and a resume
def test_sigkill_then_resume_with_adapters_is_bitwise(tmp_path: Path) -> None:
    """As tests/stages/test_resume.py, with adapters: the checkpoint holds the adapters and their AdamW states only
    (a fraction of the full-weight checkpoint), and the resumed run ends with the uninterrupted run's adapter,
    merged model and metrics, bit for bit."""
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", 16)
    overrides = [*TRAIN, *LORA, f"data.pairs_path={pairs}", f"paths.cache_dir={tmp_path / 'cache'}"]
    run_entry("train.py", overrides, tmp_path / "uninterrupted")
    checkpointed = [*overrides, "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2"]
    run_dir = tmp_path / "killed"
    kill_after_step_4(entry_command("train.py", checkpointed, run_dir), run_dir / "checkpoints")
    resumed = run_entry("train.py", [*checkpointed, "trainer.resume=true"], run_dir)
    assert "resuming from" in resumed.stdout
    for folder in ("adapter", "model"):
        expected = (adapter_weights if folder == "adapter" else lambda d: load_weights(d / "model"))(
            tmp_path / "uninterrupted")
        got = (adapter_weights if folder == "adapter" else lambda d: load_weights(d / "model"))(run_dir)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), folder
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert metrics(run_dir) == metrics(tmp_path / "uninterrupted")
    checkpoint = run_dir / "checkpoints" / f"step-{STEPS}" / "__0_0.distcp"
    full_weights = (tmp_path / "uninterrupted" / "model" / "model.safetensors").stat().st_size
    assert checkpoint.stat().st_size < full_weights  # adapters + moments < the model alone (full: 3x the model)


@pytest.mark.slow  # ~45 s: a training run and two evaluations
def test_evaluate_takes_the_adapter_folder(tmp_path: Path) -> None:
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", 8)
    overrides = [*tiny_overrides(tmp_path), f"data.pairs_path={pairs}", *LORA, "trainer.max_steps=1"]
    run_entry("train.py", overrides, tmp_path / "run")
    for folder in ("adapter", "model"):
        run_entry("evaluate.py", [*overrides, f"eval.model_path={tmp_path / 'run' / folder}", "eval.identity=false",
                                  "eval.diversity=false"], tmp_path / f"eval-{folder}")
    results = [json.loads((tmp_path / f"eval-{f}" / "eval.json").read_text())["models"]["trained"]
               for f in ("adapter", "model")]
    assert results[0]["mi_mean"] == pytest.approx(results[1]["mi_mean"], abs=1e-4)


# --------------------------------------------------------------------------------------------
# slow: torchrun on 2 gloo ranks, and iterative MIPO
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_and_fsdp_with_adapters_end_with_the_single_process_adapters(tmp_path: Path) -> None:
    from tests.training.test_distributed import torchrun, train_overrides

    run_entry("train.py", [*train_overrides(tmp_path, "cache-single"), *LORA], tmp_path / "single")
    single, single_merged = adapter_weights(tmp_path / "single"), load_weights(tmp_path / "single" / "model")
    assert max(v.abs().max().item() for k, v in single.items() if "lora_B" in k) > 1e-4  # the adapters moved
    for name, strategy, extra in (("ddp", "ddp", []), ("fsdp", "fsdp", []),
                                  ("fsdp-gc", "fsdp", ["model.gradient_checkpointing=true"])):
        run_dir = tmp_path / name
        torchrun("train.py", [*train_overrides(tmp_path, f"cache-{name}"), *LORA, f"trainer.strategy={strategy}",
                              "trainer.checkpoint_every=1", *extra], run_dir)
        for got, expected in ((adapter_weights(run_dir), single), (load_weights(run_dir / "model"), single_merged)):
            assert got.keys() == expected.keys(), name
            for key, value in expected.items():
                torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0)
        first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
        assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5), name


@pytest.mark.slow
def test_iterative_mipo_with_adapters_starts_each_round_from_the_merged_model(tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tmp_path), *LORA, "rounds=2", "trainer.max_steps=1", "eval.identity=false",
                 "eval.diversity=false"]
    run_entry("pipeline.py", overrides, tmp_path / "run")
    rounds = json.loads((tmp_path / "run" / "rounds.json").read_text())["per_round"]
    first_model = Path(rounds[0]["model_dir"])
    assert rounds[1]["sampled_and_reference_by"] == str(first_model.resolve())
    # round 1's model/ is the merged model (a plain Hugging Face folder), its adapter beside it
    assert (first_model / "model.safetensors").is_file() and not (first_model / "adapter_config.json").exists()
    assert (first_model.parent / "adapter" / "adapter_config.json").is_file()
    second = [json.loads(line) for line in (tmp_path / "run" / "round-2" / "metrics.jsonl").read_text().splitlines()]
    assert second[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # fresh adapters on round 1's merged policy
