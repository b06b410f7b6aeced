"""One benchmark on a device over ssh or adb (:func:`run_remote`).

Probe the device's Python and runtime (before anything is copied), make a fresh run directory under ``workdir``,
push device_bench and the artifact, run device_bench with ``--verify-sha256`` (the model file is checked on the
device before it is loaded), read its JSON from stdout, and remove the run directory, on success, failure and
interrupt alike. A process still running there is stopped first: its pid is recorded and checked against the run id
before a signal is sent, so a reused pid is never hit. Every remote command is built from ``shlex.quote``-d
pieces. Nothing is installed unless ``--setup`` asks.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeforge.bench.artifact import LocalArtifact
from edgeforge.bench.errors import RemoteRunError, RuntimeMissingError, TargetError, TransferCorruptedError
from edgeforge.bench.setup import RUNTIME_MODULES, pip_install_command, runtime_requirement
from edgeforge.bench.targets import DEVICE_BENCH_PACKAGE, AdbTarget, SshTarget
from edgeforge.bench.transport import Cancel, RemoteShell, remote_path_expr, tail
from edgeforge.errors import EdgeforgeError
from edgeforge.fileio import sha256_file

#: Python module of each artifact format's runtime, and the pip package ``--setup`` installs for it.


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


def device_bench_error(done: subprocess.CompletedProcess[str], label: str, python: str, fmt: str) -> EdgeforgeError:
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
    _probe_runtime(shell, target, artifact, request.setup, log, cancel)
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
            raise device_bench_error(done, label, target.python, artifact.format)
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


def _probe_runtime(shell: RemoteShell, target: SshTarget | AdbTarget, artifact: LocalArtifact, setup: bool,
                   log: Callable[[str], None], cancel: Cancel | None) -> None:
    """Before anything is copied: the device's Python runs and has the runtime; with ``setup``, install it
    (``pip install --user``, pinned to the version the artifact was verified with) when missing."""
    req = runtime_requirement(artifact)
    module, package = req.module, req.package
    py = shlex.quote(target.python)
    label = f"target '{target.name}'"
    probe = f"{py} -c {shlex.quote(_PROBE_RUNTIME_PY)} {shlex.quote(module)}"
    done = shell.run(probe, timeout_s=120, cancel=cancel, what="probe")
    if done.returncode == 4 and setup:
        if req.version is None:
            raise RuntimeMissingError(f"{label}: --setup cannot pin {package}: the artifact's record names no version "
                                      f"and none is installed here; install {package}==VERSION on the device")
        log(f"{target.name}: --setup: installing {req.describe()} with pip --user (llama-cpp-python compiles "
            "llama.cpp: minutes on a small board)")
        install = shell.run(pip_install_command(target.python, req, user=True), timeout_s=target.run_timeout_s,
                            cancel=cancel, what="pip install")
        if install.returncode != 0:
            raise RuntimeMissingError(f"{label}: --setup could not install {req.requirement} with "
                                      f"'{target.python} -m pip install --user': {pip_error(install)}")
        log(f"{target.name}: --setup: installed {req.requirement}")
        done = shell.run(probe, timeout_s=120, cancel=cancel, what="probe")
    if done.returncode == 4:
        raise RuntimeMissingError(
            f"{label}: the device's Python ({target.python}) has no {module}: install {req.requirement} there "
            f"('{target.python} -m pip install --user {req.requirement}') or rerun with --setup"
        )
    if done.returncode != 0:
        raise RemoteRunError(f"{label}: cannot run '{target.python}' on the device: "
                             f"{tail(done.stderr) or f'exit {done.returncode}'}; set 'python:' in the target file "
                             "to the device's Python 3.8+")


def pip_error(done: subprocess.CompletedProcess[str]) -> str:
    """pip's own 'error: ...' line (e.g. externally-managed-environment), else the end of its output."""
    text = done.stderr or done.stdout
    first = next((ln.strip() for ln in text.splitlines() if ln.lower().startswith("error")), None)
    return first or tail(text) or f"exit {done.returncode}"
