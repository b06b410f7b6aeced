"""One wording for every validated file (profiles, targets, pipeline files): the file, the field, what was expected
and what was found; and one reader for the YAML they are written in."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from pydantic import ValidationError


def read_yaml_file(path: Path, what: str, error: type[Exception]) -> Any:
    """``yaml.safe_load`` of a user's ``what`` file (profile, target, pipeline); every failure is one ``error``.

    Besides a missing file and bad syntax, PyYAML lets through errors that are not ``yaml.YAMLError``: a scalar it
    takes for a date but cannot build (``since: 2001-02-30`` raises ValueError) and nesting deeper than Python's
    recursion limit (RecursionError). A path that exists but is not a regular file (a FIFO blocks a reader until
    something writes to it) is refused before it is opened.
    """
    import yaml

    if not path.is_file():
        if path.exists():
            raise error(f"{path}: not a regular file; expected a YAML {what} file")
        raise error(f"{path}: no such {what} file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: cannot read {what} file (not UTF-8: invalid byte at offset {e.start}); convert it to "
                    "UTF-8") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} file ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}: not valid YAML{where} ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise error(f"{path}: not valid YAML (nested too deeply to read)") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise error(f"{path}: not valid YAML (a value cannot be read: {e}; quote it if it is meant as text)") from None


def describe_validation_error(path: Path, err: ValidationError, what: str,
                              union_tags: tuple[str, ...] = ()) -> str:
    """``{path}: invalid {what}: <one clause per problem>``.

    ``union_tags``: the values of a discriminator field ``type``; pydantic puts the chosen tag first in the error
    location, which is not a field the user wrote, so it is dropped.
    """
    parts = []
    for e in err.errors():
        loc = list(e["loc"])
        if loc and loc[0] in union_tags:
            loc = loc[1:]
        name = ".".join(str(x) for x in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown field '{name}' (remove it, or check its spelling)")
        elif e["type"] == "missing":
            parts.append(f"field '{name}' is missing")
        elif e["type"] == "union_tag_invalid":
            found = e.get("input", {}).get("type") if isinstance(e.get("input"), dict) else e.get("input")
            parts.append(f"field 'type' must be one of {', '.join(union_tags)}, found {found!r}")
        elif e["type"] == "union_tag_not_found":
            parts.append(f"field 'type' is missing ({', '.join(union_tags)})")
        else:
            found = repr(e.get("input"))
            parts.append(f"field '{name}': {e['msg']}, found {found if len(found) <= 120 else found[:117] + '...'}")
    return f"{path}: invalid {what}: " + "; ".join(parts)


class _Named(Protocol):
    name: str


EntryT = TypeVar("EntryT", bound=_Named)


class FileRegistry(Generic[EntryT]):
    """Entries read from validated files (profiles, targets), by name, with the file each came from.

    A second entry of the same name is an error naming both files, never a silent override; an unknown name is an
    error with the closest names. Subclasses set ``what`` (the entry's noun), ``error`` (the exception) and may
    override :meth:`unknown_hint` (what to do instead).
    """

    what = "entry"
    error: type[Exception] = ValueError

    def __init__(self) -> None:
        self._entries: dict[str, EntryT] = {}
        self._origin: dict[str, Path | None] = {}

    def register(self, entry: EntryT, origin: Path | None) -> None:
        if entry.name in self._entries:
            raise self.error(f"{origin}: {self.what} name '{entry.name}' is already defined by "
                             f"{self._origin[entry.name]}; rename one of them")
        self._entries[entry.name] = entry
        self._origin[entry.name] = origin

    def names(self) -> list[str]:
        return sorted(self._entries)

    def origin(self, name: str) -> Path | None:
        return self._origin[name]

    def unknown_hint(self) -> str:
        return f"known: {', '.join(self.names())}"

    def get(self, name: str) -> EntryT:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=4, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise self.error(f"unknown {self.what} '{name}'.{hint} ({self.unknown_hint()})") from None

    def __iter__(self) -> Iterator[EntryT]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)
