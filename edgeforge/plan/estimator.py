"""Speed estimates from a device profile: a roofline with a per-layer overhead, one set of constants per backend.

Decode reads every weight it multiplies once per token: it takes the longer of streaming those bytes and doing their
arithmetic (the two overlap: the dot products run on data already fetched while the next rows stream in), plus a
fixed time per layer (kernel launches, thread barriers, command encoding) that does not shrink with the bytes:

    seconds_per_token = max(decode_bytes / (bandwidth_efficiency x bandwidth),
                            decode_flops / (compute_efficiency x compute))
                        + n_layers x layer_overhead_s

``decode_bytes`` are the weights without the token-embedding table of an untied model (decode gathers one row of it;
a tied model's table is the output matrix and is read whole), plus the KV cache at the mean depth of the measured
generation. ``decode_flops`` are 2 x the weights multiplied per token plus attention over the cache.

Prefill processes the prompt in one batch and is bound by compute; only the last position goes through the output
matrix (llama.cpp computes logits for it alone):

    prefill_tokens_per_s = compute_efficiency x compute / (2 x decoder-layer params + attention FLOPs per token)

Decode's dot products are prefill's arithmetic on one row at a time, so they share the one compute efficiency; for
decode it only binds on cores too slow to keep up with their memory (a memory-bound decode never reaches it).

``compute`` is the CPU's int8 throughput for the ``cpu`` backend (llama.cpp's quantized matmuls run in int8), the
NPU's rate for ``npu``, and the GPU's dense FP16 throughput otherwise. The constants are general per backend, never
per device: :data:`SPEED_CONSTANTS` is the output of ``benchmarks/fit_estimator.py`` (least squares on the log ratio
over the published measurements of ``benchmarks/data/speed_measurements.yaml``; ``tests/test_estimator.py`` checks
the leave-one-out error). A profile may override the bandwidth efficiency, e.g. ``profiles detect``, whose bandwidth
is measured and so is taken at face value (1.0), and the per-layer overhead. ``profiles detect --calibrate`` measures
both and a decode rate per GGML type (``decode_rate_bytes_per_s``) on synthetic models of other shapes
(edgeforge.bench.calibrate): on a few CPU cores llama.cpp's decode is bound by each type's dequantizing dot product,
not by the bandwidth (on 2 AMD EPYC cores Q5_0 weights read at about half Q4_K's bytes/s), so with such a profile and
the bytes by type of the file (or of the planned mix) each type is read at its own rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgeforge.models.refs import ModelArch
from edgeforge.plan.profiles import Backend, DeviceProfile
from edgeforge.plan.sizing import kv_cache_bytes

#: Tokens device_bench decodes by default (``--gen-tokens``): its decode rate, and so the estimate's, is the mean
#: over a generation from an empty cache of this many tokens.
DEFAULT_DECODE_TOKENS = 64


@dataclass(frozen=True)
class BackendConstants:
    """The fitted constants of one backend (see the module docstring for where each enters)."""

    bandwidth_efficiency: float  # fraction of the memory bandwidth decode streams the weights at
    layer_overhead_s: float  # fixed time per decoder layer per decoded token
    compute_efficiency: float  # fraction of peak compute the matmuls reach (a batched prompt; decode's dot products)

# Output of benchmarks/fit_estimator.py on 2026-12-02 (69 published rows).
SPEED_CONSTANTS: dict[str, BackendConstants] = {
    "cpu": BackendConstants(0.441, 2e-05, 0.166),  # 10 rows; layer_overhead_s held at its nominal value
    "cuda": BackendConstants(0.699, 2.59e-05, 0.791),  # 14 rows
    "vulkan": BackendConstants(0.677, 2.07e-05, 0.231),  # 7 rows
    "metal": BackendConstants(0.871, 0.000164, 0.635),  # 37 rows
    "opencl": BackendConstants(0.627, 6.23e-05, 0.0184),  # 1 rows
    "npu": BackendConstants(0.758, 6.19e-05, 0.57),  # no rows: the pooled GPU fit
}


@dataclass(frozen=True)
class SpeedEstimate:
    backend: str
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    ttft_ms: float
    prompt_tokens: int


def device_compute_ops_per_s(profile: DeviceProfile, backend: str) -> float:
    """The throughput ``backend``'s matmuls run at on ``profile``.

    The CPU's int8 ops/s for ``cpu``; for ``npu`` the first NPU's rate; for a GPU backend (cuda, vulkan, metal,
    opencl) the first GPU's FP16 FLOP/s. A profile without the matching accelerator falls back to the CPU.
    """
    kind = "npu" if backend == "npu" else "gpu"
    if backend != "cpu":
        for accelerator in profile.accelerators:
            if accelerator.kind == kind:
                return accelerator.fp16_flops_per_s
    return profile.cpu.int8_ops_per_s


def decode_bandwidth_efficiency(profile: DeviceProfile, backend: str) -> float:
    """The profile's override for ``backend`` (e.g. a measured bandwidth: 1.0), else the fitted constant."""
    return profile.decode_efficiency.get(backend, SPEED_CONSTANTS[backend].bandwidth_efficiency)  # type: ignore[call-overload]


def mean_decode_depth(decode_tokens: int, decode_depth: int = 0) -> float:
    """Mean KV-cache length over ``decode_tokens`` decoded one at a time after ``decode_depth`` cached tokens."""
    return decode_depth + decode_tokens / 2


