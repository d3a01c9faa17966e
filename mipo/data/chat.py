"""Chat prompts: the ``Messages`` type every module uses, one key per prompt, one way to render it.

A prompt is a list of chat messages, ``[{"role": "user", "content": "..."}]``. Two prompts are
the same prompt exactly when ``prompt_key`` gives the same string. ``render_prompt`` turns it
into text with the tokenizer's chat template and the config's ``model.chat_template_kwargs``,
which ``mipo.model.loading.load_tokenizer`` attaches to the tokenizer. Those kwargs matter: the
Llama-3.1/3.2 templates print today's date unless given ``date_string``, so without a fixed
date the same prompt would tokenise differently from one day to the next while every cache
keyed by model and tokenizer was reused across days.

The end of an assistant turn is the template's too (``turn_end``): rendering ``[user, assistant]``
shows the text the template writes right after the assistant's content, and its first special
token is the token that ends a turn. It is not always the tokenizer's eos: Gemma ends a turn with
``<end_of_turn>`` (eos ``<eos>``), Phi-3 with ``<|end|>`` (eos ``<|endoftext|>`` in some releases),
the first Llama-3-Instruct tokenizers with ``<|eot_id|>`` (eos ``<|end_of_text|>``). Sampling stops
at it (``stop_token_ids``) and a finished response is trained with it
(``mipo.data.encoding.encode_response``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

TEMPLATE_KWARGS_ATTRIBUTE = "mipo_chat_template_kwargs"
TURN_END_ATTRIBUTE = "mipo_turn_end"  # a ``TurnEnd``, set by ``turn_end`` (load_tokenizer computes it up front)
STOP_IDS_ATTRIBUTE = "mipo_stop_token_ids"  # tuple of ids sampling stops at, set by mipo.model.loading.load_tokenizer
CONTENT_PROBE = "MIPO_ASSISTANT_CONTENT"  # the assistant's content when a template is rendered to find its turn end
Messages = list[dict[str, str]]  # [{"role": "user", "content": "..."}, ...]


def prompt_key(messages: Messages) -> str:
    """A string under which two prompts are equal iff their messages are (dict key order ignored)."""
    return json.dumps(list(messages), sort_keys=True, ensure_ascii=False)


def chat_template_kwargs(tokenizer: Any) -> dict[str, Any]:
    """The extra variables the chat template is rendered with (``model.chat_template_kwargs``)."""
    return dict(getattr(tokenizer, TEMPLATE_KWARGS_ATTRIBUTE, None) or {})


def render_prompt(tokenizer: Any, messages: Messages) -> str:
    """The prompt as text, ready for the assistant's reply: the only place a chat template is applied."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False,
                                         **chat_template_kwargs(tokenizer))


# --------------------------------------------------------------------------------------------
# The end of an assistant turn
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TurnEnd:
    """How the chat template ends an assistant turn.

    ``token_id``: the token a finished response is trained with and sampling stops at: the first special
    token the template writes after the assistant's content, or the tokenizer's eos when it writes none.
    ``suffix``: the text the template writes after the assistant's content (``"<|im_end|>\\n"`` for ChatML,
    ``"<|eot_id|>"`` for Llama-3, ``"<end_of_turn>\\n"`` for Gemma, ``"<|end|>\\n<|endoftext|>"`` for
    Phi-3); the eos text when the template gives no end-of-turn token. ``from_template``: whether
    ``token_id`` was found in the template (False: the eos fallback).
    """

    token_id: int
    suffix: str
    from_template: bool


def _is_special(tokenizer: Any, token_id: int) -> bool:
    """A special token: listed among the tokenizer's special tokens, or added with ``special=True``
    (the Llama-3 tokenizers add ``<|eot_id|>`` that way without listing it)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return token_id in tokenizer.all_special_ids or bool(getattr(added.get(token_id), "special", False))


def template_suffix(tokenizer: Any) -> str | None:
    """The text the chat template writes after an assistant message's content, or None if it cannot tell.

    Rendered from ``[user, assistant]`` (no generation prompt), with ``CONTENT_PROBE`` as the content:
    everything after the probe's last occurrence.
    """
    messages = [{"role": "user", "content": "U"}, {"role": "assistant", "content": CONTENT_PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False,
                                             **chat_template_kwargs(tokenizer))
    except Exception:  # a template that refuses this conversation: no turn end of its own
        return None
    at = text.rfind(CONTENT_PROBE) if isinstance(text, str) else -1
    return None if at < 0 else text[at + len(CONTENT_PROBE):]


def find_turn_end(tokenizer: Any) -> TurnEnd:
    """The template's ``TurnEnd``: the first special token of ``template_suffix``, else the tokenizer's eos."""
    suffix = template_suffix(tokenizer)
    if suffix:
        for token_id in tokenizer(suffix, add_special_tokens=False)["input_ids"]:
            if _is_special(tokenizer, token_id):
                return TurnEnd(int(token_id), suffix, True)
    return TurnEnd(int(tokenizer.eos_token_id), str(tokenizer.eos_token), False)


def turn_end(tokenizer: Any) -> TurnEnd:
    """The tokenizer's ``TurnEnd``: the one ``mipo.model.loading.load_tokenizer`` attached, else found once
    (``find_turn_end``) and attached."""
    end = getattr(tokenizer, TURN_END_ATTRIBUTE, None)
    if end is None:
        end = find_turn_end(tokenizer)
        setattr(tokenizer, TURN_END_ATTRIBUTE, end)
    return end


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The ids sampling stops at (both backends): the ones ``load_tokenizer`` attached (the turn end, the eos
    and the generation config's ``eos_token_id``), else the turn end and the eos."""
    stops = getattr(tokenizer, STOP_IDS_ATTRIBUTE, None)
    return tuple(stops) if stops else unique_ids([turn_end(tokenizer).token_id, tokenizer.eos_token_id])


def unique_ids(ids: Sequence[int | None]) -> tuple[int, ...]:
    """``ids`` without None and repeats, in first-seen order."""
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
