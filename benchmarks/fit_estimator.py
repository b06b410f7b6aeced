"""Fit the speed estimator's constants to the published measurements and print how well they predict rows they
were not fitted to.

Prints, as Markdown: one table with a line per measurement (measured decode and prefill tokens/s, the estimate of the
constants fitted on every row, the leave-one-out estimate and its error, the leave-one-device-out error); the median
and worst absolute errors per backend and overall; and the constants as Python, to paste into
edgeforge/plan/estimator.py's SPEED_CONSTANTS.

Run: PYTHONPATH=$PWD .venv/bin/python benchmarks/fit_estimator.py [--table benchmarks/data/speed_measurements.yaml]
(numpy only, a few seconds).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from edgeforge.plan.calibration import Measurement, load_measurements
from edgeforge.plan.estimator import BackendConstants
from edgeforge.plan.profiles import load_registry
from edgeforge.plan.speed_fit import (
    ALL_BACKENDS,
    DECODE_PARAMETERS,
    FITTED_DECODE,
    estimate_rows,
    fit_constants,
    leave_one_device_out,
    leave_one_out,
    summarize_errors,
)

DEFAULT_TABLE = Path(__file__).resolve().parent / "data" / "speed_measurements.yaml"


def _num(value: float) -> str:
    return "" if np.isnan(value) else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def _err(estimated: float, measured: float) -> str:
    return "" if np.isnan(estimated) or np.isnan(measured) else f"{estimated / measured - 1:+.0%}"


def print_rows(rows: list[Measurement], measured: dict[str, np.ndarray], fitted: dict[str, np.ndarray],
               loo: dict[str, np.ndarray], lodo: dict[str, np.ndarray]) -> None:
    print("| # | device | backend | model | quant | tg meas | tg fit | tg LOO | LOO err | LODO err "
          "| pp meas | pp LOO | pp LOO err |")
    print("|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        d, p = measured["decode"][i], measured["prefill"][i]
        print(f"| {i + 1} | {r.device} | {r.backend} | {r.model} | {r.quant} | {_num(d)} | {_num(fitted['decode'][i])} "
              f"| {_num(loo['decode'][i])} | {_err(loo['decode'][i], d)} | {_err(lodo['decode'][i], d)} "
              f"| {_num(p)} | {_num(loo['prefill'][i])} | {_err(loo['prefill'][i], p)} |")


def print_summaries(rows: list[Measurement], measured: dict[str, np.ndarray], fitted: dict[str, np.ndarray],
                    loo: dict[str, np.ndarray], lodo: dict[str, np.ndarray]) -> None:
    backends = [r.backend for r in rows]
    print("\n| what | backend | rows | fit median | fit worst | LOO median | LOO worst | LODO median | LODO worst |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for what in ("decode", "prefill"):
        by = {name: {s.scope: s for s in summarize_errors(backends, est[what], measured[what])}
              for name, est in (("fit", fitted), ("loo", loo), ("lodo", lodo))}
        for scope, s in by["loo"].items():
            f, d = by["fit"][scope], by["lodo"][scope]
            print(f"| {what} | {scope} | {s.rows} | {f.median:.0%} | {f.worst:.0%} | {s.median:.0%} | {s.worst:.0%} "
                  f"| {d.median:.0%} | {d.worst:.0%} |")


def print_constants(constants: dict[str, BackendConstants], rows: list[Measurement]) -> None:
    counts = {b: sum(r.backend == b for r in rows) for b in ALL_BACKENDS}
    date = time.strftime("%Y-%m-%d")
    print(f"\n```python\n# Output of benchmarks/fit_estimator.py on {date} ({len(rows)} published rows).")
    print("SPEED_CONSTANTS: dict[str, BackendConstants] = {")
    for b, c in constants.items():
        held = [n for n in DECODE_PARAMETERS if n not in FITTED_DECODE[b]]
        note = f"{counts[b]} rows" if counts[b] else "no rows: the pooled GPU fit"
        note += "".join(f"; {n} held at its nominal value" for n in held) if counts[b] else ""
        print(f'    "{b}": BackendConstants({c.bandwidth_efficiency:.3g}, {c.layer_overhead_s:.3g}, '
              f"{c.compute_efficiency:.3g}),  # {note}")
    print("}\n```")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help="the measurement table (YAML)")
    args = parser.parse_args()
    rows = load_measurements(args.table, load_registry())
    measured = {"decode": np.array([r.decode_tokens_per_s for r in rows]),
                "prefill": np.array([r.prefill_tokens_per_s or np.nan for r in rows])}
    constants = fit_constants(rows)
    fitted = dict(zip(("decode", "prefill"), estimate_rows(rows, constants), strict=True))
    loo = dict(zip(("decode", "prefill"), leave_one_out(rows), strict=True))
    lodo = dict(zip(("decode", "prefill"), leave_one_device_out(rows), strict=True))
    print(f"Speed estimator against {len(rows)} published measurements ({len({r.device for r in rows})} devices); "
          "errors are estimated / measured - 1. fit: constants fitted on every row; LOO: fitted without the row; "
          "LODO: fitted without every row of its device.\n")
    print_rows(rows, measured, fitted, loo, lodo)
    print_summaries(rows, measured, fitted, loo, lodo)
    print_constants(constants, rows)


if __name__ == "__main__":
    main()
