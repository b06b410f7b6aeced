"""Fitting the speed estimator's constants to published measurements, and cross-validating them.

numpy only (plan never imports torch, and scipy is not a dependency): least squares on log(estimated / measured),
by a damped Gauss-Newton (Levenberg-Marquardt) in log-parameter space so every constant stays positive.

Per backend, in two steps. The compute efficiency comes from the prefill rows: the geometric mean of the efficiency
each row implies. Decode then fits the bandwidth efficiency and the per-layer overhead, with that compute
efficiency bounding the dot products. Backends share a prior: the GPU backends' constants are pulled towards one
pooled fit over all GPU rows, weakly (it decides only where a backend has too few rows to say), so a backend with one
published row, or none (``npu``), still gets constants from data.

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
    prefill_tokens_per_s,
)

GPU_BACKENDS = ("cuda", "vulkan", "metal", "opencl")
ALL_BACKENDS = ("cpu", *GPU_BACKENDS, "npu")
#: The decode constants, in the order of a parameter vector.
DECODE_PARAMETERS = ("bandwidth_efficiency", "layer_overhead_s")
#: Where the search starts, and the value of a constant that is held rather than fitted.
NOMINAL = BackendConstants(bandwidth_efficiency=0.7, layer_overhead_s=20e-6, compute_efficiency=0.3)
#: Which decode constants each backend fits. The CPU holds its per-layer overhead (thread barriers, about a
#: microsecond per graph op) at the nominal 20 us: every published CPU row is a model of 1.1B parameters or more on
#: slow cores, where a per-layer cost cannot be told apart from the bandwidth, and a free fit turns the spread of
#: the CPUs' reachable bandwidth into a 0.65 ms "overhead" that a small model on a fast core then pays 30 times over.
FITTED_DECODE = {
    "cpu": ("bandwidth_efficiency",),
    **{b: DECODE_PARAMETERS for b in (*GPU_BACKENDS, "npu")},
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


def _constants(log_decode: np.ndarray, compute_efficiency: float) -> BackendConstants:
    """BackendConstants from a log decode-parameter vector (DECODE_PARAMETERS order) and a compute efficiency."""
    bandwidth, overhead = np.exp(log_decode)
    return BackendConstants(float(bandwidth), float(overhead), compute_efficiency)


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


def fit_decode_backend(inputs: DecodeInputs, backend: str, compute_efficiency: float, prior: np.ndarray,
                       prior_weight: float) -> np.ndarray:
    """The log decode parameters of one backend's rows: its FITTED_DECODE constants fitted, the rest ``prior``."""
    free = np.array([name in FITTED_DECODE[backend] for name in DECODE_PARAMETERS])

    def full(x: np.ndarray) -> np.ndarray:
        params = prior.copy()
        params[free] = x
        return params

    def residuals(x: np.ndarray) -> np.ndarray:
        fit = np.log(estimate_decode(inputs, _constants(full(x), compute_efficiency)) / inputs.measured)
        return np.concatenate([fit, prior_weight * (x - prior[free])])

    return full(levenberg_marquardt(residuals, prior[free]))


def _subset(inputs: DecodeInputs, mask: np.ndarray) -> DecodeInputs:
    return DecodeInputs(*(getattr(inputs, f)[mask] for f in DecodeInputs.__dataclass_fields__))


def fit_decode(rows: Sequence[Measurement], compute: dict[str, float]) -> dict[str, np.ndarray]:
    """Log decode parameters for every backend: its own rows where it has any, the pooled GPU fit otherwise."""
    inputs, backends = decode_inputs(rows), np.array([r.backend for r in rows])
    nominal = np.log(np.array([NOMINAL.bandwidth_efficiency, NOMINAL.layer_overhead_s]))
    gpu = np.isin(backends, GPU_BACKENDS)
    pooled = nominal
    if gpu.any():
        pooled = fit_decode_backend(_subset(inputs, gpu), "cuda", compute["pooled-gpu"], nominal, NOMINAL_WEIGHT)
    fitted: dict[str, np.ndarray] = {}
    for backend in ALL_BACKENDS:
        mask = backends == backend
        prior, weight = (nominal, NOMINAL_WEIGHT) if backend == "cpu" else (pooled, POOL_WEIGHT)
        fitted[backend] = (fit_decode_backend(_subset(inputs, mask), backend, compute[backend], prior, weight)
                           if mask.any() else prior)
    return fitted


def implied_prefill_efficiency(rows: Sequence[Measurement]) -> np.ndarray:
    """Per row, measured prefill x FLOPs per token / compute: the efficiency that row alone implies (nan: none)."""
    return np.array([
        r.prefill_tokens_per_s * prefill_flops_per_token(r.arch, r.prompt_tokens) / r.compute_ops_per_s
        if r.prefill_tokens_per_s is not None and r.compute_ops_per_s else math.nan
        for r in rows])


def fit_compute_efficiency(rows: Sequence[Measurement]) -> dict[str, float]:
    """Compute efficiency per backend (and ``pooled-gpu``): the prior-weighted geometric mean of the prefill rows'
    implied efficiencies; the GPU backends are pulled towards the pooled GPU value, the CPU towards the nominal."""
    implied, backends = np.log(implied_prefill_efficiency(rows)), np.array([r.backend for r in rows])
    known = ~np.isnan(implied)
    gpu = known & np.isin(backends, GPU_BACKENDS)
    nominal = math.log(NOMINAL.compute_efficiency)
    pooled = float(implied[gpu].mean()) if gpu.any() else nominal
    fitted = {"pooled-gpu": math.exp(pooled)}
    for backend in ALL_BACKENDS:
        values = implied[known & (backends == backend)]
        prior, weight = (nominal, NOMINAL_WEIGHT) if backend == "cpu" else (pooled, POOL_WEIGHT)
        fitted[backend] = math.exp((values.sum() + weight**2 * prior) / (len(values) + weight**2))
    return fitted


def fit_constants(rows: Sequence[Measurement]) -> dict[str, BackendConstants]:
    """The estimator's constants for every backend, fitted to ``rows``."""
    compute = fit_compute_efficiency(rows)
    decode = fit_decode(rows, compute)
    return {b: _constants(decode[b], compute[b]) for b in ALL_BACKENDS}


def estimate_rows(rows: Sequence[Measurement], constants: dict[str, BackendConstants]) -> tuple[np.ndarray, np.ndarray]:
    """(decode, prefill) tokens/s the constants give every row; prefill is nan where the row has no compute."""
    inputs, backends = decode_inputs(rows), np.array([r.backend for r in rows])
    decode = np.full(len(rows), math.nan)
    for backend in set(backends.tolist()):
        mask = backends == backend
        decode[mask] = estimate_decode(_subset(inputs, mask), constants[backend])
    prefill = np.array([
        prefill_tokens_per_s(r.arch, r.prompt_tokens, r.compute_ops_per_s, constants[r.backend])
        if r.compute_ops_per_s else math.nan for r in rows])
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
