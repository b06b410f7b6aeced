"""What ``bench --setup`` installs on a device: the runtime at the version the artifact was verified with.

A benchmark of another runtime version than the one that verified the artifact measures another program: kernels,
defaults and even the tokenizer change between llama.cpp releases. So ``--setup`` pins:

- the version in the artifact's record (``runtime_versions`` of a GGUF's ``<file>.edgeforge.json``, ``versions`` of
  an ONNX export's ``edgeforge-export.json``);
- else the version installed beside edgeforge (the one ``export``/``eval`` verify with), said as such;
- never an unpinned "latest".

llama-cpp-python compiles llama.cpp on the device, natively. Where the device's CPU reports Intel AMX it is built
without AMX (llama.cpp's AMX kernels crash in some VMs), the rule the Makefile applies here
(edgeforge.export.native_build); other CPUs (every ARM board, AMD) get the stock native build.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgeforge.bench.artifact import LocalArtifact
from edgeforge.outputs import ONNX_RECORD_FILE, gguf_record_path

#: artifact format -> (the module device_bench imports, its distribution on PyPI)
RUNTIME_MODULES = {"gguf": ("llama_cpp", "llama-cpp-python"), "onnx": ("onnxruntime", "onnxruntime")}
#: llama.cpp's CMake flags without AMX (those of edgeforge.export.native_build, which bench cannot import).
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
NO_AMX_CMAKE_ARGS = f"-DCMAKE_C_FLAGS='{NO_AMX_FLAGS}' -DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'"


@dataclass(frozen=True)
class RuntimeRequirement:
    """The pip requirement ``--setup`` installs for an artifact, and where its version came from."""

    module: str  # what device_bench imports: llama_cpp, onnxruntime
    package: str  # llama-cpp-python, onnxruntime
    version: str | None  # None: nothing recorded and nothing installed here (the install is refused)
    source: str  # "the artifact's record" or "the version installed beside edgeforge"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.version else self.package

    def describe(self) -> str:
        return f"{self.requirement} ({self.source})"


def _recorded_version(artifact: LocalArtifact, package: str) -> str | None:
    record = artifact.path / ONNX_RECORD_FILE if artifact.format == "onnx" else gguf_record_path(artifact.path)
    try:
        data = json.loads(Path(record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    versions = data.get("runtime_versions") or data.get("versions")  # GGUF record, ONNX record
    version = versions.get(package) if isinstance(versions, dict) else None
    return str(version) if version and version != "not installed" else None


def runtime_requirement(artifact: LocalArtifact) -> RuntimeRequirement:
    """The runtime the artifact was verified with, pinned."""
    module, package = RUNTIME_MODULES[artifact.format]
    recorded = _recorded_version(artifact, package)
    if recorded:
        return RuntimeRequirement(module, package, recorded, "the version in the artifact's record")
    try:
        return RuntimeRequirement(module, package, metadata.version(package),
                                  "the version installed beside edgeforge; the artifact's record names none")
    except metadata.PackageNotFoundError:
        return RuntimeRequirement(module, package, None, "no version recorded or installed here")


def pip_install_command(python: str, req: RuntimeRequirement, user: bool) -> str:
    """A POSIX shell command (ssh, adb shell, or this machine) that installs ``req`` with ``python -m pip``.

    llama-cpp-python is built without AMX where the device's /proc/cpuinfo lists ``amx_tile`` (decided on the device).
    """
    pip = f"{shlex.quote(python)} -m pip install {'--user ' if user else ''}-q {shlex.quote(req.requirement)}"
    if req.package != "llama-cpp-python":
        return pip
    no_amx = shlex.quote(NO_AMX_CMAKE_ARGS)
    return (f"if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then CMAKE_ARGS={no_amx}; export CMAKE_ARGS; fi; "
            f"{pip}")
