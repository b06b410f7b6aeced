"""The one rule for every ``--out``: edgeforge never loses what it did not write.

- A path that does not exist is created (by the command, when its output is complete).
- An output that edgeforge wrote itself, of the same kind, is replaced atomically (``publish``). It is recognised by
  the record each command leaves: ``<file>.gguf.edgeforge.json`` beside a GGUF, ``edgeforge-export.json`` in an ONNX
  directory, ``distill.json`` / ``finetune.json`` (or the checkpoint of an interrupted run) in a student or adapter
  directory, ``.stages`` or ``ship/manifest.json`` in a build folder, the header line of a detected profile, the
  ``schema_version`` of a bench result.
- Anything else (a non-empty directory edgeforge did not write, a file of another kind, another command's output)
  is refused in one line naming what is there; ``--force`` replaces it.

Commands assemble their output under a fresh name beside ``--out`` and rename it into place, so nothing the user
keeps outside ``--out`` is touched either; the commands that resume in place (distill, finetune, build) claim with
:func:`claim_output_in_place`. Usage, one line before any work: ``claim_output(out, kind="onnx",
force=force)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeforge.errors import BadInputError

#: ``model.gguf`` -> ``model.gguf.edgeforge.json``: the record ``export gguf`` writes beside its file.
GGUF_RECORD_SUFFIX = ".edgeforge.json"
#: The record ``export onnx`` writes inside its directory.
ONNX_RECORD_FILE = "edgeforge-export.json"
#: How many entries of a refused directory the message names.
_NAMED_ENTRIES = 3


@dataclass(frozen=True)
class OutputKind:
    """What one command writes at ``--out``: a file or a directory, and how edgeforge recognises its own."""

    name: str
    what: str  # for messages: "an ONNX export"
    is_dir: bool
    recognise: Callable[[Path], bool]  # True: ``path`` (which exists) is this kind's output, written by edgeforge
    example: str = ""  # a file name, for the message when a directory is given where a file goes


OUTPUT_KINDS: dict[str, OutputKind] = {}


def register_kind(kind: OutputKind) -> OutputKind:
    """Add a kind; a name registered twice is a programming error, not a silent override."""
    if kind.name in OUTPUT_KINDS:
        raise ValueError(f"output kind '{kind.name}' is already registered")
    OUTPUT_KINDS[kind.name] = kind
    return kind


def gguf_record_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + GGUF_RECORD_SUFFIX)


def _holds_any(*relative: str) -> Callable[[Path], bool]:
    return lambda d: d.is_dir() and any(os.path.lexists(d / r) for r in relative)


def _first_line_has(marker: str) -> Callable[[Path], bool]:
    def recognise(path: Path) -> bool:
        if not path.is_file():  # before opening: a FIFO would block the open
            return False
        try:
            with open(path, encoding="utf-8") as f:
                return marker in f.readline(4096)
        except (OSError, UnicodeDecodeError):
            return False

    return recognise


def _bench_result(path: Path) -> bool:
    # a result is a few kB; anything much larger is not one (and is not read whole to find out)
    try:
        if not path.is_file() or path.stat().st_size > 16 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and str(data.get("schema_version", "")).startswith("edgeforge.bench/")


for _kind in (
    OutputKind("gguf", "a GGUF export", False, lambda p: p.is_file() and gguf_record_path(p).is_file(), "model.gguf"),
    OutputKind("onnx", "an ONNX export", True, _holds_any(ONNX_RECORD_FILE)),
    # an interrupted run counts as this command's output: the command itself decides between --resume and refusal
    OutputKind("distill", "a distilled student", True, _holds_any("distill.json", ".distill-state.json")),
    OutputKind("finetune", "a fine-tuned model or adapter", True, _holds_any("finetune.json", "checkpoint/state.json")),
    OutputKind("build", "a build folder", True, _holds_any(".stages", "ship/manifest.json")),
    OutputKind("profile", "a profile written by 'edgeforge profiles detect'", False,
               _first_line_has("written by 'edgeforge profiles detect'"), "profile.yaml"),
    OutputKind("bench", "a bench result", False, _bench_result, "result.json"),
):
    register_kind(_kind)


def describe_existing(path: Path) -> str:
    """What is at ``path``, in words: another kind's output, or what edgeforge did not write."""
    for kind in OUTPUT_KINDS.values():
        if kind.recognise(path):
            return kind.what
    if path.is_dir():
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        more = f" and {len(names) - _NAMED_ENTRIES} more" if len(names) > _NAMED_ENTRIES else ""
        return f"a directory edgeforge did not write (holding {', '.join(names[:_NAMED_ENTRIES])}{more})"
    if path.is_file():
        return f"a file edgeforge did not write ({path.stat().st_size} bytes)"
    return "something that is neither a regular file nor a directory"


def claim_output(out: Path, kind: str, force: bool = False) -> None:
    """Check, before any work, that a command of ``kind`` may write ``out``; raise BadInputError when not.

    Allowed: nothing at ``out``; an empty directory (for a directory kind); this kind's own earlier output; with
    ``force``, anything but a directory where a file goes or a directory holding the working directory or home.
    """
    spec = OUTPUT_KINDS[kind]
    if not os.path.lexists(out) or (spec.is_dir and out.is_dir() and not any(out.iterdir())):
        return
    if not spec.is_dir and out.is_dir():
        raise BadInputError(f"--out {out}: expected a file path for {spec.what}, found a directory; name a file, "
                            f"for example --out {out / spec.example}")
    if spec.recognise(out):
        return
    found = describe_existing(out)
    if not force:
        raise BadInputError(f"--out {out}: expected a new path or {spec.what}, found {found}; choose another --out, "
                            "or pass --force to replace it (what is there is deleted)")
    _check_force_is_safe(out)


def claim_output_in_place(out: Path, kind: str, force: bool = False) -> None:
    """:func:`claim_output` for a command that writes into ``out`` as it goes (distill, finetune, build: their
    checkpoints and stage cache make a rerun resume there, so they cannot assemble beside it and rename).

    With ``force``, what is there and is not this kind's output is deleted first, so the new output never mixes
    with files edgeforge did not write.
    """
    claim_output(out, kind, force)
    spec = OUTPUT_KINDS[kind]
    if force and os.path.lexists(out) and not spec.recognise(out) and any(out.iterdir()):
        shutil.rmtree(out)


def _check_force_is_safe(out: Path) -> None:
    """--force deletes what is at ``out``; never the directory the user works in, or a parent of it, or home."""
    resolved = out.resolve()
    protected = [Path.cwd().resolve(), Path.home().resolve()]
    if out.is_dir() and any(p == resolved or resolved in p.parents for p in protected):
        raise BadInputError(f"--out {out}: --force would delete the current directory or home; expected a "
                            "directory of its own, for example --out " + str(out / "edgeforge-out"))


def publish(staged: Path, out: Path) -> None:
    """Move the complete ``staged`` file or directory (same filesystem, beside ``out``) to ``out``.

    File over file is one atomic rename. Otherwise (a directory cannot be renamed over a non-empty one) the old
    output first moves into a fresh hidden directory beside ``out`` and is deleted only once the new one is in
    place: between the two renames ``out`` briefly does not exist, which a reader takes for "not written yet",
    never for a mix of old and new; if the second rename fails, the old output goes back.
    """
    if not os.path.lexists(out) or (not staged.is_dir() and (out.is_symlink() or not out.is_dir())):
        os.replace(staged, out)
        return
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, aside / out.name)
    try:
        os.replace(staged, out)
    except BaseException:
        os.replace(aside / out.name, out)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)
