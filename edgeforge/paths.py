"""Where edgeforge finds its built-in data and keeps its cache.

The built-in device profiles, targets and pipeline files live at the top of the repository (``profiles/``,
``targets/``, ``pipelines/``), where a reader of the project looks for them; ``pyproject.toml`` maps them into the
package as ``edgeforge.builtin.*`` so an installed wheel carries them too, and both are found here with
``importlib.resources``. The on-device agent ``device_bench`` is its own top-level package in the same wheel.
"""

from __future__ import annotations

import importlib.util
import os
from importlib.resources import files
from pathlib import Path
from typing import Literal

BuiltinKind = Literal["profiles", "targets", "pipelines"]


def edgeforge_home() -> Path:
    """The cache folder: llama.cpp's tools, dequantized teachers, KD caches (``$EDGEFORGE_HOME`` moves it)."""
    return Path(os.environ.get("EDGEFORGE_HOME", Path.home() / ".cache" / "edgeforge"))


def builtin_dir(kind: BuiltinKind) -> Path:
    """The folder of the built-in ``kind`` files, in a clone (editable install) or an installed wheel."""
    return Path(str(files(f"edgeforge.builtin.{kind}")))


def device_bench_package() -> Path:
    """The folder of the ``device_bench`` package, copied to a device as it is (stdlib + the runtime only)."""
    spec = importlib.util.find_spec("device_bench")
    for location in (spec.submodule_search_locations or []) if spec else []:
        # Run from a clone's root, the agent's own distribution folder (device_bench/, no __init__.py) is found
        # first, as a namespace package; the package itself is the folder of the same name inside it.
        for candidate in (Path(location), Path(location) / "device_bench"):
            if (candidate / "__init__.py").is_file():
                return candidate
    raise ModuleNotFoundError("device_bench is not installed beside edgeforge; reinstall edgeforge")


def yaml_files(location: Path) -> list[Path]:
    """The ``*.yaml`` / ``*.yml`` files of a folder, sorted; a file path is returned as it is."""
    if location.is_dir():
        return sorted([*location.glob("*.yaml"), *location.glob("*.yml")])
    return [location]
