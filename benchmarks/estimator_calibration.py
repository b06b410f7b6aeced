"""Print the speed estimator against every published llama.cpp measurement, as one Markdown table.

Run: .venv/bin/python benchmarks/estimator_calibration.py
"""

from __future__ import annotations

from edgeforge.models.refs import arch_from_config
from edgeforge.plan.calibration import CALIBRATION_ROWS
from edgeforge.plan.estimator import estimate_speed
from edgeforge.plan.profiles import load_registry
from edgeforge.plan.sizing import gguf_file_bytes


def main() -> None:
    reg = load_registry()
    print("| profile | backend | model | quant | est. size MB | measured tg | estimated tg | ratio | source |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in CALIBRATION_ROWS:
        arch = arch_from_config(r.config)
        size = gguf_file_bytes(arch, r.quant)
        est = estimate_speed(reg.get(r.profile), arch, size, 128, r.backend)  # type: ignore[arg-type]
        ratio = est.decode_tokens_per_s / r.decode_tokens_per_s
        print(f"| {r.profile} | {r.backend} | {r.model} | {r.quant} | {size / 1e6:,.0f} | {r.decode_tokens_per_s:g} "
              f"| {est.decode_tokens_per_s:.1f} | {ratio:.2f} | {r.source} |")


if __name__ == "__main__":
    main()
