"""The interface every runtime backend implements, so the measurement loop is shared and identical."""

from __future__ import annotations

import abc
import random
from typing import Any

from device_bench.artifact import Artifact


class Runner(abc.ABC):
    """Loads one artifact with one runtime and times prefill, time to first token and decode.

    Timed methods return seconds measured with ``time.perf_counter_ns`` around the runtime calls only:
    token ids are prepared before the clock starts, so Python-side setup is not counted as model time.
    """

    format: str = ""
    runtime: str = ""

    def __init__(self, artifact: Artifact, threads: int, n_ctx: int, max_prompt_tokens: int, seed: int = 0) -> None:
        """Remember the settings; nothing is imported or loaded until :meth:`load`."""
        self.artifact = artifact
        self.threads = threads
        self.n_ctx = n_ctx
        self.max_prompt_tokens = max_prompt_tokens
        # A fixed seed keeps the random prompts identical across runs and devices, so reports compare.
        self.rng = random.Random(seed)

    @property
    @abc.abstractmethod
    def runtime_version(self) -> str:
        """Version string of the runtime package."""

    @abc.abstractmethod
    def import_runtime(self) -> None:
        """Import the runtime package, or raise RuntimeMissingError; kept out of ``load_ms`` on purpose."""

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model into the imported runtime (the caller times this call as ``load_ms``)."""

    @abc.abstractmethod
    def prefill(self, n_tokens: int) -> float:
        """Process an ``n_tokens`` prompt from an empty cache in one batch; return the seconds it took."""

    @abc.abstractmethod
    def ttft(self, n_tokens: int) -> float:
        """Seconds from the start of an ``n_tokens`` prompt until the first generated token id is known."""

    @abc.abstractmethod
    def decode(self, n_tokens: int, depth: int = 0) -> tuple[float, list[float]]:
        """Generate ``n_tokens`` one at a time; return total and per-token seconds.

        They follow a ``depth``-token prompt, not timed (0: from an empty cache, llama-bench's ``tg``; N: its
        ``tg @ dN``).
        """

    def details(self) -> dict[str, Any]:
        """Runtime-specific facts for the report's ``runtime_details`` block."""
        return {}

    def close(self) -> None:  # noqa: B027  (optional hook: runtimes that hold native memory override it)
        """Release the model and native resources."""
