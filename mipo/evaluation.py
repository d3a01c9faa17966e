"""The evaluation stage: base vs trained model on held-out prompts.

For each model: responses to the evaluation prompts (greedy by default), task accuracy with
its standard error, and the mean pointwise MI of the responses,

    pmi(x; y) = log pi_ref(y|x) - log (1/K) sum_k pi_ref(y|x'_k)

measured under the *reference* (base) model for both, which is the quantity MIPO maximises
(``mipo/mi.py``). For personalization tasks the K alternatives x'_k keep the query and swap
the user's context (the conditional MI pmi(c; y | q)).

Each model's results are cached in ``<cache>/eval/<key>.json``, keyed by the evaluated
model, the reference model, the evaluation prompts and settings: a sweep evaluates the base
model once.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mipo.chat import Messages
from mipo.config import build_task, task_splits
from mipo.files import stable_hash, write_json
from mipo.generation import generate
from mipo.logprobs import Scorer
from mipo.mi import estimate_pmi
from mipo.models import load_model, load_tokenizer, model_identity, resolve_device, resolve_dtype, tokenizer_identity
from mipo.tasks import Example, Task

log = logging.getLogger(__name__)
MI_PLAIN, MI_CONDITIONAL = "pmi(x; y)", "conditional pmi(c; y | q)"


def accuracy(correct: list[bool]) -> tuple[float, float]:
    """Mean accuracy and its standard error sqrt(p (1 - p) / n)."""
    n = len(correct)
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / n)


def context_alternatives(task: Task, examples: list[Example]) -> list[list[Messages]] | None:
    """For personalization: each example's query under every other user's context.

    ``estimate_pmi`` draws its K alternatives from these lists; ``None`` for tasks without contexts.
    """
    if any(e.context is None for e in examples):
        return None
    contexts = sorted({e.context for e in examples})
    return [[task.messages(task.with_context(e, c)) for c in contexts if c != e.context] for e in examples]


def eval_inputs(cfg: DictConfig, evaluated_model: str, tokenizer) -> dict[str, Any]:
    """Everything one model's evaluation results depend on."""
    settings = OmegaConf.to_container(cfg.eval, resolve=True)
    settings.pop("model_path", None)
    return {
        "evaluated_model": evaluated_model,
        "reference_model": model_identity(cfg.model),
        "tokenizer": tokenizer_identity(tokenizer),  # how prompts are rendered and tokenised
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "data": {k: cfg.data[k] for k in ("source", "num_train", "num_eval", "max_length", "max_prompt_length")},
        "eval": settings,
        "device_type": resolve_device(cfg.device).type,
        "seed": cfg.seed,
        "format": 2,
    }


