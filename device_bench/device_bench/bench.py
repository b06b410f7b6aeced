"""The measurement loop shared by every runtime: warm-up, repeats, and summary statistics.

``prefill`` and ``decode`` follow llama-bench's ``pp`` / ``tg`` tests exactly (tools/llama-bench/llama-bench.cpp):

* warm-up (``--warmup`` times, default 1, llama-bench's one): a ``pp`` test first decodes the whole prompt once, a
  ``tg`` test one token (llama-bench's ``min(32, N)`` warm-up prompt is commented out in this llama.cpp version);
* each counted repeat clears the KV cache, decodes the ``depth`` prompt untimed when there is one (``tg @ dN``),
  then times the whole test: ``pp``: N prompt tokens in ``n_batch`` chunks, then a synchronize; ``tg``: N decodes of
  one token each, synchronized after each;
* tokens/s per repeat = tokens / repeat time; reported as the mean and the sample standard deviation over repeats
  (llama-bench's ``avg_ts`` / ``stddev_ts``). llama-bench repeats 5 times by default, device_bench 3.

What llama-bench does not report, named apart: TTFT (prefill + choosing the first token), per-token decode latency
percentiles (p50 / p95 / p99 over every step of every counted repeat), decode at each ``--decode-depths`` depth, and
a sustained decode run (:func:`run_sustained`) with the device's conditions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from device_bench import conditions, stats
from device_bench.runner import Runner


@dataclass(frozen=True)
class Plan:
    """What to measure: prompt lengths for prefill, the TTFT prompt, tokens to decode, warm-ups and repeats."""

    prompt_tokens: int
    prompt_lengths: Sequence[int]
    gen_tokens: int
    repeats: int
    warmup: int
    decode_depths: Sequence[int] = ()

    @property
    def longest_prompt(self) -> int:
        """The longest prompt any measurement decodes in one go (a prefill, or a depth before decoding)."""
        return max(max(self.prompt_lengths), self.prompt_tokens, *self.decode_depths)

    @property
    def needed_ctx(self) -> int:
        """Context the plan needs: the longest prompt or depth plus the generated tokens.

        llama-bench's n_ctx is n_prompt + n_gen + n_depth of each test.
        """
        return self.longest_prompt + self.gen_tokens


def run_plan(runner: Runner, plan: Plan, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every measurement of ``plan`` on a loaded ``runner`` and return the report's measurement keys.

    Each measurement runs ``plan.warmup`` discarded times first (page faults of mmap'ed weights, graph
    allocation and cold caches land there), then ``plan.repeats`` counted times; throughput statistics are
    over per-repeat tokens/s, as llama-bench computes them.
    """
    prefill_rows = []
    for n_tokens in plan.prompt_lengths:
        seconds = _repeat(lambda n=n_tokens: runner.prefill(n), plan, log, f"prefill {n_tokens} tokens")
        rates = [n_tokens / s for s in seconds]
        prefill_rows.append(
            {
                "prompt_tokens": n_tokens,
                "tokens_per_s_mean": stats.mean(rates),
                "tokens_per_s_std": stats.std(rates),
                "ms_mean": stats.mean(seconds) * 1e3,
                "tokens_per_s_samples": rates,
            }
        )
    main_row = next(row for row in prefill_rows if row["prompt_tokens"] == plan.prompt_tokens)

    ttft_ms = [s * 1e3 for s in _repeat(lambda: runner.ttft(plan.prompt_tokens), plan, log, "time to first token")]

    decode_runs = _repeat(lambda: runner.decode(plan.gen_tokens), plan, log, f"decode {plan.gen_tokens} tokens",
                          warm_up=lambda: runner.decode(1))
    decode_rates, token_ms = _rates_and_step_ms(decode_runs, plan.gen_tokens)

    depth_rows = []
    for depth in plan.decode_depths:
        runs = _repeat(lambda d=depth: runner.decode(plan.gen_tokens, depth=d), plan, log,
                       f"decode {plan.gen_tokens} tokens at depth {depth}", warm_up=lambda: runner.decode(1))
        rates, depth_ms = _rates_and_step_ms(runs, plan.gen_tokens)
        depth_rows.append({"depth_tokens": depth, "gen_tokens": plan.gen_tokens,
                           "tokens_per_s_mean": stats.mean(rates), "tokens_per_s_std": stats.std(rates),
                           "ms_p50": stats.percentile(depth_ms, 50), "tokens_per_s_samples": rates})

    return {
        "ttft_ms": stats.mean(ttft_ms),
        "ttft_ms_std": stats.std(ttft_ms),
        "prefill_tokens_per_s": main_row["tokens_per_s_mean"],
        "prefill_tokens_per_s_std": main_row["tokens_per_s_std"],
        "prefill": prefill_rows,
        "decode_tokens_per_s": stats.mean(decode_rates),
        "decode_tokens_per_s_std": stats.std(decode_rates),
        "decode_ms_p50": stats.percentile(token_ms, 50),
        "decode_ms_p95": stats.percentile(token_ms, 95),
        "decode_ms_p99": stats.percentile(token_ms, 99),
        "decode_ms_mean": stats.mean(token_ms),
        "decode_at_depth": depth_rows,
        "samples": {"ttft_ms": ttft_ms, "decode_tokens_per_s": decode_rates},
    }


