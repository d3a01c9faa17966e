"""The whole method for one config: sample -> train -> evaluate, skipping stages already done.

    python pipeline.py task=arc_challenge negatives=random
    python pipeline.py -m loss.beta=0.01,0.1,0.5 negatives=random,partial   # a sweep
"""

import hydra
from omegaconf import DictConfig

from mipo.cli import setup
from mipo.evaluation import format_table
from mipo.pipeline import run_pipeline


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    output_dir = setup(cfg)
    results = run_pipeline(cfg, output_dir)
    print(format_table(results))


if __name__ == "__main__":
    main()
