"""check_config: every bad value is reported at once, naming the override, before any model loads."""

from __future__ import annotations

import pytest

from mipo.runtime.errors import ConfigError
from mipo.stages.config import check_config, config_problems
from tests.helpers import compose_config as composed


@pytest.mark.parametrize("experiment", ["demo_cpu", "paper_gsm8k", "paper_svamp", "paper_arc_challenge",
                                        "paper_arc_easy", "paper_persistbench", "paper_prism",
                                        "paper_community_alignment", "paper_multifaceted_bench"])
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
        (["sampling.top_k=0"], "sampling.top_k=0: expected null (no top-k) or an int > 0"),
        (["sampling.batch_size=many"], "sampling.batch_size=many: expected auto or an int > 0"),
        (["sampling.chunk_size=0"], "sampling.chunk_size=0: expected an int > 0"),
        (["sampling.max_batch_tokens=-1"], "sampling.max_batch_tokens=-1"),
        (["model.dtype=float8"], "model.dtype=float8"),
        (["kernel=cuda"], "kernel=cuda"),
        (["trainer.lr=-1e-5"], "trainer.lr=-1e-05: expected a learning rate > 0"),
        (["data.max_prompt_length=512", "data.max_length=512"], "data.max_prompt_length=512 must be < data.max_length=512"),
        (["model=tiny-llama", "model.random_init=false", "model.name_or_path=./no/such/model"],
         "model.name_or_path='./no/such/model': no such file or directory"),
        (["model=smollm2-135m-instruct", "model.gguf_package=no_such_package"],
         "model.gguf_package='no_such_package' is not installed"),
        (["trainer.checkpoint_every=0"], "trainer.checkpoint_every=0: expected null or an int > 0"),
        (["trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints=-1: expected null or an int > 0"),
        (["trainer.resume=maybe"], "trainer.resume=maybe: expected true or false"),
        (["overwrite=1"], "overwrite=1: expected true or false"),
        (["trainer.flush_denormal=on"], "trainer.flush_denormal=on: expected true or false"),
        (["trainer.resume=true", "overwrite=true"], "trainer.resume=true continues the run"),
        (["trainer.share_prompt=sometimes"], "trainer.share_prompt=sometimes"),
        (["trainer.shared_attention=flash"], "trainer.shared_attention=flash"),
        (["fused_lm_head=auto"], "fused_lm_head=auto"),
    ],
)
def test_each_bad_value_names_its_override(overrides, message):
    problems = config_problems(composed(*overrides))
    assert any(message in p for p in problems), problems


def test_every_bad_loss_setting_is_named():
    problems = config_problems(composed("loss.beta=0", "loss.loss_type=kto", "loss.label_smoothing=0.7"))
    assert [p.split(" (loss.beta=")[0] for p in problems] == [
        "loss: unknown loss_type 'kto'; expected one of ('sigmoid', 'ipo', 'hinge', 'sft', 'simpo', 'sami', 'infonce')",
        "loss: beta must be > 0, got 0", "loss: label_smoothing must be in [0, 0.5), got 0.7"]


def test_length_check_is_not_hidden_by_other_problems():
    problems = config_problems(composed("loss.beta=0", "data.max_prompt_length=800", "data.max_length=512"))
    assert any("data.max_prompt_length=800 must be < data.max_length=512" in p for p in problems), problems


def test_all_problems_reported_together():
    cfg = composed("loss.beta=-1", "trainer.lr=-1", "wandb.mode=cloud")
    with pytest.raises(ConfigError, match=r"3 problems") as error:
        check_config(cfg)
    text = str(error.value)
    assert "beta" in text and "trainer.lr=-1" in text and "wandb.mode='cloud'" in text


