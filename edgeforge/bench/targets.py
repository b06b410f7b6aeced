"""Targets: concrete devices a benchmark runs on (this machine, a board over SSH, a phone over adb).

A target is a YAML file validated by one of the pydantic models below (``type`` picks which; unknown keys are
rejected). Built-in targets live in the repository's ``targets/`` folder; users add their own with
``--targets-dir``, the ``EDGEFORGE_TARGETS`` environment variable (a ``:``-separated list of folders or files), or
by passing a YAML file's path where a target name is expected.

Each target names its device profile (a profile name, or the path of a profile file such as the one
``edgeforge profiles detect --out`` writes on the device). The ``local`` target may leave it out: the profile is
then ``this-machine``, detected with a measured memory bandwidth.

The targets are reached through the shells of edgeforge.bench.transport (``shell_for`` picks one), and
``check_target`` probes one; the errors are those of edgeforge.bench.errors.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgeforge.bench.errors import (
    RemoteRunError,
    TargetConfigError,
)
from edgeforge.bench.transport import AdbShell, Cancel, SshShell, adb_address, remote_path_expr, run_process, tail
from edgeforge.paths import builtin_dir, device_bench_package, yaml_files
from edgeforge.validation import FileRegistry, describe_validation_error, read_yaml_file

BUILTIN_TARGETS_DIR = builtin_dir("targets")
#: The on-device agent: a stdlib-only package pushed next to the artifact.
DEVICE_BENCH_PACKAGE = device_bench_package()

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # also a file-name part: <artifact>.bench-<name>.json


# ---------------------------------------------------------------- target files
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _TargetBase(_Strict):
    name: str = Field(pattern=_NAME, description="unique name, used with --target and in result file names")
    description: str = Field(default="", description="free text shown by 'targets list'")
    run_timeout_s: float = Field(default=3600, gt=0, description="give up on one benchmark after this long")


class LocalTarget(_TargetBase):
    """This machine: device_bench runs in place on the artifact, nothing is copied."""

    type: Literal["local"]
    profile: str | None = Field(
        default=None, description="profile name or file; empty: 'this-machine', detected with measured bandwidth"
    )
    python: str | None = Field(default=None, description="Python that runs device_bench (default: edgeforge's)")


class SshTarget(_TargetBase):
    """A device reached with the system ``ssh`` binary, host key checked strictly."""

    type: Literal["ssh"]
    profile: str = Field(description="profile name, or the path of a profile file (e.g. from 'profiles detect')")
    host: str = Field(pattern=r"^[A-Za-z0-9_.:%\[\]][A-Za-z0-9_.:%\[\]-]*$", description="host name or address")
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(pattern=r"^[A-Za-z0-9._][A-Za-z0-9._-]*$", description="login user")
    key_file: Path | None = Field(default=None, description="private key; only this key is offered")
    known_hosts_file: Path = Field(
        default=Path("~/.ssh/known_hosts"), description="the only file host keys are trusted from (never written)"
    )
    python: str = Field(default="python3", description="Python on the device that runs device_bench")
    workdir: str = Field(default="/tmp/edgeforge-bench", description="a run directory is made (and removed) here")
    connect_timeout_s: int = Field(default=10, ge=1, description="ssh ConnectTimeout")

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class AdbTarget(_TargetBase):
    """An Android device over adb; device_bench runs with a Python on the device (e.g. Termux's)."""

    type: Literal["adb"]
    profile: str = Field(description="profile name, or the path of a profile file")
    serial: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._:-]+$", description="adb serial; needed when several are attached"
    )
    python: str = Field(description="Python on the device that the adb shell user may run")
    workdir: str = Field(default="/data/local/tmp/edgeforge-bench", description="a run directory is made here")
    adb: str = Field(default="adb", description="the adb binary (name on PATH, or a path)")


Target = LocalTarget | SshTarget | AdbTarget
_TARGET_ADAPTER: TypeAdapter[Target] = TypeAdapter(Annotated[Target, Field(discriminator="type")])
DEFAULT_LOCAL = LocalTarget(name="local", type="local", description="this machine (built in)")


def _format_validation_error(path: Path, err: ValidationError) -> str:
    return describe_validation_error(path, err, "target", union_tags=("local", "ssh", "adb"))


def _is_path_like(value: str) -> bool:
    return value.endswith((".yaml", ".yml")) or os.sep in value or value.startswith("~")


def _anchor(value: Path, base: Path) -> Path:
    p = value.expanduser()
    return p if p.is_absolute() else base / p


