"""This process's memory: its peak resident size (the record's peak_rss_bytes) and handing freed memory back."""

from __future__ import annotations

import os
import resource


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
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
