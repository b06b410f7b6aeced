"""llama.cpp's own tools at the exact version of the installed llama-cpp-python binding.

The binding's source distribution carries the whole llama.cpp tree it was built from: ``convert_hf_to_gguf.py``,
gguf-py, and the quantize / imatrix / perplexity / llama-bench tools. Using that tree (rather than a separate
llama.cpp checkout) keeps converter, quantizer and runtime in step: a GGUF written by one is read by the others.
The tree is fetched once from PyPI (``pip download``), and the C++ tools are built once with cmake, into
``$EDGEFORGE_HOME/llama.cpp-<version>`` (default ``~/.cache/edgeforge``).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from edgeforge.errors import EdgeforgeError
from edgeforge.paths import edgeforge_home

TOOL_TARGETS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-perplexity")
# Intel AMX tile instructions fault (general protection) in some VMs even where the CPU reports them and the kernel
# grants the permission: llama.cpp's AMX matmul then kills the process on any multi-token batch. edgeforge builds
# llama.cpp (the binding, via the Makefile, and these tools) without AMX; elsewhere the build stays native.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def native_flags() -> list[str]:
    """Extra cmake arguments: -march=native, minus AMX on x86-64."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        return [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
    return []


class ToolsError(EdgeforgeError):
    """llama.cpp's tools could not be fetched or built."""


def binding_version() -> str:
    return version("llama_cpp_python")


def tree_dir() -> Path:
    """Where the llama.cpp tree of the installed binding lives once fetched."""
    return edgeforge_home() / f"llama.cpp-{binding_version()}"


def _fetch_tree(dest: Path) -> None:
    ver = binding_version()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={ver}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise ToolsError(f"could not download the llama-cpp-python {ver} source distribution (needed for "
                             f"llama.cpp's converter and tools): {r.stderr.strip().splitlines()[-1:]}")
        staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".staging-"))
        try:
            with tarfile.open(sdists[0]) as tar:
                prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(staging, members=members, filter="data")
            os.replace(staging, dest)  # atomic: a half-extracted tree is never taken as complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def ensure_tree() -> Path:
    """The llama.cpp source tree (converter and gguf-py), fetched on first use."""
    dest = tree_dir()
    if not (dest / "convert_hf_to_gguf.py").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fetch_tree(dest)
    return dest


def tool_path(name: str) -> Path:
    return tree_dir() / "build" / "bin" / name


def ensure_tools(targets: tuple[str, ...] = TOOL_TARGETS, jobs: int | None = None) -> dict[str, Path]:
    """Build llama.cpp's C++ tools (CPU backend) once; returns their paths."""
    tree = ensure_tree()
    missing = [t for t in targets if not tool_path(t).is_file()]
    if missing:
        build = tree / "build"
        cfg = ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
               "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               *native_flags()]
        make = ["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
                "--target", *missing]
        for cmd in (cfg, make):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                raise ToolsError(f"building llama.cpp tools failed ({' '.join(cmd[:2])}): {' | '.join(tail)}; "
                                 "a C++ compiler and cmake are needed")
    return {t: tool_path(t) for t in targets}


def converter_env() -> dict[str, str]:
    """Environment for running ``convert_hf_to_gguf.py``: its own gguf-py first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ensure_tree() / "gguf-py"), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def main() -> None:
    """``python -m edgeforge.export.llama_tools``: fetch and build everything now (the Makefile's set-up does this)."""
    paths = ensure_tools()
    print(f"llama.cpp {binding_version()} tree: {tree_dir()}")
    for name, p in paths.items():
        print(f"  {name}: {p}")


if __name__ == "__main__":
    main()
