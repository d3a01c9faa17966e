"""DPO on the sampled MIPO pairs against cached reference log-probs.

    python train.py task=gsm8k negatives=partial loss.beta=0.1 trainer.lr=5e-7
"""

import hydra
from omegaconf import DictConfig

from mipo.cli import log, setup
from mipo.trainer import train


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    output_dir = setup(cfg)
    summary = train(cfg, output_dir)
    log.info("trained %d steps; model saved to %s", summary["steps"], summary.get("model_dir", "(not saved)"))


if __name__ == "__main__":
    main()
