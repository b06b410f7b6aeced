"""Speed estimates from a device profile: a two-term roofline with one set of constants per backend.

Decode reads every weight once per token, so it is bound by memory bandwidth; on small CPU cores the
dequantize-and-dot work adds a compute term that cannot fully overlap with the memory traffic:

    seconds_per_token = bytes_read / (eff_bw[backend] * bandwidth) + 2 * n_params / (eff_c[backend] * compute)

Prefill processes the prompt in one batch and is bound by compute:

    prefill_tokens_per_s = eff_prefill[backend] * compute / (2 * n_params + attention FLOPs per token)

``compute`` is the CPU's int8 throughput for the ``cpu`` backend (llama.cpp's quantized matmuls run in int8) and
the accelerator's dense FP16 throughput otherwise. The efficiencies are general constants per backend, fitted once
to the whole calibration table (edgeforge.plan.calibration; tests/test_estimator.py checks every row), never per
device. A profile may override the bandwidth efficiency, e.g. with the figure ``profiles detect`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeforge.models.refs import ModelArch
from edgeforge.plan.profiles import Backend, DeviceProfile
from edgeforge.plan.sizing import kv_cache_bytes

# Fraction of theoretical memory bandwidth decode achieves.
DECODE_BANDWIDTH_EFFICIENCY: dict[str, float] = {
    "cpu": 0.55, "cuda": 0.5, "vulkan": 0.55, "metal": 0.8, "opencl": 0.4, "npu": 0.4,
}
# Fraction of peak compute decode's matrix-vector work achieves (it is latency-bound, hence low).
DECODE_COMPUTE_EFFICIENCY: dict[str, float] = {
    "cpu": 0.2, "cuda": 0.5, "vulkan": 0.5, "metal": 0.5, "opencl": 0.3, "npu": 0.3,
}
# Fraction of peak compute a batched prompt achieves.
PREFILL_COMPUTE_EFFICIENCY: dict[str, float] = {
    "cpu": 0.155, "cuda": 0.6, "vulkan": 0.5, "metal": 0.6, "opencl": 0.3, "npu": 0.3,
}


@dataclass(frozen=True)
class SpeedEstimate:
    backend: str
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    ttft_ms: float
    prompt_tokens: int


def device_compute_ops_per_s(profile: DeviceProfile, backend: str) -> float:
    """The throughput the backend's matmuls run at: CPU int8 ops/s, or the first accelerator's FP16 FLOP/s."""
    if backend == "cpu" or not profile.accelerators:
        return profile.cpu.int8_ops_per_s
    return profile.accelerators[0].fp16_flops_per_s


def decode_bandwidth_efficiency(profile: DeviceProfile, backend: str) -> float:
    return profile.decode_efficiency.get(backend, DECODE_BANDWIDTH_EFFICIENCY[backend])  # type: ignore[call-overload]


def estimate_speed(
    profile: DeviceProfile,
    arch: ModelArch,
    weights_bytes: int,
    prompt_tokens: int = 128,
    backend: Backend | None = None,
) -> SpeedEstimate:
    """Decode and prefill tokens/s and TTFT for ``arch`` stored in ``weights_bytes`` on ``profile``.

    Bytes read per decoded token are the weights plus the KV cache at the middle of a short generation.
    """
    backend = backend or profile.primary_runtime.backend
    compute = device_compute_ops_per_s(profile, backend)
    flops_per_token = 2.0 * arch.n_params
    bytes_per_token = weights_bytes + kv_cache_bytes(arch, prompt_tokens + 32)
    seconds_per_token = bytes_per_token / (
        decode_bandwidth_efficiency(profile, backend) * profile.memory_bandwidth_bytes_per_s
    ) + flops_per_token / (DECODE_COMPUTE_EFFICIENCY[backend] * compute)
    decode = 1.0 / seconds_per_token
    # Attention adds 2 x 2 x n_layers x (n_heads x head_dim) FLOPs per token per context position (QK^T and AV);
    # over a prompt, the mean context is half its length.
    attn_flops = 4.0 * arch.n_layers * arch.n_heads * arch.head_dim * (prompt_tokens / 2)
    prefill = PREFILL_COMPUTE_EFFICIENCY[backend] * compute / (flops_per_token + attn_flops)
    ttft_ms = 1000.0 * (prompt_tokens / prefill + seconds_per_token)
    return SpeedEstimate(backend, decode, prefill, ttft_ms, prompt_tokens)
