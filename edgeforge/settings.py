"""Settings declared once: a stage's pydantic model is the one place a setting's type, default, bounds and help live.

The command line (``edgeforge.cli.options``) and the pipeline file (``edgeforge.build.config``) are derived from
those models. This module gives both the same words for a field: the flag that sets it (``--kebab-name`` unless the
field declares ``json_schema_extra={"flag": ...}``), what it expects (from its type and bounds), and a pydantic
ValidationError as one BadInputError that names the flag: ``--steps: expected an integer >= 1, found 0``.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, ModelWrapValidatorHandler, ValidationError, model_validator
from pydantic.fields import FieldInfo

from edgeforge.errors import BadInputError


class StageSettings(BaseModel):
    """Base of a stage's settings: unknown names are errors (a misspelt setting must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class FlagErrors(BaseModel):
    """Mixin for a run's config built by library code or the CLI: a bad value raises one BadInputError naming the
    ``--flag`` instead of pydantic's multi-line ValidationError. (Pipeline sections leave it out: their errors name
    the file and the ``section.key`` instead, edgeforge.build.config.validate_pipeline.)"""

    @model_validator(mode="wrap")
    @classmethod
    def _one_line_errors(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        try:
            return handler(data)
        except ValidationError as e:
            raise setting_error(e, cls, data if isinstance(data, dict) else {}) from None


def extra(info: FieldInfo) -> dict[str, Any]:
    """The field's ``json_schema_extra`` (edgeforge keys: ``flag``, ``expected``, ``example``, ``internal``)."""
    value = info.json_schema_extra
    return value if isinstance(value, dict) else {}


def flag_of(name: str, info: FieldInfo) -> str:
    """The command-line flag of field ``name``: its declared ``flag``, else ``--`` + the name in kebab case; a bool
    that defaults to True is turned off by ``--no-...``."""
    declared = extra(info).get("flag")
    if declared:
        return str(declared)
    kebab = name.replace("_", "-")
    return f"--no-{kebab}" if info.annotation is bool and info.default is True else f"--{kebab}"


def fields_in_order(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """The model's fields, those the class itself declares first (a run's inputs lead a command's help, a build
    section's ``enabled`` leads its section), then the inherited ones in declaration order."""
    inherited = {n for base in model.__mro__[1:] if isinstance(base, type) and issubclass(base, BaseModel)
                 for n in base.model_fields}
    own = [(n, f) for n, f in model.model_fields.items() if n not in inherited]
    return own + [(n, f) for n, f in model.model_fields.items() if n in inherited]


def without_none(annotation: Any) -> Any:
    """``int | None`` -> ``int``; a union of several non-None types is returned as it is."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def split_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    """``Annotated[int, Gt(0)]`` -> (int, [Gt(0)]); anything else -> (annotation, [])."""
    if get_origin(annotation) is Annotated:
        base, *meta = get_args(annotation)
        return base, meta
    return annotation, []


def bounds_of(metadata: list[Any]) -> dict[str, Any]:
    """{"ge"|"gt"|"le"|"lt": value} from a field's metadata (annotated_types, as pydantic stores ``Field(ge=...)``)."""
    out: dict[str, Any] = {}
    for m in metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(annotated_types, key.capitalize())):
                out[key] = getattr(m, key)
    return out


def _bounds_text(bounds: dict[str, Any]) -> str:
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _kind(annotation: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", Path: "a path"}.get(annotation, "text")


def expected_of(info: FieldInfo) -> str:
    """What the field accepts, in words: ``an integer >= 1``, ``a number in (0, 1]``, ``ddp | fsdp``,
    ``comma-separated integers > 0 such as 20,10``; a field's declared ``expected`` wins."""
    declared = extra(info).get("expected")
    if declared:
        return str(declared)
    annotation = without_none(info.annotation)
    if get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in get_args(annotation))
    if get_origin(annotation) in (tuple, list):
        element, meta = split_annotated(get_args(annotation)[0])
        example = extra(info).get("example")
        kinds = {int: "integers", float: "numbers"}.get(element)
        if kinds is None:
            return f"{_kind(element)} values (repeat the flag)"
        return f"comma-separated {kinds}{_bounds_text(bounds_of(meta))}" + (f" such as {example}" if example else "")
    return _kind(annotation) + _bounds_text(bounds_of(info.metadata))


def shown(value: Any) -> str:
    """A value as the user typed it: ``20,x`` for a sequence, ``zero3`` for text; at most 80 characters."""
    text = ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def setting_error(err: ValidationError, model: type[BaseModel], given: dict[str, Any]) -> BadInputError:
    """The first problem of ``err`` (validating ``model`` from ``given``) as ``--flag: expected ..., found ...``."""
    first = err.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    info = model.model_fields.get(name)
    if info is None:
        return BadInputError(f"{name or '(settings)'}: not a setting of {model.__name__} ({first['msg'].lower()}); "
                             "check its spelling")
    found = given.get(name, first.get("input"))
    return BadInputError(f"{flag_of(name, info)}: expected {expected_of(info)}, found {shown(found)}")
