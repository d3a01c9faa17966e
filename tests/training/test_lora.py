"""LoRA adapters (``lora=default``, ``mipo/model/adapters.py``) on the tiny model, in one process.

The adapters sit on a frozen base that is also the reference (``adapters_disabled``); only they train and only
they are in the optimizer and in checkpoints; the merged ``model/`` folder scores what the adapter scores; an
adapter folder loads through ``load_model``; the config group checks itself and sweeps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mipo.data.pairs import PairsFile
from mipo.model import adapters
from mipo.model.loading import load_model
from mipo.stages.config import config_problems
from mipo.stages.keys import train_key
from mipo.stages.train import setup as setup_training  # as `setup`, pytest 8.0 calls it before the tests
from mipo.stages.train import train
from mipo.training.optim import MasterWeightAdamW, build_optimizer, final_weights
from mipo.training.step import optimizer_step
from tests.helpers import (
    TINY_CONFIG,
    compose_config,
    score_responses,
    tiny_model,
    tiny_tokenizer,
    user,
    write_pairs_file,
)

LORA = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", "use_rslora": False,
        "modules_to_save": None, "load_in_4bit": False}
PROMPTS = [user("What is 2 plus 2?"), user("Name a colour.")]
RESPONSES = ["It is 4.", "Blue, like the sky."]


def perturbed_lora(tokenizer, dtype: torch.dtype | None = None, **overrides):
    """The tiny model with adapters whose B is not zero (as after training)."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)  # A's random init and B's values
        policy = adapters.apply_lora(tiny_model(tokenizer, dtype=dtype), {**LORA, **overrides})
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return policy


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 40).view(1, -1)  # (1, 37)
    with torch.no_grad():
        return model(input_ids=ids).logits  # (1, 37, V)


def test_only_the_adapters_train_and_step_0_is_the_base() -> None:
    tokenizer = tiny_tokenizer()
    base = tiny_model(tokenizer)
    policy = adapters.apply_lora(tiny_model(tokenizer), LORA)
    trained = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    # every linear layer of the decoder (7 per Llama layer), not the output layer
    assert len(trained) == 2 * 7 * TINY_CONFIG["config"]["num_hidden_layers"]
    assert type(policy).__name__ == "LlamaForCausalLM" and type(policy.base_model).__name__ == "LlamaModel"
    assert torch.equal(logits(policy), logits(base))  # B = 0: the policy is the base, bit for bit
    assert adapters.has_adapters(policy) and not adapters.has_adapters(base)


def test_adapters_disabled_is_the_base_forward_and_a_no_op_without_adapters() -> None:
    tokenizer = tiny_tokenizer()
    base, policy = tiny_model(tokenizer), perturbed_lora(tokenizer)
    adapted = logits(policy)
    assert (adapted - logits(base)).abs().max() > 1e-3
    with adapters.adapters_disabled(policy):
        assert torch.equal(logits(policy), logits(base))
        assert not any(p.requires_grad for p in policy.parameters())  # peft freezes them while off
    assert torch.equal(logits(policy), adapted)  # switched back on
    assert all(p.requires_grad for name, p in policy.named_parameters() if "lora_" in name)
    with adapters.adapters_disabled(base):
        assert torch.equal(logits(base), logits(tiny_model(tokenizer)))


