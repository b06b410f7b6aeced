"""Calibrate a detected profile's decode with llama.cpp's own kernels: what decode really reaches on this CPU.

``profiles detect`` measures the read bandwidth with a float32 matrix-vector product; llama.cpp's decode on few
cores does not stream at it. It is bound by each type's dequantizing dot product (measured on 2 AMD EPYC cores: Q4_K
weights read at about 50 GB/s, Q5_0 at 27, Q6_K at 37, Q8_0 at 43, against 51 GB/s measured) and pays a fixed time
per layer (thread barriers between its ops) far above the published-row fit's 20 us: the detected profile estimated
the bundled teacher's decode, mostly Q5_0 and Q8_0 on its 576-wide rows, at about 2x the measurement. This module
measures the estimator's decode constants instead of assuming them, on synthetic models of **other shapes** than
anything it is later asked about (``export.calibration_model``: 8 layers of hidden 1,024 and 24 layers of hidden
512), so an estimate it then makes for a real model is a prediction, not the calibration read back:

- each synthetic model (random Llama weights, the bundled teacher's tokenizer, llama.cpp's converter, every matrix
  at one type by ``llama-quantize --pure``; made by the caller since export and bench are one layer) is decoded by
  device_bench (``bench --target local``);
- seconds per token = sum over types of bytes / rate(type) + layers x overhead. The two shapes at the reference type
  (Q4_K) give its rate and ``layer_overhead_s.cpu``; the first shape at each other type then gives that type's rate
  (``decode_rate_bytes_per_s.cpu``); ``decode_efficiency.cpu`` is the median rate over the bandwidth (at most 1),
  for the KV cache and for a type not measured.

Prefill is left to the fitted compute efficiency: a batched matmul's efficiency depends on its width (measured
here: hidden 1,024 reached twice the share of int8 peak that hidden 576 did), so a rate from another shape does
not transfer; the measured prefill of each reference model is written to the profile's sources beside the estimate.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from edgeforge.errors import EdgeforgeError
from edgeforge.plan.profiles import DeviceProfile

CALIBRATION_REPEATS = 6
_RERUN = "run profiles detect --calibrate again on an idle machine"


@dataclass(frozen=True)
class DecodeMeasurement:
    """One calibration model's decode: the bytes a token reads by GGML type, its layers, the measured seconds per
    token, and the one type its matrices are at."""

    bytes_by_type: dict[str, float]
    n_layers: int
    seconds_per_token: float
    qtype: str


def solve_decode(reference: tuple[DecodeMeasurement, DecodeMeasurement], others: list[DecodeMeasurement],
                 bandwidth_bytes_per_s: float) -> dict[str, Any]:
    """``layer_overhead_s``, ``decode_rate_bytes_per_s`` (type -> bytes/s) and ``decode_efficiency`` from the two
    reference models (one type, two depths) and one model per other type (of the first reference's depth).

    The reference pair is solved exactly for 1 / rate and the overhead (the overhead floored at 0 and the rate refitted
    alone when the pair implies a negative one); each other model's rate is its type's bytes over the time left once
    the layers' overhead and its other bytes (F32 norms, at the reference rate) are taken off.
    """
    import numpy as np

    ref_type = reference[0].qtype
    a = np.array([[sum(m.bytes_by_type.values()), m.n_layers] for m in reference], dtype=float)
    t = np.array([m.seconds_per_token for m in reference], dtype=float)
    (seconds_per_byte, overhead), *_ = np.linalg.lstsq(a, t, rcond=None)
    if overhead < 0:  # no per-layer time to see: all of it is streaming
        overhead = 0.0
        seconds_per_byte = float(a[:, 0] @ t / (a[:, 0] @ a[:, 0]))
    if seconds_per_byte <= 0:
        raise EdgeforgeError(f"the reference models' decode times ({', '.join(f'{s * 1e3:.2f} ms' for s in t)}) do "
                             f"not fit bytes / rate + layers x overhead; {_RERUN}")
    rates = {ref_type: 1.0 / float(seconds_per_byte)}
    for m in others:
        rest = sum(b for q, b in m.bytes_by_type.items() if q != m.qtype) * seconds_per_byte
        left = m.seconds_per_token - m.n_layers * overhead - rest
        if left <= 0:
            raise EdgeforgeError(f"the {m.qtype} calibration model decoded faster ({m.seconds_per_token * 1e3:.2f} "
                                 f"ms a token) than its layers' overhead alone; {_RERUN}")
        rates[m.qtype] = m.bytes_by_type[m.qtype] / left
    efficiency = min(1.0, statistics.median(rates.values()) / bandwidth_bytes_per_s)
    return {"decode_rate_bytes_per_s": rates, "layer_overhead_s": float(overhead), "decode_efficiency": efficiency}


def calibrate_profile(profile: DeviceProfile, models: list[Any]) -> DeviceProfile:
    """``profile`` (a detected one: measured bandwidth) with ``layer_overhead_s.cpu``, ``decode_rate_bytes_per_s.cpu``
    and ``decode_efficiency.cpu`` measured by device_bench on ``models``
    (``export.calibration_model.calibration_ggufs``: the two reference models first), and the measurement in its
    sources."""
    from edgeforge.bench.run import BenchOptions, TargetJob, run_benchmarks
    from edgeforge.bench.targets import resolve_target
    from edgeforge.models.refs import ModelRef, gguf_streamed_bytes_by_type, read_arch
    from edgeforge.plan.estimator import estimate_speed, mean_decode_depth
    from edgeforge.plan.sizing import kv_cache_bytes

    options = BenchOptions(repeats=CALIBRATION_REPEATS)  # more than a benchmark: every rate rests on one model
    results = run_benchmarks([m.path for m in models], [TargetJob(resolve_target("local"), profile)], options,
                             save=False)
    measured: list[DecodeMeasurement] = []
    notes: list[str] = []
    for model, result in zip(models, results, strict=True):
        decode, prefill = result.get("decode_tokens_per_s"), result.get("prefill_tokens_per_s")
        if not isinstance(decode, (int, float)) or decode <= 0:
            raise EdgeforgeError(f"device_bench returned no decode rate for the calibration model {model.label} at "
                                 f"{model.qtype}: {result}")
        arch: Any = read_arch(ModelRef("calibration", model.path, "gguf"))
        by_type: dict[str, float] = dict(gguf_streamed_bytes_by_type(model.path))
        kv = kv_cache_bytes(arch, round(mean_decode_depth(options.gen_tokens)))
        by_type["F16"] = by_type.get("F16", 0) + kv  # the cache is read too (F16, llama.cpp's default)
        measured.append(DecodeMeasurement(by_type, arch.n_layers, 1.0 / decode, model.qtype))
        note = (f"{model.label} at {model.qtype} ({model.path.stat().st_size / 1e6:.0f} MB): decode {decode:.1f} "
                "tokens/s")
        if len(notes) < 2:
            weights = model.path.stat().st_size
            estimate = estimate_speed(profile, arch, weights, options.prompt_tokens, "cpu", options.gen_tokens)
            note += (f", prefill {prefill:.0f} tokens/s (the fitted compute efficiency estimates "
                     f"{estimate.prefill_tokens_per_s:.0f})")
        notes.append(note)
    solved = solve_decode((measured[0], measured[1]), measured[2:], profile.memory_bandwidth_bytes_per_s)
    data = profile.model_dump(mode="json")
    data["decode_efficiency"] = {**data.get("decode_efficiency", {}), "cpu": round(solved["decode_efficiency"], 4)}
    data["layer_overhead_s"] = {**data.get("layer_overhead_s", {}), "cpu": float(f"{solved['layer_overhead_s']:.4g}")}
    data["decode_rate_bytes_per_s"] = {**data.get("decode_rate_bytes_per_s", {}), "cpu": {
        q: float(f"{r:.4g}") for q, r in solved["decode_rate_bytes_per_s"].items()}}
    data["description"] += "; decode calibrated with llama.cpp"
    data["sources"] = [s for s in data["sources"] if "decode_efficiency.cpu is 1.0" not in s] + [
        "layer_overhead_s.cpu, decode_rate_bytes_per_s.cpu and decode_efficiency.cpu are MEASURED by 'profiles "
        "detect --calibrate': seconds per token = sum of bytes / rate(type) + layers x overhead, solved through "
        f"synthetic models, every matrix at one type, decoded by device_bench with {results[0].get('threads')} "
        f"threads ({options.gen_tokens} tokens): " + "; ".join(notes)]
    return DeviceProfile.model_validate(data)
