"""Benchmarks on real targets: run device_bench on each (artifact, target), put the planner's estimate beside
each measurement, save the result next to the artifact, and compare results in one table.

One benchmark runs on this machine (:func:`run_local`, on the artifact where it is) or on a device
(edgeforge.bench.remote); its result is built, saved and compared by edgeforge.bench.results.

Targets run in parallel (one thread each; the artifacts of one target run one after another, so two benchmarks
never share a device). Ctrl-C or SIGTERM cancels every target; each removes what it put on its device first.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from edgeforge.bench.artifact import LocalArtifact, local_artifact
from edgeforge.bench.errors import Interrupted, RuntimeMissingError
from edgeforge.bench.remote import (
    BenchRequest,
    RemoteRun,
    device_bench_error,
    parse_report,
    pip_error,
    run_remote,
)
from edgeforge.bench.results import estimate_for, make_result, save_result
from edgeforge.bench.setup import RuntimeRequirement, pip_install_command, runtime_requirement
from edgeforge.bench.targets import DEVICE_BENCH_PACKAGE, LocalTarget, Target, shell_for
from edgeforge.bench.transport import Cancel, run_process
from edgeforge.errors import BadInputError, EdgeforgeError
from edgeforge.plan.profiles import DeviceProfile, load_profile_file, load_registry


# ---------------------------------------------------------------- one benchmark on a target
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
        req = runtime_requirement(artifact)
        probe = run_process([python, "-c", f"import {req.module}"], timeout_s=120, cancel=cancel, what="probe",
                            env=env)
        if probe.returncode != 0:
            install_runtime_here(target.name, python, req, env, target.run_timeout_s, log, cancel)
    log(f"{target.name}: running device_bench on {artifact.name}")
    argv = [python, "-m", "device_bench", str(artifact.path.absolute()), *request.device_bench_args, "--quiet"]
    done = run_process(argv, timeout_s=target.run_timeout_s, cancel=cancel, what=f"{label}: benchmark", env=env)
    if done.returncode != 0:
        raise device_bench_error(done, label, python, artifact.format)
    return parse_report(done.stdout, label)


def install_runtime_here(name: str, python: str, req: RuntimeRequirement, env: dict[str, str], timeout_s: float,
                         log: Callable[[str], None], cancel: Cancel | None) -> None:
    """``--setup`` on this machine: pip-install the pinned runtime into ``python``'s environment."""
    if req.version is None:
        raise RuntimeMissingError(f"target '{name}': --setup cannot pin {req.package}: the artifact's record names "
                                  f"no version and none is installed here; install it with '{python} -m pip install "
                                  f"{req.package}==VERSION'")
    log(f"{name}: --setup: installing {req.describe()}")
    done = run_process(["/bin/sh", "-c", pip_install_command(python, req, user=False)], timeout_s=timeout_s,
                       cancel=cancel, what="pip install", env=env)
    if done.returncode != 0:
        raise RuntimeMissingError(f"target '{name}': --setup could not install {req.requirement}: {pip_error(done)}")
    log(f"{name}: --setup: installed {req.requirement}")


def run_on_target(target: Target, artifact: LocalArtifact, request: BenchRequest, *,
                  log: Callable[[str], None] = lambda _m: None, cancel: Cancel | None = None,
                  after_push: Callable[[Any, RemoteRun], None] | None = None) -> dict[str, Any]:
    """Benchmark ``artifact`` on ``target``; the device_bench report."""
    if isinstance(target, LocalTarget):
        return run_local(target, artifact, request, log=log, cancel=cancel)
    return run_remote(shell_for(target), target, artifact, request, log=log, cancel=cancel, after_push=after_push)


# ---------------------------------------------------------------- settings and profiles
@dataclass(frozen=True)
class BenchOptions:
    """Benchmark settings. ``threads`` None: device_bench uses the artifact's runtime.json, else physical cores."""

    threads: int | None = None
    prompt_tokens: int = 128
    gen_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    setup: bool = False
    decode_depths: tuple[int, ...] = ()
    sustained_s: float | None = None  # decode without pause this long first, reported per window
    window_s: float = 10.0

    def request(self) -> BenchRequest:
        args = ["--prompt-tokens", str(self.prompt_tokens), "--gen-tokens", str(self.gen_tokens),
                "--repeats", str(self.repeats), "--warmup", str(self.warmup)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.decode_depths:
            args += ["--decode-depths", ",".join(map(str, self.decode_depths))]
        if self.sustained_s is not None:
            args += ["--sustained", f"{self.sustained_s:g}", "--window-s", f"{self.window_s:g}"]
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
            for line in (report.get("runtime_config") or {}).get("differs_from_shipped") or []:
                log(f"{job.target.name}: warning: not the shipped settings: {line}")
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
