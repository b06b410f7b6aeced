"""Benchmarks on real targets: run device_bench on each (artifact, target), put the planner's estimate beside
each measurement, save the result next to the artifact, and compare results in one table.

A result is device_bench's report (schema ``edgeforge.bench/1``) plus:
``target``, ``target_type``, ``profile``, ``artifact`` (the local path), ``remote_artifact`` (the path on the
device), ``estimated_decode_tokens_per_s``, ``estimated_prefill_tokens_per_s``, ``estimated_ttft_ms``,
``decode_ratio_measured_to_estimated`` and ``prefill_ratio_measured_to_estimated`` (``estimate_error`` instead
when no estimate could be made). It is saved as ``<artifact>.bench-<target>.json``.

On a remote target (:func:`run_remote`) one benchmark is: probe the device's Python and runtime (before anything
is copied), make a fresh run directory under ``workdir``, push device_bench and the artifact, run device_bench
with ``--verify-sha256`` (the model file is checked on the device before it is loaded), read its JSON from stdout,
and remove the run directory, on success, failure and interrupt alike. A process still running there is stopped
first: its pid is recorded and checked against the run id before a signal is sent, so a reused pid is never hit.
Every remote command is built from ``shlex.quote``-d pieces. Nothing is installed unless ``--setup`` asks.

Targets run in parallel (one thread each; the artifacts of one target run one after another, so two benchmarks
never share a device). Ctrl-C or SIGTERM cancels every target; each removes what it put on its device first.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeforge.bench.errors import Interrupted, RemoteRunError, RuntimeMissingError, TargetError, TransferCorruptedError
from edgeforge.bench.targets import DEVICE_BENCH_PACKAGE, AdbTarget, LocalTarget, SshTarget, Target, shell_for
from edgeforge.bench.transport import Cancel, RemoteShell, remote_path_expr, run_process, tail
from edgeforge.errors import BadInputError, EdgeforgeError
from edgeforge.fileio import sha256_file, write_text_atomic
from edgeforge.plan.profiles import DeviceProfile, load_profile_file, load_registry

#: Python module of each artifact format's runtime, and the pip package ``--setup`` installs for it.
RUNTIME_MODULES = {"gguf": ("llama_cpp", "llama-cpp-python"), "onnx": ("onnxruntime", "onnxruntime")}


# ---------------------------------------------------------------- artifacts as they travel
@dataclass(frozen=True)
class LocalArtifact:
    """A GGUF file or an ONNX export directory on this machine, as it will be pushed.

    ``model_file`` is what device_bench checks with --verify-sha256 (the GGUF, or the ONNX dir's model.onnx; the
    other files of an ONNX dir are checked before the run); ``sidecars`` travel with a GGUF (its runtime.json);
    ``weights_bytes`` is what the estimator streams per token (the GGUF, or the dir's .onnx/.onnx_data files).
    """

    path: Path
    format: Literal["gguf", "onnx"]
    model_file: Path
    weights_bytes: int
    sidecars: tuple[Path, ...] = ()

    @property
    def name(self) -> str:
        return self.path.name


def local_artifact(path: str | os.PathLike[str]) -> LocalArtifact:
    """Check that ``path`` is a GGUF file or an ONNX export directory (or its model.onnx) and size it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise BadInputError(f"{p}: artifact not found; expected a .gguf file or an ONNX export directory")
    if p.is_file() and p.suffix.lower() == ".onnx":
        p = p.parent
    if p.is_dir():
        model = p / "model.onnx"
        if not model.is_file():
            raise BadInputError(f"{p}: a directory without model.onnx; expected an ONNX export directory")
        weights = sum(f.stat().st_size for f in p.iterdir() if f.is_file() and ".onnx" in f.name)
        return LocalArtifact(p, "onnx", model, weights)
    if not p.is_file():  # a FIFO or a device: opening it could block forever
        raise BadInputError(f"{p}: not a regular file; expected a .gguf file or an ONNX export directory")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise BadInputError(f"{p}: cannot read the artifact ({e.strerror or e})") from None
    if magic != b"GGUF":
        raise BadInputError(f"{p}: not a GGUF file (magic {magic!r}, expected b'GGUF') nor an ONNX export directory")
    runtime_json = p.with_name(p.name + ".runtime.json")
    return LocalArtifact(p, "gguf", p, p.stat().st_size, (runtime_json,) if runtime_json.is_file() else ())


# ---------------------------------------------------------------- one benchmark on a device
@dataclass
class RemoteRun:
    """One run directory on a device. ``rundir_expr`` is a shell word (quoted); ``run_id`` is unique."""

    workdir_expr: str
    run_id: str = field(default_factory=lambda: f"edgeforge-bench-{uuid.uuid4().hex[:16]}")

    @property
    def rundir_expr(self) -> str:
        return f"{self.workdir_expr}/{self.run_id}"


#: Checks the SHA-256 of every file listed in a JSON manifest {relative path: hex}; exit 3 names the first bad one.
_CHECK_FILES_PY = (
    "import hashlib, json, sys\n"
    "for name, want in json.load(open(sys.argv[1])).items():\n"
    "    h = hashlib.sha256()\n"
    "    with open(name, 'rb') as f:\n"
    "        for chunk in iter(lambda: f.read(1 << 20), b''):\n"
    "            h.update(chunk)\n"
    "    if h.hexdigest() != want:\n"
    "        sys.stderr.write('device_bench: error: sha256 mismatch for %s: expected %s, got %s\\n'"
    " % (name, want, h.hexdigest()))\n"
    "        sys.exit(3)\n"
)


def _cleanup_command(run: RemoteRun) -> str:
    """Stop a device_bench still running in the run dir (only if its pid's command line names the run id), then
    remove the run dir."""
    rid = shlex.quote(run.run_id)
    return (
        f"cd {run.workdir_expr} 2>/dev/null || exit 0; "
        f"pid=$(cat {rid}/pid 2>/dev/null); "
        f'if [ -n "$pid" ] && grep -q {rid} "/proc/$pid/cmdline" 2>/dev/null; then '
        f'kill -TERM "$pid" 2>/dev/null; i=0; '
        f'while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done; '
        f'kill -KILL "$pid" 2>/dev/null; fi; '
        f"rm -rf -- {rid}"
    )


@dataclass(frozen=True)
class BenchRequest:
    """What to measure: device_bench's flags (threads only when the user gave them) and whether to install."""

    device_bench_args: tuple[str, ...]
    setup: bool = False


def parse_report(stdout: str, label: str) -> dict[str, Any]:
    """The JSON report device_bench printed (a login script may print lines before it)."""
    text = stdout.strip()
    start = text.find("{") if text.startswith("{") else text.find("\n{") + 1
    try:
        report = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        report = None
    if not isinstance(report, dict) or "decode_tokens_per_s" not in report:
        raise RemoteRunError(f"{label}: device_bench printed no report (stdout: {tail(stdout) or 'empty'})")
    return report


def _device_bench_error(done: subprocess.CompletedProcess[str], label: str, python: str, fmt: str) -> EdgeforgeError:
    """The error for a failed device_bench run, by its exit code (3 sha mismatch, 4 runtime missing)."""
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    line = next((ln for ln in reversed(lines) if ln.startswith("device_bench: error:")), lines[-1] if lines else "")
    reason = line.removeprefix("device_bench: error:").strip() or f"exit code {done.returncode}, no message"
    if done.returncode == 3:
        return TransferCorruptedError(f"{label}: artifact corrupted in transfer ({reason}); rerun to push it again")
    if done.returncode == 4:
        module, package = RUNTIME_MODULES[fmt]
        return RuntimeMissingError(f"{label}: the device's Python ({python}) has no {module}: {reason} (or run "
                                   f"'{python} -m pip install --user {package}' there)")
    if done.returncode in (126, 127) and "device_bench" not in line:
        return RemoteRunError(f"{label}: cannot run '{python}' on the device: {reason}; set 'python:' in the "
                              "target file to the device's Python 3")
    if done.returncode == 255 and not line.startswith("device_bench: error:"):
        return RemoteRunError(f"{label}: the benchmark process on the device was killed, or the connection dropped, "
                              f"before it reported{': ' + reason if lines else ''}")
    if done.returncode < 0 or done.returncode > 128 or not line.startswith("device_bench: error:"):
        return RemoteRunError(f"{label}: the benchmark process stopped before reporting (exit {done.returncode}"
                              f"{', killed?' if done.returncode in (137, 143, -9, -15) else ''}): {reason}")
    return RemoteRunError(f"{label}: {reason}")


def run_remote(shell: RemoteShell, target: SshTarget | AdbTarget, artifact: LocalArtifact,
               request: BenchRequest, *, log: Callable[[str], None] = lambda _m: None,
               cancel: Cancel | None = None,
               after_push: Callable[[Any, RemoteRun], None] | None = None) -> dict[str, Any]:
    """Push device_bench and ``artifact`` into a fresh run dir, run it, return its report, remove the run dir.

    ``after_push(shell, run)`` is called between the push and the run (tests use it to corrupt the upload).
    """
    if not DEVICE_BENCH_PACKAGE.is_dir():
        raise TargetError(f"the device agent is missing at {DEVICE_BENCH_PACKAGE}; reinstall edgeforge")
    run = RemoteRun(remote_path_expr(target.workdir))
    label = f"target '{target.name}'"
    py = shlex.quote(target.python)
    _probe_runtime(shell, target, artifact.format, request.setup, log, cancel)
    try:  # the device answers: from here on, whatever happens, the run dir is removed
        done = shell.run(f"umask 077 && mkdir -p {run.workdir_expr} && mkdir {run.rundir_expr} && "
                         f"mkdir {run.rundir_expr}/agent {run.rundir_expr}/artifact",
                         timeout_s=120, cancel=cancel, what="make run dir")
        if done.returncode != 0:
            raise TargetError(f"{label}: cannot make a run directory under workdir {target.workdir}: "
                              f"{tail(done.stderr)}")
        items = [(DEVICE_BENCH_PACKAGE, "agent/device_bench"), (artifact.path, f"artifact/{artifact.name}"),
                 *((s, f"artifact/{s.name}") for s in artifact.sidecars)]
        manifest: dict[str, str] = {}
        if artifact.format == "onnx":  # device_bench checks model.onnx; the side files are checked here
            manifest = {f"artifact/{artifact.name}/{f.name}": sha256_file(f) for f in sorted(artifact.path.iterdir())
                        if f.is_file() and f.name != "model.onnx"}
        sha = sha256_file(artifact.model_file)
        size_mb = sum(p.stat().st_size for p in (artifact.model_file, *artifact.sidecars)) / 1e6
        log(f"{target.name}: pushing device_bench and {artifact.name} ({size_mb:.0f} MB)")
        shell.push(items, run.rundir_expr, timeout_s=target.run_timeout_s, cancel=cancel)
        if manifest:
            write = shell.run(f"cd {run.rundir_expr} && printf %s {shlex.quote(json.dumps(manifest))} > files.sha256",
                              timeout_s=60, cancel=cancel, what="write manifest")
            if write.returncode != 0:
                raise TargetError(f"{label}: cannot write the file manifest: {tail(write.stderr)}")
        if after_push is not None:
            after_push(shell, run)
        remote_artifact = '"$PWD"/artifact/' + shlex.quote(artifact.name)
        check = f"{py} -c {shlex.quote(_CHECK_FILES_PY)} files.sha256 && " if manifest else ""
        args = " ".join(shlex.quote(a) for a in (*request.device_bench_args, "--verify-sha256", sha, "--quiet"))
        command = (f"cd {run.rundir_expr} && echo $$ > pid && {check}"
                   f'export PYTHONPATH="$PWD/agent" PYTHONDONTWRITEBYTECODE=1 && '
                   f"exec {py} -m device_bench {remote_artifact} {args}")
        log(f"{target.name}: running device_bench on {artifact.name}")
        done = shell.run(command, timeout_s=target.run_timeout_s, cancel=cancel, what="benchmark")
        if done.returncode != 0:
            raise _device_bench_error(done, label, target.python, artifact.format)
        return parse_report(done.stdout, label)
    finally:
        _cleanup(shell, run, label, log)


def _cleanup(shell: RemoteShell, run: RemoteRun, label: str, log: Callable[[str], None]) -> None:
    """Remove the run dir, even after an interrupt (a fresh connection, never the cancelled one)."""
    try:
        done = shell.run(_cleanup_command(run), timeout_s=60, what="cleanup")
        if done.returncode != 0:
            log(f"warning: {label}: could not remove the run directory {run.run_id}: {tail(done.stderr)}")
    except EdgeforgeError as e:
        log(f"warning: {label}: could not remove the run directory {run.run_id} ({e})")


#: Exit 0 when this Python (>= 3.8) has the module named in argv[1], 4 when it lacks it, 5 when it is too old.
_PROBE_RUNTIME_PY = (
    "import importlib.util, sys\n"
    "if sys.version_info < (3, 8):\n"
    "    sys.stderr.write('Python %s is too old: device_bench needs 3.8 or newer\\n' % sys.version.split()[0])\n"
    "    sys.exit(5)\n"
    "sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 4)\n"
)


def _probe_runtime(shell: RemoteShell, target: SshTarget | AdbTarget, fmt: str, setup: bool,
                   log: Callable[[str], None], cancel: Cancel | None) -> None:
    """Before anything is copied: the device's Python runs and has the runtime; with ``setup``, install it
    (``pip install --user``) when missing."""
    module, package = RUNTIME_MODULES[fmt]
    py = shlex.quote(target.python)
    label = f"target '{target.name}'"
    probe = f"{py} -c {shlex.quote(_PROBE_RUNTIME_PY)} {shlex.quote(module)}"
    done = shell.run(probe, timeout_s=120, cancel=cancel, what="probe")
    if done.returncode == 4 and setup:
        log(f"{target.name}: --setup: installing {package} with pip --user (llama-cpp-python compiles llama.cpp: "
            "minutes on a small board)")
        install = shell.run(f"{py} -m pip install --user -q {shlex.quote(package)}", timeout_s=target.run_timeout_s,
                            cancel=cancel, what="pip install")
        if install.returncode != 0:
            raise RuntimeMissingError(f"{label}: --setup could not install {package} with "
                                      f"'{target.python} -m pip install --user': {_pip_error(install)}")
        done = shell.run(probe, timeout_s=120, cancel=cancel, what="probe")
    if done.returncode == 4:
        raise RuntimeMissingError(
            f"{label}: the device's Python ({target.python}) has no {module}: install {package} there "
            f"('{target.python} -m pip install --user {package}') or rerun with --setup"
        )
    if done.returncode != 0:
        raise RemoteRunError(f"{label}: cannot run '{target.python}' on the device: "
                             f"{tail(done.stderr) or f'exit {done.returncode}'}; set 'python:' in the target file "
                             "to the device's Python 3.8+")


def _pip_error(done: subprocess.CompletedProcess[str]) -> str:
    """pip's own 'error: ...' line (e.g. externally-managed-environment), else the end of its output."""
    text = done.stderr or done.stdout
    first = next((ln.strip() for ln in text.splitlines() if ln.lower().startswith("error")), None)
    return first or tail(text) or f"exit {done.returncode}"


def run_local(target: LocalTarget, artifact: LocalArtifact, request: BenchRequest, *,
              log: Callable[[str], None] = lambda _m: None, cancel: Cancel | None = None) -> dict[str, Any]:
    """Run device_bench on this machine, on the artifact where it is (nothing is copied, so no checksum)."""
    python = target.python or sys.executable
    env = {k: v for k, v in os.environ.items() if k != "DEVICE_BENCH_DEBUG"}
    env["PYTHONPATH"] = str(DEVICE_BENCH_PACKAGE.parent)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["DEVICE_BENCH_PARENT_PID"] = str(os.getpid())  # dies with edgeforge, even when edgeforge is SIGKILLed
    label = f"target '{target.name}'"
    if request.setup:
        module, package = RUNTIME_MODULES[artifact.format]
        probe = run_process([python, "-c", f"import {module}"], timeout_s=120, cancel=cancel, what="probe", env=env)
        if probe.returncode != 0:
            log(f"{target.name}: --setup: installing {package}")
            done = run_process([python, "-m", "pip", "install", "-q", package], timeout_s=target.run_timeout_s,
                               cancel=cancel, what="pip install", env=env)
            if done.returncode != 0:
                raise RuntimeMissingError(f"{label}: --setup could not install {package}: {_pip_error(done)}")
    log(f"{target.name}: running device_bench on {artifact.name}")
    argv = [python, "-m", "device_bench", str(artifact.path.absolute()), *request.device_bench_args, "--quiet"]
    done = run_process(argv, timeout_s=target.run_timeout_s, cancel=cancel, what=f"{label}: benchmark", env=env)
    if done.returncode != 0:
        raise _device_bench_error(done, label, python, artifact.format)
    return parse_report(done.stdout, label)


def run_on_target(target: Target, artifact: LocalArtifact, request: BenchRequest, *,
                  log: Callable[[str], None] = lambda _m: None, cancel: Cancel | None = None,
                  after_push: Callable[[Any, RemoteRun], None] | None = None) -> dict[str, Any]:
    """Benchmark ``artifact`` on ``target``; the device_bench report."""
    if isinstance(target, LocalTarget):
        return run_local(target, artifact, request, log=log, cancel=cancel)
    return run_remote(shell_for(target), target, artifact, request, log=log, cancel=cancel, after_push=after_push)


# ---------------------------------------------------------------- estimates and results
#: Keys every result carries (device_bench's report adds more).
RESULT_KEYS = (
    "load_ms", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_p50", "decode_ms_p95",
    "peak_rss_bytes", "model_bytes", "threads", "runtime", "runtime_version", "device", "target", "profile",
    "estimated_decode_tokens_per_s", "estimated_prefill_tokens_per_s", "decode_ratio_measured_to_estimated",
)


@dataclass(frozen=True)
class BenchOptions:
    """Benchmark settings. ``threads`` None: device_bench uses the artifact's runtime.json, else physical cores."""

    threads: int | None = None
    prompt_tokens: int = 128
    gen_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    setup: bool = False

    def request(self) -> BenchRequest:
        args = ["--prompt-tokens", str(self.prompt_tokens), "--gen-tokens", str(self.gen_tokens),
                "--repeats", str(self.repeats), "--warmup", str(self.warmup)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        return BenchRequest(tuple(args), self.setup)


def target_profile(target: Target, profiles_dirs: Sequence[str | os.PathLike[str]] = ()) -> DeviceProfile:
    """The profile the target names (a registry name or a profile file); for ``local`` without one, this machine
    detected now (cores, RAM, measured memory bandwidth)."""
    if target.profile is None:
        from edgeforge.plan.detect import detect_profile

        return detect_profile("this-machine")
    if target.profile.endswith((".yaml", ".yml")) or os.sep in target.profile:
        return load_profile_file(target.profile)
    return load_registry(profiles_dirs).get(target.profile)


@functools.lru_cache(maxsize=32)
def _arch(path: Path) -> Any:
    """The artifact's architecture (a ModelArch), or the error message when it cannot be read; read once."""
    from edgeforge.models.refs import read_arch, resolve_model

    try:
        return read_arch(resolve_model(str(path)))
    except EdgeforgeError as e:
        return str(e)


def estimate_for(profile: DeviceProfile, artifact: LocalArtifact, prompt_tokens: int) -> dict[str, Any]:
    """The planner's estimate for ``artifact`` on ``profile``: decode/prefill tokens/s and TTFT.

    The architecture is read from the GGUF's metadata or the ONNX export's config.json; the weights are the
    artifact's bytes (the GGUF file, or the ONNX dir's .onnx/.onnx_data files). The backend is the profile's runtime
    for the artifact's format (CPU when the profile has none for it).
    """
    from edgeforge.plan.estimator import estimate_speed

    arch = _arch(artifact.path)
    if isinstance(arch, str):
        return {"estimate_error": f"no architecture to estimate from: {arch}"}
    runtime = profile.runtime_for(artifact.format)
    backend = runtime.backend if runtime else "cpu"
    est = estimate_speed(profile, arch, artifact.weights_bytes, prompt_tokens, backend)
    return {"estimated_decode_tokens_per_s": round(est.decode_tokens_per_s, 3),
            "estimated_prefill_tokens_per_s": round(est.prefill_tokens_per_s, 3),
            "estimated_ttft_ms": round(est.ttft_ms, 3), "estimate_backend": backend}


def _ratio(measured: Any, estimated: Any) -> float | None:
    if not isinstance(measured, (int, float)) or not isinstance(estimated, (int, float)) or estimated <= 0:
        return None
    return round(measured / estimated, 4)


def make_result(report: dict[str, Any], target: Target, profile: DeviceProfile, artifact: LocalArtifact,
                estimate: dict[str, Any]) -> dict[str, Any]:
    """device_bench's report with the target, the profile and the estimate beside the measurement."""
    result = dict(report)
    result["remote_artifact"] = report.get("artifact")
    result["artifact"] = str(artifact.path.absolute())
    result["target"] = target.name
    result["target_type"] = target.type
    result["profile"] = profile.name
    result.setdefault("estimated_decode_tokens_per_s", None)
    result.setdefault("estimated_prefill_tokens_per_s", None)
    result.update(estimate)
    result["decode_ratio_measured_to_estimated"] = _ratio(result.get("decode_tokens_per_s"),
                                                          result.get("estimated_decode_tokens_per_s"))
    result["prefill_ratio_measured_to_estimated"] = _ratio(result.get("prefill_tokens_per_s"),
                                                           result.get("estimated_prefill_tokens_per_s"))
    return result


def result_path(artifact: Path, target_name: str) -> Path:
    """Where a result is saved: ``<artifact>.bench-<target>.json`` next to the artifact (file or ONNX dir)."""
    return artifact.with_name(f"{artifact.name}.bench-{target_name}.json")


def save_result(result: dict[str, Any], log: Callable[[str], None] = lambda _m: None) -> Path | None:
    """Write the result next to its artifact; a read-only location is reported, not fatal."""
    path = result_path(Path(result["artifact"]), result["target"])
    try:  # atomic: a run killed while saving leaves no half-written result to be compared later
        write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    except OSError as e:
        log(f"warning: could not save the result to {path}: {e.strerror or e}")
        return None
    return path


# ---------------------------------------------------------------- many artifacts on many targets
@dataclass(frozen=True)
class TargetJob:
    """One target with its profile (resolved up front: detection measures bandwidth, never during a benchmark)."""

    target: Target
    profile: DeviceProfile


def run_benchmarks(artifacts: Sequence[str | os.PathLike[str]], jobs: Sequence[TargetJob], options: BenchOptions,
                   *, log: Callable[[str], None] = lambda _m: None, cancel: threading.Event | None = None,
                   after_push: Callable[[Any, RemoteRun], None] | None = None,
                   save: bool = True) -> list[dict[str, Any]]:
    """Benchmark every artifact on every target, targets in parallel; results in (artifact, target) order.

    Every result that was measured is saved even when another target fails; then the first failure is raised.
    """
    arts = [local_artifact(a) for a in artifacts]
    if not arts:
        raise BadInputError("no artifact given: pass one or more .gguf files or ONNX export directories")
    if not jobs:
        raise BadInputError("no target given")
    names = [j.target.name for j in jobs]
    if len(set(names)) != len(names):
        raise BadInputError(f"target given twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    cancel = cancel or threading.Event()
    request = options.request()

    def on_target(job: TargetJob) -> list[dict[str, Any] | BaseException]:
        out: list[dict[str, Any] | BaseException] = []
        for art in arts:
            if cancel.is_set():
                break
            try:
                report = run_on_target(job.target, art, request, log=log, cancel=cancel, after_push=after_push)
            except (EdgeforgeError, Interrupted) as e:
                out.append(e)
                continue
            # estimated after the run (reading a GGUF's metadata takes a moment; a failed run needs none)
            estimate = estimate_for(job.profile, art, options.prompt_tokens)
            result = make_result(report, job.target, job.profile, art, estimate)
            if save:
                saved = save_result(result, log)
                if saved:
                    log(f"{job.target.name}: saved {saved}")
            out.append(result)
        return out

    pool = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="bench")
    futures = [pool.submit(on_target, j) for j in jobs]
    try:
        per_target = [f.result() for f in futures]
    except BaseException:
        # Ctrl-C / SIGTERM in the main thread: every target stops its process and removes its run dir.
        cancel.set()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    for a_index in range(len(arts)):
        for outs in per_target:
            if a_index < len(outs):
                item = outs[a_index]
                (errors if isinstance(item, BaseException) else results).append(item)  # type: ignore[arg-type]
    interrupted = [e for e in errors if isinstance(e, Interrupted)]
    if interrupted:
        raise interrupted[0]
    if errors:
        first = errors[0]
        more = f" ({len(errors) - 1} more failed)" if len(errors) > 1 else ""
        kept = f"; {len(results)} other result(s) were saved" if results and save else ""
        raise type(first)(f"{first}{more}{kept}") from None
    return results


def jobs_for(targets: Sequence[Target], profiles_dirs: Sequence[str | os.PathLike[str]] = (),
             log: Callable[[str], None] = lambda _m: None) -> list[TargetJob]:
    """Resolve each target's profile once (detecting this machine when ``local`` names none)."""
    jobs = []
    for t in targets:
        if isinstance(t, LocalTarget) and t.profile is None:
            log(f"{t.name}: detecting this machine's profile (measuring memory bandwidth)")
        jobs.append(TargetJob(t, target_profile(t, profiles_dirs)))
    return jobs


# ---------------------------------------------------------------- saved results
def load_results(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Results from saved JSON files (a result, or a list of them, as ``bench --json`` prints)."""
    results = []
    for p in map(Path, paths):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError(f"{p}: no such result file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInputError(f"{p}: not a readable JSON result ({e})") from None
        except RecursionError:
            raise BadInputError(f"{p}: not a readable JSON result (nested too deeply)") from None
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "decode_tokens_per_s" not in item:
                where = f"{p}[{i}]" if isinstance(data, list) else str(p)
                raise BadInputError(f"{where}: not a benchmark result (expected a JSON object with "
                                    "decode_tokens_per_s, as 'edgeforge bench' saves)")
            results.append(item)
    if not results:
        raise BadInputError("no results to compare")
    return results


# ---------------------------------------------------------------- the table
def _num(value: Any, fmt: str = "{:,.1f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def results_table(results: Sequence[dict[str, Any]], title: str = "Benchmark") -> Any:
    """One rich table: a row per (artifact, target), the planner's estimate in brackets beside each speed."""
    from rich.table import Table

    t = Table(title=title, caption="tok/s measured (the planner's estimate for the target's profile); "
              "meas/est: measured / estimated decode")
    t.add_column("artifact", overflow="fold", min_width=12)
    t.add_column("target", overflow="fold")
    t.add_column("profile", overflow="fold")
    t.add_column("runtime")
    for col in ("thr", "MB", "load ms", "TTFT ms", "prefill tok/s", "decode tok/s", "meas/est", "p50/p95 ms",
                "RSS MB"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in results:
        t.add_row(
            Path(str(r.get("artifact", "?"))).name, str(r.get("target", "?")), str(r.get("profile", "?")),
            f"{r.get('runtime', '?')} {r.get('runtime_version', '')}".strip(), _num(r.get("threads"), "{}"),
            _num((r.get("model_bytes") or 0) / 1e6), _num(r.get("load_ms"), "{:,.0f}"), _num(r.get("ttft_ms")),
            f"{_num(r.get('prefill_tokens_per_s'))} ({_num(r.get('estimated_prefill_tokens_per_s'), '{:,.0f}')})",
            f"{_num(r.get('decode_tokens_per_s'))} ({_num(r.get('estimated_decode_tokens_per_s'), '{:,.0f}')})",
            _num(r.get("decode_ratio_measured_to_estimated"), "{:.2f}"),
            f"{_num(r.get('decode_ms_p50'), '{:.1f}')}/{_num(r.get('decode_ms_p95'), '{:.1f}')}",
            _num((r.get("peak_rss_bytes") or 0) / 1e6, "{:,.0f}"),
        )
    return t
