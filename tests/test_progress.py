"""edgeforge.progress: plain lines where stderr is not a terminal (bounded, no carriage returns, the final rate kept),
a rich bar where it is."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from edgeforge.progress import progress, set_style


@pytest.fixture(autouse=True)
def _auto_style(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFORGE_PROGRESS", raising=False)
    set_style("auto")


def _lines(capsys: pytest.CaptureFixture[str]) -> tuple[str, list[str]]:
    err = capsys.readouterr().err
    return err, [ln for ln in err.splitlines() if ln.strip()]


def test_plain_lines_are_bounded_and_the_last_carries_the_rate(capsys: pytest.CaptureFixture[str]) -> None:
    with progress("distill", total=1000, unit="step") as p:
        for i in range(1000):
            p.advance(note=f"loss {1 / (i + 1):.3g}")
    err, lines = _lines(capsys)
    assert "\r" not in err
    assert 9 <= len(lines) <= 10  # one per tenth (10% .. 90%), then the final line
    assert all(ln.startswith("distill: ") for ln in lines)
    assert "(10%)" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("distill: 1000/1000 step in ") and "step/s" in lines[-1]
    assert lines[-1].endswith("loss 0.001")


def test_a_resumed_step_counts_only_this_runs_work(capsys: pytest.CaptureFixture[str]) -> None:
    with progress("train", total=100, completed=95) as p:
        for _ in range(5):
            p.advance()
    _, lines = _lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("train: 100/100 step in ")


def test_an_estimated_total_that_falls_short_grows(capsys: pytest.CaptureFixture[str]) -> None:
    with progress("convert", total=7e6, unit="B") as p:
        p.update(completed=8.2e6)  # the file came out larger than its estimate
    _, lines = _lines(capsys)
    assert lines[-1].startswith("convert: 8.2/8.2 MB in ")


def test_without_a_total_a_line_comes_every_interval(capsys: pytest.CaptureFixture[str]) -> None:
    with progress("convert", unit="B", interval_s=0.05) as p:
        for i in range(6):
            time.sleep(0.03)
            p.update(completed=(i + 1) * 2e6)
    err, lines = _lines(capsys)
    assert "\r" not in err
    assert 2 <= len(lines) <= 5, lines  # 0.18 s at one line per 0.05 s at most, plus the final line
    assert lines[-1].startswith("convert: 12.0 MB in ") and "MB/s" in lines[-1]


def test_a_failed_step_prints_no_final_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError), progress("evaluate", total=10, unit="example") as p:
        p.advance(5)
        raise RuntimeError("engine failed")
    _, lines = _lines(capsys)
    assert lines == [lines[0]] and "5/10 example (50%)" in lines[0]  # the progress so far; no "in ... s" line


def test_off_and_disabled_print_nothing(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with progress("rank 1", total=10, enabled=False) as p:
        p.advance(10)
    monkeypatch.setenv("EDGEFORGE_PROGRESS", "off")
    with progress("quiet", total=10) as p:
        p.advance(10)
    assert capsys.readouterr().err == ""


def test_the_bar_draws_frames_and_keeps_the_final_rate(capsys: pytest.CaptureFixture[str]) -> None:
    set_style("bar")
    with progress("outer", total=2, unit="phase") as outer:
        with progress("inner", total=4, unit="example") as inner:  # nested: one shared display
            for _ in range(4):
                inner.advance()
        outer.advance(2)
    err = capsys.readouterr().err
    assert "\r" in err  # frames, as a terminal gets them
    final = err.rsplit("\r", 1)[-1]
    assert "2/2 phase" in final and "4/4 example" in final and "example/s" in final


def test_an_unknown_style_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of auto, bar, lines, off"):
        set_style("fancy")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the first-use llama.cpp tool build
FAKE_TREE_CMAKE = """cmake_minimum_required(VERSION 3.14)
project(fake_llama C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_executable(llama-quantize ok.c)
add_executable(llama-bench ok.c)
add_executable(llama-imatrix broken.c)
"""


@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("cc")), reason="needs cmake and a C compiler")
def test_tool_build_shows_each_phase_and_a_failure_names_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A real cmake build of a small tree laid out as llama.cpp's (the real one takes minutes)."""
    from edgeforge.export import llama_tools

    monkeypatch.setenv("EDGEFORGE_HOME", str(tmp_path))
    tree = llama_tools.tree_dir()
    tree.mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("", encoding="utf-8")  # a fetched tree: no download
    (tree / "CMakeLists.txt").write_text(FAKE_TREE_CMAKE, encoding="utf-8")
    (tree / "ok.c").write_text("int main(void) { return 0; }\n", encoding="utf-8")
    (tree / "broken.c").write_text("int main(void) { return missing_symbol_here; }\n", encoding="utf-8")

    paths = llama_tools.ensure_tools(("llama-quantize", "llama-bench"), jobs=1)
    assert all(p.is_file() for p in paths.values())
    _, lines = _lines(capsys)
    labels = [ln.split(":", 1)[0] for ln in lines]
    assert {"configure", "build llama-quantize", "build llama-bench"} <= set(labels)
    assert lines[-1].startswith(f"llama.cpp {llama_tools.binding_version()} tools (first use): 3/3 phase in ")
    assert llama_tools.ensure_tools(("llama-quantize",)) and capsys.readouterr().err == ""  # built: no second build

    with pytest.raises(llama_tools.ToolsError) as failed:
        llama_tools.ensure_tools(("llama-imatrix",), jobs=1)
    message = str(failed.value)
    assert "at 'build llama-imatrix'" in message and "missing_symbol_here" in message
    assert f"full log: {llama_tools.build_log()}" in message and llama_tools.build_log().is_file()


@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("cc")), reason="needs cmake and a C compiler")
def test_tools_built_with_other_cpu_flags_are_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Tools built under another AMX decision (an older cache, or EDGEFORGE_LLAMA_AMX changed) are stale: the ones
    asked for are configured and built again with this machine's flags, the others are removed until asked for."""
    from edgeforge.export import llama_tools

    monkeypatch.setenv("EDGEFORGE_HOME", str(tmp_path))
    tree = llama_tools.tree_dir()
    tree.mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("", encoding="utf-8")
    (tree / "CMakeLists.txt").write_text(FAKE_TREE_CMAKE, encoding="utf-8")
    (tree / "ok.c").write_text("int main(void) { return 0; }\n", encoding="utf-8")
    (tree / "broken.c").write_text("int main(void) { return missing_symbol_here; }\n", encoding="utf-8")
    llama_tools.ensure_tools(("llama-quantize", "llama-bench"), jobs=1)
    flags_file = tree / "build" / "edgeforge-cpu-flags.txt"
    assert flags_file.read_text(encoding="utf-8") == " ".join(llama_tools.native_flags())
    capsys.readouterr()

    flags_file.write_text("-DCMAKE_C_FLAGS=-mother", encoding="utf-8")  # as if built under the other decision
    assert llama_tools.ensure_tools(("llama-quantize",), jobs=1)["llama-quantize"].is_file()
    labels = {ln.split(":", 1)[0] for ln in _lines(capsys)[1]}
    assert {"configure", "build llama-quantize"} <= labels and "build llama-bench" not in labels
    assert not llama_tools.tool_path("llama-bench").exists()  # stale: gone until asked for
    assert flags_file.read_text(encoding="utf-8") == " ".join(llama_tools.native_flags())
