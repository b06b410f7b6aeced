"""edgeforge's llama.cpp runtime against a stock llama.cpp build, and device_bench against llama-bench, on one GGUF.

Two questions, answered from interleaved rounds in one run (a neighbour's load on a shared machine hits every tool
of a round alike; the order rotates from round to round so no tool always runs first):

1. Is the runtime edgeforge installs (llama-cpp-python, built by the Makefile with edgeforge's CPU flags) as fast as
   stock llama.cpp? ``llama-bench`` built from the same llama.cpp source with llama.cpp's default CMake options
   (``edgeforge.export.llama_tools.ensure_stock_bench``) runs once on its own libraries and once on the binding's
   (the same executable with ``LD_LIBRARY_PATH`` pointing at ``llama_cpp/lib``: the binding's libllama/libggml are
   that version's libraries, ABI-identical). Their ratio is the build's cost alone. On a CPU that reports AMX a
   second reference is built, the same defaults with only ``-mno-amx-*`` added: where stock's AMX kernels crash
   (some VMs; the table says so), runtime / that reference is the cost of everything but the AMX work-around.
2. Does device_bench time what llama-bench times? device_bench (through ``edgeforge bench``'s local target, the path
   a user takes) against llama-bench on the same binding libraries: the method's difference alone.

Tests: llama-bench's ``pp128``, ``tg64`` and ``tg64 @ d512``, ``--repeats`` repetitions each (llama-bench's default
5) after its warm-up. Each cell is the median over rounds of the tool's mean tokens/s with the range [min-max]
across rounds; each ratio is the median of the per-round ratios with their range.

Run (after `make`; the stock llama-bench is built on first use, ~6 min on 2 cores, twice on an AMX CPU):
    .venv/bin/edgeforge export gguf smollm2-135m-instruct --quant Q4_K_M --out /tmp/bench-q4km.gguf --no-verify
    .venv/bin/python benchmarks/bench_overhead.py /tmp/bench-q4km.gguf [--threads 2] [--rounds 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

from edgeforge.bench.artifact import local_artifact
from edgeforge.bench.run import BenchOptions, run_local
from edgeforge.bench.targets import LocalTarget
from edgeforge.export.llama_tools import ensure_stock_bench
from edgeforge.export.native_build import amx_decision, cpu_reports_amx

TESTS = ("pp128", "tg64", "tg64@d512")
PROMPT, GEN, DEPTH = 128, 64, 512
RUNTIME_GOAL = 0.97  # edgeforge's runtime / stock, pp128 and tg64
METHOD_GOAL = 0.03  # |device_bench / llama-bench - 1| on the same runtime


class StockCrashed(Exception):
    """The stock llama-bench died of a signal (on a CPU that reports AMX: its AMX kernels)."""


def binding_lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def llama_bench(tool: Path, gguf: Path, threads: int, repeats: int, lib_dir: Path | None) -> dict[str, float]:
    """llama-bench's mean tokens/s per test: ``-p 128 -n 64 -d 0,512 -r R -o json`` (pp128 @ d512 is not used)."""
    env = dict(os.environ)
    if lib_dir is not None:  # the executable's RUNPATH comes after LD_LIBRARY_PATH: these libraries are loaded
        env["LD_LIBRARY_PATH"] = str(lib_dir)
    cmd = [str(tool), "-m", str(gguf), "-t", str(threads), "-p", str(PROMPT), "-n", str(GEN), "-d", f"0,{DEPTH}",
           "-r", str(repeats), "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode < 0 and lib_dir is None:  # a signal: the stock build's kernels crash on this CPU
        raise StockCrashed(f"killed by signal {-done.returncode}")
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(done.stdout)

    def pick(n_prompt: int, n_gen: int, depth: int) -> float:
        return next(r["avg_ts"] for r in rows if (r["n_prompt"], r["n_gen"], r.get("n_depth", 0)) ==
                    (n_prompt, n_gen, depth))

    return {"pp128": pick(PROMPT, 0, 0), "tg64": pick(0, GEN, 0), "tg64@d512": pick(0, GEN, DEPTH)}


def device_bench(gguf: Path, threads: int, repeats: int) -> dict[str, float]:
    """device_bench on this machine through edgeforge's local target, the tests above only."""
    options = BenchOptions(threads=threads, prompt_tokens=PROMPT, gen_tokens=GEN, repeats=repeats,
                           decode_depths=(DEPTH,))
    request = options.request()
    request = type(request)((*request.device_bench_args, "--prompt-lengths", str(PROMPT)), request.setup)
    report = run_local(LocalTarget(name="local", type="local"), local_artifact(gguf), request)
    (depth_row,) = report["decode_at_depth"]
    return {"pp128": report["prefill_tokens_per_s"], "tg64": report["decode_tokens_per_s"],
            "tg64@d512": depth_row["tokens_per_s_mean"]}


def spread(values: list[float], fmt: str) -> str:
    """``median [min-max]``."""
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, nargs="?", default=Path("/tmp/bench-q4km.gguf"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="repetitions per test (llama-bench's default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the three tools (>= 5)")
    args = parser.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"{args.gguf}: no such GGUF; export one first (see this script's docstring)")
    stock = ensure_stock_bench()
    # Where the CPU reports AMX, stock's AMX kernels may crash (some VMs): a second reference, llama.cpp's defaults
    # with only AMX left out, keeps the build question answerable; it also runs the runtime's llama-bench there.
    stock_no_amx = ensure_stock_bench(without_amx=True) if cpu_reports_amx() else None
    bench_exe = stock_no_amx or stock
    libs = binding_lib_dir()
    tools: dict[str, Callable[[], dict[str, float]]] = {
        "stock": lambda: llama_bench(stock, args.gguf, args.threads, args.repeats, None),
        "runtime": lambda: llama_bench(bench_exe, args.gguf, args.threads, args.repeats, libs),
        "device_bench": lambda: device_bench(args.gguf, args.threads, args.repeats),
    }
    if stock_no_amx is not None:
        tools["stock_no_amx"] = lambda: llama_bench(stock_no_amx, args.gguf, args.threads, args.repeats, None)
    labels = {"stock": "stock llama-bench", "stock_no_amx": "stock without AMX", "runtime": "llama-bench on "
              "edgeforge's runtime", "device_bench": "device_bench (edgeforge bench)"}
    names = list(tools)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    crashed: dict[str, str] = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if name in crashed:
                continue
            try:
                runs[name].append(tools[name]())
            except StockCrashed as crash:
                crashed[name] = str(crash)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} " + ("crashed" if n in crashed else "/".join(f"{runs[n][-1][t]:.0f}" for t in TESTS))
            for n in names), flush=True)
    reference = "stock" if "stock" not in crashed else "stock_no_amx"
    if reference in crashed or reference not in runs:
        raise SystemExit(f"no stock llama-bench ran on this machine: {crashed}")

    def ratios(num: str, den: str, test: str) -> list[float]:
        return [a[test] / b[test] for a, b in zip(runs[num], runs[den], strict=True)]

    def cell(name: str, test: str) -> str:
        return f"crashed ({crashed[name]})" if name in crashed else spread([x[test] for x in runs[name]], "{:.1f}")

    print(f"\n{args.gguf.name}, {args.threads} threads, {args.rounds} interleaved rounds x {args.repeats} repetitions; "
          f"edgeforge's build: {amx_decision().reason}\n")
    print("| test | " + " | ".join(f"{labels[n]} tok/s" for n in names) +
          f" | runtime / {labels[reference]} | device_bench / llama-bench, same runtime |")
    print("|---|" + "---:|" * (len(names) + 2))
    verdicts = []
    for test in TESTS:
        build = ratios("runtime", reference, test)
        method = ratios("device_bench", "runtime", test)
        print(f"| {test} | " + " | ".join(cell(n, test) for n in names) +
              f" | {spread(build, '{:.3f}')} | {spread(method, '{:.3f}')} |")
        if test in ("pp128", "tg64"):
            verdicts.append(f"{test} runtime/{reference} {statistics.median(build):.3f} "
                            f"({'meets' if statistics.median(build) >= RUNTIME_GOAL else 'misses'} >= {RUNTIME_GOAL})")
        verdicts.append(f"{test} device_bench/llama-bench {statistics.median(method):.3f} ("
                        f"{'within' if abs(statistics.median(method) - 1) <= METHOD_GOAL else 'outside'} "
                        f"{METHOD_GOAL:.0%})")
    print("\n" + "; ".join(verdicts))


if __name__ == "__main__":
    main()
