"""The paper's baselines and ablation variants end to end through ``train.py`` (and ``sample.py`` for K
negatives) on the tiny random Llama: SFT, SimPO, SAMI, InfoNCE, and DPO with K = 2 negatives per prompt.

Each run trains on a synthetic pairs file that carries x' (``negative_prompt``) and a second rejected
response (``extra_negatives``), as ``sample.py`` writes them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mipo.negatives import derangement, extra_sources
from tests.helpers import run_entry, tiny_overrides


def write_variant_pairs(path: Path, n: int = 8) -> Path:
    """``n`` pairs with x' and one extra negative each: the rejected responses answer other prompts."""
    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} plus {3 * i}?"}] for i in range(n)]
    answers = [f"It is {4 * i}. " * (1 + i % 3) for i in range(n)]
    with open(path, "w") as f:
        for i in range(n):
            j, k = (i + 1) % n, (i + 3) % n
            f.write(json.dumps({
                "prompt": prompts[i], "chosen": [{"role": "assistant", "content": answers[i]}],
                "rejected": [{"role": "assistant", "content": answers[j]}], "negative_prompt": prompts[j],
                "uid": f"q{i}", "negative_uid": f"q{j}",
                "extra_negatives": [{"negative_prompt": prompts[k], "negative_uid": f"q{k}", "rejected": answers[k],
                                     "rejected_finish_reason": "eos"}]}) + "\n")
    return path


