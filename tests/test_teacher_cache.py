"""The offline teacher cache: identified by the teacher's content, read row by row (bounded memory)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from edgeforge.distill.teacher_cache import TopKCache, model_identity


def _teacher_dir(tmp_path: Path) -> Path:
    d = tmp_path / "teacher"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama", "vocab_size": 32}')
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "tokenizer.json").write_text("{}")
    return d


def test_identity_follows_content_not_modification_times(tmp_path: Path):
    d = _teacher_dir(tmp_path)
    before = model_identity(d)
    os.utime(d / "model.safetensors", (1, 1))  # touched, same bytes: the same teacher
    assert model_identity(d) == before
    (d / "config.json").write_text('{"model_type": "llama", "vocab_size": 33}')  # config.json counts
    changed = model_identity(d)
    assert changed != before
    (d / "tokenizer.json").write_text('{"x": 1}')
    assert model_identity(d) != changed


def test_a_changed_teacher_gets_another_cache_and_a_touched_one_the_same(tmp_path: Path):
    d = _teacher_dir(tmp_path)
    seqs = torch.randint(0, 32, (6, 5))
    key = TopKCache(tmp_path / "c", model_identity(d), seqs, 4, "float32").key
    os.utime(d / "config.json", (2, 2))
    assert TopKCache(tmp_path / "c", model_identity(d), seqs, 4, "float32").key == key
    (d / "model.safetensors").write_bytes(b"other weights")
    assert TopKCache(tmp_path / "c", model_identity(d), seqs, 4, "float32").key != key


def test_lookup_reads_rows_on_demand_and_matches_what_was_cached(tmp_path: Path):
    """Rows come back exactly as filled, across shards, from a fresh cache object (so from the files written)."""
    torch.manual_seed(0)
    vocab, k = 32, 4
    seqs = torch.randint(0, vocab, (7, 5))
    table = torch.randn(vocab, vocab)

    def logits(ids: torch.Tensor) -> torch.Tensor:  # [b, S] -> [b, S, V]
        return table[ids]

    cache = TopKCache(tmp_path / "c", {"t": 1}, seqs, k, "float32", shard_rows=3)
    assert cache.fill(cache.missing(range(7)), logits, batch_size=2) > 0
    fresh = TopKCache(tmp_path / "c", {"t": 1}, seqs, k, "float32", shard_rows=3)
    assert fresh.missing(range(7)) == []
    rows = torch.tensor([6, 0, 4, 4])
    values, ids = fresh.lookup(rows)
    assert values.shape == (4, 5, k) and ids.shape == (4, 5, k) and ids.dtype == torch.int64
    want = torch.log_softmax(table[seqs[rows]].float(), dim=-1).topk(k, dim=-1)
    assert torch.equal(ids, want.indices)
    assert torch.allclose(values.float(), want.values, atol=1e-2)


def _rss_bytes() -> int:
    """This process's resident memory now: heap and tensors, and the pages of memory-mapped files it touched."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def test_reading_a_cache_larger_than_the_limit_keeps_memory_bounded(tmp_path: Path):
    """Every row of a ~150 MB cache is read back; the process's resident memory grows by far less than the cache
    (the old lookup loaded each shard whole and kept it: the growth was the cache's size)."""
    vocab, k, seq_len, n_rows = 128, 64, 256, 1600
    seqs = torch.randint(0, vocab, (n_rows, seq_len), generator=torch.Generator().manual_seed(0))
    table = torch.randn(vocab, vocab)
    cache = TopKCache(tmp_path / "c", {"t": "big"}, seqs, k, "float32", shard_rows=200)
    cache.fill(cache.missing(range(n_rows)), lambda ids: table[ids], batch_size=50)
    cache_bytes = cache.disk_bytes()
    assert cache_bytes > 140e6
    limit_bytes = 40 << 20
    fresh = TopKCache(tmp_path / "c", {"t": "big"}, seqs, k, "float32", shard_rows=200)
    before = _rss_bytes()
    peak = before
    for start in range(0, n_rows, 16):
        values, ids = fresh.lookup(torch.arange(start, start + 16))
        assert values.shape == (16, seq_len, k)
        del values, ids
        peak = max(peak, _rss_bytes())
    grown_mib, cache_mib = (peak - before) / 2**20, cache_bytes / 2**20
    assert peak - before < limit_bytes, f"grew {grown_mib:.0f} MiB reading a {cache_mib:.0f} MiB cache"