def timed_ms(action: Callable[[], None]) -> float:
    """Milliseconds ``action`` takes (used for ``load_ms``)."""
    start_ns = time.perf_counter_ns()
    action()
    return (time.perf_counter_ns() - start_ns) / 1e6


def _rates_and_step_ms(runs: list[tuple[float, list[float]]], gen_tokens: int) -> tuple[list[float], list[float]]:
    """Tokens/s of each decode run (``(total_s, per_token_s)``) and every step's latency in ms, all runs together."""
    return ([gen_tokens / total_s for total_s, _ in runs],
            [s * 1e3 for _, per_token in runs for s in per_token])


def _repeat(measure: Callable[[], Any], plan: Plan, log: Callable[[str], None], what: str,
            warm_up: Callable[[], Any] | None = None) -> list[Any]:
    """Warm up, then measure: the results of ``plan.repeats`` counted calls of ``measure``.

    ``plan.warmup`` discarded calls of ``warm_up`` (default: ``measure``) come first.
    """
    for index in range(plan.warmup):
        log(f"{what}: warm-up {index + 1}/{plan.warmup}")
        (warm_up or measure)()
    results = []
    for index in range(plan.repeats):
        results.append(measure())
        log(f"{what}: run {index + 1}/{plan.repeats} done")
    return results


