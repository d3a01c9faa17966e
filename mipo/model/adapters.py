"""LoRA adapters on the policy through ``peft`` (``lora=default``; ``conf/lora/``).

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, eq. 3) trains, for each
adapted linear layer W (d_out x d_in, frozen), two matrices B (d_out x r, zero at step 0) and A (r x d_in):

    h = W x + (alpha / r) B A x             (rsLoRA, Kalajdzievski 2023: alpha / sqrt(r))

With adapters the frozen base is also the DPO reference: pi_ref is the same weights with the adapters
switched off (``adapters_disabled``), so no second copy is loaded, and at step 0 (B = 0) the policy *is* the
base: log pi - log pi_ref = 0 by construction.

What the trainer holds. ``apply_lora`` wraps the loaded CausalLM with ``peft.get_peft_model`` and returns
``PeftModel.get_base_model()``: the same CausalLM object with ``peft``'s LoRA layers injected in place (peft
also sets its ``peft_config`` on it). The training forward and the scorer call ``policy.base_model`` (the decoder
stack) and read the output layer's weight (``mipo.model.logprobs.output_layer_logps``), so the policy must
still be a transformers CausalLM; only the adapters (and ``lora.modules_to_save``) require gradients.

Outputs (``save_adapter_and_merged``, rank 0, from the full state dict of the trained policy): ``<run>/adapter/``
in peft's format (``adapter_config.json``, ``adapter_model.safetensors``: ``PeftModel.from_pretrained`` loads it;
``mipo_base_model.json`` names the base for ``mipo.model.loading.load_model``) and ``<run>/model/``, the merged
model (W + (alpha / r) B A, ``merge_and_unload``) in fp32 as a plain Hugging Face folder: what iterative MIPO's
next round loads, samples with and takes as its reference.

QLoRA (``lora.load_in_4bit``: Dettmers et al., "QLoRA", NeurIPS 2023; NF4 base weights through bitsandbytes)
is a CUDA-only option: refused up front without a CUDA device or without bitsandbytes (``lora_problems``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mipo.runtime.errors import ConfigError, failed, is_int, is_number

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's adapter name
BASE_MODEL_FILE = "mipo_base_model.json"  # in an adapter folder: the model config of its base
ADAPTER_CONFIG = "adapter_config.json"  # peft's


# --------------------------------------------------------------------------------------------
# The config group
# --------------------------------------------------------------------------------------------

def lora_enabled(lora_cfg: Mapping[str, Any] | None) -> bool:
    """``lora.enabled``: adapters (``lora=default``) or full fine-tuning (``lora=none``)."""
    return bool(lora_cfg is not None and lora_cfg.get("enabled", False))


def lora_identity(lora_cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """What the trained weights and the reference depend on in ``lora``, as plain values; None without adapters
    (the keys of full fine-tuning runs stay as they were)."""
    if not lora_enabled(lora_cfg):
        return None
    target = lora_cfg["target_modules"]
    saved = lora_cfg.get("modules_to_save")
    return {"rank": int(lora_cfg["rank"]), "alpha": float(lora_cfg["alpha"]), "dropout": float(lora_cfg["dropout"]),
            "target_modules": target if isinstance(target, str) else sorted(target),
            "use_rslora": bool(lora_cfg.get("use_rslora", False)),
            "modules_to_save": sorted(saved) if saved else None,
            "load_in_4bit": bool(lora_cfg.get("load_in_4bit", False))}


def _is_names(value: Any) -> bool:
    return not isinstance(value, str) and hasattr(value, "__iter__") and len(list(value)) > 0 and all(
        isinstance(v, str) and v for v in value)


def lora_problems(cfg: Mapping[str, Any]) -> list[str]:
    """The ``lora`` group's values, and QLoRA against this machine (CUDA and bitsandbytes), before any model loads."""
    lora = cfg.get("lora")
    if lora is None or not lora_enabled(lora):
        return failed([(lora is None or isinstance(lora.get("enabled", False), bool),
                        f"lora.enabled={lora.get('enabled') if lora is not None else None}: expected true or false")])
    target, saved, dropout = lora.get("target_modules"), lora.get("modules_to_save"), lora.get("dropout")
    problems = failed([
        (is_int(lora.get("rank")) and lora.get("rank") > 0, f"lora.rank={lora.get('rank')}: expected an int > 0"),
        (is_number(lora.get("alpha")) and lora.get("alpha") > 0, f"lora.alpha={lora.get('alpha')}: expected a number > 0"),
        (is_number(dropout) and 0 <= dropout < 1, f"lora.dropout={dropout}: expected a fraction in [0, 1)"),
        (target == "all-linear" or _is_names(target),
         f"lora.target_modules={target}: expected all-linear or a list of module names (e.g. [q_proj, v_proj])"),
        (isinstance(lora.get("use_rslora", False), bool), f"lora.use_rslora={lora.get('use_rslora')}: expected true or false"),
        (saved is None or _is_names(saved),
         f"lora.modules_to_save={saved}: expected null or a list of module names (e.g. [lm_head])"),
        (isinstance(lora.get("load_in_4bit", False), bool),
         f"lora.load_in_4bit={lora.get('load_in_4bit')}: expected true or false"),
        (importlib.util.find_spec("peft") is not None,
         "lora.enabled=true trains adapters with peft, which is not installed: pip install '.[lora]'"),
    ])
    if lora.get("load_in_4bit") is True:
        problems += _qlora_problems(cfg)
    return problems


