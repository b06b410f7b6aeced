"""The speed estimator against published measurements it was not fitted to, and the inputs it takes.

The cross-validated errors are recomputed here from the committed rows (benchmarks/data/speed_measurements.yaml):
leave-one-out refits every constant without the row it then predicts (numpy only, a few seconds). The goal is a
median absolute decode error of 15% or less and a worst of 35% or less. The median is met; the worst is not (the
Raspberry Pi 4 and the Apple chips' CPU cores reach a smaller share of their data-sheet bandwidth than other CPUs;
llama.cpp reached about half the Jetson AGX Orin's bandwidth; see the README's "Estimator calibration"), so the
worst-case bounds below are the errors reached: lower them, never raise them, as rows and physics are added.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from edgeforge.errors import BadInputError
from edgeforge.models.refs import arch_from_config
from edgeforge.plan import estimator
from edgeforge.plan.calibration import LLAMA_3_2_3B, TINYLLAMA_1_1B, load_measurements
from edgeforge.plan.detect import detect_profile
from edgeforge.plan.estimator import (
    SPEED_CONSTANTS,
    decode_bytes_per_token,
    device_compute_ops_per_s,
    estimate_speed,
)
from edgeforge.plan.profiles import load_registry
from edgeforge.plan.sizing import gguf_file_bytes, kv_cache_bytes
from edgeforge.plan.speed_fit import (
    fit_constants,
    leave_one_device_out,
    leave_one_out,
    summarize_errors,
)

TABLE = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "speed_measurements.yaml"
GOAL_MEDIAN = 0.15
#: Reached by the committed rows and constants (benchmarks/fit_estimator.py prints them); the goal is 0.35.
REACHED_LOO_WORST = 0.82
REACHED_LODO_WORST = 1.00


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def rows(registry):
    return load_measurements(TABLE, registry)


@pytest.fixture(scope="module")
def loo(rows):
    return leave_one_out(rows)


def _overall(rows, estimated, which="decode"):
    measured = np.array([r.decode_tokens_per_s if which == "decode" else (r.prefill_tokens_per_s or math.nan)
                         for r in rows])
    return {s.scope: s for s in summarize_errors([r.backend for r in rows], estimated, measured)}


def test_table_covers_the_backends_with_sourced_rows(rows):
    assert len(rows) >= 40
    assert {"cpu", "cuda", "vulkan", "metal", "opencl"} <= {r.backend for r in rows}
    assert all(r.source.startswith("https://") for r in rows)


def test_leave_one_out_decode_error(rows, loo):
    summary = _overall(rows, loo[0])["all"]
    assert summary.median <= GOAL_MEDIAN, summary
    assert summary.worst <= REACHED_LOO_WORST, summary


def test_leave_one_device_out_decode_error(rows):
    summary = _overall(rows, leave_one_device_out(rows)[0])["all"]
    assert summary.median <= GOAL_MEDIAN, summary
    assert summary.worst <= REACHED_LODO_WORST, summary


def test_leave_one_out_prefill_error_on_gpus(rows, loo):
    by_backend = _overall(rows, loo[1], "prefill")
    for backend in ("cuda", "metal"):
        assert by_backend[backend].median <= GOAL_MEDIAN, by_backend[backend]


def test_constants_are_the_fit_of_the_committed_rows(rows):
    """SPEED_CONSTANTS is benchmarks/fit_estimator.py's output (3 significant digits), not hand-tuned."""
    fitted = fit_constants(rows)
    for backend, pasted in SPEED_CONSTANTS.items():
        for field in dataclasses.fields(pasted):
            got, want = getattr(pasted, field.name), getattr(fitted[backend], field.name)
            assert got == pytest.approx(want, rel=5e-3), (backend, field.name)


def test_accelerator_matches_the_backend(registry):
    """The NPU runtime is estimated with the NPU's rate, not the first accelerator's (the GPU's)."""
    m2 = registry.get("apple-m2-8gb")
    gpu, npu = (next(a for a in m2.accelerators if a.kind == k) for k in ("gpu", "npu"))
    assert device_compute_ops_per_s(m2, "npu") == npu.fp16_flops_per_s
    assert device_compute_ops_per_s(m2, "metal") == gpu.fp16_flops_per_s
    assert device_compute_ops_per_s(m2, "cpu") == m2.cpu.int8_ops_per_s


