"""What every reliability test asserts about a failure, and how it runs the CLI (in-process or as a real process)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from edgeforge.cli.app import cli

EDGEFORGE = [sys.executable, "-m", "edgeforge"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def invoke(*args: Any) -> Result:
    """The CLI in-process (click's CliRunner): stdout and stderr apart, as a terminal shows them."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def edgeforge(*args: Any, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a real process (C libraries' own stderr included), with a timeout."""
    return subprocess.run([*EDGEFORGE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV)


def assert_one_error_line(done: Result | subprocess.CompletedProcess[str], fragment: str | Sequence[str],
                          exit_code: int = 2, progress_ok: bool = False) -> str:
    """The failure contract: exit ``exit_code``, no traceback anywhere, exactly one ``edgeforge: error:`` line on
    stderr, and it is the last line and names the problem (every ``fragment``).

    ``progress_ok``: commands that report progress on stderr (bench, distill, finetune, and export once a step
    such as llama.cpp's converter has run) may print progress lines before the error; otherwise stderr is that one
    line and nothing else.
    """
    code = done.exit_code if isinstance(done, Result) else done.returncode
    stdout, stderr = done.stdout, done.stderr
    assert code == exit_code, f"exit {code}, expected {exit_code}; stderr: {stderr[-2000:]}"
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("edgeforge: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line last on stderr, got: {lines[-6:]}"
    if not progress_ok:
        assert len(lines) == 1, f"expected stderr to be the error line only, got: {lines[:6]}"
    for frag in [fragment] if isinstance(fragment, str) else fragment:
        assert frag in errors[0], f"{frag!r} not in {errors[0]!r}"
    return errors[0]


def invoke_or_unblock(args: Sequence[Any], fifos: Sequence[Path], timeout_s: float = 20) -> Result:
    """Run the CLI in-process, but never hang the suite on a FIFO: if the command is still waiting after
    ``timeout_s``, open each FIFO for writing (its reader then sees end-of-file) and fail the test."""
    box: dict[str, Any] = {}

    def target() -> None:
        box["result"] = invoke(*args)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"edgeforge {' '.join(map(str, args))} blocked reading a FIFO for {timeout_s} s")
    return box["result"]


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (e.g. '4m') mounted at ``where``; skips the test where mounting is not allowed
    (not root, or no CAP_SYS_ADMIN in the container)."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'}); the in-process variant runs")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def tmpfs_available(probe: Path) -> bool:
    probe.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
    if done.returncode == 0:
        subprocess.run(["umount", "-l", str(probe)], capture_output=True)
    return done.returncode == 0
