"""Not enough disk or memory for a stage: refused before the stage writes or trains, in one line (ResourceError)."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from edgeforge.models.refs import read_arch, resolve_model
from edgeforge.train.preflight import AVAILABLE_MEMORY_ENV, check_training_memory

from .helpers import assert_one_error_line, invoke, small_tmpfs

Usage = namedtuple("Usage", "total used free")


def test_not_enough_disk_on_a_real_small_filesystem(tmp_path: Path, tiny_f16: Path) -> None:
    """A 2 MB tmpfs cannot hold the ~3.6 MB Q8_0 export: refused before anything is written there."""
    with small_tmpfs(tmp_path / "small", "2m") as small:
        r = invoke("export", "gguf", tiny_f16, "--quant", "Q8_0", "--no-verify", "--out", small / "o.gguf")
        assert_one_error_line(r, ["not enough disk at", "MB are free", "pass another --out"])
        assert list(small.iterdir()) == []


def test_not_enough_disk_as_the_os_reports_it(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check where no tmpfs can be mounted: the OS reports 1 MB free (shutil.disk_usage patched). From an
    HF directory the check counts the intermediate F16 file too."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10**6, 10**6)
                        if str(p).startswith(str(tmp_path)) else real(p))
    r = invoke("export", "gguf", tiny, "--quant", "Q8_0", "--no-verify", "--out", tmp_path / "out" / "o.gguf")
    assert_one_error_line(r, ["not enough disk at", "1.0 MB are free"])
    assert not list((tmp_path / "out").iterdir())


def test_finetune_refuses_when_predicted_memory_exceeds_what_is_available(
        tmp_path: Path, tiny: Path, task_jsonl: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-flight before any weights load: the planner's training-memory model against the available memory
    (forced to 1 MB here through EDGEFORGE_AVAILABLE_MEMORY_BYTES)."""
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "1000000")
    r = invoke("finetune", tiny, "--data", task_jsonl, "--steps", "1", "--batch-size", "4", "--out", tmp_path / "ft")
    assert_one_error_line(r, ["finetune: not enough memory", "batch 4 x 256 tokens", "lower --batch-size"])
    assert not (tmp_path / "ft").exists()


def test_memory_prediction_grows_with_the_batch_and_passes_here(tiny: Path) -> None:
    arch = read_arch(resolve_model(str(tiny)))
    small = check_training_memory("finetune", "lora", arch, 1, 128)  # passes on this machine
    assert check_training_memory("finetune", "lora", arch, 8, 128) > small > 2 * arch.n_params


def test_distill_memory_check_refuses_a_student_that_cannot_train_here(tiny: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The check distill needs (edgeforge.train.preflight.check_distill_memory), from config files only."""
    from edgeforge.distill.prune import StudentShape
    from edgeforge.errors import ResourceError
    from edgeforge.train.preflight import check_distill_memory

    need = check_distill_memory(tiny, None, StudentShape(1), 2, 32)
    assert need < check_distill_memory(tiny, tiny, None, 2, 32)  # a 1-layer student needs less than a 2-layer one
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(need - 1))
    with pytest.raises(ResourceError, match="distill: not enough memory"):
        check_distill_memory(tiny, None, StudentShape(1), 2, 32)


def test_distill_refuses_when_predicted_memory_exceeds_what_is_available(
        tmp_path: Path, tiny: Path, text_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, "1000000")
    r = invoke("distill", "--teacher", tiny, "--student-layers", "1", "--data", text_data, "--steps", "1",
               "--batch-size", "1", "--seq-len", "16", "--eval-sequences", "1", "--checkpoint-every", "0",
               "--cache-dir", tmp_path / "cache", "--out", tmp_path / "ds")
    assert_one_error_line(r, "distill: not enough memory", progress_ok=True)
