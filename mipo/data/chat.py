"""Chat prompts: the ``Messages`` type every module uses, one key per prompt, one way to render it.

A prompt is a list of chat messages, ``[{"role": "user", "content": "..."}]``. Two prompts are
the same prompt exactly when ``prompt_key`` gives the same string. ``render_prompt`` turns it
into text with the tokenizer's chat template and the config's ``model.chat_template_kwargs``,
which ``mipo.model.loading.load_tokenizer`` attaches to the tokenizer. Those kwargs matter: the
Llama-3.1/3.2 templates print today's date unless given ``date_string``, so without a fixed
date the same prompt would tokenise differently from one day to the next while every cache
keyed by model and tokenizer was reused across days.
"""

from __future__ import annotations

import json
from typing import Any

TEMPLATE_KWARGS_ATTRIBUTE = "mipo_chat_template_kwargs"
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