def test_detected_bandwidth_is_not_discounted_twice():
    """``profiles detect`` measures an achieved bandwidth: decode streams at it, with no efficiency applied."""
    p = detect_profile(bandwidth_size_bytes=32 * 2**20)
    assert p.decode_efficiency == {"cpu": 1.0}
    assert any("MEASURED" in s for s in p.sources)
    arch = arch_from_config(TINYLLAMA_1_1B)
    weights = gguf_file_bytes(arch, "Q8_0")
    memory_only = estimator.BackendConstants(0.3, 0.0, 1e6)  # an efficiency the override must replace; no compute bound
    saved = SPEED_CONSTANTS["cpu"]
    try:
        SPEED_CONSTANTS["cpu"] = memory_only
        est = estimate_speed(p, arch, weights, backend="cpu")
    finally:
        SPEED_CONSTANTS["cpu"] = saved
    kv_tokens = estimator.DEFAULT_DECODE_TOKENS / 2
    seconds = decode_bytes_per_token(arch, weights, kv_tokens) / p.memory_bandwidth_bytes_per_s
    assert est.decode_tokens_per_s == pytest.approx(1 / seconds)


def test_decode_depth_is_device_benchs_not_the_prompts(registry):
    """device_bench decodes from an empty cache: the decode estimate does not depend on the prompt length."""
    p, arch = registry.get("raspberry-pi-5-8gb"), arch_from_config(LLAMA_3_2_3B)
    size = gguf_file_bytes(arch, "Q4_K_M")
    short, long = (estimate_speed(p, arch, size, prompt_tokens=n).decode_tokens_per_s for n in (16, 4096))
    assert short == long
    deep = estimate_speed(p, arch, size, decode_tokens=4096).decode_tokens_per_s
    assert deep < short  # a longer generation reads a deeper cache


def test_untied_models_read_one_embedding_row_per_token():
    untied = arch_from_config(TINYLLAMA_1_1B)
    tied = dataclasses.replace(untied, tied_embeddings=True, n_params=untied.n_params - untied.embedding_params)
    weights = gguf_file_bytes(untied, "Q8_0")
    table_share = (untied.embedding_params - untied.hidden_size) / untied.n_params
    assert decode_bytes_per_token(untied, weights, 0) == pytest.approx(weights * (1 - table_share))
    assert decode_bytes_per_token(tied, weights, 64) == weights + kv_cache_bytes(tied, 64)


def test_bandwidth_override_scales_decode(registry):
    p = registry.get("raspberry-pi-5-8gb")
    arch = arch_from_config(TINYLLAMA_1_1B)
    size = gguf_file_bytes(arch, "Q8_0")
    base = estimate_speed(p, arch, size).decode_tokens_per_s
    faster = estimate_speed(p.model_copy(update={"decode_efficiency": {"cpu": 0.99}}), arch, size)
    assert faster.decode_tokens_per_s > base


@pytest.mark.parametrize("row, message", [
    ("{device: no-such-device, backend: cpu, model: llama-2-7b, quant: Q4_0, decode_tokens_per_s: 1, source: s}",
     "device 'no-such-device'"),
    ("{device: raspberry-pi-5-8gb, backend: cpu, model: gpt-9, quant: Q4_0, decode_tokens_per_s: 1, source: s}",
     "unknown model 'gpt-9'"),
    ("{device: raspberry-pi-5-8gb, backend: cpu, model: llama-2-7b, quant: Q4_0, decode_tokens_per_s: 1, source: s, "
     "tokens: 3}", "tokens"),
])
def test_table_errors_name_the_row(tmp_path, registry, row, message):
    path = tmp_path / "table.yaml"
    path.write_text(f"measurements:\n  - {row}\n")
    with pytest.raises(BadInputError, match=message):
        load_measurements(path, registry)


