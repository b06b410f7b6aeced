"""Benchmark results: device_bench's report with the planner's estimate beside each measurement, saved next to
the artifact, loaded back, and compared in one table.

A result is device_bench's report (schema ``edgeforge.bench/1``) plus:
``target``, ``target_type``, ``profile``, ``artifact`` (the local path), ``remote_artifact`` (the path on the
device), ``estimated_decode_tokens_per_s``, ``estimated_prefill_tokens_per_s``, ``estimated_ttft_ms``,
``decode_ratio_measured_to_estimated`` and ``prefill_ratio_measured_to_estimated`` (``estimate_error`` instead
when no estimate could be made). It is saved as ``<artifact>.bench-<target>.json``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgeforge.bench.artifact import LocalArtifact
from edgeforge.bench.targets import Target
from edgeforge.errors import BadInputError, EdgeforgeError
from edgeforge.fileio import write_text_atomic
from edgeforge.plan.profiles import DeviceProfile

#: Keys every result carries (device_bench's report adds more).
RESULT_KEYS = (
    "load_ms", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_p50", "decode_ms_p95",
    "peak_rss_bytes", "model_bytes", "threads", "runtime", "runtime_version", "device", "target", "profile",
    "estimated_decode_tokens_per_s", "estimated_prefill_tokens_per_s", "decode_ratio_measured_to_estimated",
)


@functools.lru_cache(maxsize=32)
def _arch(path: Path) -> Any:
    """The artifact's architecture (a ModelArch), or the error message when it cannot be read; read once."""
    from edgeforge.models.refs import read_arch, resolve_model

    try:
        return read_arch(resolve_model(str(path)))
    except EdgeforgeError as e:
        return str(e)


def estimate_for(profile: DeviceProfile, artifact: LocalArtifact, prompt_tokens: int) -> dict[str, Any]:
    """The planner's estimate for ``artifact`` on ``profile``: decode/prefill tokens/s and TTFT.

    The architecture is read from the GGUF's metadata or the ONNX export's config.json; the weights are the
    artifact's bytes (the GGUF file, or the ONNX dir's .onnx/.onnx_data files). The backend is the profile's runtime
    for the artifact's format (CPU when the profile has none for it).
    """
    from edgeforge.models.refs import gguf_streamed_bytes_by_type
    from edgeforge.plan.estimator import estimate_speed

    arch = _arch(artifact.path)
    if isinstance(arch, str):
        return {"estimate_error": f"no architecture to estimate from: {arch}"}
    runtime = profile.runtime_for(artifact.format)
    backend = runtime.backend if runtime else "cpu"
    by_type = gguf_streamed_bytes_by_type(artifact.path) if artifact.format == "gguf" else None
    est = estimate_speed(profile, arch, artifact.weights_bytes, prompt_tokens, backend,
                         streamed_bytes_by_type=by_type)
    return {"estimated_decode_tokens_per_s": round(est.decode_tokens_per_s, 3),
            "estimated_prefill_tokens_per_s": round(est.prefill_tokens_per_s, 3),
            "estimated_ttft_ms": round(est.ttft_ms, 3), "estimate_backend": backend}


def _ratio(measured: Any, estimated: Any) -> float | None:
    if not isinstance(measured, (int, float)) or not isinstance(estimated, (int, float)) or estimated <= 0:
        return None
    return round(measured / estimated, 4)


def make_result(report: dict[str, Any], target: Target, profile: DeviceProfile, artifact: LocalArtifact,
                estimate: dict[str, Any]) -> dict[str, Any]:
    """device_bench's report with the target, the profile and the estimate beside the measurement."""
    result = dict(report)
    result["remote_artifact"] = report.get("artifact")
    result["artifact"] = str(artifact.path.absolute())
    result["target"] = target.name
    result["target_type"] = target.type
    result["profile"] = profile.name
    result.setdefault("estimated_decode_tokens_per_s", None)
    result.setdefault("estimated_prefill_tokens_per_s", None)
    result.update(estimate)
    result["decode_ratio_measured_to_estimated"] = _ratio(result.get("decode_tokens_per_s"),
                                                          result.get("estimated_decode_tokens_per_s"))
    result["prefill_ratio_measured_to_estimated"] = _ratio(result.get("prefill_tokens_per_s"),
                                                           result.get("estimated_prefill_tokens_per_s"))
    return result


def result_path(artifact: Path, target_name: str) -> Path:
    """Where a result is saved: ``<artifact>.bench-<target>.json`` next to the artifact (file or ONNX dir)."""
    return artifact.with_name(f"{artifact.name}.bench-{target_name}.json")


