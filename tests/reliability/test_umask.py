"""``write_text_atomic`` never touches the process umask (issue #19): bench saves results from a thread pool, and
a file another thread created while the umask was briefly 0 got mode 0666 (world-writable)."""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from pathlib import Path

from edgeforge.fileio import write_text_atomic

UMASK = 0o027  # distinctive: 0666 & ~UMASK = 0640; a file created in the old window came out 0666
EXPECTED_MODE = 0o666 & ~UMASK


def _create_files(directory: Path, stop: threading.Event, made: list[Path]) -> None:
    i = 0
    while not stop.is_set():
        path = directory / f"{threading.get_ident()}-{i}"
        with open(path, "w"):  # an ordinary create: the kernel applies the umask of this moment
            pass
        made.append(path)
        i += 1


def test_threads_creating_files_meanwhile_get_the_umask_mode(tmp_path: Path) -> None:
    others, atomic = tmp_path / "others", tmp_path / "atomic"
    others.mkdir()
    atomic.mkdir()
    previous_umask, previous_interval = os.umask(UMASK), sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows: any window shows up
    stop, made = threading.Event(), []
    threads = [threading.Thread(target=_create_files, args=(others, stop, made)) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 4
        writes = 0
        while time.monotonic() < deadline and writes < 3000:
            write_text_atomic(atomic / f"{writes % 50}.json", "{}\n")
            writes += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(previous_interval)
        os.umask(previous_umask)
    assert len(made) > 100 and writes > 100, (len(made), writes)
    wrong = {oct(stat.S_IMODE(p.stat().st_mode)) for p in [*made, *atomic.iterdir()]} - {oct(EXPECTED_MODE)}
    assert not wrong, f"files created with mode {wrong}, expected {oct(EXPECTED_MODE)} under umask {oct(UMASK)}"
    assert sorted(p.name for p in atomic.iterdir()) == sorted(f"{i}.json" for i in range(min(writes, 50)))
