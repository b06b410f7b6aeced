"""How llama.cpp is built on a machine: native, minus AMX only where the CPU reports AMX (the Makefile and
llama_tools take the same decision from edgeforge.export.native_build)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeforge.export.native_build import (
    AMX_ENV,
    NO_AMX_FLAGS,
    amx_decision,
    check_binding,
    cpu_reports_amx,
    main,
)

REPO = Path(__file__).resolve().parents[1]
SPR_FLAGS = "processor : 0\nflags : fpu sse2 avx2 avx512f amx_bf16 avx512_fp16 amx_tile amx_int8\n"
EPYC_FLAGS = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n"


def test_only_a_cpu_that_reports_amx_loses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """ARM boards and CPUs without AMX get llama.cpp's stock native build: no flags replaced (the old rule stripped
    AMX flags on every x86-64 machine, AMD included); a CPU that reports AMX is built without it."""
    monkeypatch.delenv(AMX_ENV, raising=False)
    assert cpu_reports_amx(SPR_FLAGS) and not cpu_reports_amx(EPYC_FLAGS)
    assert not cpu_reports_amx("flags : avx2 amx_tilefoo\n")
    for machine, cpuinfo in (("aarch64", SPR_FLAGS), ("x86_64", EPYC_FLAGS)):
        decision = amx_decision(machine=machine, cpuinfo=cpuinfo)
        assert decision.keep_amx and decision.cmake_args() == [], decision
    spr = amx_decision(machine="x86_64", cpuinfo=SPR_FLAGS)
    assert not spr.keep_amx and spr.cmake_args() and f"{AMX_ENV}=on" in spr.reason
    monkeypatch.setenv(AMX_ENV, "on")
    assert amx_decision(machine="x86_64", cpuinfo=SPR_FLAGS).cmake_args() == []


def test_the_override_and_a_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AMX_ENV, "off")
    off = amx_decision(machine="x86_64", cpuinfo=EPYC_FLAGS)
    assert not off.keep_amx
    assert off.cmake_args() == [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
    assert off.cmake_args_shell() == f"-DCMAKE_C_FLAGS='{NO_AMX_FLAGS}' -DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'"
    monkeypatch.setenv(AMX_ENV, "sometimes")
    with pytest.raises(ValueError, match="on, off or auto"):
        amx_decision()


def test_the_makefile_runs_it_as_a_plain_script(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before anything is installed: the system python runs the file, stdout is the CMake arguments only."""
    monkeypatch.setenv(AMX_ENV, "off")
    done = subprocess.run([sys.executable, "-S", str(REPO / "edgeforge/export/native_build.py")],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"-DCMAKE_C_FLAGS='{NO_AMX_FLAGS}' -DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'"
    assert "EDGEFORGE_LLAMA_AMX=off" in done.stderr


def test_the_installed_binding_runs_a_real_batch() -> None:
    """The check the Makefile runs after building the binding, on the bundled teacher (Q4_1: AMX kernels exist)."""
    ok, why = check_binding()
    assert ok, why
    assert "64-token batch" in why
    bad, why = check_binding("/nonexistent.gguf")
    assert not bad and "could not load" in why


def test_a_binding_that_fails_stops_the_install(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check-binding exits non-zero with the reason and the way out, so `make` stops instead of installing a runtime
    that fails on the first batch."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 60)
    assert main(["--check-binding", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "could not load" in err and f"{AMX_ENV}=off make" in err
