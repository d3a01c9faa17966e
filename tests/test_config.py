"""check_config: every bad value is reported at once, naming the override, before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mipo.config import ConfigError, check_config, config_problems

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("experiment", ["demo_cpu", "paper_gsm8k", "paper_arc_challenge", "paper_arc_easy",
                                        "paper_persistbench"])
def test_shipped_configs_pass(experiment):
    assert config_problems(composed(f"experiment={experiment}")) == []
    assert config_problems(composed("model=tiny-llama")) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.max_prompt_length=800", "data.max_length=512"], "data.max_prompt_length=800 must be < data.max_length=512"),
        (["trainer.batch_size=5", "trainer.micro_batch_size=2"], "trainer.batch_size=5 must be a multiple of trainer.micro_batch_size=2"),
        (["loss.beta=0"], "beta must be > 0"),
        (["loss.loss_type=kto"], "unknown loss_type 'kto'"),
        (["loss.loss_type=ipo", "loss.label_smoothing=0.1"], "label_smoothing applies to loss_type='sigmoid' only"),
        (["negatives=random_context", "task=gsm8k"], "negatives=random_context needs a personalization task"),
        (["negatives.strategy=bogus"], "unknown negatives.strategy 'bogus'"),
        (["wandb.mode=cloud"], "wandb.mode='cloud'"),
        (["eval.mi_k=10", "data.num_eval=8"], "eval.mi_k=10 needs at least 11 distinct evaluation prompts"),
        (["trainer.lr=0"], "trainer.lr=0: expected a learning rate > 0"),
        (["data.num_train=-3"], "data.num_train=-3"),
        (["sampling.top_p=1.5"], "sampling.top_p=1.5"),
        (["model.dtype=float8"], "model.dtype=float8"),
        (["kernel=cuda"], "kernel=cuda"),
        (["trainer.share_prompt=sometimes"], "trainer.share_prompt=sometimes"),
        (["trainer.shared_attention=flash"], "trainer.shared_attention=flash"),
        (["fused_lm_head=auto"], "fused_lm_head=auto"),
    ],
)
def test_each_bad_value_names_its_override(overrides, message):
    problems = config_problems(composed(*overrides))
    assert any(message in p for p in problems), problems


def test_all_problems_reported_together():
    cfg = composed("loss.beta=-1", "trainer.lr=-1", "wandb.mode=cloud")
    with pytest.raises(ConfigError, match=r"3 problems") as error:
        check_config(cfg)
    text = str(error.value)
    assert "beta" in text and "trainer.lr=-1" in text and "wandb.mode='cloud'" in text
