"""DPO on the sampled MIPO pairs against cached reference log-probs.

    python train.py task=gsm8k negatives=partial loss.beta=0.1 trainer.lr=5e-7
    python train.py ... trainer.checkpoint_every=100 hydra.run.dir=outputs/run1   # killed? run again with
    python train.py ... trainer.checkpoint_every=100 hydra.run.dir=outputs/run1 trainer.resume=true
"""

import hydra
from omegaconf import DictConfig

from mipo.data.pairs import PairsFile
from mipo.stages.cli import entry_point, log, setup
from mipo.stages.train import train


@hydra.main(version_base=None, config_path="conf", config_name="config")
@entry_point("train")
def main(cfg: DictConfig) -> None:
    inputs = setup(cfg, "train")
    summary = train(cfg, inputs.run_dir, PairsFile.hashed(inputs.pairs_path), pairs=inputs.pairs)
    log.info("trained %d steps; model saved to %s", summary["steps"], summary.get("model_dir", "(not saved)"))


if __name__ == "__main__":
    main()