def evaluate(cfg: DictConfig, output_dir: str | Path, model_path: str | Path | None = None,
             trained_id: str | None = None) -> dict[str, Any]:
    """Evaluate the base model and (if ``model_path``) the trained model; writes ``eval.json``.

    Args:
        model_path: a trained model folder (Hugging Face format).
        trained_id: what identifies that model in the cache (the pipeline passes its train
            key); by default the folder's file names, sizes and times.
    """
    output_dir = Path(output_dir)
    task = build_task(cfg)
    _, eval_examples = task_splits(cfg, task)
    prompts = [task.messages(e) for e in eval_examples]

    identities = {"base": model_identity(cfg.model)}
    if model_path is not None:
        identities["trained"] = f"trained:{trained_id}" if trained_id else model_identity({"name_or_path": str(model_path)})
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    inputs = {name: eval_inputs(cfg, identity, tokenizer) for name, identity in identities.items()}
    cache_files = {name: Path(cfg.paths.cache_dir) / "eval" / f"{stable_hash(inputs[name], 20)}.json"
                   for name in identities}
    records = {name: json.loads(path.read_text()) for name, path in cache_files.items() if path.exists()}
    for name in records:
        log.info("evaluation of the %s model: cached, skipping (%s)", name, cache_files[name])

    pending = [name for name in identities if name not in records]
    if pending:
        records.update(_evaluate_models(cfg, task, tokenizer, eval_examples, prompts, pending, model_path))
        for name in pending:
            write_json(cache_files[name], {"inputs": inputs[name], **records[name]})

    results: dict[str, Any] = {
        "task": cfg.task.name, "num_eval": len(eval_examples), "mi_k": cfg.eval.mi_k,
        "mi": records["base"]["mi"],  # from the alternatives the estimator was given, not from one example
        "precision": records["base"]["precision"],
        "models": {name: records[name]["metrics"] for name in identities},
        "mi_values": {name: records[name]["mi_values"] for name in identities},
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "eval.json", results)
    with open(output_dir / "responses.jsonl", "w") as f:
        for i, e in enumerate(eval_examples):
            row = {"uid": e.uid, "answer": e.answer, **{name: records[name]["responses"][i] for name in identities}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (output_dir / "eval_table.md").write_text(format_table(results) + "\n")
    return results


def _evaluate_models(cfg: DictConfig, task: Task, tokenizer, examples: list[Example], prompts: list,
                     names: list[str], model_path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Generate with each named model, then score accuracy and MI under the reference model."""
    device = resolve_device(cfg.device)
    dtype = eval_dtype(cfg)
    gen = dict(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
               batch_size=cfg.eval.batch_size, seed=cfg.seed, max_prompt_length=cfg.data.max_prompt_length)
    base = load_model(cfg.model, device=device, dtype=dtype, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    responses: dict[str, list[str]] = {}
    if "base" in names:
        responses["base"] = generate(base, tokenizer, prompts, desc="eval: base model responses", **gen).texts
    if "trained" in names:
        trained = load_model({"name_or_path": str(model_path), "attn_implementation": cfg.model.attn_implementation},
                             device=device, dtype=dtype)
        responses["trained"] = generate(trained, tokenizer, prompts, desc="eval: trained model responses", **gen).texts
        del trained

    # MI of each model's responses, always under the reference (base) model in fp32.
    reference = base if base.dtype == torch.float32 else load_model(
        cfg.model, device=device, dtype=torch.float32, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    scorer = Scorer(reference, tokenizer, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                    batch_size=cfg.eval.score_batch_size, kernel=cfg.kernel)
    alternatives = context_alternatives(task, examples)
    mi_kind = MI_PLAIN if alternatives is None else MI_CONDITIONAL
    precision = {"generation": str(dtype).removeprefix("torch."), "mi_reference": "float32", "device": device.type}
    records = {}
    for name, outs in responses.items():
        estimate = estimate_pmi(
            scorer, prompts, outs, k=cfg.eval.mi_k, seed=cfg.seed, alternatives=alternatives,
            include_positive=cfg.eval.mi_include_positive, desc=f"eval: MI of {name} responses")
        metrics: dict[str, Any] = {"mi_mean": estimate.mean, "mi_stderr": estimate.stderr}
        if task.has_answers:
            acc, se = accuracy([task.is_correct(r, e) for r, e in zip(outs, examples)])
            metrics.update(accuracy=acc, accuracy_stderr=se)
        metrics["mean_response_chars"] = sum(map(len, outs)) / len(outs)
        records[name] = {"metrics": metrics, "responses": outs, "mi_values": estimate.values, "mi": mi_kind,
                         "precision": precision}
    return records


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


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per model, accuracy and mean pointwise MI with standard errors."""
    has_acc = any("accuracy" in r for r in results["models"].values())
    header = "| model | " + ("accuracy | " if has_acc else "") + f"mean pointwise MI (nats, K={results['mi_k']}) |"
    lines = [f"{results['task']}: {results['num_eval']} held-out prompts, {results['mi']} under the base model",
             "", header, "|---|" + ("---|" if has_acc else "") + "---|"]
    for name, r in results["models"].items():
        acc = f"{100 * r['accuracy']:.1f}% ± {100 * r['accuracy_stderr']:.1f} | " if has_acc else ""
        lines.append(f"| {name} | {acc}{r['mi_mean']:.3f} ± {r['mi_stderr']:.3f} |")
    return "\n".join(lines)
