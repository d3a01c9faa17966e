"""The whole method for one config: sample -> train -> evaluate, skipping stages already done.

    python pipeline.py task=arc_challenge negatives=random
    python pipeline.py -m loss.beta=0.01,0.1,0.5 negatives=random,partial   # a sweep

Killed while training with trainer.checkpoint_every set? The same command continues the train
stage from its newest checkpoint.
"""

import hydra
from omegaconf import DictConfig

from mipo.metrics.table import format_table
from mipo.stages.cli import entry_point, setup
from mipo.stages.pipeline import run_pipeline


@hydra.main(version_base=None, config_path="conf", config_name="config")
@entry_point("pipeline")
def main(cfg: DictConfig) -> None:
    inputs = setup(cfg, "pipeline")
    results = run_pipeline(cfg, inputs.run_dir, inputs.pairs_path, pairs=inputs.pairs)
    print(format_table(results))


if __name__ == "__main__":
    main()
