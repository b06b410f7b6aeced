"""edgeforge.progress: plain lines where stderr is not a terminal (bounded, no carriage returns, the final rate kept),
a rich bar where it is."""

from __future__ import annotations

import time

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