def test_the_optimizer_holds_the_adapters_only_in_fp32() -> None:
    tokenizer = tiny_tokenizer()
    trainer = OmegaConf.to_container(compose_config("model=tiny-llama").trainer, resolve=True)
    policy = adapters.apply_lora(tiny_model(tokenizer), LORA)
    optimizer = build_optimizer(policy, trainer)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in policy.parameters() if p.requires_grad}
    # a bf16 base: the adapters are fp32 (peft), so no master weights are needed
    bf16 = adapters.apply_lora(tiny_model(tokenizer, dtype=torch.bfloat16), LORA)
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.float32}
    assert not isinstance(build_optimizer(bf16, {**trainer, "master_weights": "device"}), MasterWeightAdamW)
    # modules_to_save on a bf16 base trains bf16 copies: those get fp32 masters, and only those are loaded back
    saved = adapters.apply_lora(tiny_model(tokenizer, dtype=torch.bfloat16), {**LORA, "modules_to_save": ["lm_head"]})
    masters = build_optimizer(saved, {**trainer, "master_weights": "device"})
    assert isinstance(masters, MasterWeightAdamW)
    final_weights(saved, masters)  # no step taken: nothing to load, nothing cast
    assert saved.model.embed_tokens.weight.dtype == torch.bfloat16


def test_gradient_checkpointing_with_a_frozen_base_gives_the_same_gradients() -> None:
    from mipo.model.loading import enable_activation_checkpointing

    tokenizer = tiny_tokenizer()
    grads = []
    for checkpointing in (False, True):
        policy = perturbed_lora(tokenizer)
        if checkpointing:
            enable_activation_checkpointing(policy)
            adapters.enable_input_gradients(policy)
        policy.train()
        loss = policy(input_ids=torch.arange(3, 40).view(1, -1)).logits.logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    assert grads[1].keys() == grads[0].keys() and all(g.abs().sum() > 0 for g in grads[1].values() if g is not None)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


# peft's own loader asks transformers for is_gradient_checkpointing (deprecated in 5.2x); mipo's peft calls silence it
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_merged_model_scores_what_the_adapter_scores(tmp_path: Path) -> None:
    """``save_adapter_and_merged``: the adapter folder (peft's format) and the merged fp32 folder give the same
    log-probs as the adapter model in memory, within 1e-5, and ``load_model`` takes the adapter folder."""
    from peft import PeftModel

    tokenizer = tiny_tokenizer()
    policy = perturbed_lora(tokenizer)
    adapters.save_adapter_and_merged(policy, None, tokenizer, tmp_path / "adapter", tmp_path / "model", TINY_CONFIG)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 200_000  # adapters only
    in_memory = score_responses(policy, tokenizer, PROMPTS, RESPONSES, desc=None)
    merged = load_model({"name_or_path": str(tmp_path / "model")}, device="cpu")
    assert not adapters.has_adapters(merged)
    via_loading = load_model({"name_or_path": str(tmp_path / "adapter")}, device="cpu", vocab_size=len(tokenizer))
    peft_loaded = PeftModel.from_pretrained(tiny_model(tokenizer), str(tmp_path / "adapter"))  # peft's own loader
    for model in (merged, via_loading, peft_loaded.get_base_model()):
        torch.testing.assert_close(score_responses(model, tokenizer, PROMPTS, RESPONSES, desc=None), in_memory,
                                   atol=1e-5, rtol=0)
    base = score_responses(tiny_model(tokenizer), tokenizer, PROMPTS, RESPONSES, desc=None)
    assert (base - in_memory).abs().max() > 1e-2  # the comparison is of a model that differs from its base
    assert torch.equal(logits(policy), logits(perturbed_lora(tokenizer)))  # the live policy was not merged


