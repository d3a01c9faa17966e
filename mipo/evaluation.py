"""The evaluation stage: base vs trained model on held-out prompts.

For each model: responses to the evaluation prompts (greedy by default), task accuracy with
its standard error, and the mean pointwise MI of the responses,

    pmi(x; y) = log pi_ref(y|x) - log (1/K) sum_k pi_ref(y|x'_k)

measured under the *reference* (base) model for both, which is the quantity MIPO maximises
(``mipo/mi.py``). For personalization tasks the K alternatives x'_k keep the query and swap
the user's context (the conditional MI pmi(c; y | q)).
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mipo.files import write_json
from mipo.generation import generate
from mipo.mi import estimate_pmi
from mipo.models import load_model, load_tokenizer, resolve_device
from mipo.sampling import build_task, task_splits
from mipo.tasks import Example, Task

log = logging.getLogger(__name__)


def accuracy(correct: list[bool]) -> tuple[float, float]:
    """Mean accuracy and its standard error sqrt(p (1 - p) / n)."""
    n = len(correct)
    p = sum(correct) / n
    return p, math.sqrt(p * (1 - p) / n)


def context_alternatives(task: Task, examples: list[Example], k: int, seed: int) -> list[list[list[dict]]] | None:
    """For personalization: the same query under K other users' contexts (and under none)."""
    if any(e.context is None for e in examples):
        return None
    contexts = sorted({e.context for e in examples})
    rng = random.Random(seed)
    out = []
    for e in examples:
        others = [c for c in contexts if c != e.context]
        chosen = rng.sample(others, min(len(others), k))
        out.append([task.messages(task.with_context(e, c)) for c in chosen])
    return out


def evaluate(cfg: DictConfig, output_dir: str | Path, model_path: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the base model and (if given) the trained model; writes ``eval.json``, ``responses.jsonl``."""
    output_dir = Path(output_dir)
    device = resolve_device(cfg.device)
    task = build_task(cfg)
    _, eval_examples = task_splits(cfg, task)
    prompts = [task.messages(e) for e in eval_examples]
    tokenizer = load_tokenizer(cfg.model, cfg.paths.cache_dir)
    gen = dict(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
               batch_size=cfg.eval.batch_size, seed=cfg.seed, max_prompt_length=cfg.data.max_prompt_length)

    base = load_model(cfg.model, device=device, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    responses = {"base": generate(base, tokenizer, prompts, desc="eval: base model", **gen)}
    if model_path is not None:
        trained = load_model({"name_or_path": str(model_path), "dtype": cfg.model.dtype,
                              "attn_implementation": cfg.model.attn_implementation}, device=device)
        responses["trained"] = generate(trained, tokenizer, prompts, desc="eval: trained model", **gen)
        del trained

    # MI of each model's responses, always under the reference (base) model in fp32.
    reference = base if base.dtype == torch.float32 else load_model(
        cfg.model, device=device, dtype=torch.float32, cache_dir=cfg.paths.cache_dir, vocab_size=len(tokenizer))
    alternatives = context_alternatives(task, eval_examples, cfg.eval.mi_k, cfg.seed)
    results: dict[str, Any] = {"task": cfg.task.name, "num_eval": len(eval_examples), "mi_k": cfg.eval.mi_k,
                               "mi": "conditional pmi(c; y | q)" if alternatives else "pmi(x; y)", "models": {}}
    for name, outs in responses.items():
        estimate = estimate_pmi(
            reference, tokenizer, prompts, outs, k=cfg.eval.mi_k, seed=cfg.seed, alternatives=alternatives,
            include_positive=cfg.eval.mi_include_positive, batch_size=cfg.eval.score_batch_size,
            max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length, kernel=cfg.kernel,
            desc=f"MI: {name} responses")
        row: dict[str, Any] = {"mi_mean": estimate.mean, "mi_stderr": estimate.stderr}
        if task.has_answers:
            acc, se = accuracy([task.is_correct(r, e) for r, e in zip(outs, eval_examples)])
            row.update(accuracy=acc, accuracy_stderr=se)
        row["mean_response_chars"] = sum(map(len, outs)) / len(outs)
        results["models"][name] = row
        results.setdefault("mi_values", {})[name] = estimate.values

    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "eval.json", results)
    _write_responses(output_dir / "responses.jsonl", eval_examples, responses)
    table = format_table(results)
    (output_dir / "eval_table.md").write_text(table + "\n")
    return results


def _write_responses(path: Path, examples: list[Example], responses: dict[str, list[str]]) -> None:
    import json

    with open(path, "w") as f:
        for i, e in enumerate(examples):
            f.write(json.dumps({"uid": e.uid, "answer": e.answer, **{m: r[i] for m, r in responses.items()}},
                               ensure_ascii=False) + "\n")


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per model, accuracy and mean pointwise MI with standard errors."""
    has_acc = any("accuracy" in r for r in results["models"].values())
    header = "| model | " + ("accuracy | " if has_acc else "") + f"mean pointwise MI (nats, K={results['mi_k']}) |"
    lines = [f"{results['task']}: {results['num_eval']} held-out prompts", "", header,
             "|---|" + ("---|" if has_acc else "") + "---|"]
    for name, r in results["models"].items():
        acc = f"{100 * r['accuracy']:.1f}% ± {100 * r['accuracy_stderr']:.1f} | " if has_acc else ""
        lines.append(f"| {name} | {acc}{r['mi_mean']:.3f} ± {r['mi_stderr']:.3f} |")
    return "\n".join(lines)
