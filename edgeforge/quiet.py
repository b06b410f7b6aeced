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
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield cap
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            cap.text = tmp.read().decode("utf-8", "replace")
