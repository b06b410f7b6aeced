"""One wording for every validated file (profiles, targets, pipeline files): the file, the field, what was expected
and what was found."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError


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
            parts.append(f"field '{name}': {e['msg']}, found {e.get('input')!r}")
    return f"{path}: invalid {what}: " + "; ".join(parts)
