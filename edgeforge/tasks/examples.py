"""Task examples: read a task (built-in or JSONL), encode it for answer-only training, collate micro-batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgeforge.data.chat import prompt_ids
from edgeforge.data.text import ContentSplit, read_jsonl, split_by_content, validate_messages
from edgeforge.errors import BadInputError

IGNORE_INDEX = -100


def _conversation_text(messages: list[dict[str, str]]) -> str:
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages)


def split_task_examples(examples: list[dict]) -> ContentSplit[dict]:
    """Drop exact duplicate examples, then hold out ~10% by the content hash of the prompt (every message but the
    answer), so that two answers to the same prompt never sit on both sides (edgeforge.data.text.split_by_content)."""
    return split_by_content(examples, lambda e: _conversation_text(e["messages"]),
                            group=lambda e: _conversation_text(e["messages"][:-1]))


def load_task_examples(task: str | None, data: Path | None, seed: int = 0) -> tuple[list[dict], list[dict], str]:
    """(train, held-out, source description). A JSONL file is split by content (``split_task_examples``); the
    description says how many examples were held out and how many exact duplicates were dropped."""
    if task is not None and data is None and not Path(task).exists():
        from edgeforge.tasks import build_task

        train_ex, held = build_task(task, seed)
        return train_ex, held, f"built-in task '{task}'"
    path = Path(data or task)  # type: ignore[arg-type]
    rows = read_jsonl(path)
    examples = []
    for i, row in enumerate(rows, start=1):
        where = f"{path}:{i}"
        if "messages" in row:
            msgs = validate_messages(row["messages"], where)
            if msgs[-1]["role"] != "assistant":
                raise BadInputError(f"{where}: the last message must be the assistant's answer, found role "
                                    f"'{msgs[-1]['role']}'")
            examples.append({"messages": msgs})
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            examples.append({"messages": [{"role": "user", "content": row["prompt"]},
                                          {"role": "assistant", "content": row["completion"]}]})
        else:
            raise BadInputError(f"{where}: expected 'messages' or string fields 'prompt' and 'completion'; found "
                                f"keys {sorted(row)}")
    if len(examples) < 2:
        raise BadInputError(f"{path}: need at least 2 examples (one is held out), found {len(examples)}")
    try:
        split = split_task_examples(examples)
    except BadInputError as e:
        raise BadInputError(f"{path}: {e}") from None
    return split.train, split.heldout, f"{path} ({split.describe('examples')})"


def encode_example(tokenizer: Any, messages: list[dict[str, str]], max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = -100 on every prompt token: the loss is on the answer (and its end token).

    The prompt is the chat template of all messages but the last, with the generation prompt (plain text for a
    model without a template: edgeforge.data.chat); the answer is the last (assistant) message's content followed
    by the end-of-sequence token.
    """
    prompt = prompt_ids(tokenizer, messages[:-1])
    answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (prompt + answer + end)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer + end)[:max_len]
    return ids, labels


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids / labels / attention_mask, each [batch, max_len]."""
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
