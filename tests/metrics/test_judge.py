"""The LLM judge: parsing, counting, win rates with ties; end to end with a tiny random judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import mipo.metrics.judge as judge
import mipo.stages.evaluate as evaluation
from mipo.data.tasks import Example
from mipo.model.generation import Generation, Generations
from tests.stages.test_evaluation import tiny_cfg

SETTINGS = judge.JudgeSettings(prompt="Preference: {preference}\nQuery: {query}\nResponse: {response}\nScore 1-5:")


@pytest.mark.parametrize(("text", "score"), [
    ("4", 4), ("Score: 5/5", 5), ("**3**", 3), ("I'd give it a 2.", 2), ("1", 1),
    ("10", None), ("45", None), ("0", None), ("6", None), ("great response", None), ("", None), ("2.5", 2),
])
def test_parse_score(text, score):
    assert judge.parse_score(text) == score


def test_preferences_are_the_context_lines():
    assert judge.preferences_of("- I am vegan.\n- I live in Oslo.\n\n") == ["I am vegan.", "I live in Oslo."]
    assert judge.preferences_of("I like short answers.") == ["I like short answers."]
    assert judge.preferences_of("1. first\n2) second") == ["first", "second"]
    assert judge.preferences_of(None) == []


def test_prompt_template_problems():
    assert judge.prompt_problems(SETTINGS.prompt) == []
    assert "lacks {query}" in judge.prompt_problems("{preference} {response}")[0]
    assert "unknown field(s) ['user']" in judge.prompt_problems("{preference} {query} {response} {user}")[0]


def _scripted_generate(outputs):
    """A stand-in for the decode loop: returns ``outputs`` in order and records the prompts."""
    seen = []

    def fake(model, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        assert kwargs["settings"].temperature == 0.0  # the judge decodes greedily
        texts = [outputs.pop(0) for _ in prompts]
        return Generations([Generation(t, "eos", 1) for t in texts], {})
    return fake, seen


def test_scores_counts_and_win_rate_with_ties(monkeypatch):
    examples = [Example(uid=f"u{i}", question=f"q{i}", context=c, reference=f"ref{i}")
                for i, c in enumerate(["- a\n- b", "- c", "- d\n- e", None])]
    # policy: response 0 -> (4, 2) mean 3; 1 -> unparsed; 2 -> ("Score: 5", "bad") -> 5; 3 states no preference
    fake, seen = _scripted_generate(["4", "2", "no idea", "Score: 5", "bad"])
    monkeypatch.setattr(judge, "generate", fake)
    policy = judge.score_responses(None, None, SETTINGS, examples, ["r0", "r1", "r2", "r3"])
    assert policy.scores == [3.0, None, 5.0, None]
    assert (policy.judgments, policy.unparsed, policy.unscored, policy.no_preferences) == (5, 2, 1, 1)
    assert policy.unparsed_examples == ["no idea", "bad"]
    assert seen[0][-1]["content"] == "Preference: a\nQuery: q0\nResponse: r0\nScore 1-5:"
    # reference: 0 -> 3 (a tie: a win, not a strict win), 1 -> 1, 2 -> 4 (policy 5: a strict win)
    fake, _ = _scripted_generate(["3", "3", "1", "4", "4"])
    monkeypatch.setattr(judge, "generate", fake)
    reference = judge.score_responses(None, None, SETTINGS, examples, [e.reference for e in examples])
    metrics, per_prompt = judge.judge_metrics(policy, reference)
    assert per_prompt["judge_win"] == [1, None, 1, None] and per_prompt["judge_strict_win"] == [0, None, 1, None]
    assert metrics["judge_compared"] == 2 and metrics["judge_win_rate"] == 1.0 and metrics["judge_strict_win_rate"] == 0.5
    assert metrics["judge_unparsed"] == 2 and metrics["judge_unscored"] == 1 and metrics["judge_no_preferences"] == 1
    assert metrics["judge_score_mean"] == 4.0 and metrics["judge_reference_score_mean"] == pytest.approx(8 / 3)


def _personalization_data(tmp_path: Path) -> Path:
    rows = [{"question": f"What should I cook tonight, take {i}?", "memories": [f"I am allergic to item {i}.",
             "I like spicy food."], "reference": f"Try a spicy dish without item {i}."} for i in range(6)]
    rows[5]["memories"] = []  # one user states no preference: not judged, counted
    path = tmp_path / "users.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _judge_cfg(tmp_path):
    """The tiny model judged by the tiny judge on the personalization rows of ``_personalization_data``."""
    data = _personalization_data(tmp_path)
    return tiny_cfg(tmp_path, "task=persistbench", "task.name=jsonl", f"data.source={data}", "judge=tiny-llama",
                    "+task.options.context_field=memories", "+task.options.reference_field=reference",
                    "+task.options.answer_field=null", "data.num_train=0", "data.num_eval=6",
                    "data.max_length=1400", "data.max_prompt_length=1300", "judge.max_new_tokens=3",
                    "eval.bootstrap_resamples=200")


def test_judge_end_to_end_with_a_tiny_judge(tmp_path):
    cfg = _judge_cfg(tmp_path)
    assert OmegaConf.select(cfg, "judge.weak") is True
    results = evaluation.evaluate(cfg, tmp_path / "out")
    base = results["models"]["base"]
    # 5 users with 2 preferences each: 10 judgments of the model's responses (and 10 of the references)
    assert base["judge_judgments"] == 10 and base["judge_no_preferences"] == 1
    rows = results["per_prompt"]["base"]
    assert rows["judge_score"][5] is None and rows["judge_win"][5] is None
    scored = [s for s in rows["judge_score"] if s is not None]
    assert base["judge_unscored"] == 5 - len(scored)
    assert base["judge_unparsed"] >= 2 * base["judge_unscored"]  # an unscored response had every judgment unparsed
    assert base["judge_compared"] == sum(w is not None for w in rows["judge_win"])
    if base["judge_compared"]:
        assert base["judge_win_rate"] == sum(w for w in rows["judge_win"] if w is not None) / base["judge_compared"]
    assert results["judge"]["weak"] is True and "weak judge" in results["judge"]["label"]
    assert base["judge_unparsed"] > 0 and results["judge"]["unparsed_examples"]  # random bytes: parse failures seen
    table = (tmp_path / "out" / "eval_table.md").read_text()
    assert "judgments unparsed" in table and "a weak judge" in table


def test_judge_is_off_for_tasks_without_contexts(tmp_path):
    cfg = tiny_cfg(tmp_path)
    task = evaluation.build_task(cfg)
    _, examples = evaluation.task_splits(cfg, task)
    assert not evaluation.uses_judge(cfg, task, examples)
    with pytest.raises(ValueError, match="judge.enabled=true needs a personalization task"):
        evaluation.uses_judge(tiny_cfg(tmp_path, "judge.enabled=true"), task, examples)


def test_judge_end_to_end_parsed_and_unparsed_with_deltas(tmp_path, monkeypatch):
    # the tiny judge really runs; every other judgment's output is replaced by a parseable one, so both
    # branches (scored, unparsed) go through evaluation, eval.json and the paired deltas
    from tests.stages.test_evaluation import _perturbed_model
    real_generate = judge.generate
    calls = []

    def half_parsed(model, tokenizer, prompts, **kwargs):
        generations = real_generate(model, tokenizer, prompts, **kwargs)
        calls.append(len(prompts))
        items = [Generation(f"Score: {1 + (len(calls) + i) % 5}" if i % 2 == 0 else "\x0f", g.finish_reason, g.num_tokens)
                 for i, g in enumerate(generations)]
        return Generations(items, generations.settings)

    monkeypatch.setattr(judge, "generate", half_parsed)
    cfg = _judge_cfg(tmp_path)
    results = evaluation.evaluate(cfg, tmp_path / "out", model_path=_perturbed_model(cfg, tmp_path / "trained"))
    assert calls == [10, 10, 10]  # references once, then each model: batched, one decode per set
    for name in ("base", "trained"):
        m = results["models"][name]
        assert m["judge_unparsed"] == 5 and m["judge_unscored"] == 0 and m["judge_compared"] == 5
        wins = [w for w in results["per_prompt"][name]["judge_win"] if w is not None]
        assert m["judge_win_rate"] == sum(wins) / 5 and m["judge_strict_win_rate"] <= m["judge_win_rate"]
    delta = results["deltas"]["judge_win_rate"]
    assert delta["n"] == 5 and delta["test"] == "mcnemar_exact"
    assert delta["mean"] == pytest.approx(results["models"]["trained"]["judge_win_rate"]
                                          - results["models"]["base"]["judge_win_rate"])
    assert "judge win rate (ties win)" in (tmp_path / "out" / "eval_table.md").read_text()


def test_missing_judge_weights_are_reported_before_anything_loads(tmp_path):
    from mipo.stages.config import config_problems
    missing = "judge.model.gguf_package=no_such_gguf_package"
    problems = config_problems(tiny_cfg(tmp_path, "task=persistbench", missing))
    assert any("judge=smollm2-135m-instruct" in p and "judge.enabled=false" in p for p in problems), problems
    # a task without user contexts never runs the judge: nothing to report
    assert not any("judge=" in p for p in config_problems(tiny_cfg(tmp_path, missing)))
