"""Training data: plain text, JSONL with a text field, chat JSONL (``messages``); packing and a held-out split.

Every reader fails with one clear line naming the file (and the line number for JSONL): missing, empty, not UTF-8,
malformed JSON, missing fields.

The held-out split is by content, not by position: exact duplicates (after whitespace normalization) are dropped
first, then an item is held out when the hash of (``SPLIT_SEED``, its normalized content) falls in the held-out
fraction of the hash range. A document or example therefore never sits on both sides, and reordering the input file
does not change the split.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from edgeforge.data.builtin import content_fraction, read_text_data
from edgeforge.data.chat import conversation_text
from edgeforge.errors import BadInputError

TEXT_FIELDS = ("text", "content", "document")
#: Share of the user's distinct documents / examples held out for evaluation.
HELDOUT_FRACTION = 0.1
#: Fixed, so that every stage (and every training seed) of a run holds out the same items.
SPLIT_SEED = 0

T = TypeVar("T")


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
                docs.append(conversation_text(tokenizer, msgs))
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
    """(train, held-out) by position: the last sequences are held out.

    Kept for callers that split packed sequences; new code splits documents by content (``split_documents``), which
    keeps duplicates and neighbouring text from sitting on both sides."""
    n_hold = max(min_heldout, int(len(seqs) * heldout_fraction))
    if len(seqs) <= n_hold:
        raise BadInputError(f"only {len(seqs)} sequences: too few to hold out {n_hold} for evaluation; give more data")
    return seqs[:-n_hold], seqs[-n_hold:]


def normalize_content(text: str) -> str:
    """The text with every run of whitespace made one space: what "the same content" means for the split."""
    return " ".join(text.split())


@dataclass(frozen=True)
class ContentSplit(Generic[T]):
    """Items split by content hash. ``train`` keeps the input order; ``heldout`` is ordered by hash, so a prefix of
    it (the first N for evaluation) does not depend on the order of the input file either."""

    train: list[T]
    heldout: list[T]
    duplicates_dropped: int

    def describe(self, unit: str) -> str:
        return (f"held out by content hash: {len(self.heldout)} of {len(self.train) + len(self.heldout)} distinct "
                f"{unit}; {self.duplicates_dropped} exact duplicates dropped")


def split_by_content(items: Sequence[T], content: Callable[[T], str], group: Callable[[T], str] | None = None,
                     heldout_fraction: float = HELDOUT_FRACTION, seed: int = SPLIT_SEED,
                     min_heldout: int = 1) -> ContentSplit[T]:
    """Drop exact duplicates (by normalized ``content``; the first occurrence is kept), then hold out every item
    whose group hash falls below ``heldout_fraction`` (at least ``min_heldout`` groups, the lowest hashes).

    ``group`` (default: the content) keeps items that must not be split apart on one side, e.g. every answer to
    the same prompt. Raises BadInputError when fewer than two distinct groups exist."""
    unique: dict[str, T] = {}
    for item in items:
        unique.setdefault(normalize_content(content(item)), item)
    group_of = group or content
    # (group hash, content hash): held-out groups are the lowest group hashes; the content hash orders within one.
    rank = {key: (content_fraction(normalize_content(group_of(item)), str(seed)), content_fraction(key, str(seed)))
            for key, item in unique.items()}
    group_ranks = sorted({r[0] for r in rank.values()})
    if len(group_ranks) < 2:
        raise BadInputError(f"only {len(group_ranks)} distinct item(s) after dropping {len(items) - len(unique)} "
                            "duplicate(s) (items with the same prompt count as one): need at least 2, one is held "
                            "out for evaluation; give more data")
    n_hold = min(max(min_heldout, sum(r < heldout_fraction for r in group_ranks)), len(group_ranks) - 1)
    cut = group_ranks[n_hold - 1]
    train = [item for key, item in unique.items() if rank[key][0] > cut]
    heldout = [unique[key] for key in sorted((k for k in unique if rank[k][0] <= cut), key=rank.__getitem__)]
    return ContentSplit(train, heldout, len(items) - len(unique))


@dataclass(frozen=True)
class PackedSplit:
    train: torch.Tensor  # [n_train, seq_len] int64
    heldout: torch.Tensor  # [n_heldout, seq_len] int64
    info: dict[str, Any]  # what was held out and why, for the run's record


def split_documents(docs: Sequence[str], tokenizer: Any, seq_len: int, heldout_fraction: float = HELDOUT_FRACTION,
                    seed: int = SPLIT_SEED, min_heldout_sequences: int = 1) -> PackedSplit:
    """Split documents by content (``split_by_content``), then pack each side into sequences of its own.

    When the held-out documents are too short for ``min_heldout_sequences`` full sequences, the next documents in
    hash order join them (the choice still depends on content alone)."""
    base = split_by_content(docs, str, heldout_fraction=heldout_fraction, seed=seed)
    ordered = base.heldout + sorted(base.train, key=lambda d: content_fraction(normalize_content(d), str(seed)))
    lengths = [len(tokenize_documents([d], tokenizer)) for d in ordered]
    n_hold, need = len(base.heldout), min_heldout_sequences * seq_len
    while sum(lengths[:n_hold]) < need and n_hold < len(ordered) - 1:
        n_hold += 1
    held = set(ordered[:n_hold])
    train_docs = [d for d in base.train if d not in held]
    heldout_docs = ordered[:n_hold]
    info = {"heldout_source": f"--data documents {base.describe('documents')}"
            + (f" (grown to {n_hold} documents to fill {min_heldout_sequences} sequence(s))"
               if n_hold > len(base.heldout) else ""),
            "heldout_documents": len(heldout_docs), "train_documents": len(train_docs),
            "duplicate_documents_dropped": base.duplicates_dropped, "split_seed": seed}
    return PackedSplit(pack(tokenize_documents(train_docs, tokenizer), seq_len),
                       pack(tokenize_documents(heldout_docs, tokenizer), seq_len), info)


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
