"""Fitting the speed estimator's constants to published measurements, and cross-validating them.

numpy only (plan never imports torch, and scipy is not a dependency): a damped Gauss-Newton (Levenberg-Marquardt)
least squares on log(estimated / measured), in log-parameter space so every constant stays positive.

Decode is fitted per backend on its rows: the bandwidth efficiency, the per-layer overhead, and for ``cpu`` the
compute efficiency. Backends share a prior: the GPU backends' constants are pulled towards one pooled fit over all
GPU rows (weakly: it decides only where a backend has too few rows to say), so a backend with one published row, or
none (``npu``), still gets constants from data. Prefill has one constant per backend, the compute efficiency: the
geometric mean of the rows' implied efficiencies, pulled the same way towards the pooled GPU value.

Cross-validation refits everything without the held-out rows: leave-one-out holds out one row at a time,
leave-one-device-out every row of one device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from edgeforge.plan.calibration import Measurement
from edgeforge.plan.estimator import (
    BackendConstants,
    decode_bytes_per_token,
    decode_flops_per_token,
    decode_seconds_per_token,
    mean_decode_depth,
    prefill_flops_per_token,
)

GPU_BACKENDS = ("cuda", "vulkan", "metal", "opencl")
ALL_BACKENDS = ("cpu", *GPU_BACKENDS, "npu")
#: The decode constants in the order of a parameter vector.
DECODE_PARAMETERS = ("bandwidth_efficiency", "layer_overhead_s", "decode_compute_efficiency")
#: Where the search starts, and the value of a constant that is held rather than fitted.
NOMINAL_DECODE = (0.7, 20e-6, 0.3)
NOMINAL_PREFILL = 0.3
#: Which decode constants each backend fits. A GPU fits its bandwidth efficiency and per-layer overhead; it has no
#: compute term (at batch 1 its matrix-vector work hides under the memory traffic). The CPU fits its bandwidth and
#: compute efficiencies (small cores show their dequantize-and-dot work); its per-layer overhead (thread barriers,
#: about a microsecond per graph op) is held at the nominal 20 us: every published CPU row is a model of 1.1B
#: parameters or more on slow cores, where a per-layer cost cannot be told apart from the bandwidth, and a free fit
#: turns the spread of the CPUs' reachable bandwidth into a 0.65 ms "overhead" that a small model on a fast core
#: then pays 30 times over.
FITTED_DECODE = {
    "cpu": ("bandwidth_efficiency", "decode_compute_efficiency"),
    **{b: ("bandwidth_efficiency", "layer_overhead_s") for b in (*GPU_BACKENDS, "npu")},
}
#: Prior weights, per unit of log-deviation, against residuals that are log ratios: NOMINAL_WEIGHT only keeps an
#: unidentifiable constant finite; POOL_WEIGHT makes a factor-2 departure from the pooled GPU fit cost about as much
#: as one row off by 10%.
NOMINAL_WEIGHT = 0.02
POOL_WEIGHT = 0.15


@dataclass(frozen=True)
class DecodeInputs:
    """The decode rows as arrays: bytes and FLOPs per token, the device's bandwidth and compute, the measurement."""

    bytes_per_token: np.ndarray
    bandwidth: np.ndarray
    layers: np.ndarray
    flops_per_token: np.ndarray
    compute: np.ndarray  # nan where no source gives it
    measured: np.ndarray


def decode_inputs(rows: Sequence[Measurement]) -> DecodeInputs:
    def kv(r: Measurement) -> float:
        return mean_decode_depth(r.decode_tokens, r.decode_depth)

    return DecodeInputs(
        bytes_per_token=np.array([decode_bytes_per_token(r.arch, r.weights_bytes, kv(r)) for r in rows]),
        bandwidth=np.array([r.bandwidth_bytes_per_s for r in rows]),
        layers=np.array([float(r.arch.n_layers) for r in rows]),
        flops_per_token=np.array([decode_flops_per_token(r.arch, kv(r)) for r in rows]),
        compute=np.array([r.compute_ops_per_s or math.nan for r in rows]),
        measured=np.array([r.decode_tokens_per_s for r in rows]),
    )