def _qlora_problems(cfg: Mapping[str, Any]) -> list[str]:
    """QLoRA needs bitsandbytes' CUDA kernels: refused on a machine without CUDA, saying why."""
    device = str(cfg.get("device", "auto"))
    trainer = cfg.get("trainer") or {}
    model = cfg.get("model") or {}
    return failed([
        (torch.cuda.is_available() and not device.startswith("cpu"),
         (f"lora.load_in_4bit=true (QLoRA) runs the 4-bit base through bitsandbytes' CUDA kernels, and this "
          f"machine has no CUDA device (torch.cuda.is_available() is {torch.cuda.is_available()}, device={device}): "
          "set lora.load_in_4bit=false, or run on a GPU")),
        (importlib.util.find_spec("bitsandbytes") is not None,
         "lora.load_in_4bit=true (QLoRA) needs bitsandbytes: pip install '.[qlora]'"),
        (trainer.get("strategy", "single") != "fsdp",
         ("lora.load_in_4bit=true with trainer.strategy=fsdp: FSDP2 cannot shard 4-bit weights here; use "
          "trainer.strategy=single or ddp")),
        (not model.get("random_init", False),
         "lora.load_in_4bit=true quantizes a checkpoint as it loads; model.random_init=true has none"),
    ])


def lora_config(lora_cfg: Mapping[str, Any]):
    """peft's ``LoraConfig`` of the ``lora`` group (``all-linear``: every linear layer but the output layer)."""
    from peft import LoraConfig

    target = lora_cfg["target_modules"]
    saved = lora_cfg.get("modules_to_save")
    return LoraConfig(r=int(lora_cfg["rank"]), lora_alpha=float(lora_cfg["alpha"]),
                      lora_dropout=float(lora_cfg["dropout"]),
                      target_modules=target if isinstance(target, str) else list(target),
                      use_rslora=bool(lora_cfg.get("use_rslora", False)),
                      modules_to_save=list(saved) if saved else None, bias="none", task_type="CAUSAL_LM")


def quantization_config(lora_cfg: Mapping[str, Any] | None):
    """QLoRA's 4-bit NF4 base (double quantization, bf16 compute), or None (``lora.load_in_4bit=false``).
    CUDA only; not exercised by the test suite (no CUDA there)."""
    if not lora_enabled(lora_cfg) or not lora_cfg.get("load_in_4bit", False):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


# --------------------------------------------------------------------------------------------
# The policy with adapters
# --------------------------------------------------------------------------------------------

