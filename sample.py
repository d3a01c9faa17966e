"""Sample MIPO preference pairs (x, y+, y-) from the base model.

    python sample.py task=gsm8k negatives=partial model=llama-3.2-1b-instruct

Finished chunks of responses are kept under ``<pairs path>.partial/``: a run that was killed
resumes where it stopped when the same command is run again (``mipo/stages/sample.py``).
"""

import hydra
from omegaconf import DictConfig

from mipo.stages.cli import entry_point, log, setup
from mipo.stages.sample import sample_pairs


@hydra.main(version_base=None, config_path="conf", config_name="config")
@entry_point("sample")
def main(cfg: DictConfig) -> None:
    inputs = setup(cfg, "sample")
    path = sample_pairs(cfg, inputs.pairs_path)
    log.info("pairs: %s", path)


if __name__ == "__main__":
    main()
