"""Runtime configuration shipped with the artifact (threads, context, batch, KV-cache type), overridden by CLI flags.

A benchmark is only worth quoting when it ran with the settings the artifact ships: the settings each came from are
in the report (``runtime_config``), and every shipped value a flag overrode is listed in
``runtime_config.differs_from_shipped`` so the caller can warn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from device_bench.artifact import Artifact
from device_bench.errors import BenchError

#: Keys accepted in a runtime configuration file, with the alias edgeforge may write.
_THREAD_KEYS = ("n_threads", "threads")
_CTX_KEYS = ("n_ctx", "context_length")
_BATCH_KEYS = ("n_batch",)
_UBATCH_KEYS = ("n_ubatch",)
#: KV-cache element types llama.cpp accepts (llama-bench's -ctk/-ctv values), by name, with ggml's type ids
#: (ggml.h ``enum ggml_type``) that the GGUF runner passes to llama.cpp.
KV_CACHE_TYPE_IDS = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2, "q4_1": 3, "iq4_nl": 20, "q5_0": 6,
                     "q5_1": 7}
KV_CACHE_TYPES = tuple(KV_CACHE_TYPE_IDS)
_KV_DEFAULT = "f16"


@dataclass(frozen=True)
class RuntimeSettings:
    """The settings of the run, and where each came from ("cli", "runtime.json" or "default").

    ``n_batch`` / ``n_ubatch`` None: llama-bench's defaults (2048 or the longest prompt, 512).
    """

    threads: int
    n_ctx: int
    threads_source: str
    n_ctx_source: str
    config_path: str | None
    n_batch: int | None = None
    n_ubatch: int | None = None
    cache_type_k: str = _KV_DEFAULT
    cache_type_v: str = _KV_DEFAULT
    shipped: dict[str, Any] = field(default_factory=dict)
    differs_from_shipped: tuple[str, ...] = ()

    def as_report(self) -> dict[str, Any]:
        """The ``runtime_config`` block of the report."""
        return {
            "path": self.config_path,
            "threads_source": self.threads_source,
            "n_ctx_source": self.n_ctx_source,
            "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch,
            "cache_type_k": self.cache_type_k,
            "cache_type_v": self.cache_type_v,
            "shipped": self.shipped,
            "differs_from_shipped": list(self.differs_from_shipped),
        }


def runtime_config_path(artifact: Artifact) -> str | None:
    """The runtime configuration file shipped with ``artifact``, if there is one.

    GGUF: ``<model>.gguf.runtime.json`` next to the file. ONNX: ``runtime.json`` inside the export directory.
    """
    if artifact.format == "gguf":
        candidate = artifact.model_file + ".runtime.json"
    else:
        candidate = os.path.join(artifact.model_dir, "runtime.json")
    return candidate if os.path.isfile(candidate) else None


def load_runtime_config(path: str) -> dict[str, Any]:
    """Parse a runtime configuration file; raise BenchError with the reason when it is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchError(f"cannot read runtime config {path}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise BenchError(f"runtime config {path} must be a JSON object, got {type(data).__name__}")
    return data


def default_threads() -> int:
    """Threads when neither the CLI nor the runtime config says: the physical cores this process may use.

    llama.cpp (and llama-bench's default) run best with one thread per physical core; SMT siblings only add
    contention, so they are not counted.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    physical = physical_cores()
    return max(1, min(available, physical) if physical else available)


def physical_cores() -> int | None:
    """Physical cores from /proc/cpuinfo (distinct physical id/core id pairs), or None when not listed."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    pairs = set()
    for block in text.split("\n\n"):
        fields = dict(_split_field(line) for line in block.splitlines() if ":" in line)
        if "core id" in fields:
            pairs.add((fields.get("physical id", "0"), fields["core id"]))
    return len(pairs) or None


def resolve_settings(
    artifact: Artifact, cli_threads: int | None, cli_n_ctx: int | None, needed_ctx: int
) -> RuntimeSettings:
    """Combine CLI flags, the shipped runtime config and defaults; CLI flags win.

    ``needed_ctx`` is the context the benchmark needs (longest prompt + generated tokens): it is the default
    and a shipped or given ``n_ctx`` below it is an error rather than a silently different benchmark.
    """
    path = runtime_config_path(artifact)
    config = load_runtime_config(path) if path else {}

    threads, threads_source = cli_threads, "cli"
    if threads is None:
        threads, threads_source = _config_int(config, _THREAD_KEYS, path), "runtime.json"
    if threads is None:
        threads, threads_source = default_threads(), "default"

    n_ctx, n_ctx_source = cli_n_ctx, "cli"
    if n_ctx is None:
        n_ctx, n_ctx_source = _config_int(config, _CTX_KEYS, path), "runtime.json"
    if n_ctx is None:
        n_ctx, n_ctx_source = needed_ctx, "default"
    if n_ctx < needed_ctx:
        raise BenchError(
            f"n_ctx {n_ctx} (from {n_ctx_source}) is too small for this benchmark, which needs {needed_ctx} "
            "tokens (longest prompt + gen tokens); pass a larger --n-ctx or shorter --prompt-tokens/--gen-tokens"
        )
    n_batch = _config_int(config, _BATCH_KEYS, path)
    n_ubatch = _config_int(config, _UBATCH_KEYS, path)
    cache_k = _config_kv_type(config, "cache_type_k", path)
    cache_v = _config_kv_type(config, "cache_type_v", path)
    shipped = {key: config[key] for key in (*_THREAD_KEYS, *_CTX_KEYS, *_BATCH_KEYS, *_UBATCH_KEYS, "cache_type_k",
                                            "cache_type_v") if key in config}
    differs = []
    shipped_threads = _config_int(config, _THREAD_KEYS, path)
    if shipped_threads is not None and threads != shipped_threads:
        differs.append(f"threads: the artifact ships {shipped_threads}, measured with {threads} (--threads)")
    shipped_ctx = _config_int(config, _CTX_KEYS, path)
    if shipped_ctx is not None and n_ctx != shipped_ctx:
        differs.append(f"n_ctx: the artifact ships {shipped_ctx}, measured with {n_ctx} (--n-ctx)")
    return RuntimeSettings(threads, n_ctx, threads_source, n_ctx_source, path, n_batch, n_ubatch,
                           cache_k or _KV_DEFAULT, cache_v or _KV_DEFAULT, shipped, tuple(differs))


def _config_kv_type(config: dict[str, Any], key: str, path: str | None) -> str | None:
    """A KV-cache type of the runtime config (one of :data:`KV_CACHE_TYPES`), None when not set."""
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in KV_CACHE_TYPES:
        raise BenchError(f"runtime config {path}: {key} must be one of {', '.join(KV_CACHE_TYPES)}, got {value!r}")
    return value.lower()


def _config_int(config: dict[str, Any], keys: tuple[str, ...], path: str | None) -> int | None:
    """The first of ``keys`` present in ``config`` as a positive integer; None if none is present."""
    for key in keys:
        if key in config and config[key] is not None:
            value = config[key]
            # bool is an int subclass; "true" threads is a typo, not 1 thread.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise BenchError(f"runtime config {path}: {key} must be a positive integer, got {value!r}")
            return value
    return None


def _split_field(line: str) -> tuple[str, str]:
    """Split a ``key : value`` line of /proc/cpuinfo."""
    key, _, value = line.partition(":")
    return key.strip(), value.strip()


def _one_line(err: BaseException) -> str:
    """An exception message flattened to one line."""
    return " ".join(str(err).split()) or type(err).__name__
