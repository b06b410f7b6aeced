"""The measurement loop shared by every runtime: warm-up, repeats, and summary statistics."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from device_bench import stats
from device_bench.runner import Runner


@dataclass(frozen=True)
class Plan:
    """What to measure: prompt lengths for prefill, the TTFT prompt, tokens to decode, warm-ups and repeats."""

    prompt_tokens: int
    prompt_lengths: Sequence[int]
    gen_tokens: int
    repeats: int
    warmup: int

    @property
    def needed_ctx(self) -> int:
        """Context the plan needs: the longest prompt plus the generated tokens (llama-bench's n_ctx)."""
        return max(max(self.prompt_lengths), self.prompt_tokens) + self.gen_tokens


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

    decode_runs = _repeat(lambda: runner.decode(plan.gen_tokens), plan, log, f"decode {plan.gen_tokens} tokens")
    decode_rates = [plan.gen_tokens / total_s for total_s, _ in decode_runs]
    token_ms = [s * 1e3 for _, per_token in decode_runs for s in per_token]

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
        "decode_ms_mean": stats.mean(token_ms),
        "samples": {"ttft_ms": ttft_ms, "decode_tokens_per_s": decode_rates},
    }


def timed_ms(action: Callable[[], None]) -> float:
    """Milliseconds ``action`` takes (used for ``load_ms``)."""
    start_ns = time.perf_counter_ns()
    action()
    return (time.perf_counter_ns() - start_ns) / 1e6


def _repeat(measure: Callable[[], Any], plan: Plan, log: Callable[[str], None], what: str) -> list[Any]:
    """``plan.warmup`` discarded calls of ``measure``, then the results of ``plan.repeats`` counted calls."""
    for index in range(plan.warmup):
        log(f"{what}: warm-up {index + 1}/{plan.warmup}")
        measure()
    results = []
    for index in range(plan.repeats):
        results.append(measure())
        log(f"{what}: run {index + 1}/{plan.repeats} done")
    return results
