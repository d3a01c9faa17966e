"""Evaluate the base model and, with eval.model_path, a trained model on the same held-out prompts:
strict, flexible and log-likelihood accuracy, pointwise MI (summed and per token), response length,
diversity, the LLM judge for personalization, and trained-minus-base paired comparisons
(mipo/stages/evaluate.py). Writes eval.json, eval_table.md and responses.jsonl; prints the table.

    python evaluate.py experiment=paper_gsm8k model=llama-3.2-1b-instruct eval.model_path=outputs/<date>/<time>/model
    python evaluate.py experiment=paper_prism model=llama-3.2-3b-instruct eval.model_path=...  # the base it came from
"""

import hydra
from omegaconf import DictConfig

from mipo.stages.cli import entry_point, setup
from mipo.stages.evaluate import evaluate, format_table


@hydra.main(version_base=None, config_path="conf", config_name="config")
@entry_point("evaluate")
def main(cfg: DictConfig) -> None:
    inputs = setup(cfg, "evaluate")
    results = evaluate(cfg, inputs.run_dir, model_path=cfg.eval.model_path)
    print(format_table(results))


if __name__ == "__main__":
    main()
