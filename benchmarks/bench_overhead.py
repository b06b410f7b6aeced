"""device_bench against llama.cpp's own llama-bench on the same GGUF and threads, as one Markdown table.

device_bench follows llama-bench's method (random tokens, one batch per prompt, one decode call per generated
token, from an empty cache), so on the same file and thread count its prefill and decode tokens/s should be within
5% of llama-bench's. Both tools warm up before timing. Rounds alternate the two tools, so a neighbour's load on a
shared machine hits both alike; the table shows the median over rounds.

Run:
    .venv/bin/edgeforge export gguf smollm2-135m-instruct --quant Q4_K_M --out /tmp/bench-q4km.gguf --no-verify
    .venv/bin/python benchmarks/bench_overhead.py /tmp/bench-q4km.gguf [--threads 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from edgeforge.bench.artifact import local_artifact
from edgeforge.bench.run import BenchOptions, run_local
from edgeforge.bench.targets import LocalTarget
from edgeforge.export.llama_tools import ensure_tools

GOAL = 0.05


def llama_bench(tool: Path, gguf: Path, threads: int, prompt_tokens: int, gen_tokens: int,
                repeats: int) -> dict[str, float]:
    """llama-bench's prefill (pp) and decode (tg) tokens/s: ``llama-bench -m F -t T -p P -n N -r R -o json``."""
    cmd = [str(tool), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_tokens), "-n", str(gen_tokens),
           "-r", str(repeats), "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed: {done.stderr.strip().splitlines()[-1:]}")
    rows = json.loads(done.stdout)
    prefill = next(r for r in rows if r["n_prompt"] == prompt_tokens and r["n_gen"] == 0)
    decode = next(r for r in rows if r["n_gen"] == gen_tokens and r["n_prompt"] == 0)
    return {"prefill": prefill["avg_ts"], "decode": decode["avg_ts"], "version": rows[0].get("build_commit", "?")}


def device_bench(gguf: Path, threads: int, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict[str, float]:
    """device_bench on this machine, through edgeforge's local target (the path 'edgeforge bench' takes)."""
    options = BenchOptions(threads=threads, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats)
    report = run_local(LocalTarget(name="local", type="local"), local_artifact(gguf), options.request())
    return {"prefill": report["prefill_tokens_per_s"], "decode": report["decode_tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, nargs="?", default=Path("/tmp/bench-q4km.gguf"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of both tools (median shown)")
    args = parser.parse_args()
    if not args.gguf.is_file():
        raise SystemExit(f"{args.gguf}: no such GGUF; export one first (see this script's docstring)")
    tool = ensure_tools(("llama-bench",))["llama-bench"]
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for _ in range(args.rounds):
        theirs.append(llama_bench(tool, args.gguf, args.threads, args.prompt_tokens, args.gen_tokens, args.repeats))
        ours.append(device_bench(args.gguf, args.threads, args.prompt_tokens, args.gen_tokens, args.repeats))
    print(f"{args.gguf.name}, {args.threads} threads, {args.repeats} repeats, median of {args.rounds} round(s)\n")
    print("| measurement | device_bench tok/s | llama-bench tok/s | ratio | within 5% |")
    print("|---|---|---|---|---|")
    for key, label in (("prefill", f"prefill ({args.prompt_tokens} tokens)"),
                       ("decode", f"decode ({args.gen_tokens} tokens)")):
        a = statistics.median(r[key] for r in ours)
        b = statistics.median(r[key] for r in theirs)
        ratio = a / b
        print(f"| {label} | {a:.1f} | {b:.1f} | {ratio:.3f} | {'yes' if abs(ratio - 1) <= GOAL else 'no'} |")


if __name__ == "__main__":
    main()
