"""Which models the prompt tree is exact for: the architecture gate (``prompt_tree_problem``).

The prompt tree (``mipo.model.prompt_tree``) runs a micro-batch as one row in which query q attends to key k
iff k's segment is q's or an ancestor of it and k <= q, and positions (``position_ids``) restart after the
prompt for every continuation. Each token then sees exactly the keys, values and rotary positions of its
unshared row, so the tree's forward is the rows' forward *if* every layer mixes tokens only by full causal
attention whose scores depend on the key's position through ``position_ids`` alone. What breaks that, read
from the transformers 5.25 sources (``transformers/models/*``):

* a window: sliding (Mistral, Mixtral, Phi3, Starcoder2: ``sliding_window`` in every layer;
  Qwen2/Qwen3: ``sliding_window`` in the ``layer_types`` marked ``sliding_attention``, and none where
  ``use_sliding_window=False``; Gemma2/Gemma3/Cohere2/GPT-OSS: ``layer_types``), local (GPT-Neo's
  ``attention_layers`` "local", ``window_size``) or chunked (Llama4's ``attention_chunk_size``). A window
  counts distances in the packed row, where a continuation sits after its siblings, not in its own row;
  ``segment_attention`` and the dense mask apply none. Any layer type other than ``full_attention``
  (linear attention, convolutions, state-space layers) is refused too: it mixes tokens outside the mask.
* attention-logit softcapping (Gemma2's ``attn_logit_softcapping``) and attention sinks (GPT-OSS): not in
  ``segment_attention``'s sdpa calls.
* ALiBi (Bloom, MPT, Falcon with ``alibi=True``): the bias is built from key distances in the input
  row (Bloom from the attention mask's cumulative sum), not from ``position_ids``.
* an attention implementation that cannot be switched (``_can_set_attn_implementation()``: the attention
  layers do not call transformers' ``AttentionInterface``, as GPT-Neo's and Bloom's), a model whose
  forward takes no ``position_ids``, attention layers that are not causal (``is_causal=False``: BERT-like
  "causal LMs" built without ``is_decoder``), or decoder layers that do not pass the tree on to attention
  (StableLM, Nemotron): the last check runs the model once on a 7-token tree (``probe_problem``).

A window is taken as inexact whatever its size (a window wider than every row is still refused): the gate
reads the config, never the rows. ``resolve_prompt_tree`` applies the gate to a setting: the training
forward's ``trainer.share_prompt`` and the ``Scorer``'s ``share_prompts`` both go through it.
Tested architectures: tests/model/test_architectures.py.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from mipo.model.prompt_tree import PromptGroup, pack_groups
from mipo.model.segment_attention import MissingPromptTree, use_segment_attention
from mipo.runtime.errors import ConfigError

log = logging.getLogger(__name__)

FULL_ATTENTION = "full_attention"  # transformers' layer type of a full causal attention layer
ALIBI_MODEL_TYPES = ("bloom", "mpt")  # ALiBi in every layer, whatever the config says (no rotary, no position ids)
WINDOW = "attention in a window, not over the whole prompt"
NAME_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def architecture_name(model: torch.nn.Module) -> str:
    """``MistralForCausalLM`` -> ``Mistral``: how the gate's reasons name a model."""
    name = type(model).__name__
    for suffix in NAME_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def alibi_problem(model: torch.nn.Module, config: Any) -> str | None:
    """ALiBi biases scores by key distance in the packed row (``build_alibi_tensor`` in bloom/falcon, mpt's)."""
    if config.model_type in ALIBI_MODEL_TYPES:
        return f"ALiBi attention bias (model_type={config.model_type}: biased by distances in the packed row)"
    if getattr(config, "alibi", False):
        return "alibi=True (ALiBi attention bias by distances in the packed row, not by position_ids)"
    return None


def window_off_in_every_layer(model: torch.nn.Module, layer_types: list[str]) -> bool:
    """Every layer is full attention and every attention layer says it has no window.

    Qwen2/Qwen3 keep ``sliding_window`` set with ``use_sliding_window=True`` even where ``max_window_layers``
    leaves no sliding layer; their attention layers then hold ``sliding_window=None``
    (``Qwen2Attention.__init__``). Mistral's read the config's window in every layer and hold none.
    """
    windows = [module.sliding_window for module in model.modules() if hasattr(module, "sliding_window")]
    return (bool(layer_types) and all(kind == FULL_ATTENTION for kind in layer_types)
            and len(windows) >= len(layer_types) and all(window is None for window in windows))


