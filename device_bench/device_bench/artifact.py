"""Locate the artifact, tell its format, size and checksum, without importing any runtime."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from device_bench.errors import BenchError, ChecksumMismatchError

GGUF_MAGIC = b"GGUF"
ONNX_MODEL_FILE = "model.onnx"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """A model artifact as given on the command line.

    ``path`` is what the user passed; ``model_file`` is the file the runtime loads (for ONNX the ``model.onnx``
    inside the export directory); ``model_dir`` is where the runtime configuration and side files live.
    """

    path: str
    format: str
    model_file: str
    model_dir: str

    @property
    def model_bytes(self) -> int:
        """Bytes on disk: the GGUF file, or every file of the ONNX export (external weight files included)."""
        if self.format == "gguf":
            return os.path.getsize(self.model_file)
        total = 0
        for root, _dirs, files in os.walk(self.model_dir):
            for name in files:
                total += os.path.getsize(os.path.join(root, name))
        return total


def resolve_artifact(path: str) -> Artifact:
    """Check that ``path`` exists and tell its format from its content, not just its name.

    Raises BenchError with a one-line reason for a missing, empty, truncated or unrecognised artifact.
    """
    if not os.path.exists(path):
        raise BenchError(f"artifact not found: {path}")
    if os.path.isdir(path):
        model_file = os.path.join(path, ONNX_MODEL_FILE)
        if not os.path.isfile(model_file):
            raise BenchError(
                f"{path} is a directory without {ONNX_MODEL_FILE}; pass a .gguf file or an ONNX export directory"
            )
        return _onnx_artifact(path, model_file)
    if not os.access(path, os.R_OK):
        raise BenchError(f"artifact is not readable: {path}")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] == GGUF_MAGIC:
        if len(head) < 8:
            raise BenchError(f"{path} is truncated: a GGUF header needs at least 8 bytes")
        return Artifact(path=path, format="gguf", model_file=path, model_dir=os.path.dirname(os.path.abspath(path)))
    if path.lower().endswith(".onnx"):
        if not head:
            raise BenchError(f"{path} is empty: not an ONNX model")
        return _onnx_artifact(os.path.dirname(os.path.abspath(path)), path)
    if path.lower().endswith(".gguf"):
        raise BenchError(
            f"{path} is not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r}): it is corrupt or truncated"
        )
    raise BenchError(f"cannot tell the format of {path}: expected a .gguf file, a .onnx file or an ONNX export dir")


def _onnx_artifact(model_dir: str, model_file: str) -> Artifact:
    """An ONNX artifact; the directory is where optimum put config.json, tokenizer and runtime.json."""
    return Artifact(path=model_dir, format="onnx", model_file=model_file, model_dir=model_dir)


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB models do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(artifact: Artifact, expected_hex: str) -> str:
    """Compare the model file's SHA-256 with ``expected_hex``; return it, or raise ChecksumMismatchError.

    For an ONNX export the checksum covers ``model.onnx`` (the file edgeforge records in its manifest).
    """
    if not _HEX64.match(expected_hex):
        raise BenchError(f"--verify-sha256 expects 64 hex digits, got {expected_hex!r}")
    actual = sha256_file(artifact.model_file)
    if actual != expected_hex.lower():
        raise ChecksumMismatchError(
            f"sha256 mismatch for {artifact.model_file}: expected {expected_hex.lower()}, got {actual}; "
            "the file is corrupt or not the artifact that was built: push it again"
        )
    return actual
