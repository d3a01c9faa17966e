"""Bad input gets a clear error, and nothing is lost.

Every case runs an entry point as a subprocess, exactly as a user would. Each must exit non-zero
with a message naming the file and line, or the field or override, and what was expected; it must
fail in the inputs check (before any model loads and before the run directory gets a
``config_resolved.yaml``); and the inputs, the caches and an earlier run's outputs must be byte for
byte what they were (hashed before and after).

To keep the suite fast, several cases share a process: config values in one single run (the
check reports every problem at once), and files and data as the jobs of one Hydra multirun per
entry point (each job fails on its own and prints its own message).
"""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest
import torch

import mipo.stages.reference
from mipo.data.pairs import PairsFile
from mipo.stages.cli import reported_errors
from mipo.stages.keys import pairs_key
from mipo.stages.train import train
from tests.helpers import (
    ROOT,
    compose_config,
    entry_command,
    entry_env,
    run_entry,
    tiny_overrides,
    tree_hashes,
    write_pairs_file,
)

GOOD = {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": "4", "rejected": "5", "uid": "a"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs, a cache and an earlier run's outputs, all of which the failed runs must leave alone."""
    root = tmp_path_factory.mktemp("world")
    inputs, cache = root / "inputs", root / "cache"
    inputs.mkdir()
    line = json.dumps(GOOD)
    files = {
        "invalid_json": f'{line}\n{{"prompt": "hi", "chosen": "a"\n',
        "missing_field": f'{line}\n{json.dumps({"prompt": "hi", "chosen": "a"})}\n',
        "empty": "",
        "empty_prompt": f'{line}\n{json.dumps({**GOOD, "prompt": [{"role": "user", "content": "  "}]})}\n',
        "non_string_response": f'{json.dumps({**GOOD, "chosen": 42})}\n',
        "too_few": f"{line}\n",
    }
    for name, text in files.items():
        (inputs / f"{name}.jsonl").write_text(text)
    (inputs / "not_utf8.jsonl").write_bytes(f"{line}\n{line}\n".encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    arc_row = {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide"], "answer": "B"}
    other = {"question": "What melts ice?", "choices": ["heat", "cold"], "answer": "A"}
    third = {"question": "What do bees make?", "choices": ["honey", "milk"], "answer": "A"}
    (inputs / "arc_with_duplicates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (arc_row, arc_row, other, third)))
    write_pairs_file(cache / "pairs" / "earlier.jsonl", 8)
    write_mistakes(inputs)
    (cache / "reference").mkdir()
    (cache / "reference" / "earlier.pt").write_bytes(b"an earlier reference cache")
    earlier = root / "earlier_run"
    (earlier / ".hydra").mkdir(parents=True)
    (earlier / ".hydra" / "overrides.yaml").write_text("- loss.beta=0.1\n")
    (earlier / "train.json").write_text('{"steps": 2}\n')
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (earlier / "model").mkdir()
    (earlier / "model" / "config.json").write_text("{}\n")
    return {"root": root, "inputs": inputs, "cache": cache, "earlier": earlier}


def write_mistakes(inputs: Path) -> None:
    """What a new user gets wrong (issue #23): pairs files that read but would train on something else than meant,
    model folders that are not models of the base's kind, a file where a folder goes."""
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": f"Answer {i}.",
             "rejected": f"Something else {i}.", "uid": f"q{i}"} for i in range(8)]
    mistakes = {
        "usr_role": {2: {"prompt": [{"role": "usr", "content": "Question 2?"}]}},
        "empty_chosen": {1: {"chosen": ""}},
        "blank_rejected": {4: {"rejected": [{"role": "assistant", "content": "  \n "}]}},
        "duplicate_uid": {5: {"uid": "q0"}},
        "identical": {i: {"rejected": f"Answer {i}."} for i in range(6)},  # 6 of 8 pairs: y+ == y-
    }
    for name, changes in mistakes.items():
        text = "".join(json.dumps({**row, **changes.get(i, {})}) + "\n" for i, row in enumerate(rows))
        (inputs / f"{name}.jsonl").write_text(text)
    models = inputs / "models"
    for name, files in {"no_weights": {"config.json": '{"model_type": "llama"}'},
                        "no_config": {"model.safetensors": "weights"},
                        "other_kind": {"config.json": '{"model_type": "gpt2", "vocab_size": 50257}',
                                       "model.safetensors": "weights"},
                        "lora_adapter": {"adapter_config.json": "{}", "adapter_model.safetensors": "weights"}}.items():
        (models / name).mkdir(parents=True)
        for file, text in files.items():
            (models / name / file).write_text(text)
    (models / "weights.safetensors").write_text("weights")  # a file where a folder goes
    (inputs / "a_file").write_text("a file where a folder goes\n")


def base_overrides(world) -> list[str]:
    return tiny_overrides(world["root"])  # paths.cache_dir = <root>/cache


def fails_cleanly(world, script: str, overrides: list[str], run_dir: Path | None = None,
                  sweep_dir: Path | None = None, home: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` (a single run in ``run_dir``, or a multirun in ``sweep_dir``; with ``HOME=home`` where
    given) expecting the inputs check to refuse it; checks that nothing was touched."""
    watched = (world["inputs"], world["cache"], world["earlier"])
    before = tree_hashes(*watched)
    if sweep_dir is not None:
        overrides = ["-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    if home is None:
        proc = run_entry(script, overrides, run_dir, expect_ok=False, merge_stderr=False)
    else:
        proc = subprocess.run(entry_command(script, overrides, run_dir), cwd=ROOT, env={**entry_env(), "HOME": str(home)},
                              capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert tree_hashes(*watched) == before
    out = run_dir if run_dir is not None else sweep_dir
    assert not list(out.rglob("config_resolved.yaml")), "the run got past the inputs check"
    for sign_of_work in ("reference cache", "training on", "sampling y+", "eval: "):
        assert sign_of_work not in proc.stdout + proc.stderr
    return proc


def job_errors(proc: subprocess.CompletedProcess, script: str) -> list[str]:
    """The message each job of a multirun printed, in job order."""
    return [part.strip() for part in proc.stderr.split(f"{script}: error: ")[1:]]


def test_config_values_are_all_reported_at_once_through_train_py(world):
    cases = {  # override(s) -> what the message must say
        "loss.beta=0": "loss: beta must be > 0, got 0",
        "trainer.lr=-1e-05": "trainer.lr=-1e-05: expected a learning rate > 0",
        "trainer.batch_size=5 trainer.micro_batch_size=2":
            "trainer.batch_size=5 must be a multiple of trainer.micro_batch_size=2",
        "data.max_prompt_length=512 data.max_length=512":
            "data.max_prompt_length=512 must be < data.max_length=512",
        "loss.loss_type=kto": "loss: unknown loss_type 'kto'; expected one of ('sigmoid', 'ipo', 'hinge', 'sft', 'simpo', 'sami', 'infonce')",
        "data.num_train=-1": "data.num_train=-1: expected null (all) or an int >= 0",
        "negatives=random_context": "negatives=random_context needs a personalization task whose prompts carry a "
                                    "user context; task 'arc_challenge' has none",
        "model.random_init=false model.name_or_path=./no/such/model":
            "model.name_or_path='./no/such/model': no such file or directory",
        "trainer.checkpoint_every=0": "trainer.checkpoint_every=0: expected null or an int > 0",
        "trainer.weight_decay=-0.1": "trainer.weight_decay=-0.1: expected a number >= 0",
        # shipped as ${model.gradient_checkpointing}: the kind of what it reads
        "trainer.gradient_checkpointing=maybe": "trainer.gradient_checkpointing=maybe: expected true or false, got the "
                                                "string 'maybe'",
    }
    overrides = [o for case in cases for o in case.split()]
    proc = fails_cleanly(world, "train.py", [*base_overrides(world), *overrides], world["root"] / "run-config")
    assert proc.returncode == 1
    assert f"the config cannot run ({len(cases)} problems)" in proc.stderr
    for message in cases.values():
        assert message in proc.stderr, message
    # the message comes last, one line per problem, with no traceback
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("train.py: error: the config cannot run") and len(lines) == len(cases) + 1
    assert "Traceback" not in proc.stderr + proc.stdout


def test_pairs_files_name_file_line_and_field(world):
    inputs = world["inputs"]
    cases = {
        "invalid_json": "line 2: invalid JSON (Expecting ',' delimiter at column 31); expected one JSON object per line",
        "missing_field": "line 2: field 'rejected' is missing (expected fields ('prompt', 'chosen', 'rejected'))",
        "empty": ": the file has no rows (expected one JSON object per line)",
        "not_utf8": "line 3: bytes that are not UTF-8 (b'\\xe9' at byte 16); expected UTF-8 text",
        "empty_prompt": "line 2: field 'prompt' is empty (expected a non-empty user message)",
        "non_string_response": "line 1: field 'chosen' must be a string or an assistant message, got int",
        "too_few": "holds 1 pairs, fewer than one batch (trainer.batch_size=4): expected at least 4",
        "no_such_file": "no such file (expected a pairs JSONL file)",
    }
    paths = ",".join(str(inputs / f"{name}.jsonl") for name in cases)
    proc = fails_cleanly(world, "train.py", [*base_overrides(world), f"data.pairs_path={paths}"],
                         sweep_dir=world["root"] / "sweep-pairs")
    errors = job_errors(proc, "train.py")
    assert len(errors) == len(cases), proc.stderr[-3000:]
    for (name, message), error in zip(cases.items(), errors):
        assert f"{inputs / name}.jsonl" in error and message in error, (name, error)


def test_data_and_method_problems_through_sample_py(world):
    cases = {
        "data.num_train=100000": "data.num_train=100000, data.num_eval=6: load_splits: num_train=100000 but only "
                                 "1166 arc_challenge examples are available from source 'offline' for it",
        "data.num_train=1": "negatives=random on 1 training prompts (data.num_train=1): a derangement needs at least "
                            "2 distinct prompts, got 1",
        "trainer.lr=0": "trainer.lr=0: expected a learning rate > 0",
    }
    proc = fails_cleanly(world, "sample.py", [*base_overrides(world), "data.num_train=100000,1"],
                         sweep_dir=world["root"] / "sweep-sample")
    errors = job_errors(proc, "sample.py")
    assert len(errors) == 2 and cases["data.num_train=100000"] in errors[0] and cases["data.num_train=1"] in errors[1]
    single = fails_cleanly(world, "sample.py", [*base_overrides(world), "trainer.lr=0"], run_dir=world["root"] / "run-lr0")
    assert cases["trainer.lr=0"] in single.stderr


def test_evaluation_problems_through_evaluate_py(world):
    data = world["inputs"] / "arc_with_duplicates.jsonl"
    proc = fails_cleanly(world, "evaluate.py", [
        *base_overrides(world), f"data.source={data}", "data.num_train=0", "data.num_eval=4",
        "eval.mi_k=3", "eval.model_path=null,./no/such/model"], sweep_dir=world["root"] / "sweep-eval")
    errors = job_errors(proc, "evaluate.py")
    # 4 rows, 2 of them the same question: 3 distinct prompts, so at most 2 others per row
    mi_k = "eval.mi_k=3: the 4 evaluation prompts give a row at most 2 other distinct prompts for the MI marginal " \
           "(data.num_eval=4): expected eval.mi_k <= 2"
    model = "eval.model_path=./no/such/model does not exist: expected a trained model folder"
    assert len(errors) == 2, proc.stderr[-3000:]
    assert mi_k in errors[0] and model not in errors[0]
    assert mi_k in errors[1] and model in errors[1]


def test_pipeline_checks_its_stages_up_front(world):
    proc = fails_cleanly(world, "pipeline.py", [*base_overrides(world), "trainer.save_model=false", "data.num_eval=3",
                                                "eval.mi_k=2", "data.num_train=100000"], world["root"] / "run-pipeline")
    assert "pipeline.py: error: these inputs cannot run (2 problems)" in proc.stderr
    assert "trainer.save_model=false: pipeline.py evaluates the trained model" in proc.stderr
    assert "data.num_train=100000, data.num_eval=3: load_splits: num_train=100000" in proc.stderr


@pytest.mark.parametrize("override, message", [
    ("task=no_such_task", "Could not find 'task/no_such_task'"),
    ("model=no_such_model", "Could not find 'model/no_such_model'"),
])
def test_unknown_config_group_options_are_hydras_message(world, override, message):
    proc = fails_cleanly(world, "train.py", [*base_overrides(world), override], world["root"] / "run-group")
    assert message in proc.stderr + proc.stdout and "Available options" in proc.stderr + proc.stdout


def test_a_finished_run_is_never_overwritten(world):
    earlier = world["earlier"]
    proc = fails_cleanly(world, "train.py", [*base_overrides(world), f"data.pairs_path={world['cache'] / 'pairs' / 'earlier.jsonl'}"],
                         earlier)
    assert proc.stderr.strip() == (
        f"train.py: error: these inputs cannot run (1 problem):\n  - hydra.run.dir={earlier} holds the "
        "outputs of an earlier run (train.json, metrics.jsonl, model), which are never overwritten: choose another "
        "hydra.run.dir, or add overwrite=true to replace them")
    # refused before Hydra wrote into it: the earlier run's .hydra/ and log are untouched, no new file appeared
    assert sorted(p.name for p in earlier.iterdir()) == [".hydra", "metrics.jsonl", "model", "train.json"]


def test_full_disk_while_writing_the_reference_cache_leaves_no_partial_file(tmp_path, monkeypatch):
    pairs_file = write_pairs_file(tmp_path / "pairs.jsonl", 4)
    before = tree_hashes(pairs_file)
    cfg = compose_config("model=tiny-llama", f"data.pairs_path={pairs_file}", f"paths.cache_dir={tmp_path / 'cache'}",
                         "data.max_length=256", "data.max_prompt_length=128", "trainer.batch_size=2",
                         "trainer.micro_batch_size=2")
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)  # the bytes reach the temporary file...
        with open(path, "r+b") as f:
            f.truncate(100)  # ...until the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(mipo.stages.reference.torch, "save", disk_full)
    with pytest.raises(OSError) as error:
        train(cfg, tmp_path / "run", PairsFile.hashed(pairs_file))
    assert error.value.errno == errno.ENOSPC
    assert list((tmp_path / "cache" / "reference").iterdir()) == []  # no partial file, no temporary file
    assert tree_hashes(pairs_file) == before
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # the entry points report it as a one-line message and exit 1
    with pytest.raises(SystemExit) as exit_:
        with reported_errors("train"):
            raise error.value
    assert exit_.value.code == 1


def test_reported_errors_keep_the_traceback_with_hydra_full_error(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(OSError):
        with reported_errors("train"):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    with pytest.raises(KeyError):  # a bug is never reduced to a one-line message
        with reported_errors("train"):
            raise KeyError("bug")


def test_partial_samples_of_other_inputs_are_reported_cleanly_by_sample_py(tmp_path):
    """A ``.partial`` sampling folder written for other inputs: one clean line naming the file and field, exit 1,
    the folder untouched. (Every InputError subclass reaches the entry points' one error path.)"""
    pairs = tmp_path / "pairs.jsonl"
    partial = pairs.with_name(pairs.name + ".partial")
    partial.mkdir()
    overrides = [*tiny_overrides(tmp_path), f"data.pairs_path={pairs}"]
    from mipo.stages.sample import ChunkStore

    ChunkStore(partial, pairs_key(compose_config(*overrides, "sampling.temperature=0.7")), {}).open()  # another run's
    before = tree_hashes(partial)
    proc = run_entry("sample.py", overrides, tmp_path / "run", expect_ok=False, merge_stderr=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"sample.py: error: {partial / 'meta.json'}: these partial samples were written for "
                                "other settings (sampling.temperature was 0.7, now "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert tree_hashes(partial) == before and not pairs.exists()


# --------------------------------------------------------------------------------------------
# Issue #23: the mistakes of a new user, each class through an entry point, several cases per process
# --------------------------------------------------------------------------------------------

def assert_clean(proc: subprocess.CompletedProcess) -> None:
    """Exit status 1 and the messages alone: no traceback, also from a multirun's failed jobs."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr and "Error executing job" not in proc.stdout + proc.stderr


def test_wrong_types_devices_folders_and_ignored_loss_settings_through_train_py(world):
    """No traceback for a device this machine lacks or a cache folder that is a file; a quoted number is named by
    its type; a loss setting the loss ignores is refused. One multirun: a job per device."""
    cache_file = world["inputs"] / "a_file"
    overrides = [o for o in base_overrides(world) if not o.startswith("paths.cache_dir=")]
    proc = fails_cleanly(world, "train.py", [
        *overrides, f"paths.cache_dir={cache_file}", "loss=simpo", "loss.beta='2.0'", "+loss.label_smoothing=0.1",
        "trainer.lr=abc", "data.max_identical_fraction=2", "device=gpu,cuda:99"], sweep_dir=world["root"] / "sweep-types")
    errors = job_errors(proc, "train.py")
    assert len(errors) == 2, proc.stderr[-3000:]
    common = [
        "loss.beta='2.0': expected a number, got the string '2.0' (quotes make a value a string: write loss.beta=2.0",
        "trainer.lr=abc: expected a number, got the string 'abc'",
        f"paths.cache_dir={cache_file} is a file, not a folder",
        ("loss.label_smoothing=0.1: loss.loss_type=simpo does not use label_smoothing (its settings: beta, gamma, "
        "length_normalize)"),
        "data.max_identical_fraction=2: expected a number in [0, 1]",
    ]
    for error, device in zip(errors, ("device=gpu: not a device; expected auto, cpu, cuda or cuda:<index>",
                                      "device=cuda:99: ")):
        assert error.startswith("the config cannot run (6 problems)"), error
        for message in [*common, device]:
            assert f"  - {message}" in error, message
        assert "SimPO's reward scale" not in error and "expected a learning rate" not in error  # type named once
    assert_clean(proc)


def test_pairs_that_would_train_on_the_wrong_thing_through_train_py(world):
    """A role the template does not know, an empty or blank response, a uid twice, mostly y+ == y-: refused with
    file, line and field. The paths are quoted ``~`` paths (HOME is the test's root): expanded, not missing."""
    names = ("usr_role", "empty_chosen", "blank_rejected", "duplicate_uid", "identical")
    swept = ",".join(f"'~/inputs/{name}.jsonl'" for name in names)
    proc = fails_cleanly(world, "train.py", [*base_overrides(world), f"data.pairs_path={swept}"],
                         sweep_dir=world["root"] / "sweep-pairs", home=world["root"])
    inputs = world["inputs"]
    expected = [
        f"{inputs / 'usr_role.jsonl'} line 3: field 'prompt'[0].role is 'usr': expected one of system, user, assistant",
        f"{inputs / 'empty_chosen.jsonl'} line 2: field 'chosen' is empty (expected a non-empty response)",
        f"{inputs / 'blank_rejected.jsonl'} line 5: field 'rejected' is whitespace only",
        f"{inputs / 'duplicate_uid.jsonl'} line 6: field 'uid' is 'q0', the uid of line 1 too: expected one pair per uid",
        (f"{inputs / 'identical.jsonl'}: 6 of 8 pairs have field 'chosen' equal to field 'rejected' (first: "
        f"{inputs / 'identical.jsonl'} line 1), more than data.max_identical_fraction=0.5"),
    ]
    errors = job_errors(proc, "train.py")
    assert len(errors) == len(names), proc.stderr[-3000:]
    for error, message in zip(errors, expected):
        assert error.startswith("these inputs cannot run (1 problem)") and message in error, (message, error)
    assert "6 of 8 pairs (75%) have chosen == rejected" in proc.stdout + proc.stderr  # the WARNING with the count
    assert "no such file" not in proc.stderr
    assert_clean(proc)


def test_evaluated_model_folders_through_evaluate_py(world):
    """eval.model_path without weights or config.json, of another architecture and vocabulary, or a file: refused
    up front, naming both models and what differs. A LoRA adapter folder is a model folder."""
    data, models = world["inputs"] / "arc_with_duplicates.jsonl", world["inputs"] / "models"
    folders = ("no_weights", "no_config", "other_kind", "lora_adapter", "weights.safetensors")
    proc = fails_cleanly(world, "evaluate.py", [
        *base_overrides(world), f"data.source={data}", "data.num_train=0", "data.num_eval=4", "eval.mi_k=3",
        f"eval.model_path={','.join(str(models / f) for f in folders)}"], sweep_dir=world["root"] / "sweep-models")
    errors = job_errors(proc, "evaluate.py")
    assert len(errors) == len(folders), proc.stderr[-3000:]
    expected = [f"eval.model_path={models / 'no_weights'} holds no weights (*.safetensors or pytorch_model*.bin)",
                f"eval.model_path={models / 'no_config'} holds no config.json",
                (f"eval.model_path={models / 'other_kind'} is not a model of the base model's kind (model=tiny-llama "
                "(random_init)): model_type 'gpt2' vs 'llama'; vocab_size 50257 vs 261 (evaluated vs base)"),
                None,  # the adapter folder: only the eval.mi_k problem every job has
                f"eval.model_path={models / 'weights.safetensors'} is a file, not a folder"]
    for error, message in zip(errors, expected):
        assert "eval.mi_k=3: the 4 evaluation prompts" in error
        assert (message in error) if message else ("eval.model_path" not in error), error
    assert_clean(proc)


def test_pipeline_refuses_fewer_pairs_than_one_batch_before_sampling(world):
    proc = fails_cleanly(world, "pipeline.py", [*base_overrides(world), "data.num_train=3", "negatives=random,partial"],
                         sweep_dir=world["root"] / "sweep-small")
    errors = job_errors(proc, "pipeline.py")
    assert len(errors) == 2, proc.stderr[-3000:]
    for error in errors:
        assert "data.num_train=3: 3 training prompts" in error and "fewer than one batch (trainer.batch_size=4)" in error
    assert_clean(proc)


def test_a_run_directory_that_is_a_file_through_train_py(world):
    run_file = world["inputs"] / "a_file"
    proc = fails_cleanly(world, "train.py", [*base_overrides(world), f"data.pairs_path={world['cache'] / 'pairs' / 'earlier.jsonl'}"],
                         run_file)
    assert_clean(proc)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"  - hydra.run.dir={run_file} is a file, not a folder: expected a folder (or a path where one can be made)")


def test_resume_must_without_a_checkpoint_through_train_py(world):
    fresh = world["root"] / "fresh-run"
    proc = fails_cleanly(world, "train.py", [*base_overrides(world), f"data.pairs_path={world['cache'] / 'pairs' / 'earlier.jsonl'}",
                                            "trainer.resume=must"], fresh)
    assert_clean(proc)
    assert f"trainer.resume=must: no checkpoint in {fresh / 'checkpoints'} (hydra.run.dir={fresh})" in proc.stderr
    assert not fresh.exists()  # refused before Hydra made the folder


def test_an_attention_the_model_class_lacks_through_train_py(world):
    """``model.attn_implementation=sdpa`` on a class without an SDPA path (Bloom: ALiBi) is refused
    up front, naming the class and what ``auto`` picks there; transformers would refuse it only while loading."""
    proc = fails_cleanly(world, "train.py", [*base_overrides(world), f"data.pairs_path={world['cache'] / 'pairs' / 'earlier.jsonl'}",
                                            "model.config.model_type=bloom", "model.attn_implementation=sdpa"],
                         world["root"] / "bloom-sdpa")
    assert_clean(proc)
    assert proc.stderr.strip().splitlines()[-1] == (
        "  - model.attn_implementation=sdpa: BloomForCausalLM has no sdpa attention; use auto (here: eager) or eager")


def test_pairs_paths_where_no_file_can_be_through_sample_py(world):
    """data.pairs_path naming a folder, or a path under a file: refused up front (sampling would have run first and
    failed at the write); one job each."""
    folder, under_a_file = world["inputs"] / "models", world["inputs"] / "a_file" / "pairs.jsonl"
    proc = fails_cleanly(world, "sample.py", [*base_overrides(world), f"data.pairs_path={folder},{under_a_file}"],
                         sweep_dir=world["root"] / "sweep-pairs-paths")
    errors = job_errors(proc, "sample.py")
    assert len(errors) == 2, proc.stderr[-3000:]
    assert f"  - data.pairs_path={folder} is a folder, not a file: expected a pairs JSONL file" in errors[0]
    assert (f"  - data.pairs_path={under_a_file}: {world['inputs'] / 'a_file'} is a file, so {under_a_file} cannot be "
            "a file under it (expected a pairs JSONL file)") in errors[1]
    assert_clean(proc)


def test_lora_target_modules_the_model_lacks_through_train_py(world, tmp_path):
    """A module name the model does not have: one line naming the model's linear layers (peft raised a traceback).
    Known only once the model is built, so the run directory exists; nothing is trained or written beside it."""
    pytest.importorskip("peft")
    run = tmp_path / "lora-run"
    before = tree_hashes(world["inputs"], world["cache"], world["earlier"])
    proc = run_entry("train.py", [*base_overrides(world), f"data.pairs_path={world['cache'] / 'pairs' / 'earlier.jsonl'}",
                                  "lora=default", "lora.target_modules=[qkv_proj]"], run, expect_ok=False,
                     merge_stderr=False)
    assert_clean(proc)
    assert proc.stderr.strip().splitlines()[-1] == (
        "train.py: error: lora.target_modules=['qkv_proj']: no such module in LlamaForCausalLM; its linear layers: "
        "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or all-linear)")
    assert tree_hashes(world["inputs"], world["cache"], world["earlier"]) == before
    assert not (run / "model").exists() and not (run / "train.json").exists()
