"""Training, reference scoring and sampling under torchrun on CPU (gloo), against one process.

The torchrun tests (``@pytest.mark.slow``, ``make dist-cpu``) launch the real entry points
with ``torchrun --standalone --nproc_per_node=2`` on the tiny random Llama, in fp32:

* DDP and FSDP2 runs (FSDP2 also with tied embeddings and gradient checkpointing) end with
  the weights of a single-process run with the same global batch
  (within 1e-5), log the same metrics, and build the same reference cache (same file name,
  same numbers);
* an FSDP2 run resumed on 2 ranks from a checkpoint ends with the uninterrupted run's weights
  and metrics; a checkpoint written by 2 ranks is refused by a run with 1;
* ``sample.py`` on 2 ranks writes the pairs file 1 rank writes, byte for byte;
* ``generate()`` and ``Scorer`` (what evaluation runs) give the one-process responses and log-probs.

The default suite keeps what runs in one process: the batch split, the world-size refusal,
the helpers' one-process behaviour, and the vLLM backend's mapping of prompts and sampling
settings through a stand-in for its engine (vllm is not installed here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mipo.model.generation import (
    DecodeSettings,
    Generation,
    PlanSettings,
    plan_generation,
    row_seed,
)
from mipo.model.loading import load_model
from mipo.model.vllm_backend import VLLMGenerator, resolve_backend, sampling_params
from mipo.runtime import distributed
from mipo.training import parallel
from mipo.training.checkpoint import CheckpointError, check_world_size
from tests.helpers import (
    ROOT,
    compose_config,
    entry_env,
    load_weights,
    run_entry,
    tiny_overrides,
    tiny_tokenizer,
    user,
    write_pairs_file,
)

# --------------------------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------------------------


def test_each_rank_takes_an_equal_contiguous_share_of_the_global_batch() -> None:
    batch = [7, 3, 5, 1, 0, 2, 6, 4]
    shares = [parallel.local_batch(batch, 4, r) for r in range(4)]
    assert shares == [[7, 3], [5, 1], [0, 2], [6, 4]]
    assert parallel.local_batch(batch, 1, 0) == batch
    assert parallel.accumulation_steps(8, 2, 2) == 2 and parallel.accumulation_steps(8, 2, 1) == 4
    with pytest.raises(ValueError, match=r"trainer.batch_size=8 must be a multiple of trainer.micro_batch_size=2 x 3"):
        parallel.accumulation_steps(8, 2, 3)


def test_helpers_are_the_identity_in_one_process() -> None:
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.shard(5) == [0, 1, 2, 3, 4]
    assert distributed.shard(5, rank_=1, world=2) == [1, 3]
    assert distributed.gather_in_order({1: "b", 0: "a"}, 2) == ["a", "b"]
    with pytest.raises(ValueError, match="no rank produced item 1 of 2"):
        distributed.gather_in_order({0: "a"}, 2)
    assert distributed.mean_over_ranks({"loss": 0.5}) == {"loss": 0.5}
    assert distributed.broadcast_object(3) == 3
    assert parallel.resolve_strategy("fsdp") == "single"  # not under torchrun: nothing to shard over
    with pytest.raises(ValueError, match="trainer.strategy='zero3'"):
        parallel.resolve_strategy("zero3")


def test_a_checkpoint_resumes_only_with_the_world_size_that_wrote_it(tmp_path: Path) -> None:
    check_world_size(tmp_path, {"world_size": 2}, 2)
    check_world_size(tmp_path, {}, 1)  # written before world sizes were recorded: one process
    with pytest.raises(CheckpointError, match=r"written by 2 ranks but this run has 1.*--nproc_per_node = 2"):
        check_world_size(tmp_path, {"world_size": 2}, 1)


def test_strategy_and_backend_are_checked_up_front() -> None:
    from mipo.stages.config import config_problems

    problems = config_problems(compose_config("model=tiny-llama", "trainer.strategy=zero3", "sampling.backend=sglang",
                                              "trainer.cpu_offload=1"))
    assert any("trainer.strategy=zero3: expected one of single, ddp, fsdp" in p for p in problems)
    assert any("sampling.backend=sglang: expected one of transformers, vllm" in p for p in problems)
    assert any("trainer.cpu_offload=1: expected true or false" in p for p in problems)


def test_batch_must_split_over_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from mipo.stages.config import config_problems

    monkeypatch.setenv("WORLD_SIZE", "3")
    problems = config_problems(compose_config("model=tiny-llama", "trainer.batch_size=4", "trainer.micro_batch_size=2"))
    assert any("trainer.batch_size=4 must be a multiple of trainer.micro_batch_size=2 x 3 ranks" in p for p in problems)
    assert not any("trainer.strategy" in p for p in config_problems(compose_config(
        "model=tiny-llama", "trainer.batch_size=6", "trainer.micro_batch_size=2", "trainer.strategy=ddp")))


def test_model_configs_default_the_strategy() -> None:
    assert compose_config("model=tiny-llama").trainer.strategy == "single"
    big = compose_config("model=llama-3-8b-instruct")
    assert big.trainer.strategy == "fsdp" and big.model.train_dtype == "float32"
    assert compose_config("model=llama-3-8b-instruct", "trainer.strategy=ddp").trainer.strategy == "ddp"


# --------------------------------------------------------------------------------------------
# vLLM: the mapping, through a stand-in engine
# --------------------------------------------------------------------------------------------

class FakeSamplingParams(SimpleNamespace):
    """Records the keyword arguments vllm.SamplingParams would get."""


class FakeLLM:
    """A stand-in for ``vllm.LLM``: returns scripted token ids and records what it was asked."""

    def __init__(self, script: dict[tuple[int, ...], tuple[list[int], str]]):
        self.script, self.calls = script, []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outputs = []
        for prompt in prompts:
            tokens, reason = self.script[tuple(prompt["prompt_token_ids"])]
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, finish_reason=reason)]))
        return outputs


def test_vllm_backend_maps_prompts_settings_and_seeds() -> None:
    tokenizer = tiny_tokenizer()
    prompts = [user("a long question about the sky"), user("short"), user("middle one")]
    plan = plan_generation(tokenizer, prompts, max_new_tokens=5, batch_size=2, chunk_size=2, max_prompt_length=12)
    eos = tokenizer.eos_token_id
    hi, yo = tokenizer.encode("hi", add_special_tokens=False), tokenizer.encode("yo!", add_special_tokens=False)
    script = {plan.prompts[0].ids: (hi + [eos], "stop"), plan.prompts[1].ids: (yo, "length"),
              plan.prompts[2].ids: (hi, "stop")}
    engine = FakeLLM(script)
    generator = VLLMGenerator(engine, tokenizer, FakeSamplingParams)
    settings = DecodeSettings(max_new_tokens=5, temperature=0.1, top_p=0.9, top_k=None)

    by_prompt = {}
    for chunk, index in enumerate(plan.chunks):
        generations = generator.generate_chunk(plan, chunk, settings, seed=7)
        sent, params = engine.calls[-1]
        # the plan's rendered (chat template, truncated) token ids, in chunk order: vllm renders nothing itself
        assert [p["prompt_token_ids"] for p in sent] == [list(plan.prompts[i].ids) for i in index]
        for p, i in zip(params, index, strict=True):
            assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.1, 0.9, -1, 5)
            assert (p.repetition_penalty, p.min_tokens, p.n) == (1.0, 0, 1)  # DecodeSettings.record()'s fixed options
            assert p.seed == row_seed(7, i) and p.stop_token_ids == [eos]  # per-prompt seeds, as mipo.model.generation
        by_prompt.update(zip(index, generations, strict=True))
    assert len(engine.calls) == 2 and sorted(by_prompt) == [0, 1, 2]
    assert plan.prompts[0].cut > 0  # the long prompt was cut to max_prompt_length, and is sent cut
    assert by_prompt[0] == Generation("hi", "eos", 2, plan.prompts[0].cut)  # eos not part of the response
    assert by_prompt[1] == Generation("yo!", "length", 3, plan.prompts[1].cut)
    assert by_prompt[2] == Generation("hi", "eos", 2, plan.prompts[2].cut)
    top_k = sampling_params(DecodeSettings(5, 0.0, 1.0, 40), 3, eos, FakeSamplingParams)
    assert (top_k.temperature, top_k.top_k, top_k.seed) == (0.0, 40, 3)  # 0 = greedy in both backends


def test_vllm_generate_returns_responses_in_prompt_order() -> None:
    from mipo.model import vllm_backend

    tokenizer = tiny_tokenizer()
    prompts = [user("a"), user("a much longer prompt than the first"), user("mid-sized one")]
    rendered = {tuple(plan_generation(tokenizer, [p], 4).prompts[0].ids): f"r{i}" for i, p in enumerate(prompts)}
    script = {ids: (tokenizer.encode(text, add_special_tokens=False), "length") for ids, text in rendered.items()}
    engine = FakeLLM(script)
    out = vllm_backend.generate(VLLMGenerator(engine, tokenizer, FakeSamplingParams), prompts,
                                DecodeSettings(max_new_tokens=4, temperature=0.0, top_p=1.0), PlanSettings(chunk_size=2),
                                seed=5)
    assert out.texts == ["r0", "r1", "r2"]  # plans decode longest first; the result is in input order
    assert out.settings["backend"] == "vllm" and out.settings["temperature"] == 0.0
    assert [p.seed for _, params in engine.calls for p in params] == [row_seed(5, 1), row_seed(5, 2), row_seed(5, 0)]


def test_vllm_backend_without_vllm_falls_back_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    if "vllm" in sys.modules or __import__("importlib").util.find_spec("vllm"):
        pytest.skip("vllm is installed")
    with caplog.at_level("WARNING"):
        assert resolve_backend("vllm", {"name": "x"}) == "transformers"
    assert "vllm is not installed" in caplog.text and "transformers backend" in caplog.text
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(ValueError, match="sampling.backend='sglang'"):
        resolve_backend("sglang")


# --------------------------------------------------------------------------------------------
# torchrun, 2 ranks, gloo
# --------------------------------------------------------------------------------------------

def torchrun(script: str, overrides: list[str], run_dir: Path | None, nproc: int = 2,
             expect_ok: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script), *overrides, *([f"hydra.run.dir={run_dir}"] if run_dir else [])]
    env = {**entry_env(), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


TIED = ["+model.config.tie_word_embeddings=true"]  # the output layer is the input embedding (Llama-3.2 1B/3B)


def train_overrides(tmp_path: Path, cache: str) -> list[str]:
    """16 pairs, 2 steps of 8 (micro-batches of 2: 4 accumulation steps in one process, 2 per rank on 2)."""
    pairs = write_pairs_file(tmp_path / "pairs.jsonl", 16)
    return ["model=tiny-llama", f"data.pairs_path={pairs}", f"paths.cache_dir={tmp_path / cache}",
            "trainer.batch_size=8", "trainer.micro_batch_size=2", "trainer.lr=1e-3", "trainer.warmup_ratio=0",
            "data.max_length=256", "data.max_prompt_length=128"]


@pytest.mark.slow
def test_ddp_and_fsdp_end_with_the_single_process_weights(tmp_path: Path) -> None:
    baselines = {}  # tied: one process's weights, metrics and reference cache
    for tied in (False, True):
        name = "single-tied" if tied else "single"
        run_entry("train.py", [*train_overrides(tmp_path, f"cache-{name}"), *(TIED if tied else [])], tmp_path / name)
        baselines[tied] = (load_weights(tmp_path / name / "model"),
                           (tmp_path / name / "metrics.jsonl").read_text().splitlines(),
                           {p.name: torch.load(p) for p in (tmp_path / f"cache-{name}" / "reference").glob("*.pt")})
        assert len(baselines[tied][2]) == 1
    single = baselines[False][0]
    initial = load_model(compose_config("model=tiny-llama").model, device="cpu", vocab_size=len(tiny_tokenizer()))
    moved = max((single[name] - value).abs().max().item() for name, value in initial.state_dict().items())
    assert moved > 1e-4  # two steps at lr 1e-3 moved the weights: the comparison below is not of untrained models
    assert "lm_head.weight" in single and "lm_head.weight" not in baselines[True][0]  # a tied one is saved once

    for name, strategy, extra in (("ddp", "ddp", []), ("fsdp", "fsdp", []),
                                  ("fsdp-tied-gc", "fsdp", [*TIED, "model.gradient_checkpointing=true"])):
        single, single_metrics, reference = baselines[bool(extra)]
        run_dir = tmp_path / name
        proc = torchrun("train.py", [*train_overrides(tmp_path, f"cache-{name}"), f"trainer.strategy={strategy}",
                                     "trainer.checkpoint_every=1", *extra], run_dir)
        assert f"2 x 2 accumulation x 2 ranks, {strategy}" in proc.stdout
        weights = load_weights(run_dir / "model")  # one consolidated folder
        assert weights.keys() == single.keys()
        for key, value in single.items():
            assert weights[key].dtype == torch.float32
            torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=0)
        # metrics reduced over the ranks and written once, by rank 0
        metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == len(single_metrics) == 2
        for mine, theirs in zip(metrics, single_metrics):
            mine, theirs = json.loads(mine), json.loads(theirs)
            for key in ("train/loss", "train/reward_margin", "train/logps_chosen", "train/grad_norm"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (name, key)
        # the reference cache built by 2 ranks: the same file name (key) and the same numbers
        built = {p.name: torch.load(p) for p in (tmp_path / f"cache-{name}" / "reference").glob("*.pt")}
        assert built.keys() == reference.keys()
        for file, stored in built.items():
            assert stored["inputs"] == reference[file]["inputs"]
            for key in ("chosen", "rejected"):
                torch.testing.assert_close(stored[key], reference[file][key], atol=1e-5, rtol=1e-6)
        # sharded checkpoints: one file per rank
        step = run_dir / "checkpoints" / "step-2"
        assert sorted(p.name for p in step.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        assert json.loads((step / "trainer_state.json").read_text())["world_size"] == 2

    # resumed on 2 ranks from step 1's checkpoint (as after a kill), the FSDP2 run ends exactly where it did
    resumed = tmp_path / "fsdp-resumed"
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step-1", resumed / "checkpoints" / "step-1")
    shutil.copy(tmp_path / "fsdp" / "metrics.jsonl", resumed / "metrics.jsonl")  # cut back to step 1 on resume
    proc = torchrun("train.py", [*train_overrides(tmp_path, "cache-fsdp"), "trainer.strategy=fsdp",
                                 "trainer.checkpoint_every=1", "trainer.resume=true"], resumed)
    assert "resuming from" in proc.stdout
    uninterrupted = load_weights(tmp_path / "fsdp" / "model")
    for key, value in load_weights(resumed / "model").items():
        torch.testing.assert_close(value, uninterrupted[key], atol=0, rtol=0)
    strip = [{k: v for k, v in json.loads(line).items() if k != "time"}
             for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "time"}
                     for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]

    # a checkpoint written by 2 ranks is refused by 1 process, with the reason
    refused = tmp_path / "resume-1"
    shutil.copytree(tmp_path / "ddp" / "checkpoints", refused / "checkpoints")
    shutil.copy(tmp_path / "ddp" / "metrics.jsonl", refused / "metrics.jsonl")
    proc = run_entry("train.py", [*train_overrides(tmp_path, "cache-ddp"), "trainer.strategy=ddp",
                                  "trainer.checkpoint_every=1", "trainer.resume=true"], refused, expect_ok=False)
    assert proc.returncode == 1
    assert "was written by 2 ranks but this run has 1" in proc.stdout


@pytest.mark.slow
def test_sampling_on_two_ranks_writes_the_single_process_pairs_file(tmp_path: Path) -> None:
    overrides = [*(o for o in tiny_overrides(tmp_path) if not o.startswith(("paths.cache_dir", "sampling.batch_size"))),
                 "sampling.chunk_size=2", "sampling.batch_size=2",
                 "negatives.reuse_positives=false"]  # 4 chunks per stream, y- sampled separately
    run_entry("sample.py", [*overrides, f"paths.cache_dir={tmp_path / 'one'}"], tmp_path / "run-one")
    torchrun("sample.py", [*overrides, f"paths.cache_dir={tmp_path / 'two'}"], tmp_path / "run-two")
    one = list((tmp_path / "one" / "pairs").glob("*.jsonl"))
    two = list((tmp_path / "two" / "pairs").glob("*.jsonl"))
    assert len(one) == 1 and [p.name for p in two] == [one[0].name]
    assert two[0].read_bytes() == one[0].read_bytes()
    assert not list((tmp_path / "two" / "pairs").glob("*.partial"))


WORKER = '''
import json, sys
import torch
from mipo.runtime import distributed
from mipo.model.generation import DecodeSettings, PlanSettings, generate
from mipo.model.logprobs import Scorer, ScoringSettings
from tests.helpers import tiny_model, tiny_tokenizer, user

distributed.init()
tokenizer = tiny_tokenizer()
model = tiny_model(tokenizer)
prompts = [user(f"question {i}: " + "word " * (i % 4)) for i in range(7)]
gens = generate(model, tokenizer, prompts, DecodeSettings(6, temperature=1.0, top_p=0.9),
                PlanSettings(batch_size=2, chunk_size=2), seed=3, desc=None)
logps = Scorer(model, tokenizer, ScoringSettings(max_length=128, max_prompt_length=64, batch_size=2)).score(
    prompts, [g.text + " end" for g in gens], desc=None)
if distributed.is_main():
    json.dump({"texts": gens.texts, "logps": logps.tolist(), "world": distributed.world_size()}, open(sys.argv[1], "w"))
'''


@pytest.mark.slow
def test_generation_and_scoring_on_two_ranks_equal_one_process(tmp_path: Path) -> None:
    """What evaluation runs under torchrun: generate() shards chunks, Scorer shards batches; both gather in order."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "two.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)]
    env = {**entry_env(), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    two = json.loads(out.read_text())
    assert two["world"] == 2
    one = tmp_path / "one.json"
    proc = subprocess.run([sys.executable, str(script), str(one)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    one = json.loads(one.read_text())
    assert one["world"] == 1 and len(set(one["texts"])) > 1
    assert two["texts"] == one["texts"]
    assert two["logps"] == pytest.approx(one["logps"], abs=1e-5)
