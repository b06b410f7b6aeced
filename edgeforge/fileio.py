"""File helpers every stage shares: streaming sha256, content identities, one canonical-JSON hash, and atomic writes
(a reader never sees half a file)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in ``chunk_bytes`` blocks (artifacts are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    """sha256 hex of the canonical JSON of ``obj`` (sorted keys, no spaces; Paths and other objects as strings).

    The one hash of settings and identities: build stage keys and the offline teacher cache both use it.
    """
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_identity(path: Path) -> dict[str, Any]:
    """What identifies an input file or directory by content: the sha256 of each file (hidden files and folders,
    such as a checkpoint, left out). Never modification times: a touched file is the same input, a changed one is
    not. Hashing costs about a second per 500 MB, once per run.
    """
    path = Path(path)
    if path.is_file():
        return {"name": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return {"name": path.name, "files": {str(p.relative_to(path)): sha256_file(p) for p in files}}


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON written so that a reader (or a rerun after SIGKILL) never sees half a file; creates the parent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that a reader never sees half a file: a temp file in the same directory, fsync, then
    os.replace (atomic on POSIX within one filesystem).

    The temp file is created with mode 0666 and the kernel applies the process umask, as for any ``open()``: the
    shipped file gets the usual mode without reading the umask. Reading it means setting it (``os.umask`` has no
    getter), and setting it is process-wide: another thread creating a file in that window got mode 0666.
    """
    fd, tmp = _create_unique(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_unique(directory: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """A new file ``directory/prefix<random>suffix`` opened for writing, created (O_EXCL) with mode 0666 & ~umask;
    unlike tempfile.mkstemp, which always makes it 0600."""
    for _ in range(100):
        name = os.path.join(directory, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: no free temporary name after 100 tries")
