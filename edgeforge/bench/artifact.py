"""An artifact as a benchmark sees it: a GGUF file or an ONNX export directory, checked, sized and listed with the
files that travel with it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeforge.errors import BadInputError


@dataclass(frozen=True)
class LocalArtifact:
    """A GGUF file or an ONNX export directory on this machine, as it will be pushed.

    ``model_file`` is what device_bench checks with --verify-sha256 (the GGUF, or the ONNX dir's model.onnx; the
    other files of an ONNX dir are checked before the run); ``sidecars`` travel with a GGUF (its runtime.json);
    ``weights_bytes`` is what the estimator streams per token (the GGUF, or the dir's .onnx/.onnx_data files).
    """

    path: Path
    format: Literal["gguf", "onnx"]
    model_file: Path
    weights_bytes: int
    sidecars: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name


def local_artifact(path: str | os.PathLike[str]) -> LocalArtifact:
    """Check that ``path`` is a GGUF file or an ONNX export directory (or its model.onnx) and size it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInputError(f"{p}: artifact not found; expected a .gguf file or an ONNX export directory")
    if p.is_file() and p.suffix.lower() == ".onnx":
        p = p.parent
    if p.is_dir():
        model = p / "model.onnx"
        if not model.is_file():
            raise BadInputError(f"{p}: a directory without model.onnx; expected an ONNX export directory")
        weights = sum(f.stat().st_size for f in p.iterdir() if f.is_file() and ".onnx" in f.name)
        return LocalArtifact(p, "onnx", model, weights)
    if not p.is_file():  # a FIFO or a device: opening it could block forever
        raise BadInputError(f"{p}: not a regular file; expected a .gguf file or an ONNX export directory")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise BadInputError(f"{p}: cannot read the artifact ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise BadInputError(f"{p}: not a GGUF file (magic {magic!r}, expected b'GGUF') nor an ONNX export directory")
    runtime_json = p.with_name(p.name + ".runtime.json")
    return LocalArtifact(p, "gguf", p, p.stat().st_size, (runtime_json,) if runtime_json.is_file() else ())