def save_result(result: dict[str, Any], log: Callable[[str], None] = lambda _m: None) -> Path | None:
    """Write the result next to its artifact; a read-only location is reported, not fatal."""
    path = result_path(Path(result["artifact"]), result["target"])
    try:  # atomic: a run killed while saving leaves no half-written result to be compared later
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    except OSError as e:
        log(f"warning: could not save the result to {path}: {e.strerror or e}")
        return None
    return path


def load_results(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Results from saved JSON files (a result, or a list of them, as ``bench --json`` prints)."""
    results = []
    for p in map(Path, paths):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError(f"{p}: no such result file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInputError(f"{p}: not a readable JSON result ({e})") from None
        except RecursionError:
            raise BadInputError(f"{p}: not a readable JSON result (nested too deeply)") from None
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "decode_tokens_per_s" not in item:
                where = f"{p}[{i}]" if isinstance(data, list) else str(p)
                raise BadInputError(f"{where}: not a benchmark result (expected a JSON object with "
                                    "decode_tokens_per_s, as 'edgeforge bench' saves)")
            results.append(item)
    if not results:
        raise BadInputError("no results to compare")
    return results


def _num(value: Any, fmt: str = "{:,.1f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def results_table(results: Sequence[dict[str, Any]], title: str = "Benchmark") -> Any:
    """One rich table: a row per (artifact, target), the planner's estimate in brackets beside each speed."""
    from rich.table import Table

    t = Table(title=title, caption="tok/s measured (the planner's estimate for the target's profile); "
              "meas/est: measured / estimated decode")
    t.add_column("artifact", overflow="fold", min_width=12)
    t.add_column("target", overflow="fold")
    t.add_column("profile", overflow="fold")
    t.add_column("runtime")
    for col in ("thr", "MB", "load ms", "TTFT ms", "prefill tok/s", "decode tok/s", "meas/est", "p50/p95/p99 ms",
                "RSS MB"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in results:
        t.add_row(
            Path(str(r.get("artifact", "?"))).name, str(r.get("target", "?")), str(r.get("profile", "?")),
            f"{r.get('runtime', '?')} {r.get('runtime_version', '')}".strip(), _num(r.get("threads"), "{}"),
            _num((r.get("model_bytes") or 0) / 1e6), _num(r.get("load_ms"), "{:,.0f}"), _num(r.get("ttft_ms")),
            f"{_num(r.get('prefill_tokens_per_s'))} ({_num(r.get('estimated_prefill_tokens_per_s'), '{:,.0f}')})",
            f"{_num(r.get('decode_tokens_per_s'))} ({_num(r.get('estimated_decode_tokens_per_s'), '{:,.0f}')})",
            _num(r.get("decode_ratio_measured_to_estimated"), "{:.2f}"),
            f"{_num(r.get('decode_ms_p50'), '{:.1f}')}/{_num(r.get('decode_ms_p95'), '{:.1f}')}/"
            f"{_num(r.get('decode_ms_p99'), '{:.1f}')}",
            _num((r.get("peak_rss_bytes") or 0) / 1e6, "{:,.0f}"),
        )
    return t


def sustained_table(result: dict[str, Any]) -> Any:
    """The windows of a ``--sustained`` result: tokens/s, CPU MHz, hottest sensor and power, each window."""
    from rich.table import Table

    run = result["sustained"]
    energy = run.get("joules_per_token")
    t = Table(title=f"Sustained decode: {Path(str(result.get('artifact', '?'))).name} on {result.get('target', '?')}",
              caption=f"first {_num(run.get('first_window_tokens_per_s'))} -> last "
                      f"{_num(run.get('last_window_tokens_per_s'))} tok/s (drop {_num(run.get('drop_percent'))}%); "
                      f"energy: {_num(energy, '{:.3f} J/token') if not isinstance(energy, str) else energy}")
    for col in ("window", "tok/s", "CPU MHz", "max °C", "power W", "throttled"):
        t.add_column(col, justify="right", no_wrap=True)
    for w in run.get("windows") or []:
        t.add_row(f"{_num(w.get('start_s'), '{:g}')}-{_num(w.get('end_s'), '{:g}')} s", _num(w.get("tokens_per_s")),
                  _cond(w.get("cpu_frequency_mhz_mean"), "{:,.0f}"), _cond(w.get("temperature_c_max"), "{:.1f}"),
                  _cond(w.get("power_w_total"), "{:.2f}"), _cond(w.get("throttled"), "{}"))
    return t


def _cond(value: Any, fmt: str) -> str:
    """A condition reading, or "n/a" for "not available on this device"."""
    if isinstance(value, str):
        return "n/a" if value.startswith("not available") else value
    return _num(value, fmt)
