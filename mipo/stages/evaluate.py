"""The evaluation stage: base vs trained model on held-out prompts, measured as the field does.

For each model, on the same evaluation prompts (greedy by default):

* **accuracy**, strict and flexible (``Task.extract_answer(text, mode=...)``, lm-evaluation-
  harness's two filters), and for multiple choice the **log-likelihood accuracy** (lm-eval's
  ``acc`` and ``acc_norm``: the option whose text has the highest log-likelihood after the
  question, summed or per character; ``mipo/metrics/accuracy.py``), which needs no answer format at all;
* **pointwise MI** of the responses under the *reference* (base) model for both models,

      pmi(x; y) = log pi_ref(y|x) - log (1/K) sum_k pi_ref(y|x'_k)

  (``mipo/mi.py``), summed over the response and **per token** (``pmi_per_token``; the summed
  pmi grows with length), beside the **mean response length** and the **fraction cut at
  max_new_tokens**. For personalization tasks the K alternatives x'_k keep the query and swap the
  user's context (the conditional MI pmi(c; y | q));
* for personalization with reference responses, the **LLM judge**'s scores and win rate against
  the reference (``mipo/metrics/judge.py``); **diversity**: self-BLEU and distinct-1/2 (``mipo/metrics/diversity.py``).

Then **paired comparisons**: both models answer the same prompts and are scored with the same
alternatives, so ``deltas.<metric>`` is trained minus base per prompt: mean, paired standard
error, a seeded 95% bootstrap interval over prompts and a p-value (McNemar's exact test for
accuracies, a sign-flip permutation test for pmi and lengths; ``mipo/metrics/stats.py``).

Then **the paper's identity** (``eval.identity``, a trained model whose loss has a reference): the
implicit reward r(x, y) = beta log pi_theta(y|x)/pi_ref(y|x) against pmi(x; y) on the base model's
held-out responses, each prompt with its own response and the responses whose MI rows drew it as
an alternative (``mipo/metrics/identity.py``; MIPO, arXiv 2603.19294: DPO's optimal implicit reward on
MIPO pairs is the pointwise MI up to a per-prompt constant). The reference scores are the MI
estimator's; only the trained policy's log-probs of those rows are new. ``identity.png`` plots them.

Each model's results are cached in ``<cache>/eval/<key>.json``, keyed by the evaluated
model, the reference model, the evaluation prompts and settings: a sweep evaluates the base
model once. The comparisons are recomputed from the cached per-prompt values. The printed
table (``eval_table.md``) is ``mipo/metrics/table.py``'s.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from mipo.data.chat import Messages
from mipo.data.encoding import encode_rows, truncation_counts, warn_truncation
from mipo.data.tasks import Example, Task, build_task, task_splits
from mipo.losses import loss_family
from mipo.metrics.accuracy import accuracy, loglik_correct
from mipo.metrics.diversity import diversity_metrics
from mipo.metrics.identity import (
    identity_candidates,
    identity_metrics,
    score_candidates,
)
from mipo.metrics.judge import (
    JudgeScores,
    JudgeSettings,
    judge_metrics,
    prompt_problems,
    score_responses,
)
from mipo.metrics.stats import mean_stderr, paired_comparison
from mipo.metrics.table import format_table
from mipo.mi import Marginal, MIEstimate, estimate_pmi, pmi_per_token
from mipo.model.generation import DecodeSettings, Generations, PlanSettings, generate
from mipo.model.loading import (
    load_model,
    load_tokenizer,
    model_identity,
    model_source_problem,
    resolve_device,
    resolve_dtype,
    run_tokenizer,
)
from mipo.model.logprobs import Scorer, ScoringSettings
from mipo.reporting.plots import plot_identity
from mipo.runtime import distributed
from mipo.runtime.errors import failed, is_int
from mipo.runtime.files import write_json
from mipo.stages.keys import eval_key, eval_path

log = logging.getLogger(__name__)
MI_PLAIN, MI_CONDITIONAL = "pmi(x; y)", "conditional pmi(c; y | q)"
# deltas.<metric>: (per-prompt field, 0/1 outcome?). Binary ones get McNemar's exact test, the others a sign-flip test.
PAIRED_METRICS: dict[str, tuple[str, bool]] = {
    "accuracy_strict": ("correct_strict", True),
    "accuracy_flexible": ("correct_flexible", True),
    "accuracy_loglik": ("correct_loglik", True),
    "accuracy_loglik_norm": ("correct_loglik_norm", True),
    "mi_mean": ("mi", False),
    "mi_per_token_mean": ("mi_per_token", False),
    "mean_response_tokens": ("response_tokens", False),
    "truncated_fraction": ("truncated", True),
    "judge_score_mean": ("judge_score", False),
    "judge_win_rate": ("judge_win", True),
    "judge_strict_win_rate": ("judge_strict_win", True),
}


def uses_loglik(cfg: DictConfig, task: Task, examples: Sequence[Example]) -> bool:
    """``eval.loglik``: auto is on when every evaluation example has options and a gold answer."""
    setting = cfg.eval.get("loglik", "auto")
    multiple_choice = task.has_answers and bool(examples) and all(e.choices and e.answer for e in examples)
    if setting == "auto":
        return multiple_choice
    if setting and not multiple_choice:
        raise ValueError(f"eval.loglik=true needs a multiple-choice task (options and gold answers); "
                         f"task {task.name!r} has none: use eval.loglik=auto or false")
    return bool(setting)


def uses_judge(cfg: DictConfig, task: Task, examples: Sequence[Example]) -> bool:
    """``judge.enabled``: auto is on when the prompts carry user contexts and some example has a reference response."""
    judge = cfg.get("judge")
    if judge is None:
        return False
    personalized = task.supports_context and any(e.context for e in examples) and any(e.reference for e in examples)
    if judge.enabled == "auto":
        return personalized
    if judge.enabled and not personalized:
        raise ValueError(f"judge.enabled=true needs a personalization task whose evaluation prompts carry user "
                         f"contexts and reference responses; task {task.name!r} has none: use judge.enabled=auto or false")
    return bool(judge.enabled)


def uses_identity(cfg: DictConfig, evaluates_trained: bool) -> bool:
    """``eval.identity`` (default true): measured where a trained model is evaluated and its loss has a
    reference (``mipo.losses.loss_family(loss.loss_type).needs_reference``): the implicit reward
    r = beta log pi_theta/pi_ref needs pi_ref, and the identity is about DPO's."""
    if not (cfg.eval.get("identity", True) and evaluates_trained):
        return False
    return loss_family(cfg.loss.loss_type).needs_reference


