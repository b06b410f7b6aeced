"""Faults: SIGKILL in the middle of fine-tuning, GGUF export and a benchmark, and a disk that fills up during an
export. Real processes (``python -m edgeforge``) killed with SIGKILL, and real small filesystems (tmpfs) where this
machine allows mounting one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from edgeforge.bench.results import result_path, save_result
from edgeforge.export.gguf import load_record, read_lineage, sha256_file

from .helpers import EDGEFORGE, ENV, assert_one_error_line, edgeforge, invoke, small_tmpfs


def _start(*args: object) -> subprocess.Popen[str]:
    """edgeforge in its own process group, so SIGKILL reaches it and everything it started."""
    return subprocess.Popen([*EDGEFORGE, *map(str, args)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str, timeout_s: float = 300,
               after_s: float = 0.0) -> None:
    """SIGKILL the process group of ``proc`` as soon as ``ready()`` (polled every 10 ms) holds."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"edgeforge ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.01)
    time.sleep(after_s)
    assert proc.poll() is None, f"edgeforge ended before it could be killed ({what})"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------- fine-tuning
@pytest.mark.integration
def test_sigkill_during_finetune_then_resume_finishes(tmp_path: Path, tiny: Path, task_jsonl: Path) -> None:
    out = tmp_path / "ft"
    args = ["finetune", tiny, "--data", task_jsonl, "--steps", "60", "--batch-size", "2", "--eval-examples", "1",
            "--checkpoint-every", "15", "--out", out]
    state = out / "checkpoint" / "state.json"
    _kill_when(_start(*args), state.is_file, "the first checkpoint", after_s=0.5)
    assert json.loads(state.read_text())["step"] >= 15  # the checkpoint on disk is whole (written atomically)
    assert not (out / "finetune.json").exists() and not (out / "adapter_model.safetensors").exists()
    # a new run never silently overwrites the interrupted one
    assert_one_error_line(edgeforge(*args), ["interrupted fine-tuning run", "--resume"])
    done = edgeforge(*args, "--resume", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "finetune.json").read_text())
    assert [e["step"] for e in record["loss_curve"]] == list(range(1, 61))  # the curve survives the kill
    assert (out / "adapter_model.safetensors").is_file() and not (out / "checkpoint").exists()


# ---------------------------------------------------------------- GGUF export
def _tempdir_has(out_dir: Path, name: str) -> Callable[[], bool]:
    return lambda: any(p.is_dir() and (p / name).exists() for p in out_dir.glob(".edgeforge-export-*"))


