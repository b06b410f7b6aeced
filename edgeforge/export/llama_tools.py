"""llama.cpp's own tools at the exact version of the installed llama-cpp-python binding.

The binding's source distribution carries the whole llama.cpp tree it was built from: ``convert_hf_to_gguf.py``,
gguf-py, and the quantize / imatrix / perplexity / llama-bench tools. Using that tree (rather than a separate
llama.cpp checkout) keeps converter, quantizer and runtime in step: a GGUF written by one is read by the others.
The tree is fetched once from PyPI (``pip download``), and the C++ tools are built once with cmake, into
``$EDGEFORGE_HOME/llama.cpp-<version>`` (default ``~/.cache/edgeforge``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from edgeforge.errors import EdgeforgeError
from edgeforge.export.native_build import NO_AMX_FLAGS, amx_decision
from edgeforge.models.support import binding_version, llama_tree_dir
from edgeforge.paths import edgeforge_home
from edgeforge.progress import ProgressStep, progress

TOOL_TARGETS = ("llama-quantize", "llama-imatrix", "llama-bench", "llama-perplexity")


def native_flags() -> list[str]:
    """Extra cmake arguments: none (the native build), or the ``-mno-amx-*`` flags where the CPU reports AMX
    (the same decision as the Makefile's for the binding: edgeforge.export.native_build)."""
    args = amx_decision().cmake_args()
    # explicit either way: a CMake cache keeps the CMAKE_C_FLAGS of an earlier configure otherwise
    return args or ["-DCMAKE_C_FLAGS=", "-DCMAKE_CXX_FLAGS="]


class ToolsError(EdgeforgeError):
    """llama.cpp's tools could not be fetched or built."""


def tree_dir() -> Path:
    """Where the llama.cpp tree of the installed binding lives once fetched."""
    return llama_tree_dir()


def run_logged(cmd: list[str], log: Path, on_poll: Callable[[], None] | None = None,
               env: dict[str, str] | None = None, poll_s: float = 0.5) -> int:
    """Run ``cmd`` with its stdout and stderr appended to ``log``; ``on_poll()`` every ``poll_s`` while it runs
    (to move a progress display). Returns the exit code; an interrupt stops the child too."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        sink.write(f"$ {' '.join(cmd)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    return proc.wait(timeout=poll_s)
                except subprocess.TimeoutExpired:
                    if on_poll is not None:
                        on_poll()
        except BaseException:
            proc.kill()
            proc.wait()
            raise


def log_tail(log: Path, n: int = 3) -> list[str]:
    """The last ``n`` non-empty lines of a log (read from its last 64 KiB)."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - 65536))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()][-n:]


def failure_excerpt(log: Path) -> list[str]:
    """What a failed command's log says: its first error line (a compiler's, not make's echo of it) and its last
    line, from the output after the log's last ``$ command`` header."""
    lines = log_tail(log, 400)
    starts = [i for i, ln in enumerate(lines) if ln.startswith("$ ")]
    lines = lines[starts[-1] + 1:] if starts else lines
    errors = [ln for ln in lines if "error" in ln.lower() and not ln.startswith(("gmake", "make", "ninja"))]
    excerpt = errors[:1] + [ln for ln in lines[-1:] if ln not in errors[:1]]
    return [ln[:300] for ln in excerpt] or ["no output"]


def build_percent(log: Path) -> float | None:
    """How far a cmake build is, from the last ``[ 45%]`` (Makefiles) or ``[12/150]`` (Ninja) line of its log."""
    for line in reversed(log_tail(log, 40)):
        made = _MAKE_PERCENT.match(line)
        if made:
            return float(made.group(1))
        ninja = _NINJA_COUNT.match(line)
        if ninja and int(ninja.group(2)):
            return 100.0 * int(ninja.group(1)) / int(ninja.group(2))
    return None


def downloaded_bytes(log: Path) -> tuple[int, int] | None:
    """(bytes so far, total bytes) of a ``pip download --progress-bar raw``, from its last ``Progress X of Y``."""
    for line in reversed(log_tail(log, 40)):
        found = _PIP_PROGRESS.match(line)
        if found:
            return int(found.group(1)), int(found.group(2))
    return None


_MAKE_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
_NINJA_COUNT = re.compile(r"^\[(\d+)/(\d+)\]")
_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)")


def build_log() -> Path:
    """Where the first-use fetch and build write their output (kept after a failure, to read)."""
    return edgeforge_home() / f"llama.cpp-{binding_version()}-build.log"