# ---------------------------------------------------------------- sustained decode
def run_sustained(runner: Runner, seconds: float, window_s: float, gen_tokens: int,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Decode without pause for ``seconds`` and report tokens/s per ``window_s`` window with the device's state.

    Decoding repeats llama-bench's ``tg`` test (``gen_tokens`` from an empty cache) back to back, so every window
    decodes at the same depths; a window's rate is the tokens finished inside it divided by its length (the cache
    clears between runs count as the time they take). Tokens finished after the last whole window are not counted.
    The conditions (:func:`device_bench.conditions.read_conditions`) are read before, at each window's end (between
    two runs, so the reading is not timed as decoding) and after; energy is the RAPL counters' difference, else the
    power sensors' mean times the duration, else "not available on this device".
    """
    n_windows = max(1, int(seconds // window_s))
    ranges = conditions.energy_ranges_uj()
    before = conditions.read_conditions()
    log(f"sustained decode: {n_windows} windows of {window_s:g} s")
    finished_s: list[float] = []  # when each token finished, seconds since the start
    samples: list[dict[str, Any]] = []
    start_s = time.perf_counter()
    elapsed_s = 0.0
    while elapsed_s < n_windows * window_s:
        run_start_s = time.perf_counter() - start_s
        _, per_token_s = runner.decode(gen_tokens)
        clock_s = run_start_s
        for step_s in per_token_s:
            clock_s += step_s
            finished_s.append(clock_s)
        elapsed_s = time.perf_counter() - start_s
        while len(samples) < n_windows and elapsed_s >= (len(samples) + 1) * window_s:
            samples.append(conditions.read_conditions())
            log(f"sustained decode: window {len(samples)}/{n_windows} done")
            elapsed_s = time.perf_counter() - start_s
    total_s = n_windows * window_s
    after = conditions.read_conditions()
    windows = []
    for index in range(n_windows):
        lo, hi = index * window_s, (index + 1) * window_s
        tokens = sum(1 for t in finished_s if lo <= t < hi)
        window = {"index": index, "start_s": lo, "end_s": hi, "tokens": tokens, "tokens_per_s": tokens / window_s}
        window.update(_window_conditions(samples[index] if index < len(samples) else after))
        windows.append(window)
    tokens = sum(w["tokens"] for w in windows)
    first, last = windows[0]["tokens_per_s"], windows[-1]["tokens_per_s"]
    energy_j, energy_source = _energy(before, after, ranges, samples, total_s)
    package_j = _package_joules(energy_j) if isinstance(energy_j, dict) else None
    return {
        "seconds": total_s,
        "window_s": window_s,
        "gen_tokens_per_run": gen_tokens,
        "tokens": tokens,
        "tokens_per_s_mean": tokens / total_s,
        "windows": windows,
        "first_window_tokens_per_s": first,
        "last_window_tokens_per_s": last,
        "drop_percent": (first - last) / first * 100.0 if first > 0 else 0.0,
        "conditions_before": before,
        "conditions_after": after,
        "energy_j": energy_j,
        "energy_source": energy_source,
        "joules_per_token": package_j / tokens if package_j is not None and tokens else conditions.NOT_AVAILABLE,
    }


def _window_conditions(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The per-window summary of a conditions snapshot: mean CPU MHz, hottest sensor, total power."""
    temps = snapshot["temperatures_c"]
    power = snapshot["power_w"]
    return {
        "cpu_frequency_mhz_mean": snapshot["cpu_frequency_mhz_mean"],
        "temperature_c_max": max(temps.values()) if isinstance(temps, dict) and temps else conditions.NOT_AVAILABLE,
        "power_w_total": round(sum(power.values()), 3) if isinstance(power, dict) and power
        else conditions.NOT_AVAILABLE,
        "throttled": snapshot["throttled"],
    }


def _energy(before: dict[str, Any], after: dict[str, Any], ranges: dict[str, int], samples: list[dict[str, Any]],
            total_s: float) -> tuple[Any, str]:
    """Joules used over the run by counter or sensor, and where they came from."""
    if isinstance(before["energy_counters_uj"], dict) and isinstance(after["energy_counters_uj"], dict):
        used = conditions.energy_used_j(before["energy_counters_uj"], after["energy_counters_uj"], ranges)
        if used:
            return used, "RAPL energy counters (/sys/class/powercap)"
    readings = [s["power_w"] for s in samples if isinstance(s["power_w"], dict)]
    if readings:
        names = sorted({name for r in readings for name in r})
        return ({name: round(stats.mean([r[name] for r in readings if name in r]) * total_s, 3) for name in names},
                "power sensors sampled at each window's end (mean W x seconds)")
    return conditions.NOT_AVAILABLE, conditions.NOT_AVAILABLE


def _package_joules(energy_j: dict[str, float]) -> float | None:
    """The device's total joules, from the best source it has.

    The RAPL packages (their sub-zones are inside them), else Jetson's input rail (VDD_IN feeds the others), else
    the battery, else the sum of the measured rails.
    """
    # "package-0.intel-rapl:0" is the same package seen through a second interface (intel-rapl-mmio): once only
    packages = [v for k, v in energy_j.items() if k.startswith("package") and "/" not in k and "." not in k]
    if packages:
        return sum(packages)
    for prefix in ("ina3221/VDD_IN", "battery/"):
        found = [v for k, v in energy_j.items() if k.startswith(prefix)]
        if found:
            return sum(found)
    rails = [v for k, v in energy_j.items() if k.startswith("ina3221/")]
    return sum(rails) if rails else None
