"""Content-keyed stage outputs for ``edgeforge build``: a finished stage is never run twice.

A stage's key is a hash of its name, its settings, the keys of the stages it reads from and the identity of its
external inputs (model files, data files). Its outputs live in ``<root>/<stage>-<key16>/``; the stage is done
exactly when ``stage.json`` exists there, and that file is written last, atomically (temporary file, then rename),
so a stage killed half-way (even by SIGKILL) is never taken as done: the next run finds the directory without
``stage.json`` and runs the stage again there, resuming from its own checkpoint where the stage has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeforge import __version__
from edgeforge.fileio import stable_hash, write_json_atomic

MARKER = "stage.json"


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