def window_problem(model: torch.nn.Module, config: Any) -> str | None:
    """A sliding, local or chunked window, or a layer that is not full attention (see the module docstring)."""
    layer_types = list(getattr(config, "layer_types", None) or ())
    window = None if getattr(config, "use_sliding_window", None) is False else (
        getattr(config, "sliding_window", None) or getattr(config, "sliding_window_size", None))
    other = sorted({kind for kind in layer_types if kind != FULL_ATTENTION})
    if other:
        sliding = window is not None and any("sliding" in kind for kind in other)
        detail = f"sliding_window={window}: {WINDOW}" if sliding else "not full causal attention"
        return f"layer_types has {', '.join(other)} layers ({detail})"
    if window is not None and not window_off_in_every_layer(model, layer_types):
        switch = ", use_sliding_window=True" if getattr(config, "use_sliding_window", None) else ""
        return f"sliding_window={window}{switch} ({WINDOW})"
    if "local" in (getattr(config, "attention_layers", None) or ()):
        return f"attention_layers has local layers (window_size={getattr(config, 'window_size', None)}: {WINDOW})"
    if getattr(config, "attention_chunk_size", None) is not None:
        return f"attention_chunk_size={config.attention_chunk_size} (attention in chunks, not over the whole prompt)"
    return None


def score_problem(model: torch.nn.Module, config: Any) -> str | None:
    """Softcapped attention logits or attention sinks: terms ``segment_attention``'s sdpa calls do not add."""
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        return f"attn_logit_softcapping={softcap} (capped attention logits, which segment attention does not apply)"
    if any(name.rsplit(".", 1)[-1] == "sinks" for name, _ in model.named_parameters()):
        return "attention sinks (learned per-head logits, which segment attention does not add)"
    return None


def interface_problem(model: torch.nn.Module, config: Any) -> str | None:
    """The tree reaches attention through a switched implementation, restarts positions via ``position_ids``,
    and relies on causal attention (an encoder's attention layers hold ``is_causal=False``)."""
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if can_switch is None or not can_switch():
        return ("attention layers do not call transformers' AttentionInterface (its attention implementation "
                "cannot be switched to the prompt tree's)")
    base = model.base_model
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no position_ids (the tree restarts them for each continuation)"
    bidirectional = [module for module in model.modules() if getattr(module, "is_causal", True) is False]
    if bidirectional:
        return f"{type(bidirectional[0]).__name__} has is_causal=False (a prompt would attend to its continuations)"
    return None


def probe_problem(model: torch.nn.Module, config: Any) -> str | None:
    """The tree reaches every attention layer: one forward of a 3-token prompt with two 2-token continuations under
    ``segment_attention``, which refuses to run without the tree (StableLM's and Nemotron's decoder layers do not
    pass the model's keywords on to attention). Without gradients, in eval mode, the random state left as it was."""
    packed = pack_groups([PromptGroup((1, 2, 3), ((4, 5), (6, 7)))])
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                use_segment_attention(model):
            model.eval()
            model.base_model(input_ids=packed.input_ids.to(device), position_ids=packed.position_ids.to(device),
                             prompt_tree=packed.to(device), use_cache=False)
    except MissingPromptTree:
        return "decoder layers do not pass the forward's keywords (prompt_tree=) on to attention"
    except Exception as error:  # noqa: BLE001 - any failure of the tree's forward is the reason not to use it
        message = str(error).splitlines()[0] if str(error) else ""
        return f"forward fails on a prompt tree ({type(error).__name__}: {message[:160]})"
    finally:
        model.train(was_training)
    return None


CHECKS: tuple[Callable[[torch.nn.Module, Any], str | None], ...] = (
    alibi_problem, window_problem, score_problem, interface_problem, probe_problem)  # the probe, a forward, last


def prompt_tree_problem(model: torch.nn.Module) -> str | None:
    """None when the prompt tree's forward equals the unshared rows' for ``model``, else why not, in one line
    naming the config field (e.g. "Mistral's sliding_window=8 (attention in a window, not over the whole prompt)")."""
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} is not a transformers model (no config to check the attention against)"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config  # a VLM's decoder
    for check in CHECKS:
        reason = check(model, text_config)
        if reason is not None:
            return f"{architecture_name(model)}'s {reason}"
    return None


def resolve_prompt_tree(model: torch.nn.Module, setting: Any, key: str) -> bool:
    """Whether ``model`` runs prompt trees under the setting ``key`` (``auto``, true or false).

    ``auto``: the tree iff ``prompt_tree_problem(model)`` is None, else rows and one INFO line saying why;
    true on a model the tree is not exact for: ``ConfigError`` naming ``key=true`` and the reason; false: rows.
    """
    if setting != "auto" and not setting:
        return False
    problem = prompt_tree_problem(model)
    if problem is None:
        return True
    if setting == "auto":
        log.info("%s=auto: unshared rows, not the prompt tree, which is not exact for this model: %s", key, problem)
        return False
    raise ConfigError(f"{key}=true: the prompt tree is not exact for this model: {problem}; set {key}=auto or false")
