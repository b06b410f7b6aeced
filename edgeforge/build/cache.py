"""Content-keyed stage outputs for ``edgeforge build``: a finished stage is never run twice.

A stage's key is a hash of its name, its settings, the keys of the stages it reads from and the identity of its
external inputs (model files, data files). Its outputs live in ``<root>/<stage>-<key16>/``; the stage is done
exactly when ``stage.json`` exists there, and that file is written last, atomically (temporary file, then rename),
so a stage killed half-way (even by SIGKILL) is never taken as done: the next run finds the directory without
``stage.json`` and runs the stage again there, resuming from its own checkpoint where the stage has one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeforge import __version__
from edgeforge.fileio import sha256_file, write_text_atomic

MARKER = "stage.json"


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys; Paths as strings)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def path_identity(path: Path) -> dict[str, Any]:
    """What identifies an input file or directory: the sha256 of each file (data files are small; model weights
    are hashed once per build, which costs about a second per 500 MB)."""
    path = Path(path)
    if path.is_file():
        return {"name": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                           p.relative_to(path).parts))
    return {"name": path.name, "files": {str(p.relative_to(path)): sha256_file(p) for p in files}}


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON written so that a reader (or a rerun after SIGKILL) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def stage_key(name: str, settings: dict[str, Any], inputs: dict[str, Any]) -> str:
    """The full sha256 hex key of stage ``name`` for these settings and inputs (upstream keys, input identities)."""
    return stable_hash({"stage": name, "edgeforge": __version__, "config": settings, "inputs": inputs})


@dataclass(frozen=True)
class StageDir:
    """One stage's place in the cache: ``<root>/<name>-<key16>/``, done when its marker file exists."""

    name: str
    key: str  # full sha256 hex
    dir: Path
    config: dict[str, Any]

    @property
    def done(self) -> bool:
        return (self.dir / MARKER).is_file()

    @property
    def started(self) -> bool:
        """Ran before without finishing (killed or failed): its directory exists but has no marker."""
        return self.dir.is_dir() and not self.done

    def result(self) -> dict[str, Any]:
        return json.loads((self.dir / MARKER).read_text(encoding="utf-8"))["result"]

    def seconds(self) -> float:
        """How long the stage took when it ran."""
        return float(json.loads((self.dir / MARKER).read_text(encoding="utf-8"))["seconds"])

    def finish(self, result: dict[str, Any], seconds: float) -> None:
        write_json_atomic(self.dir / MARKER, {"stage": self.name, "key": self.key, "edgeforge": __version__,
                                              "config": self.config, "seconds": seconds, "result": result})


class StageCache:
    """Stage directories under ``root`` (``OUT/.stages``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def place(self, name: str, config: dict[str, Any], inputs: dict[str, Any]) -> StageDir:
        """The place of stage ``name`` for these settings and inputs (upstream keys, input identities)."""
        key = stage_key(name, config, inputs)
        return StageDir(name=name, key=key, dir=self.root / f"{name}-{key[:16]}", config=config)
