"""Click options generated from a stage's settings model, so a setting is declared once (edgeforge.settings).

Each field becomes ``--kebab-name`` (or the ``flag`` it declares) holding the field's name: a bool is a flag (one
that defaults to True is ``--no-...``), a Literal a choice, a tuple of numbers a comma list (``--progressive 20,10``),
a tuple of text or paths a repeatable option (``--extra-teacher``), bounds a range; the field's description is the
help and its default is shown. A value click refuses is one ``--flag: expected ..., found ...`` BadInputError, which
the CLI prints as its one error line (exit 2), not click's usage block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from edgeforge.errors import BadInputError
from edgeforge.settings import (
    bounds_of,
    expected_of,
    extra,
    fields_in_order,
    flag_of,
    shown,
    split_annotated,
    without_none,
)

F = TypeVar("F", bound=Callable[..., Any])


class _OneLineErrors:
    """Mixin for a click type: a refused value raises BadInputError naming the flag and what it expects."""

    expected = "a valid value"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)  # type: ignore[misc]
        except click.BadParameter:
            flag = param.opts[0] if param is not None and param.opts else "value"
            raise BadInputError(f"{flag}: expected {self.expected}, found {shown(value)}") from None


class IntType(_OneLineErrors, click.types.IntParamType):
    pass


class FloatType(_OneLineErrors, click.types.FloatParamType):
    pass


class IntRange(_OneLineErrors, click.IntRange):
    pass


class FloatRange(_OneLineErrors, click.FloatRange):
    pass


class Choice(_OneLineErrors, click.Choice):
    pass


class PathType(_OneLineErrors, click.Path):
    pass


class CommaList(click.ParamType):
    """``"20,10"`` -> (20, 10): numbers separated by commas (their bounds are the model's to check)."""

    name = "list"

    def __init__(self, element: type, expected: str) -> None:
        self.element, self.expected = element, expected

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, tuple | list):
            return tuple(value)
        try:
            return tuple(self.element(p.strip()) for p in str(value).split(",") if p.strip())
        except ValueError:
            flag = param.opts[0] if param is not None and param.opts else "value"
            raise BadInputError(f"{flag}: expected {self.expected}, found {shown(value)}") from None


def _with_bounds(info: FieldInfo, annotation: Any, expected: str) -> click.ParamType:
    b = bounds_of(info.metadata)
    if not b:
        plain: click.ParamType = IntType() if annotation is int else FloatType()
    else:
        cls = IntRange if annotation is int else FloatRange
        plain = cls(min=b.get("ge", b.get("gt")), max=b.get("le", b.get("lt")), min_open="gt" in b,
                    max_open="lt" in b)
    plain.expected = expected  # type: ignore[attr-defined]
    return plain


def option_for(name: str, info: FieldInfo) -> Callable[[F], F]:
    """The click option of one settings field (see the module docstring for the mapping)."""
    flag, helptext, expected = flag_of(name, info), info.description, expected_of(info)
    default = info.get_default(call_default_factory=True)
    annotation = without_none(info.annotation)
    origin = get_origin(annotation)
    if annotation is bool:
        return click.option(flag, name, is_flag=True, flag_value=not default, default=default, help=helptext)
    if origin in (tuple, list):
        element, _ = split_annotated(get_args(annotation)[0])
        if element in (int, float):
            return click.option(flag, name, type=CommaList(element, expected), default=",".join(map(str, default)),
                                show_default=bool(default), metavar="N1,N2,..." if element is int else "X1,X2,...",
                                help=helptext)
        kind: click.ParamType = PathType(path_type=Path) if element is Path else click.STRING
        return click.option(flag, name, type=kind, multiple=True, help=helptext)
    if origin is Literal:
        choice = Choice([str(a) for a in get_args(annotation)])
        choice.expected = expected
        return click.option(flag, name, type=choice, default=default, show_default=True, help=helptext)
    if annotation in (int, float):
        return click.option(flag, name, type=_with_bounds(info, annotation, expected), default=default,
                            show_default=default is not None, help=helptext)
    if annotation is Path:
        must_exist = bool(extra(info).get("existing_dir"))
        path = PathType(path_type=Path, exists=must_exist, file_okay=not must_exist)
        path.expected = "an existing directory" if must_exist else expected
        return click.option(flag, name, type=path, default=default, help=helptext)
    # text, or a union that takes text (finetune's target_modules: "all-linear" or a comma list)
    return click.option(flag, name, type=click.STRING, default=default, show_default=default is not None,
                        help=helptext)


def options_from(model: type[BaseModel], skip: Iterable[str] = ()) -> Callable[[F], F]:
    """Decorator: one option per field of ``model`` (its own fields first), except ``skip`` (options the command
    declares itself) and fields marked ``internal`` (library-only, not user settings). The command receives each
    under the field's name, ready for ``model(**those)``."""
    skipped = set(skip)
    chosen = [(n, f) for n, f in fields_in_order(model) if n not in skipped and not extra(f).get("internal")]

    def decorate(fn: F) -> F:
        for name, info in reversed(chosen):  # click lists options in the order the decorators are written
            fn = option_for(name, info)(fn)
        return fn

    return decorate
