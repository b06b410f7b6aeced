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
