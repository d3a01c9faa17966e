"""``make gpu-check``'s dry run (bench/gpu_check.py --dry: all six checks on CPU at tiny sizes, the code a GPU
window runs) and the model-FLOP-utilisation arithmetic of ``make bench`` (bench/mfu.py, bench/run.py), on tiny cases."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import torch

from bench import gpu_setup
from bench.gpu_report import Report
from bench.mfu import matmul_params, matmul_rate, model_flops, pair_tokens, utilisation
from mipo.data.encoding import EncodedRow
from tests.helpers import ROOT, tiny_config, tiny_model, tiny_tokenizer


def test_dry_run_passes_every_check_and_writes_them_all(tmp_path):
    """The dry run as ``make gpu-check DRY=1`` runs it, its results in a temporary file (never bench/GPU_RESULTS.md)."""
    from bench.gpu_check import CHECKS, GPU_OUT

    before = GPU_OUT.stat().st_mtime_ns if GPU_OUT.exists() else None
    out = tmp_path / "GPU_RESULTS.md"
    # a budget no loaded CI machine reaches: this checks the code paths, not the speed (seconds when idle)
    command = [sys.executable, "-m", "bench.gpu_check", "--dry", "--budget", "600", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("# mipo GPU check (dry run")
    for title, _ in CHECKS:
        assert f"| {title} | **passed** |" in text, f"{title} did not pass:\n{text}"
        assert f"## {title}" in text
    for figure in ("max \\|loss − log 2\\|", "FSDP2 on one rank (gloo)", "gradient error", "tokens/s", "MFU",
                   "% of copy BW", "one-prompt loop", "matrix rate"):
        assert figure in text, figure
    assert f"{len(CHECKS)} of {len(CHECKS)} checks passed" in proc.stdout
    assert (GPU_OUT.stat().st_mtime_ns if GPU_OUT.exists() else None) == before


def test_make_target_runs_the_script_on_the_carried_wheels():
    """``make gpu-check`` builds no venv: the node's python3 with .whl/site on PYTHONPATH, the budget and the flags."""
    dry = subprocess.run(["make", "-n", "gpu-check", "DRY=1", "GPU_OUT=/tmp/r.md", "GPU_PY=python3"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "/.whl/site" in dry and "python3 -m bench.gpu_check --budget 480 --dry" in dry and "--out /tmp/r.md" in dry
    gpu = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "python3 -m bench.gpu_check --budget 480" in gpu and "--dry" not in gpu and "venv" not in gpu


def budget_context(tmp_path, seconds: float):
    report = Report(tmp_path / "r.md", "test", torch.device("cpu"), seconds)
    return gpu_setup.Context(torch.device("cpu"), gpu_setup.DRY, time.monotonic() + seconds, tmp_path, report)


def test_a_check_past_the_budget_is_cut_off_keeps_its_figures_and_the_rest_is_not_run(tmp_path, monkeypatch):
    from bench import gpu_check
    from bench.gpu_check import run_check

    monkeypatch.setattr(gpu_check, "MIN_LEFT_S", 0.2)  # a check does not start with less left
    ctx = budget_context(tmp_path, 60.0)  # the failing check runs well inside the budget, however loaded the machine

    def slow(ctx, r):
        r.figures["measured before"] = 1
        time.sleep(30)

    def failing(ctx, r):
        raise ValueError("broken | here")

    first = run_check(ctx, "failing", failing)
    ctx.deadline = time.monotonic() + 0.8  # then 0.8 s are left for the slow one
    second, third = run_check(ctx, "slow", slow), run_check(ctx, "next", lambda ctx, r: None)
    assert first.status == "FAILED" and "ValueError: broken \\| here" in first.note
    assert second.status == "cut off" and second.figures == {"measured before": 1} and second.seconds < 5
    assert third.status == "not run"
    text = (tmp_path / "r.md").read_text()
    assert "| failing | **FAILED** |" in text and "| slow | **cut off** |" in text and "| next | **not run** |" in text


def test_sized_tokenizer_has_the_models_vocabulary_and_decodes_any_id():
    tokenizer = gpu_setup.sized_tokenizer(gpu_setup.TINY_QWEN.vocab)
    assert len(tokenizer) == gpu_setup.TINY_QWEN.vocab
    assert len(tokenizer("a few words", add_special_tokens=False)["input_ids"]) == len("a few words")  # one a character
    assert isinstance(tokenizer.decode(list(range(250, 400))), str)
    assert tokenizer.eos_token_id == gpu_setup.TINY_QWEN.vocab - 5


# --------------------------------------------------------------------------------------------
# Model FLOP utilisation (bench/mfu.py) and make bench's use of it (bench/run.py)
# --------------------------------------------------------------------------------------------

def test_model_flops_and_utilisation():
    assert model_flops(10, 3, backward=True) == 180 and model_flops(10, 3, backward=False) == 60
    assert utilisation(2e12, 2.0, 4e12) == 0.25
    rows = ([EncodedRow((1, 2), (3,)), EncodedRow((1,), (2, 3, 4))],
            [EncodedRow((1, 2), (5, 6)), EncodedRow((1,), (9,))])
    assert pair_tokens(rows, [0, 1]) == (3 + 4) + (4 + 2)


def test_matmul_params_count_a_tied_output_layer_once_and_no_untied_embedding():
    tokenizer = tiny_tokenizer()
    tied = tiny_model(tokenizer, tiny_config(config={**tiny_config()["config"], "tie_word_embeddings": True}))
    untied = tiny_model(tokenizer, tiny_config(config={**tiny_config()["config"], "tie_word_embeddings": False}))
    embedding = tied.get_input_embeddings().weight.numel()
    assert matmul_params(tied) == sum(p.numel() for p in tied.parameters())
    assert matmul_params(untied) == sum(p.numel() for p in untied.parameters()) - embedding
    assert matmul_params(untied) == matmul_params(tied)  # the same products: the output layer's, once


def test_matmul_rate_is_measured():
    rate = matmul_rate(torch.device("cpu"), torch.float32, 64, repeats=2)
    assert math.isfinite(rate) and rate > 1e6


def test_make_bench_reports_each_frameworks_mfu_from_its_times():
    from bench.run import Work, reference_mfu, sampling_mfu, training_mfu
    from bench.train_step import Settings

    work = Work(params=1000, pair_tokens=[10, 20, 30, 40, 50, 60])
    settings = Settings("anchor", steps=3, skip=1, pairs_per_step=2)
    result = {"step_s": {"mipo": [9.0, 1.0, 2.0], "trl": [9.0, 2.0, 4.0]}, "reference_s": {"mipo": 1.0, "trl": 4.0}}
    step = training_mfu(result, settings, work, rate=1e6)
    flops = 6 * 1000 * ((30 + 40) + (50 + 60))  # steps 2 and 3 (the first is left out, as in the median)
    assert step["mipo"] == pytest.approx(flops / 3.0 / 1e6) and step["trl"] == pytest.approx(flops / 6.0 / 1e6)
    reference = reference_mfu(result, work, rate=1e6)
    assert reference["mipo"] == pytest.approx(2 * 1000 * 210 / 1.0 / 1e6) and reference["trl"] == reference["mipo"] / 4
    table = "\n".join(["| method | seconds | CPU seconds | useful tokens | tokens/s | x one-prompt loop |",
                       "|---|---|---|---|---|---|", "| one-prompt loop | 10.0 | 9.5 | 500 | 50.0 | 1.00 |",
                       "| mipo.model.generation (auto) | 2.5 | 2.4 | 500 | 200.0 | 4.00 |"])
    lines = sampling_mfu(table, params=1000, prompt_tokens=100, rate=1e6)
    assert lines == ["| one-prompt loop | 12.0% |", "| mipo.model.generation (auto) | 48.0% |"]