def _fetch_tree(dest: Path, log: Path) -> None:
    ver = binding_version()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--progress-bar", "raw", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={ver}", "-d", tmp]

        def show_download(p: ProgressStep) -> None:
            done = downloaded_bytes(log)
            if done is not None:
                p.update(done[0], total=done[1] or None)

        with progress(f"download llama-cpp-python {ver} source", unit="B") as p:
            code = run_logged(cmd, log, on_poll=lambda: show_download(p))
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if code != 0 or not sdists:
            raise ToolsError(f"could not download the llama-cpp-python {ver} source distribution (needed for "
                             f"llama.cpp's converter and tools): {' | '.join(failure_excerpt(log))}; full log: {log}")
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
        _fetch_tree(dest, build_log())
    return dest


def tool_path(name: str) -> Path:
    return tree_dir() / "build" / "bin" / name


def ensure_tools(targets: tuple[str, ...] = TOOL_TARGETS, jobs: int | None = None) -> dict[str, Path]:
    """Build llama.cpp's C++ tools (CPU backend) once; returns their paths.

    The first build takes minutes: each phase (configure, then each tool) is shown as it runs, its output goes to
    ``build_log()``, and a failure names that log and quotes its last lines.
    """
    tree = ensure_tree()
    build, log = tree / "build", build_log()
    flags = native_flags()
    flags_file = build / "edgeforge-cpu-flags.txt"  # the AMX decision the tools were built with
    built_with = flags_file.read_text(encoding="utf-8") if flags_file.is_file() else None
    if built_with != " ".join(flags):
        # never built, or built with the other AMX decision: the tools there are stale; each is built again, with
        # these flags, when it is asked for (the requested ones now)
        for stale in TOOL_TARGETS:
            tool_path(stale).unlink(missing_ok=True)
    missing = [t for t in targets if not tool_path(t).is_file()]
    if not missing:
        return {t: tool_path(t) for t in targets}
    configure = ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                 "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", *flags]
    phases = [("configure", configure)] + [
        (f"build {t}", ["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
                        "--target", t]) for t in missing]
    with progress(f"llama.cpp {binding_version()} tools (first use)", total=len(phases), unit="phase") as overall:
        for done, (phase, cmd) in enumerate(phases):
            overall.update(done, note=phase)
            with progress(phase, total=100, unit="%") as p:
                code = run_logged(cmd, log, on_poll=lambda p=p: p.update(build_percent(log)))
                if code != 0:
                    raise ToolsError(f"building llama.cpp's tools failed at '{phase}' (exit {code}): "
                                     f"{' | '.join(failure_excerpt(log))}; full log: {log}; a C++ compiler and cmake "
                                     "are needed")
                p.update(100)
        overall.update(len(phases), note="done")
    flags_file.write_text(" ".join(flags), encoding="utf-8")
    return {t: tool_path(t) for t in targets}


def stock_bench_path(without_amx: bool = False) -> Path:
    """Where the stock ``llama-bench`` (llama.cpp's default CMake options, same source) is built; ``without_amx``:
    the same defaults plus only the ``-mno-amx-*`` flags (the reference on a CPU whose stock AMX build crashes)."""
    return tree_dir() / ("build-stock-no-amx" if without_amx else "build-stock") / "bin" / "llama-bench"


def ensure_stock_bench(jobs: int | None = None, without_amx: bool = False) -> Path:
    """``llama-bench`` built from the binding's llama.cpp tree with llama.cpp's default options (no flag of
    edgeforge's, AMX as the compiler's ``-march=native`` sees it), once, beside the tools: the reference that
    ``benchmarks/bench_overhead.py`` compares edgeforge's runtime with. Only ``LLAMA_CURL`` is off (no libcurl is
    needed to read a local file; it does not touch the compute code). ``without_amx`` adds the ``-mno-amx-*``
    compiler flags and nothing else, for a CPU where the default build cannot run."""
    tree, path = ensure_tree(), stock_bench_path(without_amx)
    if path.is_file():
        return path
    build, log = path.parent.parent, build_log()
    configure = ["cmake", "-S", str(tree), "-B", str(build), "-DLLAMA_CURL=OFF"]
    if without_amx:
        configure += [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
    name = "stock llama-bench" + (" without AMX" if without_amx else "")
    phases = [(f"configure {name}", configure),
              (f"build {name}", ["cmake", "--build", str(build), "--config", "Release", "-j",
                                 str(jobs or os.cpu_count() or 2), "--target", "llama-bench"])]
    for phase, cmd in phases:
        with progress(phase, total=100, unit="%") as p:
            code = run_logged(cmd, log, on_poll=lambda p=p: p.update(build_percent(log)))
            if code != 0:
                raise ToolsError(f"building the {name} failed at '{phase}' (exit {code}): "
                                 f"{' | '.join(failure_excerpt(log))}; full log: {log}")
            p.update(100)
    return path


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
