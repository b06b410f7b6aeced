"""Progress of a long step on stderr: a bar with ETA in a terminal, a few plain lines in a log.

    with progress("distill", total=steps, unit="step") as p:
        for ...:
            p.advance(note=f"loss {loss:.3g}")

Where stderr is a terminal, a ``rich.progress`` bar shows the count, the rate, the time left and the time spent;
steps that run inside one another (a task evaluation inside a build) share one display, and a finished step stays on
screen with its final rate. Everywhere else (a log file, a pipe, ``--json``, click's test runner) there are no
carriage-return frames: one line each time another tenth of a step with a known total is done, one line every
``PLAIN_INTERVAL_S`` seconds for a step without one, and a last line with the time and the rate when the step ends.
A step that fails prints nothing more, so the CLI's one error line stays the last word.

``EDGEFORGE_PROGRESS`` (``bar``, ``lines`` or ``off``) overrides the choice; ``set_style`` is the CLI's way to ask
for plain lines under ``--json``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any, Literal

Style = Literal["auto", "bar", "lines", "off"]
STYLES: tuple[str, ...] = ("auto", "bar", "lines", "off")
#: Plain lines: one each time another PLAIN_FRACTION of a known total is done ...
PLAIN_FRACTION = 0.1
#: ... or, without a total, one every PLAIN_INTERVAL_S seconds.
PLAIN_INTERVAL_S = 30.0
BAR_REFRESH_PER_S = 4  # the display thread competes with training for the same few cores

_style_setting: Style = "auto"


def set_style(style: Style) -> None:
    """Choose how progress is shown from now on (``auto``: a bar where stderr is a terminal, else plain lines)."""
    global _style_setting
    if style not in STYLES:
        raise ValueError(f"progress style {style!r}: expected one of {', '.join(STYLES)}")
    _style_setting = style


def current_style() -> Style:
    """The style a step started now gets: ``EDGEFORGE_PROGRESS``, then ``set_style``, then what stderr is."""
    env = os.environ.get("EDGEFORGE_PROGRESS", "").strip().lower()
    style = env if env in STYLES else _style_setting
    if style != "auto":
        return style  # type: ignore[return-value]
    stream = sys.stderr
    is_tty = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
    return "bar" if is_tty and os.environ.get("TERM") != "dumb" else "lines"


def format_seconds(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 07 min``."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_amount(value: float, unit: str) -> str:
    """A count in its unit; bytes (``unit="B"``) in MB."""
    if unit == "B":
        return f"{value / 1e6:.1f}"
    return f"{value:g}" if value != int(value) else f"{int(value)}"


def format_rate(per_s: float, unit: str) -> str:
    """``2.31 step/s``, ``48.2 example/s``, ``1203 step/s``; bytes in MB/s."""
    shown_unit = "MB" if unit == "B" else unit
    value = per_s / 1e6 if unit == "B" else per_s
    digits = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:.{digits}f} {shown_unit}/s"


class ProgressStep:
    """One step's progress; made by :func:`progress`, which draws or prints it."""

    def __init__(self, label: str, total: float | None, unit: str, completed: float) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.completed = float(completed)
        self.initial = float(completed)  # a resumed step's rate counts only this run's work
        self.note = ""
        self.started_s = time.monotonic()
        self.ended_s: float | None = None  # seconds the step took, once it has ended

    # ---- what callers use
    def advance(self, n: float = 1, note: str | None = None) -> None:
        """``n`` more units done; ``note`` (optional) says what is going on now (a loss, the next phase)."""
        self.update(self.completed + n, note=note)

    def update(self, completed: float | None = None, note: str | None = None, total: float | None = None) -> None:
        """Set the count done so far (and the note, or the total once it is known)."""
        if completed is not None:
            self.completed = float(completed)
        if note is not None:
            self.note = note
        if total is not None:
            self.total = float(total)
        if self.total is not None and self.completed > self.total:  # an estimated total (a file's size) fell short
            self.total = self.completed
        self._changed()

    # ---- what the display uses
    def elapsed_s(self) -> float:
        return self.ended_s if self.ended_s is not None else time.monotonic() - self.started_s

    def rate_per_s(self) -> float:
        return (self.completed - self.initial) / max(1e-9, self.elapsed_s())

    def amount_text(self) -> str:
        if not self.unit:  # nothing is counted, only the time
            return ""
        if self.unit == "%":  # a share of an external tool's work, as it reports it
            return f"{self.completed:.0f}%"
        unit = "MB" if self.unit == "B" else self.unit
        if self.total is None:
            return f"{format_amount(self.completed, self.unit)} {unit}"
        return f"{format_amount(self.completed, self.unit)}/{format_amount(self.total, self.unit)} {unit}"

    def rate_text(self) -> str:
        """The rate as shown (none for a percentage: it is not a count of anything)."""
        if self.unit in ("", "%"):
            return ""
        return ", " + format_rate(self.rate_per_s(), self.unit)

    def final_line(self) -> str:
        note = f", {self.note}" if self.note else ""
        amount = self.amount_text() or "done"
        return f"{self.label}: {amount} in {format_seconds(self.elapsed_s())}{self.rate_text()}{note}"

    def _changed(self) -> None:
        """Hook for the display."""

    def _finish(self, ok: bool) -> None:
        """Hook for the display: the step ended (``ok``: without an exception)."""


