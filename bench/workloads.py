"""The pairs files the training and reference benchmarks run on.

* ``anchor``: the demo's pairs (``experiment=demo_cpu``: SmolLM2-135M-Instruct's own samples on
  64 ARC-Challenge prompts, responses up to 64 tokens), sampled by ``sample.py``'s stage if
  they are not cached yet.
* ``gsm8k``: GSM8K-shaped pairs, built without sampling: the task's real 8-shot prompts (about
  1,000 tokens with SmolLM2's chat template) and synthetic chain-of-thought responses of 200-300
  tokens (reasoning sentences of the 8 exemplars, cycled, then "The answer is N."), y- being
  another prompt's response (random negatives). Throughput depends on lengths, not on words, so
  these pairs time the paper's GSM8K setting without hours of CPU sampling.
"""

from __future__ import annotations

import random
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mipo.data.pairs import PreferencePair, write_pairs
from mipo.data.tasks import task_splits
from mipo.data.tasks.gsm8k import GSM8K_COT_EXEMPLARS
from mipo.model.loading import run_tokenizer
from mipo.negatives import derangement

CONF = str(Path(__file__).resolve().parents[1] / "conf")
WORKLOADS = ("anchor", "gsm8k")


def workload_config(name: str, *overrides: str) -> DictConfig:
    """The composed config of a workload: the demo's for ``anchor``, GSM8K's 8-shot task for ``gsm8k``."""
    base = {
        "anchor": ["experiment=demo_cpu", "data.max_length=1024", "data.max_prompt_length=768"],
        "gsm8k": ["task=gsm8k", "data.source=offline", "data.num_train=64", "data.max_length=2560",
                  "data.max_prompt_length=1536"],
    }[name]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=[*base, "device=cpu", "wandb.mode=disabled", *overrides])


def synthetic_response(tokenizer, answer: str, length: int, offset: int) -> str:
    """Exemplar reasoning sentences from ``offset`` on, cycled to ``length`` tokens, then the answer."""
    sentences = [s.strip() + "." for _, reasoning, _ in GSM8K_COT_EXEMPLARS for s in reasoning.split(". ") if s.strip()]
    words: list[str] = []
    i = offset
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < length:
        words.append(sentences[i % len(sentences)].rstrip(".") + ".")
        i += 1
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:length]
    return tokenizer.decode(ids).strip() + f" The answer is {answer}."


def gsm8k_pairs(cfg: DictConfig, path: Path, seed: int = 0) -> Path:
    """Write the GSM8K-shaped pairs of ``cfg`` (its ``data.num_train`` prompts) to ``path``."""
    from mipo.data.tasks import build_task

    task = build_task(cfg)
    examples, _ = task_splits(cfg, task)
    tokenizer = run_tokenizer(cfg)
    rng = random.Random(seed)
    responses = [synthetic_response(tokenizer, ex.answer, rng.randint(200, 300), rng.randrange(1000)) for ex in examples]
    other = derangement([ex.uid for ex in examples], rng)
    pairs = [PreferencePair(task.messages(ex), responses[i], responses[other[i]],
                            {"strategy": "random", "task": "gsm8k", "uid": ex.uid, "answer": ex.answer,
                             "synthetic": "bench/workloads.py"})
             for i, ex in enumerate(examples)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pairs(path, pairs)
    return path


def pairs_file(name: str, cfg: DictConfig) -> Path:
    """The workload's pairs file, built (or sampled) once and cached under the cache dir."""
    if name == "anchor":
        from mipo.stages.keys import pairs_path
        from mipo.stages.sample import sample_pairs

        return sample_pairs(cfg, pairs_path(cfg))
    path = Path(cfg.paths.cache_dir) / "pairs" / f"bench-gsm8k-{cfg.data.num_train}.jsonl"
    return path if path.exists() else gsm8k_pairs(cfg, path)
