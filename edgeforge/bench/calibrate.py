"""Calibrate a detected profile with llama.cpp's own kernels: what decode and prefill really reach on this CPU.

``profiles detect`` measures the read bandwidth with a float32 matrix-vector product and takes the int8 peak from
the ISA table; llama.cpp's quantized kernels reach neither on every CPU (on a 2-core AMD EPYC VM: 8-10 GB/s of
Q4_K_M weights against 25 GB/s measured, and about a tenth of the int8 peak in prefill), so the estimate was
2.3-2.7x the measured decode there. This module measures the two efficiencies the estimator uses instead of
assuming them, on a **synthetic model of another shape** than anything it is later asked about (8 layers, hidden
1,024: wider and shallower than the bundled teacher and its students), so an estimate it then makes for a real
model is a prediction, not the calibration read back:

- a random Llama of ``export.calibration_model.CALIBRATION_SHAPE`` with the bundled teacher's tokenizer,
  converted by llama.cpp's own converter and quantized to Q4_K_M (``export gguf``; made by the caller: export and
  bench are one layer), benchmarked by device_bench (``bench --target local``);
- ``compute_efficiency.cpu`` = measured prefill tokens/s x prefill FLOPs per token / the profile's int8 ops/s;
- ``decode_efficiency.cpu`` = the bytes one decoded token reads / (the profile's bandwidth x (measured seconds per
  token - the fitted per-layer overhead)): the share of the measured bandwidth llama.cpp's decode streams at.

Both are written into the profile with the measurement in its sources. Costs about a minute on 2 cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeforge.errors import EdgeforgeError
from edgeforge.plan.profiles import DeviceProfile


def efficiencies(profile: DeviceProfile, arch: Any, weights_bytes: int, decode_tokens_per_s: float,
                 prefill_tokens_per_s: float, prompt_tokens: int, decode_tokens: int) -> dict[str, float]:
    """The bandwidth and compute efficiencies that make the estimator reproduce the measured rates of ``arch``."""
    from edgeforge.plan.estimator import (
        SPEED_CONSTANTS,
        decode_bytes_per_token,
        mean_decode_depth,
        prefill_flops_per_token,
    )

    constants = SPEED_CONSTANTS["cpu"]
    compute = profile.cpu.int8_ops_per_s
    compute_efficiency = prefill_tokens_per_s * prefill_flops_per_token(arch, prompt_tokens) / compute
    streaming_s = 1.0 / decode_tokens_per_s - arch.n_layers * constants.layer_overhead_s
    if streaming_s <= 0:
        raise EdgeforgeError(f"the calibration model decoded at {decode_tokens_per_s:.0f} tokens/s, faster than the "
                             "per-layer overhead alone allows; the measurement is off: run profiles detect again")
    bytes_per_token = decode_bytes_per_token(arch, weights_bytes, mean_decode_depth(decode_tokens))
    decode_efficiency = bytes_per_token / (profile.memory_bandwidth_bytes_per_s * streaming_s)
    return {"decode_efficiency": min(1.0, decode_efficiency), "compute_efficiency": min(1.0, compute_efficiency)}


def calibrate_profile(profile: DeviceProfile, gguf: Path, what: str) -> DeviceProfile:
    """``profile`` (a detected one: measured bandwidth) with ``decode_efficiency.cpu`` and ``compute_efficiency.cpu``
    measured by device_bench on ``gguf`` (``export.calibration_model.calibration_gguf``, described by ``what``),
    and the measurement in its sources."""
    from edgeforge.bench.run import BenchOptions, TargetJob, run_benchmarks
    from edgeforge.bench.targets import resolve_target
    from edgeforge.models.refs import ModelRef, read_arch

    options = BenchOptions()
    arch = read_arch(ModelRef("calibration", gguf, "gguf"))
    (result,) = run_benchmarks([gguf], [TargetJob(resolve_target("local"), profile)], options, save=False)
    weights = gguf.stat().st_size
    decode, prefill = result.get("decode_tokens_per_s"), result.get("prefill_tokens_per_s")
    if not isinstance(decode, (int, float)) or not isinstance(prefill, (int, float)) or decode <= 0 or prefill <= 0:
        raise EdgeforgeError(f"device_bench returned no decode/prefill rate for the calibration model: {result}")
    eff = efficiencies(profile, arch, weights, decode, prefill, options.prompt_tokens, options.gen_tokens)
    data = profile.model_dump(mode="json")
    data["decode_efficiency"] = {**data.get("decode_efficiency", {}), "cpu": round(eff["decode_efficiency"], 4)}
    data["compute_efficiency"] = {**data.get("compute_efficiency", {}), "cpu": round(eff["compute_efficiency"], 4)}
    data["description"] += "; calibrated with llama.cpp"
    sources = [s for s in data["sources"] if "decode_efficiency.cpu is 1.0" not in s]
    sources.append(
        f"decode_efficiency.cpu and compute_efficiency.cpu are MEASURED by 'profiles detect --calibrate': {what} "
        f"({weights / 1e6:.0f} MB) decoded at {decode:.1f} tokens/s and prefilled {prefill:.0f} "
        f"tokens/s ({options.prompt_tokens}-token prompt) in device_bench with {result.get('threads')} threads: "
        f"{eff['decode_efficiency']:.3f} of the measured bandwidth, {eff['compute_efficiency']:.3f} of the int8 peak")
    data["sources"] = sources
    return DeviceProfile.model_validate(data)
