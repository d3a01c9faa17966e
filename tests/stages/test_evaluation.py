"""The evaluation stage on a tiny random Llama: precision of the evaluated models, the MI label."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import mipo.stages.evaluate as evaluation
from mipo.data.tasks import task_splits
from mipo.metrics.accuracy import choose_option, loglik_correct
from mipo.model.loading import load_model, load_tokenizer, model_identity
from mipo.stages import keys

CONF = str(Path(__file__).resolve().parents[2] / "conf")


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


# -- eval.json: accuracies, per-token pmi, lengths, paired deltas -----------------------------------------


def _perturbed_model(cfg, path: Path, scale: float = 0.05) -> Path:
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device="cpu", dtype=torch.float32, vocab_size=len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    model.save_pretrained(path)
    return path


def test_eval_json_reports_every_metric_and_paired_deltas(tmp_path):
    cfg = tiny_cfg(tmp_path, "data.num_eval=6", "eval.bootstrap_resamples=500")
    results = evaluation.evaluate(cfg, tmp_path / "out", model_path=_perturbed_model(cfg, tmp_path / "trained"))
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["deltas"].keys() == results["deltas"].keys()
    for name in ("base", "trained"):
        m, rows = results["models"][name], results["per_prompt"][name]
        for key in ("accuracy_strict", "accuracy_flexible", "accuracy_loglik", "accuracy_loglik_norm",
                    "mean_response_tokens"):
            assert key in m and key + "_stderr" in m
        assert {"mi_mean", "mi_stderr", "mi_per_token_mean", "mi_per_token_stderr", "truncated_fraction"} <= m.keys()
        assert (m["accuracy"], m["accuracy_stderr"]) == (m["accuracy_strict"], m["accuracy_strict_stderr"])  # alias
        assert m["mi_mean"] == pytest.approx(sum(rows["mi"]) / 6) and "mi_stderr" in m
        # per-token pmi: each response's pmi over its scored tokens, end-of-turn included when it finished
        assert rows["mi_per_token"] == pytest.approx([v / n for v, n in zip(rows["mi"], rows["scored_tokens"])])
        tokenizer = load_tokenizer(cfg.model)
        texts = [json.loads(line)[name] for line in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
        assert rows["scored_tokens"] == [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + (not cut)
                                         for t, cut in zip(texts, rows["truncated"])]
        assert m["truncated_fraction"] == sum(rows["truncated"]) / 6
        assert m["mean_response_tokens"] == pytest.approx(sum(rows["response_tokens"]) / 6)
        assert {"self_bleu", "distinct_1", "distinct_2"} <= m.keys()
    for metric in ("accuracy_strict", "accuracy_flexible", "accuracy_loglik", "mi_mean", "mi_per_token_mean",
                   "mean_response_tokens", "truncated_fraction"):
        delta = results["deltas"][metric]
        assert set(delta) == {"mean", "stderr", "ci95", "p_value", "n", "test"} and delta["n"] == 6
        assert delta["ci95"][0] <= delta["mean"] <= delta["ci95"][1] and 0 < delta["p_value"] <= 1
    mi = results["deltas"]["mi_mean"]
    assert mi["mean"] == pytest.approx(results["models"]["trained"]["mi_mean"] - results["models"]["base"]["mi_mean"])
    assert results["deltas"]["accuracy_strict"]["test"] == "mcnemar_exact" and mi["test"] == "sign_flip"
    assert results["decoding"]["temperature"] == 0.0 and results["precision"]["generation"] == "float32"
    table = (tmp_path / "out" / "eval_table.md").read_text()
    assert "| trained − base |" in table and "accuracy flexible" in table and "pmi / token (nats)" in table


def test_loglik_accuracy_agrees_with_unshared_scoring(tmp_path):
    # the prompt-tree scorer's pick of each option equals plain right-padded scoring's
    from mipo.model.logprobs import Scorer, ScoringSettings
    cfg = tiny_cfg(tmp_path, "data.num_eval=5")
    task = evaluation.build_task(cfg)
    _, examples = task_splits(cfg, task)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device="cpu", dtype=torch.float32, vocab_size=len(tokenizer))
    shared = loglik_correct(Scorer(model, tokenizer, ScoringSettings(max_length=768, max_prompt_length=700)), task,
                            examples)
    plain_scorer = Scorer(model, tokenizer, ScoringSettings(max_length=768, max_prompt_length=700, share_prompts=False))
    expected_raw, expected_norm = [], []
    for ex in examples:
        texts = [text for _, text in ex.choices]
        logps = plain_scorer.score([task.loglik_messages(ex)] * len(texts), texts, finished=[False] * len(texts))
        raw = max(range(len(texts)), key=lambda j: (logps[j].item(), -j))
        norm = max(range(len(texts)), key=lambda j: (logps[j].item() / len(texts[j]), -j))
        expected_raw.append(int(ex.choices[raw][0] == ex.answer))
        expected_norm.append(int(ex.choices[norm][0] == ex.answer))
    assert shared == {"correct_loglik": expected_raw, "correct_loglik_norm": expected_norm}


def test_choose_option_by_hand():
    # raw: -4 is the highest; per character: -6/12 = -0.5 beats -4/2 = -2 and -5/5 = -1
    assert choose_option([-4.0, -6.0, -5.0], [2, 12, 5]) == (0, 1)
    assert choose_option([-3.0, -3.0], [4, 4]) == (0, 0)  # ties: the first option, as numpy's argmax


def test_paired_deltas_skip_prompts_missing_either_value():
    base = {"judge_score": [3.0, None, 2.0, 4.0], "mi": [1.0, 2.0, 3.0, 4.0]}
    trained = {"judge_score": [4.0, 5.0, None, 5.0], "mi": [2.0, 2.0, 5.0, 4.0]}
    deltas = evaluation.paired_deltas(base, trained, resamples=200)
    assert deltas["judge_score_mean"]["n"] == 2 and deltas["judge_score_mean"]["mean"] == pytest.approx(1.0)
    assert deltas["mi_mean"]["n"] == 4 and deltas["mi_mean"]["mean"] == pytest.approx(0.75)
    assert "accuracy_strict" not in deltas  # not measured: no delta


def test_old_eval_json_without_new_fields_is_not_reused(tmp_path):
    # the cache key carries the format: an evaluation cached by the previous code is not read back
    cfg = tiny_cfg(tmp_path)
    tokenizer = load_tokenizer(cfg.model)
    assert keys.eval_key(cfg, "m", tokenizer)["format"] == keys.EVAL_FORMAT >= 3
    assert "bootstrap_resamples" not in keys.eval_key(cfg, "m", tokenizer)["eval"]


@pytest.mark.parametrize(("override", "message"), [
    ("eval.bootstrap_resamples=0", "eval.bootstrap_resamples=0: expected an int >= 1"),
    ("eval.loglik=maybe", "eval.loglik=maybe: expected auto, true or false"),
    ("judge.prompt='Rate {response}'", "judge.prompt lacks {preference}, {query}"),
    ("judge.batch_size=0", "judge.batch_size=0: expected auto or an int > 0"),
])
def test_bad_eval_and_judge_settings_are_config_problems(tmp_path, override, message):
    from mipo.stages.config import config_problems
    problems = config_problems(tiny_cfg(tmp_path, override))
    assert any(message in p for p in problems), problems


# -- the paper's identity: the implicit reward against pmi (mipo/metrics/identity.py) --------------------


def _cache_records(cfg) -> dict[str, Path]:
    """The evaluation cache files by the model they hold ("base" or "trained")."""
    files = list((Path(cfg.paths.cache_dir) / "eval").glob("*.json"))
    return {"trained" if json.loads(f.read_text())["inputs"]["evaluated_model"] != model_identity(cfg.model)
            else "base": f for f in files}


def test_eval_json_has_the_identity_and_the_figure(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "data.num_eval=6", "eval.bootstrap_resamples=200", "loss.beta=0.2")
    trained = _perturbed_model(cfg, tmp_path / "trained")
    results = evaluation.evaluate(cfg, tmp_path / "out", model_path=trained)
    identity = json.loads((tmp_path / "out" / "eval.json").read_text())["identity"]
    assert identity == json.loads(json.dumps(results["identity"]))
    k = cfg.eval.mi_k
    assert identity["candidates"] == 6 * (k + 1) and identity["prompts"] == 6 and identity["beta"] == 0.2
    assert identity["pmi"] == "pmi(x; y)" and identity["loss_type"] == "sigmoid"
    for name in ("spearman_within_prompt", "slope_demeaned", "heldout_pair_accuracy"):
        assert name in identity and f"{name}_stderr" in identity
    assert 0.0 <= identity["heldout_pair_accuracy"] <= 1.0 and identity["pair_comparisons"] == 6 * k
    assert identity["theory"] == {"slope_demeaned": 1.0, "spearman_within_prompt": 1.0,
                                  "heldout_pair_accuracy_chance": 0.5}
    per = identity["per_candidate"]
    assert len(per["reward"]) == len(per["pmi"]) == 6 * (k + 1) and sum(per["answers"]) == 6
    # the pmi of each response under its own prompt is the MI the evaluation reports for the base model
    own = {j: p for j, p, a in zip(per["response"], per["pmi"], per["answers"]) if a}
    assert [own[j] for j in range(6)] == pytest.approx(results["per_prompt"]["base"]["mi"], abs=1e-9)
    assert (tmp_path / "out" / "identity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "out" / "eval_table.md").read_text()
    assert "held-out pair accuracy" in table and "r~pmi slope (demeaned)" in table
    assert "identity (trained model)" in table

    # cached: read back, not scored again; a base model cached without its MI scores is evaluated again
    monkeypatch.setattr(evaluation, "score_candidates", lambda *a, **k: pytest.fail("scored again"))
    again = evaluation.evaluate(cfg, tmp_path / "again", model_path=trained)
    assert again["identity"] == identity
    monkeypatch.undo()
    for name, path in _cache_records(cfg).items():
        record = json.loads(path.read_text())
        record.pop("mi_estimate" if name == "base" else "identity")
        path.write_text(json.dumps(record))
    stale = evaluation.evaluate(cfg, tmp_path / "stale", model_path=trained)
    for field, values in per.items():
        assert stale["identity"]["per_candidate"][field] == pytest.approx(values, abs=1e-5), field
    assert stale["models"]["base"]["mi_mean"] == pytest.approx(results["models"]["base"]["mi_mean"], abs=1e-6)


def test_identity_of_an_untrained_policy_is_r_zero(tmp_path):
    # the policy is the base model: the candidates are scored in the MI estimator's batches, so r = 0 exactly
    cfg = tiny_cfg(tmp_path, "data.num_eval=5", "eval.bootstrap_resamples=100")
    tokenizer = load_tokenizer(cfg.model)
    load_model(cfg.model, device="cpu", dtype=torch.float32, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "m")
    identity = evaluation.evaluate(cfg, tmp_path / "out", model_path=tmp_path / "m")["identity"]
    assert set(identity["per_candidate"]["reward"]) == {0.0}
    assert identity["slope_demeaned"] == 0.0 and identity["heldout_pair_accuracy"] == 0.5
    assert identity["spearman_within_prompt"] is None and identity["spearman_prompts"] == 0  # constant r: undefined
    assert identity["spearman_undefined"] + identity["spearman_too_few"] == identity["prompts"]


@pytest.mark.parametrize(("overrides", "trained", "expected"), [
    ((), True, True), (("loss=ipo",), True, True), (("loss=sft",), True, False), (("loss=sami",), True, False),
    (("++eval.identity=false",), True, False), ((), False, False),
])
def test_identity_needs_a_trained_model_and_a_reference(tmp_path, overrides, trained, expected):
    assert evaluation.uses_identity(tiny_cfg(tmp_path, *overrides), trained) is expected


def test_identity_flag_is_checked(tmp_path):
    from mipo.stages.config import config_problems
    problems = config_problems(tiny_cfg(tmp_path, "++eval.identity=maybe"))
    assert any("eval.identity=maybe: expected true or false" in p for p in problems), problems


def test_identity_under_context_swapped_prompts(tmp_path):
    # personalization: the alternatives keep the query and swap the user's context (pmi(c; y | q)), so the
    # candidates sit under prompts that are no held-out row's, mostly one each
    rows = [{"question": f"Question number {i}?", "answer": str(i), "memories": [f"I like {i}."]} for i in range(5)]
    data = tmp_path / "users.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg(tmp_path, "task=persistbench", "task.name=jsonl", f"data.source={data}",
                   "+task.options.context_field=memories", "data.num_train=0", "data.num_eval=5",
                   "eval.bootstrap_resamples=100")
    identity = evaluation.evaluate(cfg, tmp_path / "out", model_path=_perturbed_model(cfg, tmp_path / "t"))["identity"]
    assert identity["pmi"] == "conditional pmi(c; y | q)" and identity["candidates"] == 5 * (cfg.eval.mi_k + 1)
    assert identity["prompts"] == identity["candidates"]  # every (context, query) prompt holds one response
    assert identity["heldout_pair_accuracy"] is None and identity["spearman_too_few"] == identity["prompts"]
    assert (tmp_path / "out" / "identity.png").exists()
