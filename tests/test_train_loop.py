"""The shared training loop: schedule, exact resume after an interruption, checkpoints written atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgeforge.data.text import batch_iterator
from edgeforge.train.loop import TrainConfig, lr_at, train


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50))


def _run(ckpt: Path, steps: int, resume: bool, stop_at: int | None = None) -> nn.Module:
    model = _model()
    seqs = torch.randint(0, 50, (64, 8), generator=torch.Generator().manual_seed(1))

    def step_fn(batch):
        x = batch["input_ids"]
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), x[:, 1:].reshape(-1))
        return loss, {}

    def on_log(entry):
        if stop_at is not None and entry["step"] == stop_at:
            raise KeyboardInterrupt  # an interruption right after a checkpoint-less step

    cfg = TrainConfig(steps=steps, lr=1e-2, warmup_steps=2, checkpoint_every=2, seed=0)
    try:
        train(model, step_fn, lambda s: batch_iterator(seqs, 4, 0, s), cfg, ckpt, resume=resume, on_log=on_log)
    except KeyboardInterrupt:
        pass
    return model


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path):
    straight = _run(tmp_path / "a", steps=8, resume=False)
    _run(tmp_path / "b", steps=8, resume=False, stop_at=5)  # last checkpoint at step 4
    resumed = _run(tmp_path / "b", steps=8, resume=True)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_no_partial_checkpoint_is_left(tmp_path: Path):
    _run(tmp_path / "c", steps=4, resume=False)
    assert (tmp_path / "c" / "state.json").is_file()
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.old"))


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_tokens_exclude_padding(tmp_path: Path):
    """A padded batch counts its attention mask's ones, not its shape (padding inflated tokens/s and FLOPs/token)."""
    model = _model()
    ids = torch.randint(0, 50, (4, 8))
    mask = torch.zeros(4, 8, dtype=torch.int64)
    mask[:, :3] = 1  # 12 real tokens of 32

    def step_fn(batch):
        logits = model(batch["input_ids"][:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, 50), batch["input_ids"][:, 1:].reshape(-1)), {}

    def batches(_skip: int):
        while True:
            yield {"input_ids": ids, "attention_mask": mask}

    state = train(model, step_fn, batches, TrainConfig(steps=3, lr=1e-3, warmup_steps=0, checkpoint_every=0, seed=0),
                  tmp_path / "ckpt")
    assert state.tokens == 3 * 12


def test_rss_sampler_sees_a_peak_inside_its_span_only():
    """A span's peak is sampled inside it: an allocation made and freed inside the span shows in its peak."""
    import mmap
    import time

    from edgeforge.distill.memory import RssSampler

    with RssSampler(interval_s=0.01) as idle:
        time.sleep(0.05)
    with RssSampler(interval_s=0.01) as busy:
        # A fresh anonymous mapping, every page touched: a tensor could reuse pages the allocator freed earlier in
        # the run (still resident), and then the span's peak would not move (seen after the whole fast suite).
        block = mmap.mmap(-1, 64 << 20)
        for offset in range(0, 64 << 20, 4096):
            block[offset] = 1
        time.sleep(0.05)
        block.close()
    assert busy.peak_bytes - idle.peak_bytes > 48 << 20
