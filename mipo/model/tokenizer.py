"""Tokenizer pieces that load nothing: its identity (what the caches are keyed by), the built-in byte-level
tokenizer for tiny test models, and the end of an assistant turn attached to it.

Loading a model's tokenizer (``load_tokenizer``, ``run_tokenizer``) is ``mipo.model.loading``'s, which attaches
what is here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from transformers import PreTrainedTokenizerBase

from mipo.data.chat import (
    STOP_IDS_ATTRIBUTE,
    chat_template_kwargs,
    render_prompt,
    stop_token_ids,
    turn_end,
    unique_ids,
)
from mipo.data.encoding import DEFAULT_RESPONSE_SUFFIX, response_suffix

log = logging.getLogger(__name__)

PROBE_PROMPT = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything the token ids of a rendered prompt depend on.

    The vocabulary, the special tokens, the chat template, its ``chat_template_kwargs``, and a
    probe prompt as the template renders it now: a template that prints today's date (no fixed
    ``date_string``) changes the probe, hence the identity and every cache keyed by it, each day.
    Then what a response is scored and sampled with, where it is not the tokenizer's eos alone:
    the end-of-turn token, the stop ids and ``data.response_suffix`` (left out where they are the
    eos and the default, so that the caches of a model whose template ends a turn with its eos, such
    as SmolLM2's or the byte tokenizer's, keep their keys).
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    digest.update(str(tokenizer.all_special_tokens).encode())
    digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
    digest.update(json.dumps(chat_template_kwargs(tokenizer), sort_keys=True, default=str).encode())
    try:
        probe = render_prompt(tokenizer, PROBE_PROMPT)
    except Exception:  # templates that refuse a system message
        probe = render_prompt(tokenizer, PROBE_PROMPT[1:])
    digest.update(probe.encode())
    eos, end, stops, ending = tokenizer.eos_token_id, turn_end(tokenizer).token_id, stop_token_ids(tokenizer), {}
    if end != eos:
        ending["end_of_turn"] = end
    if stops != (eos,):
        ending["stop_token_ids"] = sorted(stops)
    if response_suffix(tokenizer) != DEFAULT_RESPONSE_SUFFIX:
        ending["response_suffix"] = response_suffix(tokenizer)
    if ending:
        digest.update(json.dumps(ending, sort_keys=True).encode())
    return digest.hexdigest()[:16]


BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 byte tokens + specials) that needs no download: for tiny test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.add_special_tokens({"eos_token": "<|end|>", "pad_token": "<|pad|>",
                            "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    tok.chat_template = BYTE_CHAT_TEMPLATE
    return tok


def eos_ids(value: Any) -> tuple[int, ...] | None:
    """A config's ``eos_token_id`` (an int, a list of ints or None) as a tuple, None when unset."""
    if value is None:
        return None
    return unique_ids([value] if isinstance(value, int) else list(value))


def attach_turn_end(tokenizer: PreTrainedTokenizerBase, generation_eos: tuple[int, ...] | None, name: str) -> None:
    """Attach the end of an assistant turn (``mipo.data.chat.turn_end``) and the ids sampling stops at to ``tokenizer``.

    The stop ids are the turn end, the tokenizer's eos and the generation config's ``eos_token_id``
    (``generation_eos``): every id ``model.generate`` stops at, and the one the template ends a turn with.
    A template whose end-of-turn token is not among the generation config's eos ids is logged once
    (a warning): the checkpoint and its template disagree on how a turn ends.
    """
    end = turn_end(tokenizer)  # found once and attached
    setattr(tokenizer, STOP_IDS_ATTRIBUTE,
            unique_ids([end.token_id, tokenizer.eos_token_id, *(generation_eos or ())]))
    if end.from_template and generation_eos is not None and end.token_id not in generation_eos:
        named = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in generation_eos)
        log.warning("%s: the chat template ends an assistant turn with %r (%d) but the generation config's "
                    "eos_token_id is %s; sampling stops at both, and a finished response is trained with %r",
                    name, tokenizer.convert_ids_to_tokens(end.token_id), end.token_id, named,
                    tokenizer.convert_ids_to_tokens(end.token_id))
