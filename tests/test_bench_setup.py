"""bench --setup: the runtime is pinned to the version the artifact was verified with, built as edgeforge builds it."""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path

from edgeforge.bench.artifact import local_artifact
from edgeforge.bench.setup import NO_AMX_FLAGS, pip_install_command, runtime_requirement


def _gguf(tmp_path: Path, record: dict | None) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    if record is not None:
        path.with_name("m.gguf.edgeforge.json").write_text(json.dumps(record))
    return path


def test_the_version_in_the_gguf_record_is_pinned(tmp_path: Path):
    req = runtime_requirement(local_artifact(_gguf(tmp_path, {"runtime_versions": {"llama-cpp-python": "0.3.1"}})))
    assert req.requirement == "llama-cpp-python==0.3.1" and "record" in req.source


def test_without_a_record_the_version_installed_here_is_pinned_and_said(tmp_path: Path):
    req = runtime_requirement(local_artifact(_gguf(tmp_path, None)))
    assert req.requirement == f"llama-cpp-python=={metadata.version('llama-cpp-python')}"
    assert "installed beside edgeforge" in req.describe()


def test_the_onnx_record_pins_onnxruntime(tmp_path: Path):
    d = tmp_path / "onnx"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"x")
    (d / "edgeforge-export.json").write_text(json.dumps({"versions": {"onnxruntime": "1.20.0", "torch": "2.5"}}))
    assert runtime_requirement(local_artifact(d)).requirement == "onnxruntime==1.20.0"


def test_the_install_command_builds_llama_cpp_without_amx_only_where_the_cpu_has_it(tmp_path: Path):
    """The command runs in a real shell; the "python" it calls prints what pip would get: the AMX flags exactly where
    this machine's CPU reports AMX (every other CPU gets llama.cpp's stock native build)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "CMAKE_ARGS=${CMAKE_ARGS:-}"\necho "ARGS=$*"\n')
    fake.chmod(0o755)
    req = runtime_requirement(local_artifact(_gguf(tmp_path, {"runtime_versions": {"llama-cpp-python": "0.3.1"}})))
    out = subprocess.run(["/bin/sh", "-c", pip_install_command(str(fake), req, user=True)], capture_output=True,
                         text=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    assert "ARGS=-m pip install --user -q llama-cpp-python==0.3.1" in out
    has_amx = "amx_tile" in Path("/proc/cpuinfo").read_text().split()
    assert (NO_AMX_FLAGS in out) == has_amx, out