def eval_config_problems(cfg: DictConfig) -> list[str]:
    """Problems with the ``eval.*`` and ``judge.*`` values this module adds (``mipo.stages.config`` lists them)."""
    ev, problems = cfg.eval, []
    problems += failed([(is_int(ev.score_batch_size) and ev.score_batch_size > 0,
                         f"eval.score_batch_size={ev.score_batch_size}: expected an int > 0"),
                        (is_int(ev.mi_k) and ev.mi_k >= 1, f"eval.mi_k={ev.mi_k}: expected an int >= 1")])
    if is_int(ev.mi_k) and is_int(cfg.data.num_eval) and ev.mi_k > cfg.data.num_eval - 1:
        problems.append(f"eval.mi_k={ev.mi_k} needs at least {ev.mi_k + 1} distinct evaluation prompts (each row's own "
                        f"and K others) but data.num_eval={cfg.data.num_eval}: lower eval.mi_k or raise data.num_eval")
    resamples = ev.get("bootstrap_resamples", 10_000)
    if not (is_int(resamples) and resamples >= 1):
        problems.append(f"eval.bootstrap_resamples={resamples}: expected an int >= 1 (10000 as the default)")
    if ev.get("loglik", "auto") not in ("auto", True, False):
        problems.append(f"eval.loglik={ev.get('loglik')}: expected auto, true or false")
    for flag in ("diversity", "identity"):
        if not isinstance(ev.get(flag, True), bool):
            problems.append(f"eval.{flag}={ev.get(flag)}: expected true or false")
    judge = cfg.get("judge")
    if judge is not None:
        if judge.get("enabled") not in ("auto", True, False):
            problems.append(f"judge.enabled={judge.get('enabled')}: expected auto, true or false")
        problems += prompt_problems(str(judge.get("prompt", "")))
        max_new = judge.get("max_new_tokens")
        if not (is_int(max_new) and max_new >= 1):
            problems.append(f"judge.max_new_tokens={max_new}: expected an int > 0")
        batch = judge.get("batch_size")
        if batch != "auto" and not (is_int(batch) and batch >= 1):
            problems.append(f"judge.batch_size={batch}: expected auto or an int > 0")
        may_run = judge.get("enabled") is True or (judge.get("enabled") == "auto" and _task_has_contexts(cfg))
        source_problem = model_source_problem(judge.model) if may_run else None
        if source_problem is not None:
            problems.append(f"{source_problem} (judge={judge.get('name')}; judge.enabled=false turns the judge off)")
    return problems


