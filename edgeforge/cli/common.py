"""Options and output helpers shared by every command module of the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

PROFILES_DIR_OPTION = click.option(
    "--profiles-dir", "profiles_dirs", multiple=True, type=click.Path(path_type=Path),
    help="Extra folder or YAML file of device profiles (repeatable; also EDGEFORGE_PROFILES).",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
#: Every command that writes --out takes it (edgeforge.outputs.claim_output: what is replaced without it).
FORCE_OPTION = click.option(
    "--force", is_flag=True,
    help="Replace what is at --out even when edgeforge did not write it (without: only its own earlier output).")


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))