def load_target_file(path: str | os.PathLike[str]) -> Target:
    """Read and validate one target YAML file; relative paths in it are relative to the file's folder.

    Raises TargetConfigError naming the file and the field.
    """
    p = Path(path)
    data = read_yaml_file(p, "target", TargetConfigError)
    if not isinstance(data, dict):
        raise TargetConfigError(f"{p}: expected a YAML mapping of target fields, found {type(data).__name__}")
    try:
        target = _TARGET_ADAPTER.validate_python(data)
    except ValidationError as e:
        raise TargetConfigError(_format_validation_error(p, e)) from None
    base = p.resolve().parent
    update: dict[str, Any] = {}
    if target.profile and _is_path_like(target.profile):
        update["profile"] = str(_anchor(Path(target.profile), base))
    if isinstance(target, SshTarget):
        update["known_hosts_file"] = _anchor(target.known_hosts_file, base)
        if target.key_file is not None:
            update["key_file"] = _anchor(target.key_file, base)
    return target.model_copy(update=update) if update else target


def target_search_path(extra: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Where targets are looked up: the built-ins, then EDGEFORGE_TARGETS, then ``extra``."""
    env = [Path(p) for p in os.environ.get("EDGEFORGE_TARGETS", "").split(os.pathsep) if p]
    return [BUILTIN_TARGETS_DIR, *env, *(Path(p) for p in extra)]


class TargetRegistry(FileRegistry[Target]):
    """Targets by name. A second target of the same name is an error, not a silent override."""

    what = "target"
    error = TargetConfigError

    def unknown_hint(self) -> str:
        return f"known: {', '.join(self.names())}; or pass a target YAML path"


def load_target_registry(extra: Iterable[str | os.PathLike[str]] = ()) -> TargetRegistry:
    """All targets on the search path, validated; ``local`` is always there (built in unless a file defines it)."""
    registry = TargetRegistry()
    for location in target_search_path(extra):
        if not location.exists():
            if location == BUILTIN_TARGETS_DIR:
                continue
            raise TargetConfigError(f"{location}: target folder or file does not exist")
        for f in yaml_files(location):
            registry.register(load_target_file(f), f)
    if "local" not in registry.names():
        registry.register(DEFAULT_LOCAL, None)
    return registry


def resolve_target(name_or_path: str, extra: Iterable[str | os.PathLike[str]] = ()) -> Target:
    """A target by name, or from a YAML file path."""
    if _is_path_like(name_or_path):
        return load_target_file(Path(name_or_path).expanduser())
    return load_target_registry(extra).get(name_or_path)


def describe_address(target: Target) -> str:
    """Where the target is, in one short string."""
    if isinstance(target, SshTarget):
        return target.address
    if isinstance(target, AdbTarget):
        return adb_address(target.serial)
    return "this machine"


# ---------------------------------------------------------------- reaching a target
def shell_for(target: SshTarget | AdbTarget) -> SshShell | AdbShell:
    """The remote shell that reaches ``target``."""
    return SshShell(target) if isinstance(target, SshTarget) else AdbShell(target)


# ---------------------------------------------------------------- targets check
_PROBE_PY = (
    "import importlib.util, json, platform, sys\n"
    "print(json.dumps({'python': sys.version.split()[0], 'machine': platform.machine(),\n"
    "    'llama_cpp': importlib.util.find_spec('llama_cpp') is not None,\n"
    "    'onnxruntime': importlib.util.find_spec('onnxruntime') is not None}))\n"
)


def check_target(target: Target, cancel: Cancel | None = None) -> dict[str, Any]:
    """Reach the target and report its Python, machine, runtimes and whether workdir is writable.

    Installs nothing; ``workdir`` is created if missing (the benchmark would create it too).
    """
    if isinstance(target, LocalTarget):
        python = target.python or sys.executable
        done = run_process([python, "-c", _PROBE_PY], timeout_s=60, cancel=cancel, what="probe")
        writable = True
    else:
        shell = shell_for(target)
        py = shlex.quote(target.python)
        wd = remote_path_expr(target.workdir)
        done = shell.run(f"mkdir -p {wd} && test -w {wd} && echo WRITABLE; {py} -c {shlex.quote(_PROBE_PY)}",
                         timeout_s=120, cancel=cancel, what="check")
        writable = "WRITABLE" in done.stdout
        python = target.python
    if done.returncode != 0:
        raise RemoteRunError(f"target '{target.name}': cannot run '{python}': {tail(done.stderr)}; set 'python:' "
                             "in the target file to the device's Python 3")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return {"name": target.name, "type": target.type, "address": describe_address(target),
            "python_path": python, **info, "workdir_writable": writable}