def _decode_constants(log_params: np.ndarray, backend: str, prefill: float = NOMINAL_PREFILL) -> BackendConstants:
    """BackendConstants from a full log-parameter vector (DECODE_PARAMETERS order); no compute term unless fitted."""
    values = np.exp(log_params)
    compute = float(values[2]) if "decode_compute_efficiency" in FITTED_DECODE[backend] else None
    return BackendConstants(float(values[0]), float(values[1]), compute, prefill)


def estimate_decode(inputs: DecodeInputs, constants: BackendConstants) -> np.ndarray:
    """Tokens/s of every row under ``constants`` (the estimator's own formula, on arrays)."""
    seconds = decode_seconds_per_token(inputs.bytes_per_token, inputs.bandwidth, inputs.layers,
                                       inputs.flops_per_token, inputs.compute, constants)
    return 1.0 / seconds


def levenberg_marquardt(residuals: Callable[[np.ndarray], np.ndarray], start: np.ndarray,
                        iterations: int = 60) -> np.ndarray:
    """Minimise ``sum(residuals(x)**2)`` from ``start``: damped Gauss-Newton with a finite-difference Jacobian."""
    x, damping, step = start.astype(float), 1e-2, 1e-6
    r = residuals(x)
    cost = float(r @ r)
    for _ in range(iterations):
        jac = np.stack([(residuals(x + step * e) - r) / step for e in np.eye(len(x))], axis=1)
        grad, hess = jac.T @ r, jac.T @ jac
        for _ in range(10):
            candidate = x - np.linalg.solve(hess + damping * np.diag(np.diag(hess) + 1e-12), grad)
            rc = residuals(candidate)
            if float(rc @ rc) < cost:
                x, r, cost, damping = candidate, rc, float(rc @ rc), damping / 3
                break
            damping *= 4
        else:
            break  # no step lowers the cost: converged
    return x


def fit_decode_backend(inputs: DecodeInputs, backend: str, prior: np.ndarray, prior_weight: float) -> np.ndarray:
    """The full log-parameter vector of one backend's rows: its FITTED_DECODE constants fitted, the rest ``prior``."""
    free = np.array([name in FITTED_DECODE[backend] for name in DECODE_PARAMETERS])
    if free[2] and np.isnan(inputs.compute).any():
        raise ValueError(f"{backend}: a decode compute term needs every row's compute figure")

    def full(x: np.ndarray) -> np.ndarray:
        params = prior.copy()
        params[free] = x
        return params

    def residuals(x: np.ndarray) -> np.ndarray:
        fit = np.log(estimate_decode(inputs, _decode_constants(full(x), backend)) / inputs.measured)
        return np.concatenate([fit, prior_weight * (x - prior[free])])

    return full(levenberg_marquardt(residuals, prior[free]))


def _subset(inputs: DecodeInputs, mask: np.ndarray) -> DecodeInputs:
    return DecodeInputs(*(getattr(inputs, f)[mask] for f in DecodeInputs.__dataclass_fields__))


def fit_decode(rows: Sequence[Measurement]) -> dict[str, np.ndarray]:
    """Log decode parameters for every backend: its own rows where it has any, the pooled GPU fit otherwise."""
    inputs, backends = decode_inputs(rows), np.array([r.backend for r in rows])
    nominal = np.log(np.array(NOMINAL_DECODE))
    gpu = np.isin(backends, GPU_BACKENDS)
    pooled = fit_decode_backend(_subset(inputs, gpu), "cuda", nominal, NOMINAL_WEIGHT) if gpu.any() else nominal
    fitted: dict[str, np.ndarray] = {}
    for backend in ALL_BACKENDS:
        mask = backends == backend
        prior, weight = (nominal, NOMINAL_WEIGHT) if backend == "cpu" else (pooled, POOL_WEIGHT)
        fitted[backend] = fit_decode_backend(_subset(inputs, mask), backend, prior, weight) if mask.any() else prior
    return fitted


