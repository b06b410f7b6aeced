"""Built-in text that needs no download: CPython's own documentation topics, shipped in ``pydoc_data``.

The topics are split once, by content, into *training* text (training, calibration, importance matrices) and
*held-out* text (verification and evaluation, never trained on):

- The topics repeat each other (``attribute-access`` sits inside ``specialnames``, ``augassign`` inside
  ``assignment``), so holding out whole topics would hold out text that is also trained on. The split is per
  paragraph instead, and a paragraph goes wherever its content hash sends it, so duplicates land on the same side.
- Held-out candidates are prose paragraphs (not indented code, at least ``MIN_PROSE_CHARS`` long) whose content hash
  falls in the first ``HELDOUT_FRACTION`` of the hash range. A candidate that shares any ``WINDOW_CHARS``-character
  window with the training text (a near-duplicate of a trained-on paragraph) is dropped from both sides.
- The held-out paragraphs are ordered by content hash, not by topic order, so the text does not depend on the order
  in which a Python version lists its topics.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

#: Two texts that share no window of this many characters share no sentence: the leak test's unit.
WINDOW_CHARS = 64
#: Share of the prose paragraphs held out (gives ~9,000 tokens of held-out text on CPython 3.11).
HELDOUT_FRACTION = 0.3
#: Shorter paragraphs are headings, signatures and one-line notes: they stay on the training side.
MIN_PROSE_CHARS = 200
PARAGRAPH_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class BuiltinSplit:
    """The built-in text, split by content."""

    training_paragraphs: tuple[str, ...]  # in topic order, repeats kept (the text the topics really hold)
    heldout_paragraphs: tuple[str, ...]  # ordered by content hash, each once
    dropped_paragraphs: int  # held-out candidates that overlapped the training side: in neither


def content_fraction(text: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by ``text`` (and ``salt``) alone: where its SHA-256 falls in the hash range."""
    digest = hashlib.sha256(f"{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def window_hashes(text: str, width: int = WINDOW_CHARS) -> set[int]:
    """Hashes of every ``width``-character window of ``text`` (a set for fast overlap tests)."""
    return {hash(text[i:i + width]) for i in range(len(text) - width + 1)}


def _is_prose(paragraph: str) -> bool:
    return len(paragraph) >= MIN_PROSE_CHARS and not paragraph[:1].isspace()


def _paragraphs() -> list[str]:
    import pydoc_data.topics as topics

    return [p for topic in topics.topics.values() for p in topic.split(PARAGRAPH_SEPARATOR) if p.strip()]


@functools.lru_cache(maxsize=1)
def builtin_split() -> BuiltinSplit:
    """Split the pydoc topics (computed once per process, ~0.5 s)."""
    paragraphs = _paragraphs()
    candidates = {p for p in paragraphs if _is_prose(p) and content_fraction(p) < HELDOUT_FRACTION}
    training = tuple(p for p in paragraphs if p not in candidates)
    trained_windows = window_hashes(PARAGRAPH_SEPARATOR.join(training))
    heldout: list[str] = []
    text = ""
    for p in sorted(candidates, key=content_fraction):
        # The windows that adding ``p`` creates, including those across the separator before it.
        piece = f"{text[-(WINDOW_CHARS - 1):]}{PARAGRAPH_SEPARATOR}{p}" if text else p
        if window_hashes(piece).isdisjoint(trained_windows):
            heldout.append(p)
            text = f"{text}{PARAGRAPH_SEPARATOR}{p}" if text else p
    return BuiltinSplit(training, tuple(heldout), len(candidates) - len(heldout))


def heldout_prose(max_chars: int | None = None) -> str:
    """English prose for verification and evaluation, never trained on: all of it, or its first ``max_chars``.

    There is no hidden cap: a caller that needs N tokens takes the whole text and checks it got N (about 9,000
    tokens exist on CPython 3.11).
    """
    text = PARAGRAPH_SEPARATOR.join(builtin_split().heldout_paragraphs)
    return text if max_chars is None else text[:max_chars]


def training_prose(max_chars: int | None = None) -> str:
    """The built-in training text: every paragraph of the topics except the held-out ones (and dropped ones)."""
    text = PARAGRAPH_SEPARATOR.join(builtin_split().training_paragraphs)
    return text if max_chars is None else text[:max_chars]


#: Characters of the built-in calibration text (importance matrices, fitted mixes): training prose only.
CALIBRATION_TEXT_CHARS = 200_000


def calibration_text() -> str:
    """The built-in calibration text ('builtin' for --imatrix-data): the start of the training prose."""
    return training_prose(CALIBRATION_TEXT_CHARS)


def write_calibration_text(path: Path, max_chars: int = CALIBRATION_TEXT_CHARS) -> Path:
    """The built-in calibration text written to ``path`` (llama-imatrix reads a file); ``max_chars`` shorter for
    tests."""
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