@pytest.mark.integration
@pytest.mark.parametrize("moment", ["converting", "quantizing"])
def test_sigkill_during_export_gguf_leaves_no_complete_looking_file(moment: str, tmp_path: Path, tiny: Path) -> None:
    out_dir = tmp_path / "out"
    out = out_dir / "tiny-q8.gguf"
    args = ["export", "gguf", tiny, "--quant", "Q8_0", "--no-verify", "--out", out]
    ready = (lambda: any(out_dir.glob(".edgeforge-export-*"))) if moment == "converting" else _tempdir_has(
        out_dir, "base.gguf")  # the converter's F16 file is complete, quantization and lineage are running
    _kill_when(_start(*args), ready, moment)
    assert not out.exists() and not out.with_name(out.name + ".edgeforge.json").exists()
    assert all(p.name.startswith(".") for p in out_dir.iterdir()), list(out_dir.iterdir())  # temporary names only
    done = edgeforge(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_record(out)["sha256"] == sha256_file(out) and read_lineage(out)["quant"] == "Q8_0"


# ---------------------------------------------------------------- benchmark
def _device_bench_pids(proc: subprocess.Popen[str]) -> list[int]:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c.pid for c in children if "device_bench" in " ".join(c.cmdline())]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.integration
def test_sigkill_during_bench_leaves_no_result_and_no_orphan(tmp_path: Path, tiny_f16: Path,
                                                              local_target: Path) -> None:
    art = tmp_path / "tiny.gguf"
    art.symlink_to(tiny_f16)
    proc = _start("bench", art, "--target", local_target, "--threads", "1", "--prompt-tokens", "8", "--gen-tokens",
                  "16", "--repeats", "5000")
    pids: list[int] = []

    def running() -> bool:
        pids[:] = _device_bench_pids(proc)
        return len(pids) >= 2  # device_bench's supervisor and its worker

    _kill_when(proc, running, "device_bench started", after_s=1.0)
    deadline = time.monotonic() + 10
    try:
        while alive := [p for p in pids if _alive(p)]:
            assert time.monotonic() < deadline, f"device_bench kept running after edgeforge was killed: {alive}"
            time.sleep(0.1)
    finally:
        for p in pids:  # never leave an orphan benchmark behind, even when the assertion fails
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    assert not result_path(art, "here").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]
    done = edgeforge("bench", art, "--target", local_target, "--threads", "1", "--prompt-tokens", "8",
                     "--gen-tokens", "4", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(result_path(art, "here").read_text())["decode_tokens_per_s"] > 0


def test_a_result_interrupted_while_saving_is_never_half_written(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """save_result writes a temporary file and renames it: a kill between the two leaves no result file at all
    (the rename is where this test stops the process, as SIGKILL would)."""
    art = tmp_path / "m.gguf"
    art.write_bytes(b"GGUF")

    def killed(*_a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_result({"artifact": str(art), "target": "here", "decode_tokens_per_s": 1.0})
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ---------------------------------------------------------------- disk full during an export
#: Fools edgeforge's own disk pre-check (as when another process fills the disk after it ran), so that the write
#: itself hits the full filesystem.
_FOOLED_PRECHECK = (
    "import collections, shutil, sys\n"
    "real = shutil.disk_usage\n"
    "big = collections.namedtuple('u', 'total used free')(10**12, 0, 10**12)\n"
    "shutil.disk_usage = lambda p: big if real(p).free > 1 << 20 else real(p)\n"
    "from edgeforge.cli.app import main\n"
    "sys.argv[0] = 'edgeforge'\n"
    "main()\n"
)

#: (source, filesystem size): where the disk fills up. A GGUF source: quantizing (4 MB) or writing the lineage copy
#: (5.5 MB: the quantized file fits, its copy does not). An HF source: llama.cpp's converter (6 MB < its 8 MB F16).
DISK_FULL_CASES = {"quantizing": ("gguf", "4m"), "writing-lineage": ("gguf", "5500k"), "converting": ("hf", "6m")}


@pytest.mark.parametrize("where", list(DISK_FULL_CASES))
def test_disk_full_during_export_is_one_line_and_leaves_nothing(where: str, tmp_path: Path, tiny: Path,
                                                                tiny_f16: Path) -> None:
    source, size = DISK_FULL_CASES[where]
    with small_tmpfs(tmp_path / "small", size) as small:
        out = small / "o.gguf"
        done = subprocess.run([EDGEFORGE[0], "-c", _FOOLED_PRECHECK, "export", "gguf",
                               str(tiny_f16 if source == "gguf" else tiny), "--quant", "Q8_0", "--no-verify", "--out",
                               str(out)], capture_output=True, text=True, timeout=300, env=ENV)
        assert_one_error_line(done, ["filled up during the export", "no space left on device", "no partial file"],
                              progress_ok=True)
        assert list(small.iterdir()) == []  # no partial artifact, no temporary directory


def test_disk_full_simulated_at_the_write(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no tmpfs can be mounted: the GGUF writer's tensor write fails with ENOSPC, as on a full disk."""
    import errno

    import gguf

    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    out = tmp_path / "out" / "o.gguf"
    r = invoke("export", "gguf", tiny, "--quant", "F16", "--no-verify", "--out", out)
    assert_one_error_line(r, ["filled up during the export", "no partial file"], progress_ok=True)
    assert list(out.parent.iterdir()) == []