class _PlainLines(ProgressStep):
    """Plain lines on stderr: every PLAIN_FRACTION of the total, or every ``interval_s`` without one."""

    def __init__(self, label: str, total: float | None, unit: str, completed: float, interval_s: float) -> None:
        super().__init__(label, total, unit, completed)
        self.interval_s = interval_s
        self.last_line_s = self.started_s
        self.next_fraction = self._fraction_step_after(self._fraction())

    def _fraction(self) -> float:
        return self.completed / self.total if self.total else 0.0

    @staticmethod
    def _fraction_step_after(fraction: float) -> float:
        return (math.floor(fraction / PLAIN_FRACTION + 1e-9) + 1) * PLAIN_FRACTION

    def _changed(self) -> None:
        now = time.monotonic()
        if self.total:
            fraction = self._fraction()
            if fraction < self.next_fraction - 1e-9 or fraction >= 1.0:
                return  # the last line says 100%
            self.next_fraction = self._fraction_step_after(fraction)
            rate = self.rate_per_s()
            eta = (self.total - self.completed) / rate if rate > 0 else math.inf
            share = "" if self.unit == "%" else f" ({fraction:.0%})"
            line = f"{self.label}: {self.amount_text()}{share}{self.rate_text()}, ETA {format_seconds(eta)}"
        else:
            if now - self.last_line_s < self.interval_s:
                return
            line = f"{self.label}: {self.amount_text() or 'running'} after {format_seconds(self.elapsed_s())}"
        self.last_line_s = now
        _write_line(line + (f", {self.note}" if self.note else ""))

    def _finish(self, ok: bool) -> None:
        if ok:
            _write_line(self.final_line())


def _write_line(line: str) -> None:
    stream = sys.stderr  # looked up each time: click's test runner and captured_stderr swap it
    if stream is None:
        return
    stream.write(line + "\n")
    stream.flush()


class _Bar(ProgressStep):
    """One task of the shared rich display."""

    def __init__(self, label: str, total: float | None, unit: str, completed: float) -> None:
        super().__init__(label, total, unit, completed)
        self.task_id = _display.add(self)

    def _changed(self) -> None:
        _display.refresh(self)

    def _finish(self, ok: bool) -> None:
        _display.finish(self)


class _SharedDisplay:
    """One ``rich.progress.Progress`` for every bar open at once (rich allows one live display per console).

    It writes to a duplicate of the terminal's file descriptor taken when it starts, so C libraries' stderr being
    redirected meanwhile (``edgeforge.quiet.captured_stderr``) neither hides the bar nor mixes it into their logs.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: Any = None
        self.users = 0
        self.stream: IO[str] | None = None

    def add(self, step: ProgressStep) -> int:
        with self.lock:
            if self.live is None:
                self.live = self._start()
            self.users += 1
            return int(self.live.add_task(step.label, total=step.total, completed=step.completed, step=step))

    def refresh(self, step: _Bar) -> None:
        if self.live is not None:
            self.live.update(step.task_id, completed=step.completed, total=step.total)

    def finish(self, step: _Bar) -> None:
        with self.lock:
            if self.live is None:
                return
            total = step.total if step.total is not None else step.completed
            self.live.update(step.task_id, completed=step.completed, total=total)
            self.live.stop_task(step.task_id)
            self.users -= 1
            if self.users == 0:
                self.live.stop()
                self.live = None
                if self.stream is not None and self.stream is not sys.stderr:
                    self.stream.close()
                self.stream = None

    def _start(self) -> Any:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

        self.stream = _terminal_stream()
        console = Console(file=self.stream, force_terminal=True)
        live = Progress(SpinnerColumn(finished_text="done"), TextColumn("{task.description}"), BarColumn(bar_width=24),
                        _amount_and_rate_column()(), TimeRemainingColumn(), console=console,
                        refresh_per_second=BAR_REFRESH_PER_S, transient=False)
        live.start()
        return live


def _terminal_stream() -> IO[str]:
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):  # no file descriptor (a StringIO): write to it directly
        return sys.stderr


def _amount_and_rate_column() -> type:
    """The rich column class, made on first use: rich is imported only where a bar is drawn."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class AmountAndRate(ProgressColumn):
        """``37/150 step, 2.31 step/s, 16.0 s`` and the step's note, from the same numbers as the plain lines."""

        def render(self, task: Any) -> Text:
            step: ProgressStep = task.fields["step"]
            elapsed = step.elapsed_s()
            note = f"  {step.note}" if step.note else ""
            return Text(f"{step.amount_text()}{step.rate_text()}, {format_seconds(elapsed)}{note}")

    return AmountAndRate


_display = _SharedDisplay()


@contextlib.contextmanager
def progress(label: str, total: float | None = None, unit: str = "step", completed: float = 0,
             enabled: bool = True, interval_s: float = PLAIN_INTERVAL_S) -> Iterator[ProgressStep]:
    """Show the progress of the step ``label`` while the block runs.

    ``total``: units the step takes (None: unknown; plain lines then come every ``interval_s``); ``unit``: what is
    counted (``"B"`` is shown in MB, ``"%"`` is a tool's own percentage, ``""`` counts nothing: only the time
    is shown); ``completed``: units already done (a resumed run); ``enabled=False`` shows
    nothing (the other processes of a distributed run).
    """
    style = current_style() if enabled else "off"
    if style == "off":
        step = ProgressStep(label, total, unit, completed)
    elif style == "bar":
        step = _Bar(label, total, unit, completed)
    else:
        step = _PlainLines(label, total, unit, completed, interval_s)
    ok = False
    try:
        yield step
        ok = True
    finally:
        step.ended_s = step.elapsed_s()
        step._finish(ok)
