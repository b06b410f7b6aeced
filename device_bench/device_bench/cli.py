"""Command line: ``python -m device_bench ARTIFACT [options]``.

stdout carries exactly one JSON document (the report); progress goes to stderr. Every failure is one
``device_bench: error: ...`` line on stderr and an exit code: 2 bad input or failed run, 3 SHA-256 mismatch,
4 runtime not installed. No traceback is ever shown (set ``DEVICE_BENCH_DEBUG=1`` to get one).

The benchmark runs in a child process supervised by this one: a native crash inside the runtime (a
segfault in a kernel, the OOM killer) then still ends in a clear error line instead of a silent death, and a
crash in llama.cpp's repacked/AMX weight kernels is retried once without them (recorded in the report).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from device_bench import SCHEMA_VERSION, __version__
from device_bench.artifact import Artifact, resolve_artifact, verify_sha256
from device_bench.bench import Plan, run_plan, run_sustained, timed_ms
from device_bench.config import RuntimeSettings, resolve_settings
from device_bench.device import fingerprint, peak_rss_bytes, proc_status_bytes, read_thermals
from device_bench.errors import BenchError
from device_bench.runner import Runner
from device_bench.schema import validate_report

PROG = "device_bench"
DEFAULT_SHORT_PROMPT_TOKENS = 32
_WORKER_FLAG = "--_worker"
#: Set by a launcher to its own pid: the supervisor then dies with it (see _supervise).
PARENT_PID_ENV = "DEVICE_BENCH_PARENT_PID"
_FALLBACK_FLAG = "--_repack-fallback"
#: Signals that mean "the native code crashed", as opposed to being killed from outside.
_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT}


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors become one ``device_bench: error:`` line (exit 2), not usage text."""

    def error(self, message: str) -> Any:
        """Raise instead of printing usage: the caller prints one line."""
        raise BenchError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = _Parser(
        prog=PROG,
        description="Benchmark a GGUF (llama.cpp) or ONNX (onnxruntime) model on this device; print one JSON report.",
    )
    parser.add_argument("artifact", help="a .gguf file, or an ONNX export directory (or its model.onnx)")
    parser.add_argument("--threads", type=_positive_int, help="threads (default: runtime config, else physical cores)")
    parser.add_argument("--n-ctx", type=_positive_int, help="context tokens (default: runtime config, else needed)")
    parser.add_argument("--prompt-tokens", type=_positive_int, default=128, help="prompt for TTFT (default: 128)")
    parser.add_argument(
        "--prompt-lengths",
        type=_length_list,
        help=f"comma-separated prefill lengths (default: {DEFAULT_SHORT_PROMPT_TOKENS} and --prompt-tokens)",
    )
    parser.add_argument("--gen-tokens", type=_positive_int, default=64, help="tokens to decode (default: 64)")
    parser.add_argument(
        "--decode-depths",
        type=_length_list,
        default=[],
        help="comma-separated KV depths: also decode --gen-tokens after a prompt of each (llama-bench tg @ dN)",
    )
    parser.add_argument(
        "--sustained",
        type=_positive_float,
        metavar="SECONDS",
        help="first decode without pause for SECONDS: tokens/s per window, CPU frequency, temperature, energy",
    )
    parser.add_argument(
        "--window-s", type=_positive_float, default=10.0, help="window of --sustained in seconds (default: 10)"
    )
    parser.add_argument("--repeats", type=_positive_int, default=3, help="counted runs per measurement (default: 3)")
    parser.add_argument("--warmup", type=_non_negative_int, default=1, help="discarded runs before them (default: 1)")
    parser.add_argument("--verify-sha256", metavar="HEX", help="fail (exit 3) unless the artifact has this SHA-256")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids (default: 0)")
    parser.add_argument(
        "--repack",
        choices=("auto", "on", "off"),
        default="auto",
        help="GGUF: llama.cpp extra CPU buffer types (repacked weights, AMX); auto = on, off after a crash",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--verbose", action="store_true", help="forward the runtime's own log lines to stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} ({SCHEMA_VERSION})")
    parser.add_argument(_WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(_FALLBACK_FLAG, metavar="SIGNAL", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return _run_worker(args) if args._worker else _supervise(argv, args)
    except BenchError as err:
        return _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as err:  # a bug: still one line, with the traceback only on request
        if os.environ.get("DEVICE_BENCH_DEBUG"):
            traceback.print_exc()
        reason = " ".join(str(err).split())
        return _fail(f"unexpected {type(err).__name__}: {reason} (set DEVICE_BENCH_DEBUG=1 for a traceback)", 2)


def _supervise(argv: list[str], args: argparse.Namespace) -> int:
    """Run the benchmark in a child process and turn a native crash into one error line (or one retry).

    A launcher that sets ``DEVICE_BENCH_PARENT_PID`` to its own pid (edgeforge's local target does) has this
    supervisor die with it: killed by SIGKILL, the launcher cannot stop it, and it would run on as an orphan.
    """
    parent = os.environ.get(PARENT_PID_ENV, "")
    if parent.isdigit():
        _die_with_parent(int(parent))
    exit_code, crash = _run_child(argv)
    if crash is None:
        return exit_code
    if crash in _CRASH_SIGNALS and args.repack == "auto" and _is_gguf(args.artifact):
        _log(
            args,
            f"llama.cpp crashed ({crash.name}) with its extra CPU buffer types (repacked/AMX weights); "
            "retrying once with --repack off",
        )
        exit_code, crash = _run_child([*argv, "--repack", "off", _FALLBACK_FLAG, crash.name])
        if crash is None:
            return exit_code
    if crash == signal.SIGKILL:
        raise BenchError(f"the benchmark was killed ({crash.name}) while running {args.artifact}: out of memory?")
    if crash not in _CRASH_SIGNALS:
        raise BenchError(f"the benchmark was stopped by {crash.name} while running {args.artifact}")
    raise BenchError(
        f"the runtime crashed ({crash.name}) while benchmarking {args.artifact}; rerun with --verbose for its log"
        + ("" if args.repack == "off" else " or with --repack off")
    )


def _run_child(argv: list[str]) -> tuple[int, signal.Signals | None]:
    """Run ``python -m device_bench ARGV --_worker`` with inherited stdio; return (exit code, crash signal)."""
    env = dict(os.environ)
    # The child must import this very package, wherever it was pushed: put its parent dir first on the path.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    child = subprocess.Popen([sys.executable, "-m", PROG, *argv, _WORKER_FLAG], env=env)
    # A remote orchestrator stops a run with SIGTERM: pass it on, or the child would go on loading the CPU.
    previous_handler = signal.signal(signal.SIGTERM, lambda _signum, _frame: child.terminate())
    try:
        returncode = child.wait()
    except KeyboardInterrupt:
        # The child got the same SIGINT and reports "interrupted" itself; just wait for it to finish.
        returncode = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if returncode >= 0:
        return returncode, None
    try:
        return 2, signal.Signals(-returncode)
    except ValueError:
        raise BenchError(f"the benchmark process died with signal {-returncode}") from None


def _run_worker(args: argparse.Namespace) -> int:
    """Validate the inputs, run the benchmark in this process and print the report."""
    _die_with_parent()
    started_at = _utc_now()
    wall_start_s = time.monotonic()
    plan = _plan(args)
    artifact = resolve_artifact(args.artifact)
    settings = resolve_settings(artifact, args.threads, args.n_ctx, plan.needed_ctx)
    if args.sustained is not None and args.sustained < args.window_s:
        raise BenchError(f"--sustained {args.sustained:g} is shorter than one window (--window-s {args.window_s:g})")
    for line in settings.differs_from_shipped:
        _log(args, f"warning: {line}")
    sha256 = verify_sha256(artifact, args.verify_sha256) if args.verify_sha256 else None
    runner = _make_runner(artifact, settings, plan, args)
    runner.import_runtime()

    device = fingerprint()
    rss_before_load_bytes = proc_status_bytes("VmRSS")
    try:
        load_ms = timed_ms(runner.load)
        # Logged only once loaded, so a load failure is the single error line on stderr.
        _log(
            args,
            f"loaded {args.artifact} with {runner.runtime} {runner.runtime_version} in {load_ms:.0f} ms "
            f"(threads={settings.threads} from {settings.threads_source}, n_ctx={settings.n_ctx})",
        )
        sustained = None
        if args.sustained is not None:
            # First, on a device that has not run the model yet: the first window is the cold one. One token
            # decoded before it pages in the weights, as every warm-up does.
            runner.decode(1)
            sustained = run_sustained(runner, args.sustained, args.window_s, plan.gen_tokens,
                                      lambda message: _log(args, message))
        measurements = run_plan(runner, plan, lambda message: _log(args, message))
        details = runner.details()
    finally:
        runner.close()
    if args._repack_fallback:
        details["repack_fallback"] = f"first run crashed with {args._repack_fallback}; rerun with --repack off"
    temperatures_after_c, throttled_after = read_thermals()

    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "edgeforge-device-bench", "version": __version__},
        "started_at": started_at,
        "duration_s": time.monotonic() - wall_start_s,
        "artifact": args.artifact,
        "model_bytes": artifact.model_bytes,
        "sha256": sha256,
        "format": artifact.format,
        "runtime": runner.runtime,
        "runtime_version": runner.runtime_version,
        "threads": settings.threads,
        "n_ctx": settings.n_ctx,
        "runtime_config": settings.as_report(),
        "prompt_tokens": plan.prompt_tokens,
        "prompt_lengths": list(plan.prompt_lengths),
        "gen_tokens": plan.gen_tokens,
        "repeats": plan.repeats,
        "warmup": plan.warmup,
        "seed": args.seed,
        "load_ms": load_ms,
        **measurements,
        "peak_rss_bytes": peak_rss_bytes(),
        "vm_hwm_bytes": proc_status_bytes("VmHWM"),
        "rss_before_load_bytes": rss_before_load_bytes,
        "device": device,
        "temperatures_after_c": temperatures_after_c,
        "throttled_after": throttled_after,
        "runtime_details": details,
    }
    if sustained is not None:
        report["sustained"] = sustained
    report = _rounded(report)
    problems = validate_report(report)
    if problems:
        raise BenchError("internal error: the report does not match its schema: " + "; ".join(problems))
    text = json.dumps(report, indent=2, sort_keys=False)
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        except OSError as err:
            raise BenchError(f"cannot write --out {args.out}: {err.strerror or err}") from None
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0


def _die_with_parent(expected_parent: int | None = None) -> None:
    """On Linux, have the kernel kill this process if its parent dies (even by SIGKILL); best-effort.

    ``expected_parent``: the parent's pid; if it already died before the request took effect, stop now.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        raise BenchError("the process that started the benchmark is gone; nothing was measured")


def _plan(args: argparse.Namespace) -> Plan:
    """The measurement plan from the flags; the TTFT prompt length is always one of the prefill lengths."""
    lengths = set(args.prompt_lengths or [DEFAULT_SHORT_PROMPT_TOKENS])
    lengths.add(args.prompt_tokens)
    return Plan(
        prompt_tokens=args.prompt_tokens,
        prompt_lengths=sorted(lengths),
        gen_tokens=args.gen_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        decode_depths=sorted(set(args.decode_depths)),
    )


def _make_runner(artifact: Artifact, settings: RuntimeSettings, plan: Plan, args: argparse.Namespace) -> Runner:
    """The runner for the artifact's format; runtimes are imported only when loading, inside the runner."""
    common: dict[str, Any] = {
        "artifact": artifact,
        "threads": settings.threads,
        "n_ctx": settings.n_ctx,
        "max_prompt_tokens": plan.longest_prompt,
        "seed": args.seed,
    }
    if artifact.format == "gguf":
        from device_bench.gguf_runner import GgufRunner

        return GgufRunner(repack=args.repack != "off", verbose=args.verbose, n_batch=settings.n_batch,
                          n_ubatch=settings.n_ubatch, cache_type_k=settings.cache_type_k,
                          cache_type_v=settings.cache_type_v, **common)
    from device_bench.onnx_runner import OnnxRunner

    return OnnxRunner(verbose=args.verbose, **common)


def _is_gguf(path: str) -> bool:
    """Whether ``path`` is a GGUF artifact (False when it is not readable: the child reported that)."""
    try:
        return resolve_artifact(path).format == "gguf"
    except (BenchError, OSError):
        return False


def _rounded(value: Any) -> Any:
    """Floats rounded to 3 decimals (microseconds for ``_ms`` keys): more digits are timer noise."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def _utc_now() -> str:
    """Current UTC time as ISO 8601 with a Z suffix."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log(args: argparse.Namespace, message: str) -> None:
    """A progress line on stderr (never stdout, which carries only the report)."""
    if not args.quiet:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _fail(message: str, exit_code: int) -> int:
    """Print the one error line and return its exit code."""
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return exit_code


def _positive_int(text: str) -> int:
    """Parse for argparse: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    """Parse for argparse: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    """Parse for argparse: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _length_list(text: str) -> list[int]:
    """Parse for argparse: comma-separated positive integers, e.g. ``32,128,512``."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}")
    return [_positive_int(part) for part in parts]


def _int(text: str) -> int:
    """int() with an argparse-friendly error."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
