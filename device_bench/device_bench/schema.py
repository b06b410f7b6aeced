"""The report's versioned schema: required keys, their types, and a validator the CLI runs before printing.

Units are in the key names (``_ms``, ``_bytes``, ``_per_s``). Keys may be added within a schema version;
removing or retyping one needs a new ``SCHEMA_VERSION``.
"""

from __future__ import annotations

from typing import Any

from device_bench import SCHEMA_VERSION

NUMBER = "number"  # int or float, never bool
NULLABLE_STR = "str|null"

#: Required top-level keys and their types.
REPORT_KEYS: dict[str, Any] = {
    "schema_version": str,
    "started_at": str,
    "artifact": str,
    "model_bytes": int,
    "format": str,
    "runtime": str,
    "runtime_version": str,
    "threads": int,
    "n_ctx": int,
    "prompt_tokens": int,
    "gen_tokens": int,
    "repeats": int,
    "load_ms": NUMBER,
    "ttft_ms": NUMBER,
    "ttft_ms_std": NUMBER,
    "prefill_tokens_per_s": NUMBER,
    "prefill": list,
    "decode_tokens_per_s": NUMBER,
    "decode_tokens_per_s_std": NUMBER,
    "decode_ms_p50": NUMBER,
    "decode_ms_p95": NUMBER,
    "peak_rss_bytes": int,
    "sha256": NULLABLE_STR,
    "runtime_config": dict,
    "device": dict,
}

#: Keys of each entry of ``prefill`` (one per prompt length).
PREFILL_KEYS: dict[str, Any] = {
    "prompt_tokens": int,
    "tokens_per_s_mean": NUMBER,
    "tokens_per_s_std": NUMBER,
}

#: Keys of ``device``.
DEVICE_KEYS: dict[str, Any] = {
    "cpu_model": str,
    "cores": int,
    "isa_flags": list,
    "ram_bytes": int,
    "os": str,
    "machine": str,
    "hostname_hash": str,
    "temperatures_c": dict,
    "throttled": NULLABLE_STR,
}

FORMATS = {"gguf": "llama.cpp", "onnx": "onnxruntime"}


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with ``report`` against the schema (empty when it conforms)."""
    problems = _check_keys(report, REPORT_KEYS, "")
    if report.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {report.get('schema_version')!r}, expected {SCHEMA_VERSION!r}")
    fmt = report.get("format")
    if fmt not in FORMATS:
        problems.append(f"format is {fmt!r}, expected one of {sorted(FORMATS)}")
    elif report.get("runtime") != FORMATS[fmt]:
        problems.append(f"runtime is {report.get('runtime')!r}, expected {FORMATS[fmt]!r} for {fmt}")
    for index, row in enumerate(report.get("prefill") or []):
        if not isinstance(row, dict):
            problems.append(f"prefill[{index}] is not an object")
            continue
        problems.extend(_check_keys(row, PREFILL_KEYS, f"prefill[{index}]."))
    if not report.get("prefill"):
        problems.append("prefill has no entries")
    device = report.get("device")
    if isinstance(device, dict):
        problems.extend(_check_keys(device, DEVICE_KEYS, "device."))
        if not all(isinstance(flag, str) for flag in device.get("isa_flags") or []):
            problems.append("device.isa_flags must be a list of strings")
        temperatures = device.get("temperatures_c") or {}
        if not all(_is_type(value, NUMBER) for value in temperatures.values()):
            problems.append("device.temperatures_c values must be numbers")
    return problems


def _check_keys(data: dict[str, Any], spec: dict[str, Any], prefix: str) -> list[str]:
    """Missing or mistyped keys of ``data`` against ``spec``."""
    problems = []
    for key, expected in spec.items():
        if key not in data:
            problems.append(f"missing key {prefix}{key}")
        elif not _is_type(data[key], expected):
            problems.append(f"{prefix}{key} is {type(data[key]).__name__}, expected {_type_name(expected)}")
    return problems


def _is_type(value: Any, expected: Any) -> bool:
    """Type check where bool never counts as a number and ``NULLABLE_STR`` allows None."""
    if expected == NUMBER:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected == NULLABLE_STR:
        return value is None or isinstance(value, str)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    """Readable name of a spec type."""
    return expected if isinstance(expected, str) else expected.__name__