def implied_prefill_efficiency(rows: Sequence[Measurement]) -> np.ndarray:
    """Per row, measured prefill x FLOPs per token / compute: the efficiency that row alone implies (nan: none)."""
    return np.array([
        r.prefill_tokens_per_s * prefill_flops_per_token(r.arch, r.prompt_tokens) / r.compute_ops_per_s
        if r.prefill_tokens_per_s is not None and r.compute_ops_per_s else math.nan
        for r in rows])


def fit_prefill(rows: Sequence[Measurement]) -> dict[str, float]:
    """Prefill compute efficiency per backend: the prior-weighted geometric mean of its rows' implied values."""
    implied, backends = np.log(implied_prefill_efficiency(rows)), np.array([r.backend for r in rows])
    known = ~np.isnan(implied)
    gpu = known & np.isin(backends, GPU_BACKENDS)
    pooled = float(implied[gpu].mean()) if gpu.any() else math.log(NOMINAL_PREFILL)
    fitted = {}
    for backend in ALL_BACKENDS:
        values = implied[known & (backends == backend)]
        prior = math.log(NOMINAL_PREFILL) if backend == "cpu" else pooled
        weight = NOMINAL_WEIGHT if backend == "cpu" else POOL_WEIGHT
        fitted[backend] = math.exp((values.sum() + weight**2 * prior) / (len(values) + weight**2))
    return fitted


def fit_constants(rows: Sequence[Measurement]) -> dict[str, BackendConstants]:
    """The estimator's constants for every backend, fitted to ``rows``."""
    decode, prefill = fit_decode(rows), fit_prefill(rows)
    return {b: _decode_constants(decode[b], b, prefill[b]) for b in ALL_BACKENDS}


def estimate_rows(rows: Sequence[Measurement], constants: dict[str, BackendConstants]) -> tuple[np.ndarray, np.ndarray]:
    """(decode, prefill) tokens/s the constants give every row; prefill is nan where the row has no compute."""
    inputs, backends = decode_inputs(rows), np.array([r.backend for r in rows])
    decode = np.full(len(rows), math.nan)
    for backend in set(backends.tolist()):
        mask = backends == backend
        decode[mask] = estimate_decode(_subset(inputs, mask), constants[backend])
    prefill = np.array([
        constants[r.backend].prefill_compute_efficiency * r.compute_ops_per_s
        / prefill_flops_per_token(r.arch, r.prompt_tokens) if r.compute_ops_per_s else math.nan
        for r in rows])
    return decode, prefill


def cross_validate(rows: Sequence[Measurement],
                   group: Callable[[int, Measurement], Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """(decode, prefill) estimates of every row from constants fitted without its group (see the module doc)."""
    keys = [group(i, r) for i, r in enumerate(rows)]
    decode, prefill = np.full(len(rows), math.nan), np.full(len(rows), math.nan)
    for key in dict.fromkeys(keys):
        held = np.array([k == key for k in keys])
        constants = fit_constants([r for r, h in zip(rows, held, strict=True) if not h])
        d, p = estimate_rows([r for r, h in zip(rows, held, strict=True) if h], constants)
        decode[held], prefill[held] = d, p
    return decode, prefill


def leave_one_out(rows: Sequence[Measurement]) -> tuple[np.ndarray, np.ndarray]:
    return cross_validate(rows, lambda i, _: i)


def leave_one_device_out(rows: Sequence[Measurement]) -> tuple[np.ndarray, np.ndarray]:
    return cross_validate(rows, lambda _, r: r.device)


@dataclass(frozen=True)
class ErrorSummary:
    """Absolute relative errors |estimated / measured - 1| of one group of rows."""

    scope: str
    rows: int
    median: float
    worst: float


def summarize_errors(backends: Sequence[str], estimated: np.ndarray, measured: np.ndarray) -> list[ErrorSummary]:
    """Per backend (in ALL_BACKENDS order) and overall; rows without a measurement or an estimate are skipped."""
    errors = np.abs(estimated / measured - 1)
    valid = ~np.isnan(errors)
    labels = np.array(backends)
    out = []
    for scope in (*ALL_BACKENDS, "all"):
        mask = valid & ((labels == scope) if scope != "all" else True)
        if mask.any():
            out.append(ErrorSummary(scope, int(mask.sum()), float(np.median(errors[mask])), float(errors[mask].max())))
    return out