@contextmanager
def _peft_calls() -> Iterator[None]:
    """peft 0.21 asks transformers 5.23+ for ``is_gradient_checkpointing``, which warns that the name goes in v6."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def apply_lora(policy: torch.nn.Module, lora_cfg: Mapping[str, Any]) -> torch.nn.Module:
    """Inject LoRA layers into ``policy`` (a transformers CausalLM) in place and freeze everything else.

    Returns the CausalLM (``PeftModel.get_base_model()``, the same object as ``policy``): what the trainer
    calls. Adapter weights are fp32 even on a bf16 base (peft's ``autocast_adapter_dtype``); B starts at 0.
    """
    from peft import get_peft_model

    if lora_cfg.get("load_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        policy = prepare_model_for_kbit_training(policy, use_gradient_checkpointing=False)
    try:
        with _peft_calls():
            peft_model = get_peft_model(policy, lora_config(lora_cfg), adapter_name=ADAPTER)
    except ValueError as error:  # peft: "Target modules {...} not found in the base model"
        if "not found in the base model" not in str(error):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in policy.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules={lora_cfg.get('target_modules')}: no such module in "
                          f"{type(policy).__name__}; its linear layers: {', '.join(linear)} (or all-linear)") from None
    trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in policy.parameters())
    log.info("LoRA rank %s on %s: %d of %d parameters train (%.2f%%)", lora_cfg["rank"], lora_cfg["target_modules"],
             trained, total, 100 * trained / total)
    return peft_model.get_base_model()


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import AuxiliaryTrainingWrapper, BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries peft layers (False without peft installed)."""
    return importlib.util.find_spec("peft") is not None and bool(_tuner_layers(model))


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block the forward of ``model`` (the CausalLM of ``apply_lora``, a PeftModel, or any module
    holding either) is the base model's: every LoRA layer and every ``modules_to_save`` copy switched off.

    What ``peft.PeftModel.disable_adapter()`` does for LoRA (``BaseTuner._enable_adapter_layers``), on the modules
    themselves, so it works on the bare CausalLM and under DDP/FSDP2 wrappers. A no-op without adapters.
    """
    layers = _tuner_layers(model) if importlib.util.find_spec("peft") is not None else []
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def enable_input_gradients(policy: torch.nn.Module) -> None:
    """Gradient checkpointing (reentrant) recomputes a layer only if its input requires grad; with a frozen
    base the embeddings' output does not, so make it (transformers' ``enable_input_require_grads``)."""
    policy.enable_input_require_grads()


# --------------------------------------------------------------------------------------------
# Outputs: the adapter folder and the merged model
# --------------------------------------------------------------------------------------------

def is_quantized(model: torch.nn.Module) -> bool:
    """Weights loaded quantized by transformers (QLoRA's 4-bit base: ``lora.load_in_4bit``)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "hf_quantizer", None) is not None)


def _trained_peft_model(policy: torch.nn.Module, state: Mapping[str, torch.Tensor] | None,
                        load_base: Callable[[], torch.nn.Module] | None = None):
    """A CPU fp32 PeftModel of ``policy``'s architecture and adapters holding ``state`` (default: the policy's
    own state dict, copied): the weights are never merged into the live policy.

    A quantized base (QLoRA) has no fp32 state to rebuild from (packed 4-bit weights and their constants):
    its trained tensors (the adapters, ``modules_to_save``) go onto ``load_base()``, the base loaded again
    unquantized in fp32 on the CPU, as QLoRA's adapters are merged (Dettmers et al. 2023).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    state = policy.state_dict() if state is None else state
    quantized = is_quantized(policy)
    if quantized:
        if load_base is None:
            raise ValueError("a policy on a quantized base is saved with load_base (its base, unquantized)")
        trained = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
        state = {name: value for name, value in state.items() if name in trained}
        skeleton = load_base().to("cpu", torch.float32)
    else:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(policy.config), dtype=torch.float32)
    with _peft_calls():
        peft_model = get_peft_model(skeleton, copy.deepcopy(policy.peft_config[ADAPTER]), adapter_name=ADAPTER,
                                    low_cpu_mem_usage=not quantized)
    inner = peft_model.get_base_model()
    cpu_state = {name: value.detach().to("cpu", torch.float32, copy=True) for name, value in state.items()}
    unexpected = inner.load_state_dict(cpu_state, strict=False, assign=True).unexpected_keys
    if quantized and unexpected:
        raise RuntimeError(f"{len(unexpected)} trained tensors have no place in the unquantized base, "
                           f"e.g. {unexpected[:3]}")
    inner.tie_weights()
    missing = [name for name, p in inner.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"the trained state lacks {len(missing)} parameters of the policy, e.g. {missing[:3]}")
    return peft_model


def save_adapter_and_merged(policy: torch.nn.Module, state: Mapping[str, torch.Tensor] | None, tokenizer: Any,
                            adapter_dir: Path, model_dir: Path, base_model: Mapping[str, Any],
                            load_base: Callable[[], torch.nn.Module] | None = None) -> None:
    """Write ``adapter_dir`` (peft's format, plus ``mipo_base_model.json``: ``base_model``, the config the base
    loads from) and ``model_dir`` (the merged model in fp32, and the tokenizer); call on one rank.

    ``state``: the policy's full state dict (FSDP2: gathered on this rank's CPU); None: ``policy.state_dict()``.
    ``load_base``: the base model unquantized, for a policy on a quantized base (``_trained_peft_model``).
    """
    peft_model = _trained_peft_model(policy, state, load_base)
    peft_model.save_pretrained(adapter_dir)
    base_model = dict(base_model)
    if base_model.get("random_init"):  # its vocabulary was the tokenizer's: the base must load with that size
        base_model["config"] = {**base_model.get("config", {}), "vocab_size": policy.config.vocab_size}
    (Path(adapter_dir) / BASE_MODEL_FILE).write_text(json.dumps(base_model, indent=1, sort_keys=True) + "\n")
    tokenizer.save_pretrained(adapter_dir)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def is_adapter_folder(name_or_path: Any) -> bool:
    """A local folder written by ``save_adapter_and_merged`` (peft's ``adapter_config.json`` and mipo's base)."""
    path = Path(str(name_or_path)).expanduser()
    return bool(name_or_path) and (path / ADAPTER_CONFIG).is_file() and (path / BASE_MODEL_FILE).is_file()


def load_adapter_folder(folder: str | Path, load_base: Callable[[Mapping[str, Any]], torch.nn.Module],
                        merge: bool = True) -> torch.nn.Module:
    """The base model (``load_base`` of the folder's ``mipo_base_model.json``) with the folder's adapter
    (``PeftModel.from_pretrained``): merged into its weights (``merge``), else the CausalLM with LoRA layers."""
    from peft import PeftModel

    base_cfg = json.loads((Path(folder) / BASE_MODEL_FILE).read_text())
    base = load_base(base_cfg)
    with _peft_calls():
        peft_model = PeftModel.from_pretrained(base, str(folder), adapter_name=ADAPTER)
    return peft_model.merge_and_unload() if merge else peft_model.get_base_model()