VARIANTS = {  # name -> overrides, train/ metrics every step must log
    "sami": (["loss=sami"], ["pmi_margin", "pmi_accuracy"]),
    "infonce": (["loss=infonce"], ["pmi_margin", "pmi_accuracy"]),
    "sft": (["loss=sft"], []),
    "simpo": (["loss=simpo"], ["reward_margin", "reward_accuracy"]),
    "dpo_k2_mean": (["negatives.num_negatives=2"], ["reward_margin", "reward_accuracy"]),
    "dpo_k2_plackett_luce": (["negatives.num_negatives=2", "loss.multi_negative=plackett_luce"],
                             ["reward_margin", "reward_accuracy"]),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_through_train_py(tmp_path: Path, name: str) -> None:
    overrides, keys = VARIANTS[name]
    pairs = write_variant_pairs(tmp_path / "pairs.jsonl")
    run = run_entry("train.py", [*tiny_overrides(tmp_path), f"data.pairs_path={pairs}", *overrides,
                                 "trainer.save_model=false"], tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ["loss", "logps_chosen", "length_chosen", "length_rejected", "grad_norm", *keys]:
        assert all(f"train/{key}" in m for m in metrics), key
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["length_chosen"] > 0 and summary["length_rejected"] > 0
    needs_reference = name.startswith("dpo")
    assert ("reference cache miss" in run.stdout) is needs_reference
    assert (summary["reference_cache"] is not None) is needs_reference
    if name.startswith("dpo"):  # policy == reference at the first step: K = 2 mean log 2, Plackett-Luce log 3
        first = metrics[0]["train/loss"]
        assert first == pytest.approx(0.6931 if name.endswith("mean") else 1.0986, abs=1e-3)
    if name == "sami":  # policy log-probs only: a finite loss that changes as the policy trains
        assert metrics[0]["train/loss"] != metrics[1]["train/loss"]


def test_extra_sources_are_distinct_other_prompts() -> None:
    keys = [f"p{i % 9}" for i in range(20)]  # 9 distinct prompts, some repeated
    rng = random.Random(0)
    sigma = derangement(keys, rng)
    extras = extra_sources(keys, sigma, 3, rng)
    for i, rows in enumerate(extras):
        sources = [keys[j] for j in [sigma[i], *rows]]
        assert len(rows) == 3 and keys[i] not in sources and len(set(sources)) == 4
    with pytest.raises(ValueError, match="num_negatives=9 needs at least 10 distinct prompts"):
        extra_sources(keys, sigma, 8, rng)


@pytest.mark.slow
def test_sample_writes_k_negatives_and_k1_keeps_its_pairs(tmp_path: Path) -> None:
    """sample.py with negatives.num_negatives=3 writes two extra negatives per pair, each the response sampled
    for another prompt; K = 1 writes the same pairs file (same path, same bytes) as before the option existed."""
    overrides = tiny_overrides(tmp_path)
    run_entry("sample.py", overrides, tmp_path / "k1")
    run_entry("sample.py", [*overrides, "negatives.num_negatives=3"], tmp_path / "k3")
    files = sorted((tmp_path / "cache" / "pairs").glob("*.jsonl"))
    assert len(files) == 2
    k1, k3 = ([json.loads(line) for line in f.read_text().splitlines()] for f in files)
    if "extra_negatives" in k1[0]:
        k1, k3 = k3, k1
    assert all("extra_negatives" not in row for row in k1)
    chosen = {row["uid"]: row["chosen"][0]["content"] for row in k1}
    for row in k3:
        extras = row["extra_negatives"]
        uids = [row["negative_uid"], *(e["negative_uid"] for e in extras)]
        assert len(extras) == 2 and len(set(uids)) == 3 and row["uid"] not in uids
        assert all(e["rejected"] == chosen[e["negative_uid"]] for e in extras)
    # the K = 1 rows are the K = 3 rows without the extras: the derangement is drawn first, unchanged
    assert [{k: v for k, v in r.items() if k != "extra_negatives"} for r in k3] == k1
    run_entry("train.py", [*overrides, "negatives.num_negatives=3", "trainer.save_model=false"], tmp_path / "train3")
    summary = json.loads((tmp_path / "train3" / "train.json").read_text())
    assert summary["steps"] == 2


def test_train_refuses_pairs_without_what_the_loss_needs(tmp_path: Path) -> None:
    """Pairs without x' under loss=sami, or without extra negatives under K = 2: one line each, in the inputs
    check that train.py runs before any model loads (``mipo.stages.inputs``)."""
    from mipo.runtime.errors import ConfigError
    from mipo.stages.inputs import check_inputs
    from tests.helpers import compose_config, write_pairs_file

    pairs = write_pairs_file(tmp_path / "plain.jsonl", 8)

    def problems(*overrides: str) -> str:
        with pytest.raises(ConfigError) as error:
            check_inputs(compose_config(*tiny_overrides(tmp_path), f"data.pairs_path={pairs}", *overrides), "train",
                         tmp_path / "run")
        return str(error.value)

    assert "plain.jsonl line 1: field 'negative_prompt' is missing (8 of 8 pairs" in problems("loss=sami")
    assert "field 'extra_negatives' holds fewer than 1 responses" in problems("negatives.num_negatives=2")
    both = problems("negatives.num_negatives=2", "loss=sft", "negatives=partial")
    assert "it needs negatives=random with negatives.reuse_positives=true" in both
    assert "loss.loss_type=sft trains on one negative per prompt" in both
    check_inputs(compose_config(*tiny_overrides(tmp_path), f"data.pairs_path={write_variant_pairs(tmp_path / 'v.jsonl')}",
                                "loss=sami", "negatives.num_negatives=1"), "train", tmp_path / "run")


@pytest.mark.slow
def test_iterative_mipo_two_rounds_then_resume(tmp_path: Path) -> None:
    """pipeline.py rounds=2: round 2 samples with round 1's policy and trains against it as the reference; each
    round has its own pairs, reference cache, policy and evaluation; a second run redoes nothing."""
    overrides = [*tiny_overrides(tmp_path), "rounds=2", "trainer.max_steps=1"]
    run_entry("pipeline.py", overrides, tmp_path / "run")
    run = tmp_path / "run"
    rounds = json.loads((run / "rounds.json").read_text())["per_round"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["sampled_and_reference_by"] == str(Path(rounds[0]["model_dir"]).resolve())
    assert rounds[0]["pairs"] != rounds[1]["pairs"] and rounds[0]["model_dir"] != rounds[1]["model_dir"]
    for r in (1, 2):
        for name in ("eval.json", "train.json", "metrics.jsonl", "model", "pairs.jsonl"):
            assert (run / f"round-{r}" / name).exists(), (r, name)
    assert len(list((tmp_path / "cache" / "reference").glob("*.pt"))) == 2
    round2 = json.loads((run / "round-2" / "train.json").read_text())
    assert not round2["reference_cache_hit"]
    metrics = [json.loads(line) for line in (run / "round-2" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["train/loss"] == pytest.approx(0.6931, abs=1e-3)  # round 2's policy starts as its reference
    assert (run / "eval.json").read_text() == (run / "round-2" / "eval.json").read_text()

    again = run_entry("pipeline.py", [*overrides, "overwrite=true"], tmp_path / "run")
    assert again.stdout.count("train stage: outputs exist for these inputs, skipping") == 2
    assert "pairs exist, not re-sampling" in again.stdout
    assert json.loads((run / "rounds.json").read_text())["per_round"] == rounds


def test_compare_cpu_arms_compose() -> None:
    """Each arm of ``make compare-cpu`` composes to its loss and negative strategy on the demo's setting."""
    from tests.helpers import compose_config
    arms = {"sft": ("sft", "random"), "dpo_random": ("sigmoid", "random"), "dpo_partial": ("sigmoid", "partial"),
            "sami": ("sami", "random"), "infonce": ("infonce", "random")}
    for method, (loss_type, strategy) in arms.items():
        cfg = compose_config("experiment=compare_cpu", f"+method={method}", "seed=2")
        assert (cfg.loss.loss_type, cfg.negatives.strategy, cfg.seed) == (loss_type, strategy, 2)
        assert (cfg.model.name, cfg.task.name, cfg.data.num_train, cfg.trainer.lr) == (
            "smollm2-135m-instruct", "arc_challenge", 64, 1e-5)
