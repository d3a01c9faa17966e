"""Chat prompts as data: the ``Messages`` type every module uses, and one key per prompt.

A prompt is a list of chat messages, ``[{"role": "user", "content": "..."}]``; the tokenizer's
chat template renders it (``mipo.encoding.encode_prompt``). Two prompts are the same prompt
exactly when ``prompt_key`` gives the same string.
"""

from __future__ import annotations

import json

Messages = list[dict[str, str]]  # [{"role": "user", "content": "..."}, ...]


def prompt_key(messages: Messages) -> str:
    """A string under which two prompts are equal iff their messages are (dict key order ignored)."""
    return json.dumps(list(messages), sort_keys=True, ensure_ascii=False)
