"""How a conversation becomes the model's input: its tokenizer's chat template, or plain text for a base model.

Base checkpoints (Llama 2, Gemma 3 ``-pt``, most models a user pre-trains) ship no chat template, and transformers
raises on ``apply_chat_template`` for them. Such a model is prompted the way a base model is trained and the way TRL
treats a prompt/completion dataset that is not conversational: the contents one after the other (a newline between
two messages unless the first already ends in whitespace), the answer straight after the prompt, preceded by the
BOS token where the tokenizer adds one.
"""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_format(tokenizer: Any) -> str:
    """'chat template' or 'plain text': what the functions below use for ``tokenizer``."""
    return "chat template" if has_chat_template(tokenizer) else "plain text"


def _bos_text(tokenizer: Any) -> str:
    """The BOS token's text where the tokenizer puts it before a text, else ''."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ""
    adds = tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
    return tokenizer.bos_token if adds else ""


def _plain(messages: Messages) -> str:
    parts = []
    for m in messages:
        content = m["content"]
        parts.append(content if not content or content[-1].isspace() else content + "\n")
    return "".join(parts)


def prompt_text(tokenizer: Any, messages: Messages) -> str:
    """The prompt for the answer that follows ``messages`` (with the template's generation prompt), as text whose
    special tokens are written out: tokenize it with ``add_special_tokens=False``."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return _bos_text(tokenizer) + _plain(messages)


def conversation_text(tokenizer: Any, messages: Messages) -> str:
    """A whole conversation (its last message included) as text, special tokens written out."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return _bos_text(tokenizer) + _plain(messages[:-1]) + messages[-1]["content"]


def prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of ``prompt_text``."""
    if has_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"])
