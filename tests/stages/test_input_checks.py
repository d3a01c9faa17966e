"""The pieces of the inputs check (issue #23), in process: folders, model folders and the evaluated model's match
with the base, ``~`` in path settings, the resume point's word, eval.json's truncation counts, and
``describe_changes`` (what a stale ``.partial`` sampling folder's message names). The entry points' side of each
is in test_bad_inputs.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mipo.model.sources import model_folder_problem
from mipo.runtime.errors import describe_changes
from mipo.runtime.files import file_problem, folder_problem
from mipo.stages.evaluate import model_metrics
from mipo.stages.inputs import (
    evaluated_model_problems,
    expand_path_settings,
    job_resume,
    run_dir_problems,
)
from mipo.stages.train import RESUME_MUST, resume_point
from mipo.training.checkpoint import CheckpointError
from tests.helpers import (
    compose_config,
    run_entry,
    tiny_model,
    tiny_overrides,
    tiny_tokenizer,
    write_pairs_file,
)


def test_describe_changes_names_each_setting_that_differs():
    old = {"model": "hub:x@1", "sampling": {"temperature": 0.1, "top_p": 0.9}, "seed": 0, "data": {"num_train": 8}}
    new = {"model": "hub:x@1", "sampling": {"temperature": 0.7, "top_p": 0.9}, "seed": 0, "data": {"num_train": 8},
           "backend": "vllm"}
    assert describe_changes(old, new) == "sampling.temperature was 0.1, now 0.7; backend was unset, now 'vllm'"
    assert describe_changes(new, old) == "sampling.temperature was 0.7, now 0.1; backend was 'vllm', now unset"
    assert describe_changes(old, old) == ""
    many = describe_changes({f"k{i}": i for i in range(8)}, {f"k{i}": -i - 1 for i in range(8)}, limit=3)
    assert many.endswith("; and 5 more") and many.startswith("k0 was 0, now -1")


def test_folder_problem(tmp_path):
    (tmp_path / "file").write_text("")
    assert folder_problem(tmp_path / "new" / "run", "hydra.run.dir") is None
    assert folder_problem(tmp_path, "hydra.run.dir") is None
    assert "is a file, not a folder" in folder_problem(tmp_path / "file", "hydra.run.dir")
    assert f"{tmp_path / 'file'} is a file, so no folder" in folder_problem(tmp_path / "file" / "x", "paths.cache_dir")
    assert "contains a literal ~" in folder_problem(Path("~/runs/a"), "hydra.run.dir")


def test_file_problem(tmp_path):
    (tmp_path / "file").write_text("")
    assert file_problem(tmp_path / "file", "data.pairs_path", "a pairs JSONL file") is None  # exists: the reader's
    assert file_problem(tmp_path / "new" / "p.jsonl", "data.pairs_path", "a pairs JSONL file") is None  # can be made
    assert file_problem(tmp_path, "data.pairs_path", "a pairs JSONL file") == (
        f"data.pairs_path={tmp_path} is a folder, not a file: expected a pairs JSONL file")
    assert f"{tmp_path / 'file'} is a file, so" in file_problem(tmp_path / "file" / "x" / "p.jsonl", "data.pairs_path", "x")
    assert "contains a literal ~" in file_problem(Path("~/p.jsonl"), "data.pairs_path", "x")


def test_quoted_home_paths_are_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose_config(*tiny_overrides(tmp_path), "data.pairs_path='~/pairs.jsonl'", "eval.model_path='~/m'",
                         "paths.cache_dir='~/cache'")
    expand_path_settings(cfg)
    assert (cfg.data.pairs_path, cfg.eval.model_path, cfg.paths.cache_dir) == (
        str(tmp_path / "pairs.jsonl"), str(tmp_path / "m"), str(tmp_path / "cache"))
    assert cfg.data.source == "offline"  # not a path: as it was


@pytest.fixture(scope="module")
def saved_tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "model"
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_model_folders(tmp_path, saved_tiny_model):
    assert model_folder_problem(saved_tiny_model, "eval.model_path", needs_tokenizer=True) is None
    run = saved_tiny_model.parent  # a run directory, whose model/ is the model folder
    assert model_folder_problem(run, "eval.model_path").endswith(
        f"(a run directory? its model folder is one: eval.model_path={saved_tiny_model})")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert "no adapter weights" in model_folder_problem(adapter, "eval.model_path")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    assert model_folder_problem(adapter, "eval.model_path") is None  # a LoRA adapter folder is a model folder
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert model_folder_problem(bare, "model.name_or_path", needs_tokenizer=True) == (
        f"model.name_or_path={bare} holds no weights (*.safetensors or pytorch_model*.bin) and no tokenizer files "
        "(tokenizer.json or tokenizer_config.json or tokenizer.model or vocab.json): expected a model folder "
        "(config.json and weights: model.safetensors or pytorch_model.bin) or a LoRA adapter folder "
        "(adapter_config.json and adapter_model.safetensors)")


def test_the_evaluated_model_must_match_the_base_models_vocabulary_and_architecture(tmp_path, saved_tiny_model):
    cfg = compose_config(*tiny_overrides(tmp_path))
    assert evaluated_model_problems(cfg, saved_tiny_model) == []  # a model of the base's kind
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((saved_tiny_model / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 300, "num_hidden_layers": 3}))
    (other / "model.safetensors").write_bytes(b"not read")
    vocab = json.loads((saved_tiny_model / "tokenizer.json").read_text())
    vocab["model"]["vocab"] = {token: (i + 1) % len(vocab["model"]["vocab"])  # the same tokens, other ids
                               for token, i in vocab["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    (problem,) = evaluated_model_problems(cfg, other)
    assert problem.startswith(f"eval.model_path={other} is not a model of the base model's kind (model=tiny-llama")
    assert "vocab_size 300 vs 261; num_hidden_layers 3 vs 2; tokenizers of 261 tokens that map" in problem


def test_resume_true_says_when_there_is_no_checkpoint_and_must_refuses(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mipo.stages.train"):
        assert resume_point(tmp_path, {}, total_steps=4, world=1, resume=True) == (None, None)
    assert f"no checkpoint in {tmp_path / 'checkpoints'}: starting at step 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mipo.stages.train"):
        resume_point(tmp_path, {}, total_steps=4, world=1, resume=False)
    assert "no checkpoint" not in caplog.text  # a run that asked for no resume is not told
    with pytest.raises(CheckpointError, match=r"trainer.resume=must: no checkpoint in .*checkpoints"):
        resume_point(tmp_path, {}, total_steps=4, world=1, resume=RESUME_MUST)


def test_eval_metrics_count_what_the_truncation_rule_cut():
    per_prompt = {"mi": [1.0, 2.0], "mi_per_token": [0.1, 0.2], "response_tokens": [3, 4], "truncated": [0, 1],
                  "response_chars": [9, 12], "prompt_tokens_cut": [0, 17], "response_tokens_cut": [5, 2]}
    metrics = model_metrics(per_prompt)
    assert (metrics["prompts_cut"], metrics["prompt_tokens_cut"]) == (1, 17)
    assert (metrics["responses_cut"], metrics["response_tokens_cut"]) == (2, 7)
    older = {k: v for k, v in per_prompt.items() if not k.endswith("_cut")}  # a cached record of older code
    assert "prompts_cut" not in model_metrics(older)


def test_train_py_counts_and_warns_what_truncation_cut_and_says_resume_found_nothing(tmp_path):
    """Truncation is counted in train.json and warned of; trainer.resume=true in a fresh folder says it starts at 0."""
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", 4)
    run_dir = tmp_path / "run"
    proc = run_entry("train.py", ["model=tiny-llama", f"data.pairs_path={pairs}", f"paths.cache_dir={tmp_path / 'cache'}",
                                  "data.max_prompt_length=24", "data.max_length=40", "trainer.batch_size=2",
                                  "trainer.micro_batch_size=2", "trainer.max_steps=1", "trainer.save_model=false",
                                  "trainer.resume=true"], run_dir)
    summary = json.loads((run_dir / "train.json").read_text())
    assert summary["truncation_rows"] == 8 and summary["truncation_prompts_cut"] == 8  # every prompt > 24 bytes
    assert summary["truncation_prompt_tokens_cut"] > 0 and summary["truncation_responses_cut"] > 0
    assert f"no checkpoint in {run_dir / 'checkpoints'}: starting at step 0" in proc.stdout
    assert f"[WARNING] - training on {pairs}: the truncation rule cut 8 of 8 prompts" in proc.stdout


def test_a_submitit_job_continues_its_own_training(tmp_path, monkeypatch, caplog):
    """In a submitit job, trainer.resume=false reads as true (a requeued job finds its own checkpoints); elsewhere,
    with overwrite=true, or with resume=must it is left as given. A finished run is still refused."""
    run = tmp_path / "job"
    (run / "checkpoints" / "step-00000003").mkdir(parents=True)
    (run / "checkpoints" / "step-00000003" / "state.pt").write_bytes(b"x")
    (run / "metrics.jsonl").write_text("{}\n")

    def resume(*overrides: str, env: bool = True):
        cfg = compose_config(*tiny_overrides(tmp_path), *overrides)
        if env:
            monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        else:
            monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
        job_resume(cfg, run)
        return cfg

    assert resume(env=False).trainer.resume is False
    assert "trainer.resume=true to continue" in run_dir_problems(resume(env=False), "train", run)[0]
    with caplog.at_level(logging.INFO, logger="mipo.stages.inputs"):
        cfg = resume()
    assert cfg.trainer.resume is True and run_dir_problems(cfg, "train", run) == []
    assert any("continues its own run directory" in r.getMessage() for r in caplog.records)
    assert resume("overwrite=true").trainer.resume is False
    assert resume("trainer.resume=must").trainer.resume == RESUME_MUST
    (run / "train.json").write_text("{}")
    assert "holds a finished run" in run_dir_problems(resume(), "train", run)[0]