def test_float16_autocast_is_refused():
    problems = config_problems(composed("trainer.autocast=float16"))
    assert any("float16 autocast needs a gradient scaler" in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# Issue #23: a value of the wrong type is named by its type; settings the loss ignores; devices; folders
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("loss.beta='0.1'", "loss.beta='0.1': expected a number, got the string '0.1'"),
    ("trainer.batch_size='4'", "trainer.batch_size='4': expected a number, got the string '4'"),
    ("eval.mi_k='2'", "eval.mi_k='2': expected a number, got the string '2'"),
    ("trainer.adam_betas=['0.9',0.95]", "trainer.adam_betas[0]='0.9': expected a number, got the string '0.9'"),
    ("overwrite='true'", "overwrite='true': expected true or false, got the string 'true'"),
    ("trainer.lr=abc", "trainer.lr=abc: expected a number, got the string 'abc'"),
    ("trainer.resume=yes", "trainer.resume=yes: expected true or false, or must, got the string 'yes'"),
])
def test_a_value_of_the_wrong_type_names_its_type(override, message):
    problems = config_problems(composed("model=tiny-llama", override))
    assert problems[0].startswith(message), problems
    assert not any("expected a learning rate" in p or "beta must be > 0" in p for p in problems)  # the value's other lines


@pytest.mark.parametrize("overrides, message", [
    (["loss=sft", "+loss.beta=0.5"], "loss.beta=0.5: loss.loss_type=sft does not use beta (its settings: sft_reduction)"),
    (["loss=infonce", "+loss.label_smoothing=0.1"], "loss.label_smoothing=0.1: loss.loss_type=infonce does not use"),
    (["loss=dpo", "+loss.gamma=1.0"], "loss.gamma=1.0: loss.loss_type=sigmoid does not use gamma"),
    (["loss=simpo", "+loss.sft_reduction=sum"], "loss.sft_reduction=sum: loss.loss_type=simpo does not use"),
])
def test_a_loss_setting_the_loss_ignores_is_refused(overrides, message):
    problems = config_problems(composed("model=tiny-llama", *overrides))
    assert any(p.startswith(message) for p in problems), problems


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "ipo", "hinge", "sft", "simpo", "sami", "infonce"])
def test_every_shipped_loss_uses_all_its_settings(loss):
    assert config_problems(composed("model=tiny-llama", f"loss={loss}")) == []


@pytest.mark.parametrize("device, message", [
    ("gpu", "device=gpu: not a device; expected auto, cpu, cuda or cuda:<index>"),
    ("cuda:99", "device=cuda:99: "),
    ("xla", "device=xla: device type 'xla' is not supported"),
    ("1", "device=1: expected auto, cpu, cuda or cuda:<index>, got the int 1"),
])
def test_a_device_this_machine_lacks_is_refused(device, message):
    problems = config_problems(composed("model=tiny-llama", f"device={device}"))
    assert any(p.startswith(message) for p in problems), problems
    assert config_problems(composed("model=tiny-llama", "device=cpu")) == []


def test_a_cache_directory_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    for path, message in [(tmp_path / "file", "is a file, not a folder"),
                          (tmp_path / "file" / "sub", f"{tmp_path / 'file'} is a file, so no folder can be made")]:
        problems = config_problems(composed("model=tiny-llama", f"paths.cache_dir={path}"))
        assert problems == [f"paths.cache_dir={path}{'' if message.startswith('is') else ':'} {message}"
                            + (": expected a folder (or a path where one can be made)" if message.startswith("is") else
                               " under it")], problems


def test_resume_takes_true_false_or_must():
    assert config_problems(composed("model=tiny-llama", "trainer.resume=must")) == []
    assert any("trainer.resume=must continues the run" in p
               for p in config_problems(composed("model=tiny-llama", "trainer.resume=must", "overwrite=true")))


@pytest.mark.parametrize("task, prompt, total", [("gsm8k", 1536, 2560), ("svamp", 1536, 2560), ("arc_challenge", 512, 1024),
                                                 ("arc_easy", 512, 1024), ("persistbench", 768, 1536), ("prism", 1024, 1536),
                                                 ("community_alignment", 1024, 1536), ("multifaceted_bench", 1024, 1536)])
def test_tasks_default_to_lengths_that_hold_their_prompts(task, prompt, total):
    cfg = composed(f"task={task}")
    assert (cfg.data.max_prompt_length, cfg.data.max_length) == (prompt, total)  # measured: test_task_lengths.py
    assert cfg.data.max_length - cfg.data.max_prompt_length >= cfg.task.max_new_tokens  # a whole response after any prompt
    overridden = composed(f"task={task}", "data.max_length=300", "data.max_prompt_length=200")
    assert (overridden.data.max_prompt_length, overridden.data.max_length) == (200, 300)