def test_a_quantized_base_is_saved_onto_the_base_loaded_again(tmp_path: Path, monkeypatch) -> None:
    """QLoRA's save path (``is_quantized``: a 4-bit base has no fp32 state to rebuild from): the trained tensors
    alone go onto ``load_base()``'s unquantized base. Forced here on a bf16 base (no bitsandbytes on CPU), whose
    frozen weights in the state dict must not be used: the merged folder equals the fp32 base plus the adapters,
    as QLoRA merges, within 1e-5 of the adapters on the fp32 base in memory; without ``load_base`` it refuses."""
    tokenizer = tiny_tokenizer()
    policy = perturbed_lora(tokenizer, dtype=torch.bfloat16)  # the "quantized" base: its weights are not fp32's
    reference = perturbed_lora(tokenizer)  # the same adapters on the fp32 base
    with torch.no_grad():
        for (name, theirs), (_, ours) in zip(reference.named_parameters(), policy.named_parameters()):
            if "lora_" in name:
                theirs.copy_(ours.float())
    monkeypatch.setattr(adapters, "is_quantized", lambda model: model is policy)
    with pytest.raises(ValueError, match="load_base"):
        adapters.save_adapter_and_merged(policy, None, tokenizer, tmp_path / "a0", tmp_path / "m0", TINY_CONFIG)
    loads = []
    adapters.save_adapter_and_merged(policy, None, tokenizer, tmp_path / "adapter", tmp_path / "model", TINY_CONFIG,
                                     load_base=lambda: loads.append(1) or tiny_model(tokenizer))
    assert loads == [1]
    merged = load_model({"name_or_path": str(tmp_path / "model")}, device="cpu")
    assert next(merged.parameters()).dtype == torch.float32
    want = score_responses(reference, tokenizer, PROMPTS, RESPONSES, desc=None)
    torch.testing.assert_close(score_responses(merged, tokenizer, PROMPTS, RESPONSES, desc=None), want,
                               atol=1e-5, rtol=0)
    via_adapter = load_model({"name_or_path": str(tmp_path / "adapter")}, device="cpu", vocab_size=len(tokenizer))
    torch.testing.assert_close(score_responses(via_adapter, tokenizer, PROMPTS, RESPONSES, desc=None), want,
                               atol=1e-5, rtol=0)
    bf16_merged = score_responses(perturbed_lora(tokenizer, dtype=torch.bfloat16).float(), tokenizer, PROMPTS,
                                  RESPONSES, desc=None)
    assert (bf16_merged - want).abs().max() > 1e-4  # the bf16 base's weights would have shown


