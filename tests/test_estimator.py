"""The speed estimator against every published measurement in edgeforge.plan.calibration (within +-30%).

The efficiencies are general per-backend constants (edgeforge.plan.estimator); nothing here is per row.
"""

from __future__ import annotations

import pytest

from edgeforge.models.refs import arch_from_config
from edgeforge.plan.calibration import CALIBRATION_ROWS, TINYLLAMA_1_1B
from edgeforge.plan.estimator import estimate_speed
from edgeforge.plan.profiles import load_registry
from edgeforge.plan.sizing import gguf_file_bytes


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.mark.parametrize("row", CALIBRATION_ROWS, ids=[f"{r.profile}-{r.model}-{r.quant}" for r in CALIBRATION_ROWS])
def test_estimate_within_30_percent_of_published(registry, row):
    arch = arch_from_config(row.config)
    est = estimate_speed(registry.get(row.profile), arch, gguf_file_bytes(arch, row.quant), 128, row.backend)
    assert est.decode_tokens_per_s == pytest.approx(row.decode_tokens_per_s, rel=0.30), (row.source, est)
    if row.prefill_tokens_per_s is not None:
        assert est.prefill_tokens_per_s == pytest.approx(row.prefill_tokens_per_s, rel=0.30), (row.source, est)


def test_bandwidth_override_scales_decode(registry):
    p = registry.get("raspberry-pi-5-8gb")
    arch = arch_from_config(TINYLLAMA_1_1B)
    size = gguf_file_bytes(arch, "Q8_0")
    base = estimate_speed(p, arch, size).decode_tokens_per_s
    faster = estimate_speed(p.model_copy(update={"decode_efficiency": {"cpu": 0.99}}), arch, size)
    assert faster.decode_tokens_per_s > base
