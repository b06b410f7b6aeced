"""Training data: plain text, JSONL with a text field, chat JSONL (``messages``); packing and a held-out split.

Every reader fails with one clear line naming the file (and the line number for JSONL): missing, empty, not UTF-8,
malformed JSON, missing fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from edgeforge.data.builtin import read_text_data
from edgeforge.errors import BadInputError

TEXT_FIELDS = ("text", "content", "document")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Objects of a JSONL file, one per non-blank line. Errors name the line number."""
    text = read_text_data(path)
    rows = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInputError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise BadInputError(f"{path}:{i}: malformed JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise BadInputError(f"{path}:{i}: expected a JSON object per line, found {type(obj).__name__}")
        rows.append(obj)
    if not rows:
        raise BadInputError(f"{path}: no JSON lines found")
    return rows


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat: a non-empty list of {"role": str, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise BadInputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadInputError(f"{where}: messages[{j}] needs string fields 'role' and 'content'")
    return messages


def documents_from_file(path: Path, tokenizer: Any) -> list[str]:
    """Training documents from a .txt file (blank-line separated), JSONL with a text field, or chat JSONL."""
    if path.suffix.lower() in (".jsonl", ".json"):
        docs = []
        for i, row in enumerate(read_jsonl(path), start=1):
            where = f"{path}:{i}"
            if "messages" in row:
                msgs = validate_messages(row["messages"], where)
                docs.append(tokenizer.apply_chat_template(msgs, tokenize=False))
            elif "prompt" in row and "completion" in row:
                docs.append(f"{row['prompt']}{row['completion']}")
            else:
                key = next((k for k in TEXT_FIELDS if isinstance(row.get(k), str)), None)
                if key is None:
                    raise BadInputError(f"{where}: expected a 'text' field, a 'messages' list, or 'prompt' and "
                                        f"'completion'; found keys {sorted(row)}")
                docs.append(row[key])
        return docs
    text = read_text_data(path)
    return [d for d in text.split("\n\n") if d.strip()]


def tokenize_documents(docs: Iterable[str], tokenizer: Any) -> list[int]:
    """One token stream: each document's ids followed by the EOS token, so documents don't run together."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for d in docs:
        stream.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    return stream


def pack(stream: list[int], seq_len: int) -> torch.Tensor:
    """Cut a token stream into full sequences: [n_sequences, seq_len] int64 (the tail that doesn't fill one is
    dropped)."""
    n = len(stream) // seq_len
    if n == 0:
        raise BadInputError(f"the data has {len(stream)} tokens, fewer than one sequence of {seq_len}; give more "
                            "data or a shorter --seq-len")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_heldout(seqs: torch.Tensor, heldout_fraction: float = 0.1, min_heldout: int = 1) -> tuple[torch.Tensor,
                                                                                                        torch.Tensor]:
    """(train, held-out): the last sequences are held out (deterministic; no shuffling across the split)."""
    n_hold = max(min_heldout, int(len(seqs) * heldout_fraction))
    if len(seqs) <= n_hold:
        raise BadInputError(f"only {len(seqs)} sequences: too few to hold out {n_hold} for evaluation; give more data")
    return seqs[:-n_hold], seqs[-n_hold:]


def batch_iterator(seqs: torch.Tensor, batch_size: int, seed: int, start_step: int, grad_accum: int = 1,
                   rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches in a fixed, seeded order, starting at optimizer step ``start_step`` (for exact resume).

    The order is a fresh permutation per epoch; under DDP each rank takes every ``world``-th batch.
    """
    per_step = grad_accum * world
    idx = start_step * per_step
    epoch_len = max(1, len(seqs) // batch_size)
    while True:
        epoch, pos = divmod(idx, epoch_len)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(seqs), generator=g)
        if idx % world == rank:
            rows = perm[pos * batch_size:(pos + 1) * batch_size]
            yield {"input_ids": seqs[rows]}
        idx += 1
