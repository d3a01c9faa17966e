"""Offline stand-ins for the chat templates of four model families, for the end-of-turn and TRL tests.

Each family is a small byte-level BPE tokenizer (``tokenizers``, wrapped in ``PreTrainedTokenizerFast``)
with the family's special tokens and a chat template copied from its release, and a generation config
listing the ids the release's ``generation_config.json`` lists:

    family   eos               turn ends with     generation_config eos_token_id       template from
    chatml   <|im_end|>        <|im_end|>         <|im_end|>                           SmolLM2-135M-Instruct
    llama3   <|end_of_text|>   <|eot_id|>         <|end_of_text|>, <|eot_id|>          Meta-Llama-3-8B-Instruct (first release)
    gemma    <eos>             <end_of_turn>      <eos>, <end_of_turn>                 gemma-2-2b-it
    phi3     <|endoftext|>     <|end|>            <|endoftext|>, <|assistant|>, <|end|> Phi-3-mini-4k-instruct

``save_family`` writes one as a local checkpoint folder (tokenizer, a tiny random Llama, its generation config)
that ``mipo.model.loading`` loads like any other, without the hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    template: str
    special: dict[str, str]  # eos_token, bos_token, pad_token ...
    listed: tuple[str, ...]  # additional_special_tokens
    unlisted: tuple[str, ...] = ()  # added with special=True but not listed (as Llama-3's <|eot_id|>)
    end_of_turn: str = ""
    generation_eos: tuple[str, ...] = ()
    system: bool = True  # the template takes a system message
    extra: dict[str, Any] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "chatml": Family(CHATML, {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|im_end|>"},
                     ("<|im_start|>", "<|im_end|>", "<|endoftext|>"), end_of_turn="<|im_end|>",
                     generation_eos=("<|im_end|>",)),
    "llama3": Family(LLAMA3, {"eos_token": "<|end_of_text|>", "bos_token": "<|begin_of_text|>"}, (),
                     ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), end_of_turn="<|eot_id|>",
                     generation_eos=("<|end_of_text|>", "<|eot_id|>")),
    "gemma": Family(GEMMA, {"eos_token": "<eos>", "bos_token": "<bos>", "pad_token": "<pad>"},
                    ("<start_of_turn>", "<end_of_turn>"), end_of_turn="<end_of_turn>",
                    generation_eos=("<eos>", "<end_of_turn>"), system=False),
    "phi3": Family(PHI3, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
                   ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), end_of_turn="<|end|>",
                   generation_eos=("<|endoftext|>", "<|assistant|>", "<|end|>")),
}

# the pre-tokenizer split of Llama-3's tokenizer.json (Qwen2's differs only in \p{N} vs \p{N}{1,3})
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
# a few merges, so that tokens are not all single bytes (ByteLevel: "Ġ" is a space, "Ċ" a newline)
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ċ", "Ċ"), ("i", "s"), ("Ġ", "is"), ("o", "n")]


def family_tokenizer(name: str, template: str | None = None):
    """The tokenizer of family ``name`` (``template`` replaces its chat template)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    core.pre_tokenizer = pre_tokenizers.Sequence([  # as Llama-3's and Qwen2's tokenizer.json: their split, then bytes
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({**family.special, "additional_special_tokens": list(family.listed)})
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in family.unlisted])
    tok.chat_template = template or family.template
    return tok


def save_family(name: str, folder: Path, generation_eos: tuple[str, ...] | None = None,
                template: str | None = None) -> Path:
    """A local checkpoint of family ``name`` in ``folder``: tokenizer, a tiny random Llama, a generation config
    whose ``eos_token_id`` lists ``generation_eos`` (default: the family's)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = family_tokenizer(name, template)
    ids = [tok.convert_tokens_to_ids(t) for t in (generation_eos or FAMILIES[name].generation_eos)]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=ids if len(ids) > 1 else ids[0],
                                               bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def model_cfg(folder: Path) -> dict[str, Any]:
    """The ``model`` config of a folder ``save_family`` wrote."""
    return {"name_or_path": str(folder), "random_init": False, "tokenizer": None, "dtype": "float32",
            "attn_implementation": "sdpa"}


def conversation(name: str, user_text: str) -> list[dict[str, str]]:
    """A prompt for family ``name``: a system message where its template takes one, then ``user_text``."""
    system = [{"role": "system", "content": "Answer briefly."}] if FAMILIES[name].system else []
    return [*system, {"role": "user", "content": user_text}]
