"""Every CLI option that takes a value, given a bad one: exit 2 with one line naming the option, never a traceback,
never "internal error" (exit 3), never click's multi-line usage block.

The walk covers every command of every group (so a new option is covered when it is added): numbers get a word,
choices a value not offered, comma lists a word where numbers go, bounded numbers a value past their bound. Values
that only a later check can judge (a profile name, a model path) are covered by test_bad_input.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest

from edgeforge.cli.app import cli
from edgeforge.cli.options import CommaList

from .helpers import assert_one_error_line, invoke


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def _bad_values(param: click.Option) -> list[str]:
    """Values the option's type refuses at parse time."""
    t = param.type
    if isinstance(t, click.Choice):
        return ["no-such-choice"]
    if isinstance(t, CommaList):
        return ["1,x"]
    if isinstance(t, (click.types.IntParamType, click.types.FloatParamType)):  # ranges included
        bad = ["many"]
        low = getattr(t, "min", None)
        if low is not None and not getattr(t, "min_open", False):
            bad.append(str(low - 1))
        return bad
    return []


CASES = [(path, param.opts[0], value)
         for path, cmd in _commands(cli)
         for param in cmd.params
         if isinstance(param, click.Option) and not param.is_flag and param.opts[0].startswith("--")
         for value in _bad_values(param)]


def test_the_walk_covers_the_commands_that_take_numbers_and_choices() -> None:
    covered = {path for path, _, _ in CASES}
    for want in (("plan",), ("distill",), ("finetune",), ("build",), ("bench", "run"), ("export", "gguf"),
                 ("export", "onnx"), ("eval",)):
        assert want in covered, want
    assert len(CASES) >= 60, len(CASES)


@pytest.mark.parametrize("path, flag, value", CASES, ids=[f"{' '.join(p)} {f}={v}" for p, f, v in CASES])
def test_a_bad_value_is_one_line_and_exit_2(path: tuple[str, ...], flag: str, value: str) -> None:
    # The bad option comes first: click parses in command-line order, so it is refused before a missing argument
    # or option (the dummies below) is looked at.
    done = invoke(*path, f"{flag}={value}", "dummy-argument")
    assert_one_error_line(done, flag)