def _task_has_contexts(cfg: DictConfig) -> bool:
    """Whether the configured task's prompts can carry a user context (the judge may run)."""
    try:
        return build_task(cfg).supports_context
    except Exception:  # noqa: BLE001 - a bad task is reported by the task checks
        return False


def context_alternatives(task: Task, examples: list[Example]) -> list[list[Messages]] | None:
    """For personalization: each example's query under every other user's context.

    ``estimate_pmi`` draws its K alternatives from these lists; ``None`` for tasks without contexts.
    """
    if any(e.context is None for e in examples):
        return None
    contexts = sorted({e.context for e in examples})
    return [[task.messages(task.with_context(e, c)) for c in contexts if c != e.context] for e in examples]


def evaluate(cfg: DictConfig, output_dir: str | Path, model_path: str | Path | None = None,
             trained_id: str | None = None) -> dict[str, Any]:
    """Evaluate the base model and (if ``model_path``) the trained model; writes ``eval.json``.

    ``eval.json`` holds ``models.<base|trained>`` (each metric with ``<name>_stderr``; see
    ``model_metrics``), ``deltas.<metric>`` (trained minus base over the same prompts: ``{"mean",
    "stderr", "ci95", "p_value", "n", "test"}``, see ``paired_deltas``), the decoding settings, the
    precision, the judge (where it ran), ``identity`` (``uses_identity``: the implicit reward against
    pmi, ``mipo.metrics.identity.identity_metrics``; with ``identity.png`` beside it) and ``per_prompt``
    values of every metric.

    Args:
        model_path: a trained model folder (Hugging Face format).
        trained_id: what identifies that model in the cache (the pipeline passes its train
            key); by default the folder's file names, sizes and times.
    """
    output_dir = Path(output_dir)
    task = build_task(cfg)
    _, eval_examples = task_splits(cfg, task)
    judged = uses_judge(cfg, task, eval_examples)

    identities = {"base": model_identity(cfg.model)}
    if model_path is not None:
        identities["trained"] = f"trained:{trained_id}" if trained_id else model_identity({"name_or_path": str(model_path)})
    tokenizer = run_tokenizer(cfg)
    inputs = {name: eval_key(cfg, identity, tokenizer, judged) for name, identity in identities.items()}
    cache_files = {name: eval_path(cfg, inputs[name]) for name in identities}
    records = {name: json.loads(path.read_text()) for name, path in cache_files.items() if path.exists()}
    for name in records:
        log.info("evaluation of the %s model: cached, skipping (%s)", name, cache_files[name])

    measure_identity = uses_identity(cfg, model_path is not None)  # the paper's identity, not the models' identities
    pending = _pending(records, list(identities), measure_identity)
    if pending:
        records.update(_evaluate_models(cfg, task, tokenizer, eval_examples, pending, model_path, judged))
    if measure_identity and "identity" not in records["trained"]:
        records["trained"]["identity"] = _identity_scores(cfg, tokenizer, task, eval_examples, records["base"],
                                                          model_path)
        pending = list(dict.fromkeys([*pending, "trained"]))
    for name in pending:
        write_json(cache_files[name], {"inputs": inputs[name], **records[name]})

    results = _results(cfg, len(eval_examples), records, list(identities), judged, measure_identity)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "eval.json", results)
    with open(output_dir / "responses.jsonl", "w") as f:
        for i, e in enumerate(eval_examples):
            row = {"uid": e.uid, "answer": e.answer, **{name: records[name]["responses"][i] for name in identities}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (output_dir / "eval_table.md").write_text(format_table(results) + "\n")
    if measure_identity and distributed.is_main():
        plot_identity(results["identity"], output_dir / "identity.png",
                      title=f"{cfg.task.name} · {cfg.model.get('name')}")
    return results


def _pending(records: dict[str, dict[str, Any]], names: list[str], measure_identity: bool) -> list[str]:
    """The models to evaluate: those not cached, and a base model cached without its MI scores
    (``mi_estimate``, by code older than the identity) when the identity still needs them."""
    pending = [name for name in names if name not in records]
    stale_base = "mi_estimate" not in records.get("base", {}) and "identity" not in records.get("trained", {})
    if measure_identity and stale_base and "base" not in pending:
        log.info("the cached base evaluation has no MI scores for the identity: evaluating the base model again")
        pending.insert(0, "base")
    return pending


def _results(cfg: DictConfig, num_eval: int, records: dict[str, dict[str, Any]], names: list[str], judged: bool,
             measure_identity: bool) -> dict[str, Any]:
    """``eval.json``: the models' metrics, the paired deltas, the judge, the identity, the per-prompt values."""
    results: dict[str, Any] = {
        "task": cfg.task.name, "num_eval": num_eval, "mi_k": cfg.eval.mi_k,
        "mi": records["base"]["mi"],  # from the alternatives the estimator was given, not from one example
        "precision": records["base"]["precision"],
        "decoding": records["base"]["decoding"],
        "models": {name: records[name]["metrics"] for name in names},
    }
    if "trained" in records:
        resamples = int(cfg.eval.get("bootstrap_resamples", 10_000))
        results["deltas"] = paired_deltas(records["base"]["per_prompt"], records["trained"]["per_prompt"],
                                          resamples=resamples, seed=cfg.seed)
        results["comparison"] = {"bootstrap_resamples": resamples, "seed": cfg.seed, "ci": 0.95,
                                 "unit": "prompt (trained minus base on the same prompts)"}
    if measure_identity:
        results["identity"] = {"reward": "beta * (log pi_theta(y|x) - log pi_ref(y|x))", "pmi": records["base"]["mi"],
                               "loss_type": cfg.loss.loss_type, "responses": "base model's", "precision": "float32",
                               **identity_metrics(records["trained"]["identity"], float(cfg.loss.beta))}
    if judged:
        results["judge"] = records["base"]["judge"]
    results["mi_values"] = {name: records[name]["mi_values"] for name in names}
    results["per_prompt"] = {name: records[name]["per_prompt"] for name in names}
    return results


def _identity_scores(cfg: DictConfig, tokenizer, task: Task, examples: list[Example], base: dict[str, Any],
                     model_path: str | Path) -> dict[str, list]:
    """The identity's candidates (``mipo.metrics.identity.identity_candidates``) with the reference scores
    the base model's MI estimate holds, and the trained policy's log-probs of them: the policy in fp32
    (as the MI reference), scored with the evaluation's ``ScoringSettings``, rows in the estimator's order."""
    prompts = [task.messages(e) for e in examples]
    candidates = identity_candidates(prompts, MIEstimate(**base["mi_estimate"]), context_alternatives(task, examples))
    finished = [not cut for cut in base["per_prompt"]["truncated"]]
    policy = load_model({"name_or_path": str(model_path), "attn_implementation": cfg.model.attn_implementation},
                        device=resolve_device(cfg.device), dtype=torch.float32, cache_dir=cfg.paths.cache_dir,
                        vocab_size=len(tokenizer))
    logp_policy = score_candidates(Scorer(policy, tokenizer, ScoringSettings.of(cfg)), candidates, base["responses"],
                                   finished, desc="eval: identity, the trained policy's log-probs")
    return {**candidates.record(), "logp_policy": logp_policy}


def model_metrics(per_prompt: dict[str, list]) -> dict[str, Any]:
    """One model's ``eval.json`` numbers from its per-prompt values.

    Each mean comes with ``<name>_stderr`` (std ddof=1 / sqrt(n)): ``accuracy_strict``,
    ``accuracy_flexible`` (with ``unparsed_strict``/``unparsed_flexible``, the responses no answer
    was extracted from), ``accuracy_loglik``/``accuracy_loglik_norm`` (multiple choice),
    ``mi_mean`` (stderr ``mi_stderr``), ``mi_per_token_mean``, ``mean_response_tokens``
    (generated tokens, end-of-turn not counted), ``truncated_fraction`` (cut at max_new_tokens), ``prompts_cut``/
    ``prompt_tokens_cut`` and ``responses_cut``/``response_tokens_cut`` (cut by data.max_prompt_length/max_length).
    ``accuracy`` is an alias of ``accuracy_strict`` for older sweeps.
    """
    metrics: dict[str, Any] = {}
    for name, field in (("accuracy_strict", "correct_strict"), ("accuracy_flexible", "correct_flexible"),
                        ("accuracy_loglik", "correct_loglik"), ("accuracy_loglik_norm", "correct_loglik_norm")):
        if field in per_prompt:
            metrics[name], metrics[f"{name}_stderr"] = accuracy(per_prompt[field])
    for mode in ("strict", "flexible"):
        if f"parsed_{mode}" in per_prompt:
            metrics[f"unparsed_{mode}"] = sum(1 for parsed in per_prompt[f"parsed_{mode}"] if not parsed)
    if "accuracy_strict" in metrics:
        metrics["accuracy"], metrics["accuracy_stderr"] = metrics["accuracy_strict"], metrics["accuracy_strict_stderr"]
    metrics["mi_mean"], metrics["mi_stderr"] = mean_stderr(per_prompt["mi"])
    metrics["mi_per_token_mean"], metrics["mi_per_token_stderr"] = mean_stderr(per_prompt["mi_per_token"])
    metrics["mean_response_tokens"], metrics["mean_response_tokens_stderr"] = mean_stderr(per_prompt["response_tokens"])
    metrics["truncated_fraction"] = sum(per_prompt["truncated"]) / len(per_prompt["truncated"])
    metrics["mean_response_chars"] = sum(per_prompt["response_chars"]) / len(per_prompt["response_chars"])
    for unit, field in (("prompt", "prompt_tokens_cut"), ("response", "response_tokens_cut")):  # by the truncation rule
        if field in per_prompt:
            metrics[f"{unit}s_cut"], metrics[field] = sum(n > 0 for n in per_prompt[field]), sum(per_prompt[field])
    return metrics


def paired_deltas(base: dict[str, list], trained: dict[str, list], resamples: int = 10_000,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """``deltas.<metric>``: trained minus base over the same prompts, for each metric of ``PAIRED_METRICS``
    both models have (``mipo.metrics.stats.paired_comparison``: mean, paired stderr, bootstrap ci95, p-value).

    Prompts where either value is missing (a response the judge could not score) are left out,
    and ``n`` says how many prompts were compared.
    """
    deltas = {}
    for metric, (field, binary) in PAIRED_METRICS.items():
        if field not in base or field not in trained:
            continue
        if len(base[field]) != len(trained[field]):
            raise ValueError(f"{field}: base has {len(base[field])} prompts but trained {len(trained[field])}: "
                             "the paired comparison needs the same evaluation prompts")
        pairs = [(t, b) for t, b in zip(trained[field], base[field]) if t is not None and b is not None]
        if not pairs:
            continue
        treated, control = [float(t) for t, _ in pairs], [float(b) for _, b in pairs]
        deltas[metric] = paired_comparison(treated, control, binary=binary, resamples=resamples, seed=seed).record()
    return deltas


def _evaluate_models(cfg: DictConfig, task: Task, tokenizer, examples: list[Example], names: list[str],
                     model_path: str | Path | None, judged: bool = False) -> dict[str, dict[str, Any]]:
    """Generate with each named model (and score its log-likelihood accuracy), then score accuracy
    and MI under the reference model, diversity, and the judge where it runs."""
    device = resolve_device(cfg.device)
    dtype = eval_dtype(cfg)
    prompts = [task.messages(e) for e in examples]
    scoring = ScoringSettings.of(cfg)
    loglik = uses_loglik(cfg, task, examples)
    base = load_model(cfg.model, device=device, dtype=dtype, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    generations, loglik_values = {}, {}
    for name in ("base", "trained"):
        if name not in names:
            continue
        model = base if name == "base" else load_model(
            {"name_or_path": str(model_path), "attn_implementation": cfg.model.attn_implementation}, device=device,
            dtype=dtype, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
        generations[name] = _responses(cfg, model, tokenizer, prompts, name)
        if loglik:
            loglik_values[name] = loglik_correct(Scorer(model, tokenizer, scoring), task, examples,
                                                 desc=f"eval: {name} model, option log-likelihoods")
        del model

    # MI of each model's responses, always under the reference (base) model in fp32.
    reference = base if base.dtype == torch.float32 else load_model(
        cfg.model, device=device, dtype=torch.float32, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    scorer = Scorer(reference, tokenizer, scoring)
    alternatives = context_alternatives(task, examples)
    mi_kind = MI_PLAIN if alternatives is None else MI_CONDITIONAL
    precision = {"generation": str(dtype).removeprefix("torch."), "mi_reference": "float32", "device": device.type,
                 "loglik": str(dtype).removeprefix("torch.") if loglik else None}
    records = {}
    for name, generated in generations.items():
        outs = generated.texts
        mi_values, estimate = _pmi_and_length_values(cfg, scorer, prompts, alternatives, name, generated)
        per_prompt: dict[str, list] = {**mi_values, **_answer_values(task, examples, outs),
                                       **loglik_values.get(name, {})}
        metrics = model_metrics(per_prompt)
        if cfg.eval.get("diversity", True) and len(outs) > 1:
            metrics.update({k: v for k, v in diversity_metrics(outs).items() if v is not None})
        records[name] = {"metrics": metrics, "responses": outs, "per_prompt": per_prompt, "mi_values": per_prompt["mi"],
                         "mi": mi_kind, "precision": precision, "decoding": generated.settings,
                         "mi_estimate": estimate.to_dict()}  # the scores the identity reuses
    del reference, base, scorer
    if judged:
        _judge(cfg, examples, records, device)
    return records


def _responses(cfg: DictConfig, model: torch.nn.Module, tokenizer, prompts: list[Messages], name: str) -> Generations:
    """Model ``name``'s responses to the evaluation prompts, decoded with ``eval.*`` (greedy by default)."""
    settings = DecodeSettings(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                              top_p=cfg.eval.top_p)
    planning = PlanSettings(batch_size=cfg.eval.batch_size, max_prompt_length=cfg.data.max_prompt_length)
    return generate(model, tokenizer, prompts, settings, planning, seed=cfg.seed, desc=f"eval: {name} model responses")


def _pmi_and_length_values(cfg: DictConfig, scorer: Scorer, prompts: list[Messages],
                           alternatives: list[list[Messages]] | None, name: str,
                           generated: Generations) -> tuple[dict[str, list], MIEstimate]:
    """One model's per-prompt pmi under the reference ``scorer`` (summed and per scored token), response
    lengths and cut responses; and the MI estimate itself (its log-probs, which the identity reuses)."""
    outs = generated.texts
    finished = [reason == "eos" for reason in generated.finish_reasons]
    marginal = Marginal(k=cfg.eval.mi_k, seed=cfg.seed, include_positive=cfg.eval.mi_include_positive)
    estimate = estimate_pmi(scorer, prompts, outs, marginal, alternatives=alternatives,
                            desc=f"eval: MI of {name} responses", finished=finished)
    # the rows the estimator scored, after the truncation rule: tokens scored, and what data.max_prompt_length
    # (the prompt generation saw) and data.max_length (the response) cut
    rows = encode_rows(scorer.tokenizer, prompts, outs, cfg.data.max_length, cfg.data.max_prompt_length, finished)
    warn_truncation(truncation_counts(rows), f"eval: the {name} model's responses")
    scored_tokens = [len(row.response_ids) for row in rows]
    return {
        "mi": estimate.values, "mi_per_token": pmi_per_token(estimate.values, scored_tokens),
        "scored_tokens": scored_tokens, "response_tokens": [g.num_tokens for g in generated],
        "truncated": [int(not done) for done in finished], "response_chars": [len(text) for text in outs],
        "prompt_tokens_cut": [row.prompt_cut for row in rows], "response_tokens_cut": [row.response_cut for row in rows],
    }, estimate


def _answer_values(task: Task, examples: list[Example], outs: list[str]) -> dict[str, list]:
    """Per prompt, for tasks with answers: whether an answer was extracted and whether it is correct,
    strict and flexible."""
    values: dict[str, list] = {}
    if task.has_answers:
        for mode in ("strict", "flexible"):
            extracted = [task.extract_answer(r, mode=mode) for r in outs]
            values[f"parsed_{mode}"] = [int(a is not None) for a in extracted]
            values[f"correct_{mode}"] = [int(task.is_correct(r, e, mode=mode)) for r, e in zip(outs, examples)]
    return values


def _judge(cfg: DictConfig, examples: list[Example], records: dict[str, dict[str, Any]], device: torch.device) -> None:
    """Judge every model's responses and the reference responses; adds the judge's metrics and per-prompt values."""
    settings = JudgeSettings.from_config(cfg.judge)
    judge_tokenizer = load_tokenizer(cfg.judge.model, cfg.paths.cache_dir)
    judge = load_model(cfg.judge.model, device=device, cache_dir=cfg.paths.cache_dir, vocab_size=len(judge_tokenizer))
    with_reference = [i for i, e in enumerate(examples) if e.reference]
    reference_judged = score_responses(judge, judge_tokenizer, settings, [examples[i] for i in with_reference],
                                       [examples[i].reference for i in with_reference],
                                       max_prompt_length=cfg.data.max_length, desc="judge: reference responses")
    reference_scores: list[float | None] = [None] * len(examples)
    for i, score in zip(with_reference, reference_judged.scores):
        reference_scores[i] = score
    reference = JudgeScores(reference_scores, reference_judged.judgments, reference_judged.unparsed,
                            reference_judged.unscored, reference_judged.no_preferences, reference_judged.unparsed_examples)
    label = (f"{cfg.judge.name}: a weak judge, to test the judging path; its scores are not a result"
             if cfg.judge.weak else f"{cfg.judge.name}")
    for name, record in records.items():
        judged = score_responses(judge, judge_tokenizer, settings, examples, record["responses"],
                                 max_prompt_length=cfg.data.max_length, desc=f"judge: {name} responses")
        metrics, per_prompt = judge_metrics(judged, reference)
        record["metrics"].update(metrics)
        record["per_prompt"].update(per_prompt)
        record["judge"] = {"name": cfg.judge.name, "weak": bool(cfg.judge.weak), "label": label,
                           "reference_judgments": reference.judgments, "reference_unparsed": reference.unparsed,
                           "unparsed_examples": judged.unparsed_examples,
                           "ties": "count as wins (judge_win_rate); judge_strict_win_rate counts only wins"}


def eval_dtype(cfg: DictConfig) -> torch.dtype:
    """The one precision both models generate in: ``eval.dtype`` (default fp32).

    The trained policy is saved from fp32 master weights; at lr 5e-7 most per-weight updates
    are below half a bf16 step, so loading it in bf16 would return most weights to the base
    model. ``eval.dtype=bfloat16`` is allowed as an explicit choice and logged as such.
    """
    dtype = resolve_dtype(str(cfg.eval.dtype), resolve_device(cfg.device))
    if dtype != torch.float32:
        log.warning("eval.dtype=%s: both models generate in %s, which can round small trained updates away; "
                    "the MI reference stays fp32", cfg.eval.dtype, dtype)
    return dtype
