"""This process's memory: its peak resident size, sampled over a span of work (the record's
``training_peak_rss_bytes``) or since start (``process_peak_rss_bytes``), and handing freed memory back."""

from __future__ import annotations

import os
import resource
import threading
from types import TracebackType


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started (Linux reports KiB, macOS bytes): data preparation and
    evaluation included, so a record calls it ``process_peak_rss_bytes``."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if os.uname().sysname == "Darwin" else r * 1024)


def release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps freed heap pages otherwise), so the peak RSS
    of training is not inflated by the evaluation and the fp32 teacher that came before it."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class RssSampler:
    """The peak resident memory while the ``with`` block runs, sampled every ``interval_s`` by a daemon thread.

    The kernel's high-water mark (:func:`peak_rss_bytes`) cannot be reset, so a span's own peak is sampled. A peak
    shorter than the interval can be missed; training's peak (weights, optimizer state, a step's activations) lasts
    a whole step, which is longer.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak_bytes = 0

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, int(self._process.memory_info().rss))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