def test_lora_group_checks_and_sweeps() -> None:
    assert config_problems(compose_config("model=tiny-llama", "lora=default")) == []
    assert compose_config().lora.enabled is False and adapters.lora_identity(compose_config().lora) is None
    bad = compose_config("model=tiny-llama", "lora=default", "lora.rank=0", "lora.dropout=1.5",
                         "lora.target_modules=[]", "lora.modules_to_save=lm_head")
    problems = "\n".join(config_problems(bad))
    for expected in ("lora.rank=0: expected an int > 0", "lora.dropout=1.5: expected a fraction in [0, 1)",
                     "lora.target_modules=[]: expected all-linear or a list", "lora.modules_to_save=lm_head"):
        assert expected in problems
    identities = [adapters.lora_identity(compose_config("lora=default", f"lora.rank={r}").lora) for r in (8, 16, 64)]
    assert [i["rank"] for i in identities] == [8, 16, 64]


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA is refused only on a machine without CUDA")
def test_qlora_is_refused_without_cuda_before_any_model_loads() -> None:
    problems = config_problems(compose_config("lora=default", "lora.load_in_4bit=true"))
    assert any("lora.load_in_4bit=true (QLoRA)" in p and "no CUDA device" in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# Through the training stage (setup/train), in one process
# --------------------------------------------------------------------------------------------

def lora_overrides(pairs: Path, cache: Path, *extra: str) -> list[str]:
    return ["model=tiny-llama", "lora=default", f"data.pairs_path={pairs}", f"paths.cache_dir={cache}",
            "trainer.batch_size=4", "trainer.micro_batch_size=2", "trainer.warmup_ratio=0",
            "trainer.lr_scheduler=constant_with_warmup", "data.max_length=256", "data.max_prompt_length=128", *extra]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs_file(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 8)


@pytest.mark.parametrize("autocast", ["null", "bfloat16"])
def test_step_1_is_log_2_with_adapters(tmp_path: Path, pairs: Path, autocast: str) -> None:
    cfg = compose_config(*lora_overrides(pairs, tmp_path / "cache", f"trainer.autocast={autocast}",
                                         "trainer.max_steps=1", "trainer.save_model=false", "trainer.lr=1e-3"))
    train(cfg, tmp_path / "run", PairsFile.hashed(pairs))
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(math.log(2), abs=2e-5)
    assert abs(first["train/reward_chosen"]) <= 2e-5 and abs(first["train/reward_rejected"]) <= 2e-5


def test_the_frozen_base_stays_the_reference_after_training(tmp_path: Path, pairs: Path) -> None:
    """After steps that moved the adapters, the forward with adapters off is the step-0 reference, bit for bit."""
    cfg = compose_config(*lora_overrides(pairs, tmp_path / "cache", "trainer.lr=1e-2"))
    run = setup_training(cfg, tmp_path / "run", PairsFile.hashed(pairs))
    for step in (1, 2):
        optimizer_step(step, run.model, run.data, run.settings, run.state)
    index = list(range(4))
    batch = run.model.forward.collate_rows(run.data.rows, index, run.data.reference, run.data.pad_token_id,
                                           "sigmoid").to("cpu")
    reference = run.data.reference.stacked()[index]  # (4, 2)
    run.model.policy.eval()
    trained = run.model.forward.logps(batch)
    with adapters.adapters_disabled(run.model.policy):
        torch.testing.assert_close(run.model.forward.logps(batch), reference, atol=0, rtol=0)
    assert (trained - reference).abs().max() > 1e-3


@pytest.mark.parametrize("train_dtype", ["float32", "bfloat16"])
def test_an_lr_5e_7_update_survives_saving_and_merging(tmp_path: Path, pairs: Path, train_dtype: str) -> None:
    """One step at the paper's lr moves the adapters by ~5e-7; the merged model (fp32 even on a bf16 base) keeps
    that update, and scores what the adapter folder scores."""
    cfg = compose_config(*lora_overrides(pairs, tmp_path / "cache", "trainer.lr=5e-7", "trainer.max_steps=1",
                                         f"++model.train_dtype={train_dtype}"))
    summary = train(cfg, tmp_path / "run", PairsFile.hashed(pairs))
    assert summary["adapter_dir"] == str(tmp_path / "run" / "adapter")
    tokenizer = tiny_tokenizer()
    merged = load_model({"name_or_path": str(tmp_path / "run" / "model")}, device="cpu")
    # the base as it trained (a bf16 base is the fp32 weights rounded), then in fp32 as the merged model is
    base = load_model(cfg.model, device="cpu", dtype=getattr(torch, train_dtype), vocab_size=len(tokenizer)).float()
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    moved = max((merged.state_dict()[name] - value).abs().max().item()
                for name, value in base.state_dict().items() if name.endswith("proj.weight"))
    assert 0 < moved < 1e-4
    adapter_model = adapters.load_adapter_folder(tmp_path / "run" / "adapter", lambda base_cfg: load_model(
        base_cfg, device="cpu", dtype=getattr(torch, train_dtype)).float(), merge=False)  # unmerged, fp32
    scored = [score_responses(m, tokenizer, PROMPTS, RESPONSES, desc=None) for m in (merged, base, adapter_model)]
    torch.testing.assert_close(scored[0], scored[2], atol=1e-5, rtol=0)
    assert (scored[0] - scored[1]).abs().max() > 0


def test_lora_enters_the_train_key(tmp_path: Path, pairs: Path) -> None:
    """A LoRA run never reuses a full fine-tuning run's folder, nor one of another rank."""
    pairs_file = PairsFile.hashed(pairs)
    full = train_key(compose_config("model=tiny-llama"), pairs_file)
    ranks = [train_key(compose_config("model=tiny-llama", "lora=default", f"lora.rank={r}"), pairs_file)
             for r in (8, 16)]
    assert len({json.dumps(k, sort_keys=True) for k in (full, *ranks)}) == 3