def test_calibrated_decode_constants_reproduce_the_measurements_and_predict_another_model():
    """``profiles detect --calibrate``'s solve: from synthetic models' decode times (made here by known per-type read
    rates and a per-layer time) it recovers both, and the profile it writes then predicts another model's decode
    from the bytes by type of its planned mix (a 576-wide model: Q4_K_M's matrices fall back to Q5_0 and Q8_0)."""
    import dataclasses as dc

    from edgeforge.bench.calibrate import DecodeMeasurement, solve_decode
    from edgeforge.plan.sizing import gguf_bytes_by_type

    p = detect_profile(bandwidth_size_bytes=32 * 2**20)
    bandwidth, overhead = p.memory_bandwidth_bytes_per_s, 1.2e-4
    rates = {"Q4_K": 0.6 * bandwidth, "Q5_0": 0.3 * bandwidth, "Q8_0": 0.5 * bandwidth, "Q6_K": 0.4 * bandwidth}

    def seconds(by_type: dict[str, float], layers: int) -> float:
        return sum(b / rates.get(q, rates["Q4_K"]) for q, b in by_type.items()) + layers * overhead

    def model(qtype: str, weights: float, layers: int) -> DecodeMeasurement:
        by_type = {qtype: weights, "F32": 1e5}
        return DecodeMeasurement(by_type, layers, seconds(by_type, layers), qtype)

    solved = solve_decode((model("Q4_K", 90e6, 8), model("Q4_K", 40e6, 24)),
                          [model(q, 90e6 * f, 8) for q, f in (("Q5_0", 1.2), ("Q8_0", 1.9), ("Q6_K", 1.5))],
                          bandwidth)
    assert solved["layer_overhead_s"] == pytest.approx(overhead)
    assert solved["decode_rate_bytes_per_s"] == pytest.approx(rates)
    assert solved["decode_efficiency"] == pytest.approx(0.45)  # the median rate over the bandwidth

    data = p.model_dump(mode="json")
    data["decode_efficiency"] = {"cpu": solved["decode_efficiency"]}
    data["layer_overhead_s"] = {"cpu": solved["layer_overhead_s"]}
    data["decode_rate_bytes_per_s"] = {"cpu": solved["decode_rate_bytes_per_s"]}
    calibrated = type(p).model_validate(data)
    arch = arch_from_config({**TINYLLAMA_1_1B, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
                             "num_hidden_layers": 30, "tie_word_embeddings": True})
    by_type = gguf_bytes_by_type(arch, "Q4_K_M", streamed_only=True)
    assert by_type["Q5_0"] > by_type.get("Q4_K", 0)  # the fallback is what the file mostly holds
    weights = gguf_file_bytes(arch, "Q4_K_M")
    saved = SPEED_CONSTANTS["cpu"]
    try:  # no compute bound, so the decode is the measured constants' alone
        SPEED_CONSTANTS["cpu"] = dc.replace(saved, compute_efficiency=1e6)
        est = estimate_speed(calibrated, arch, weights, backend="cpu", streamed_bytes_by_type=by_type)
        by_total = estimate_speed(calibrated, arch, weights, backend="cpu")
    finally:
        SPEED_CONSTANTS["cpu"] = saved
    kv = kv_cache_bytes(arch, round(estimator.DEFAULT_DECODE_TOKENS / 2))
    expected = seconds(by_type, 30) + kv / (solved["decode_efficiency"] * bandwidth)
    f32 = by_type["F32"] * (1 / rates["Q4_K"] - 1 / (solved["decode_efficiency"] * bandwidth))  # F32: no rate here
    assert 1 / est.decode_tokens_per_s == pytest.approx(expected - f32)
    assert by_total.decode_tokens_per_s != pytest.approx(est.decode_tokens_per_s, rel=0.02)  # the types matter


def test_a_file_is_read_by_the_types_it_holds(tmp_path: Path):
    """``gguf_streamed_bytes_by_type`` of a written GGUF: its tensors' bytes by type, an untied table left out."""
    from gguf import GGUFWriter

    from edgeforge.models.refs import gguf_streamed_bytes_by_type

    path = tmp_path / "m.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float16))
    w.add_tensor("output.weight", np.zeros((64, 32), dtype=np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.zeros(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_streamed_bytes_by_type(path) == {"F16": 64 * 32 * 2, "F32": 32 * 4}


def test_a_decode_rate_that_is_not_positive_is_refused():
    p = detect_profile(bandwidth_size_bytes=32 * 2**20)
    data = p.model_dump(mode="json")
    data["decode_rate_bytes_per_s"] = {"cpu": {"Q4_K": 0}}
    with pytest.raises(ValueError, match=r"decode_rate_bytes_per_s\[cpu\]\[Q4_K\] must be > 0"):
        type(p).model_validate(data)


def test_a_layer_overhead_out_of_range_is_refused():
    p = detect_profile(bandwidth_size_bytes=32 * 2**20)
    data = p.model_dump(mode="json")
    data["layer_overhead_s"] = {"cpu": 0.5}
    with pytest.raises(ValueError, match=r"layer_overhead_s\[cpu\] must be in \[0, 0.01\)"):
        type(p).model_validate(data)


@pytest.mark.integration  # synthetic models at 12 types through llama.cpp and device_bench: about three minutes
def test_profiles_detect_calibrate_measures_the_decode_constants(tmp_path: Path):
    from click.testing import CliRunner

    from edgeforge.cli.app import cli
    from edgeforge.plan.profiles import load_profile_file

    out = tmp_path / "calibrated.yaml"
    r = CliRunner().invoke(cli, ["profiles", "detect", "--calibrate", "--out", str(out)])
    assert r.exit_code == 0, r.output
    p = load_profile_file(out)
    assert 0 < p.decode_efficiency["cpu"] <= 1 and 0 <= p.layer_overhead_s["cpu"] < 0.01
    from edgeforge.export.calibration_model import CALIBRATION_TYPES

    assert set(p.decode_rate_bytes_per_s["cpu"]) == set(CALIBRATION_TYPES)
    assert any("profiles detect --calibrate" in s and "tokens/s" in s for s in p.sources)
    assert not any("decode_efficiency.cpu is 1.0" in s for s in p.sources)
