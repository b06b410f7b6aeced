"""Silence the C libraries' own stderr chatter (llama.cpp logs every tensor) while keeping it for error messages."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


class CapturedStderr:
    """What the wrapped C code wrote to file descriptor 2; ``tail(n)`` for an error message."""

    def __init__(self) -> None:
        self.text = ""

    def tail(self, n: int = 2) -> str:
        lines = [ln for ln in self.text.strip().splitlines() if ln.strip()]
        return " | ".join(lines[-n:])


@contextlib.contextmanager
def captured_stderr() -> Iterator[CapturedStderr]:
    """Redirect fd 2 (C-level stderr, not only ``sys.stderr``) to a temporary file for the duration.

    Set EDGEFORGE_VERBOSE=1 to let it through.
    """
    cap = CapturedStderr()
    if os.environ.get("EDGEFORGE_VERBOSE") == "1":
        yield cap
        return
    sys.stderr.flush()
    saved = os.dup(2)
    saved_py = sys.stderr
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        # Python-level writes too (tqdm bars, llama-cpp-python's log callback): they reach fd 2 in a plain process,
        # but not where sys.stderr was replaced (click's CliRunner, notebooks), which would then show them.
        sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)
        try:
            yield cap
        finally:
            sys.stderr.flush()
            sys.stderr = saved_py
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            cap.text = tmp.read().decode("utf-8", "replace")