def decode_bytes_per_token(arch: ModelArch, weights_bytes: float, kv_tokens: float) -> float:
    """Bytes one decoded token reads: the weights it multiplies plus the KV cache of ``kv_tokens`` positions.

    An untied model's token-embedding table is a lookup (one row per token), so its share of ``weights_bytes``
    (taken in proportion to its parameters) is not streamed; a tied table doubles as the output matrix and is.
    """
    untouched_params = 0 if arch.tied_embeddings else arch.embedding_params - arch.hidden_size
    return weights_bytes * (1 - untouched_params / arch.n_params) + kv_cache_bytes(arch, round(kv_tokens))


def rate_weighted_bytes(bytes_by_type: Mapping[str, float], rates_bytes_per_s: Mapping[str, float],
                        reference_bytes_per_s: float) -> float:
    """The bytes that, streamed at ``reference_bytes_per_s``, take as long as ``bytes_by_type`` read at each type's
    measured rate (a type without one at the reference rate)."""
    return sum(b * reference_bytes_per_s / rates_bytes_per_s.get(t, reference_bytes_per_s)
               for t, b in bytes_by_type.items())


def attention_flops_per_token(arch: ModelArch, context_tokens: float) -> float:
    """QK^T and AV over ``context_tokens`` cached positions: 2 x 2 x n_layers x (n_heads x head_dim) each."""
    return 4.0 * arch.n_layers * arch.n_heads * arch.head_dim * context_tokens


def decode_flops_per_token(arch: ModelArch, kv_tokens: float) -> float:
    """2 x every multiplied weight (the output matrix included, an untied embedding lookup not) plus attention."""
    multiplied = arch.n_params - (0 if arch.tied_embeddings else arch.embedding_params)
    return 2.0 * multiplied + attention_flops_per_token(arch, kv_tokens)


def prefill_flops_per_token(arch: ModelArch, prompt_tokens: int) -> float:
    """2 x the decoder-layer weights plus attention over half the prompt (the mean context of a causal prompt)."""
    return 2.0 * arch.n_layers * arch.layer_params + attention_flops_per_token(arch, prompt_tokens / 2)


def decode_seconds_per_token(
    decode_bytes: float,
    bandwidth_bytes_per_s: float,
    n_layers: float,
    decode_flops: float,
    compute_ops_per_s: float,
    constants: BackendConstants,
    bandwidth_efficiency: float | None = None,
) -> float:
    """The decode formula of the module docstring. numpy arrays work as arguments too; a NaN compute (a device whose
    rate no source gives) leaves the memory term alone (``fmax`` ignores NaN)."""
    efficiency = constants.bandwidth_efficiency if bandwidth_efficiency is None else bandwidth_efficiency
    memory_s = decode_bytes / (efficiency * bandwidth_bytes_per_s)
    compute_s = decode_flops / (constants.compute_efficiency * compute_ops_per_s)
    return np.fmax(memory_s, compute_s) + n_layers * constants.layer_overhead_s


def prefill_tokens_per_s(arch: ModelArch, prompt_tokens: int, compute_ops_per_s: float,
                         constants: BackendConstants) -> float:
    """One batch of ``prompt_tokens``: the compute formula of the module docstring."""
    return constants.compute_efficiency * compute_ops_per_s / prefill_flops_per_token(arch, prompt_tokens)


def estimate_speed(
    profile: DeviceProfile,
    arch: ModelArch,
    weights_bytes: int,
    prompt_tokens: int = 128,
    backend: Backend | None = None,
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    streamed_bytes_by_type: Mapping[str, float] | None = None,
) -> SpeedEstimate:
    """Decode and prefill tokens/s and TTFT for ``arch`` stored in ``weights_bytes`` on ``profile``.

    Decode is the mean rate over ``decode_tokens`` tokens generated from an empty cache, as device_bench and
    llama-bench's ``tg`` measure it; prefill is one batch of ``prompt_tokens``. ``streamed_bytes_by_type``: the
    bytes a token reads by GGML type (``sizing.gguf_bytes_by_type(..., streamed_only=True)`` or
    ``models.refs.gguf_streamed_bytes_by_type``); with a profile that measured per-type decode rates for the backend
    (``decode_rate_bytes_per_s``), each type's bytes are read at its own rate.
    """
    backend = backend or profile.primary_runtime.backend
    constants = SPEED_CONSTANTS[backend]
    if backend in profile.layer_overhead_s:  # measured on this device (profiles detect --calibrate)
        constants = BackendConstants(constants.bandwidth_efficiency, profile.layer_overhead_s[backend],  # type: ignore[index]
                                     constants.compute_efficiency)
    compute = device_compute_ops_per_s(profile, backend)
    kv_tokens = mean_decode_depth(decode_tokens)
    efficiency = decode_bandwidth_efficiency(profile, backend)
    rates = profile.decode_rate_bytes_per_s.get(backend)  # type: ignore[call-overload]
    if rates and streamed_bytes_by_type:
        decode_bytes = (rate_weighted_bytes(streamed_bytes_by_type, rates,
                                            efficiency * profile.memory_bandwidth_bytes_per_s)
                        + kv_cache_bytes(arch, round(kv_tokens)))
    else:
        decode_bytes = decode_bytes_per_token(arch, weights_bytes, kv_tokens)
    seconds_per_token = float(decode_seconds_per_token(
        decode_bytes, profile.memory_bandwidth_bytes_per_s, arch.n_layers, decode_flops_per_token(arch, kv_tokens),
        compute, constants, efficiency))
    prefill = prefill_tokens_per_s(arch, prompt_tokens, compute, constants)
    ttft_ms = 1000.0 * (prompt_tokens / prefill + seconds_per_token)
    return SpeedEstimate(backend, 1.0 / seconds_per_token, prefill, ttft_ms, prompt_tokens)
