"""The evaluation stage on a tiny random Llama: precision of the evaluated models, the MI label."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import mipo.evaluation as evaluation
from mipo.config import task_splits
from mipo.models import load_model, load_tokenizer

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def tiny_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=[
            "model=tiny-llama", "task=arc_challenge", "data.source=offline", "data.num_train=4", "data.num_eval=4",
            "data.max_length=768", "data.max_prompt_length=700", "eval.max_new_tokens=4", "eval.mi_k=2",
            "eval.batch_size=4", "eval.score_batch_size=8", "device=cpu", f"paths.cache_dir={tmp_path / 'cache'}",
            *overrides])


def test_trained_update_survives_evaluation_even_with_bf16_model_dtype(tmp_path, monkeypatch):
    # model.dtype=bfloat16 is what `auto` means on a GPU; the evaluated policy must still be the trained weights
    cfg = tiny_cfg(tmp_path, "model.dtype=bfloat16")
    tokenizer = load_tokenizer(cfg.model)
    trained = load_model(cfg.model, device="cpu", dtype=torch.float32, vocab_size=len(tokenizer))
    with torch.no_grad():
        for p in trained.parameters():  # bf16-exact base weights plus an update below half a bf16 step
            p.copy_(p.to(torch.bfloat16).float() + 1e-7)
    trained.save_pretrained(tmp_path / "trained")
    saved = {k: v.clone() for k, v in trained.state_dict().items()}

    evaluated = {}
    real_generate = evaluation.generate

    def spy(model, *args, desc=None, **kwargs):
        evaluated[desc] = {k: v.clone() for k, v in model.state_dict().items()}
        return real_generate(model, *args, desc=None, **kwargs)

    monkeypatch.setattr(evaluation, "generate", spy)
    results = evaluation.evaluate(cfg, tmp_path / "out", model_path=tmp_path / "trained")
    state = evaluated["eval: trained model responses"]
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], saved[k]) for k in saved)
    assert results["precision"]["generation"] == "float32"
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["precision"]["mi_reference"] == "float32"


def test_mi_label_comes_from_the_alternatives_used(tmp_path):
    rows = [{"question": f"Question number {i}?", "answer": str(i), "memories": [f"I like {i}."]} for i in range(6)]
    rows[3]["memories"] = []  # one user without a context: no context-swapped alternatives for every row
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg(tmp_path, "task=persistbench", "task.name=jsonl", f"data.source={data}",
                   "+task.options.context_field=memories",
                   "data.num_train=0", "data.num_eval=6")
    _, examples = task_splits(cfg)
    assert examples[0].context is not None  # the old rule, read off the first example, would say "conditional"
    results = evaluation.evaluate(cfg, tmp_path / "out")
    assert results["mi"] == "pmi(x; y)"


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_half_precision_evaluation_is_an_explicit_logged_choice(tmp_path, dtype, caplog):
    cfg = tiny_cfg(tmp_path, f"eval.dtype={dtype}")
    with caplog.at_level("WARNING"):
        assert evaluation.eval_dtype(cfg) == torch.bfloat16
    assert "round small trained updates away" in caplog.text
