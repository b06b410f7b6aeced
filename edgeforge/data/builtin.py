"""Built-in text that needs no download: CPython's own documentation topics, shipped in ``pydoc_data``.

The topics are split once, deterministically: topics 5-7 are *held out* (verification and evaluation text, never
trained on); the rest are training / calibration text.
"""

from __future__ import annotations

from pathlib import Path

HELDOUT_TOPICS = slice(5, 8)


def _topics() -> list[str]:
    import pydoc_data.topics as topics

    return list(topics.topics.values())


def heldout_prose(max_chars: int = 5000) -> str:
    """English prose for verification: the same text the acceptance checks use."""
    return " ".join(_topics()[HELDOUT_TOPICS])[:max_chars]


def training_prose(max_chars: int | None = None) -> str:
    """Every topic except the held-out ones."""
    t = _topics()
    text = "\n\n".join(t[: HELDOUT_TOPICS.start] + t[HELDOUT_TOPICS.stop:])
    return text if max_chars is None else text[:max_chars]


def write_calibration_text(path: Path, max_chars: int = 200_000) -> Path:
    """Calibration text (e.g. for an importance matrix) written to ``path``."""
    path.write_text(training_prose(max_chars), encoding="utf-8")
    return path


def read_text_data(path: Path) -> str:
    """A user's plain-text data file; one clear error for missing, empty or non-UTF-8 files."""
    from edgeforge.errors import BadInputError

    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO or a device: reading could block forever
        raise BadInputError(f"{path}: not a regular file; expected a UTF-8 text data file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{path}: data file not found") from None
    except OSError as e:
        raise BadInputError(f"{path}: cannot read data file ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise BadInputError(f"{path}: data file is empty")
    return text
