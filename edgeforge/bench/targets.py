"""Targets: concrete devices a benchmark runs on (this machine, a board over SSH, a phone over adb).

A target is a YAML file validated by one of the pydantic models below (``type`` picks which; unknown keys are
rejected). Built-in targets live in the repository's ``targets/`` folder; users add their own with
``--targets-dir``, the ``EDGEFORGE_TARGETS`` environment variable (a ``:``-separated list of folders or files), or
by passing a YAML file's path where a target name is expected.

Each target names its device profile (a profile name, or the path of a profile file such as the one
``edgeforge profiles detect --out`` writes on the device). The ``local`` target may leave it out: the profile is
then ``this-machine``, detected with a measured memory bandwidth.

Talking to a device (:class:`SshShell`, :class:`AdbShell`) is kept safe here:

* Every remote command is one string built by the caller from ``shlex.quote``-d pieces; no local shell is used.
* SSH checks host keys strictly against the target's ``known_hosts_file`` only (never auto-adds, never writes it),
  in batch mode, offering only the named key. Files travel as one tar stream over ``ssh`` rather than ``scp``:
  scp's remote paths are parsed by a shell in its legacy mode and not in its SFTP mode, so no single quoting is
  right for both. ``adb push`` paths are not parsed by a shell at all.
* Each local ``ssh``/``adb`` process runs in its own session, so a terminal's Ctrl-C reaches edgeforge only, which
  then stops it and cleans up on the device (see :mod:`edgeforge.bench.run`).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from edgeforge.errors import BadInputError, EdgeforgeError
from edgeforge.paths import builtin_dir, device_bench_package, yaml_files
from edgeforge.validation import describe_validation_error, read_yaml_file

BUILTIN_TARGETS_DIR = builtin_dir("targets")
#: The on-device agent: a stdlib-only package pushed next to the artifact.
DEVICE_BENCH_PACKAGE = device_bench_package()

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # also a file-name part: <artifact>.bench-<name>.json


# ---------------------------------------------------------------- errors
class TargetError(EdgeforgeError):
    """A target cannot be reached or used, or the run on it failed."""


class TargetConfigError(BadInputError):
    """A target is unknown or its YAML file is malformed."""


class TargetUnreachableError(TargetError):
    """The device does not answer (closed port, no route, unknown host name, timeout)."""


class TargetAuthError(TargetError):
    """The device answered but refused the key."""


class HostKeyError(TargetError):
    """The device's host key is unknown or differs from the one in known_hosts_file."""


class TransferCorruptedError(TargetError):
    """The artifact on the device does not have the SHA-256 of the local one."""


class RuntimeMissingError(TargetError):
    """The device's Python lacks the runtime the artifact needs (llama-cpp-python or onnxruntime)."""


class RemoteRunError(TargetError):
    """The benchmark started on the device but did not produce a report."""


class AdbError(TargetError):
    """adb is missing, or no (or the wrong) Android device is attached."""


class Interrupted(KeyboardInterrupt):
    """The run was cancelled (Ctrl-C, SIGTERM, or another target's interrupt); cleanup has run."""


# ---------------------------------------------------------------- target files
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _TargetBase(_Strict):
    name: str = Field(pattern=_NAME, description="unique name, used with --target and in result file names")
    description: str = Field(default="", description="free text shown by 'targets list'")
    run_timeout_s: float = Field(default=3600, gt=0, description="give up on one benchmark after this long")


class LocalTarget(_TargetBase):
    """This machine: device_bench runs in place on the artifact, nothing is copied."""

    type: Literal["local"]
    profile: str | None = Field(
        default=None, description="profile name or file; empty: 'this-machine', detected with measured bandwidth"
    )
    python: str | None = Field(default=None, description="Python that runs device_bench (default: edgeforge's)")


class SshTarget(_TargetBase):
    """A device reached with the system ``ssh`` binary, host key checked strictly."""

    type: Literal["ssh"]
    profile: str = Field(description="profile name, or the path of a profile file (e.g. from 'profiles detect')")
    host: str = Field(pattern=r"^[A-Za-z0-9_.:%\[\]][A-Za-z0-9_.:%\[\]-]*$", description="host name or address")
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(pattern=r"^[A-Za-z0-9._][A-Za-z0-9._-]*$", description="login user")
    key_file: Path | None = Field(default=None, description="private key; only this key is offered")
    known_hosts_file: Path = Field(
        default=Path("~/.ssh/known_hosts"), description="the only file host keys are trusted from (never written)"
    )
    python: str = Field(default="python3", description="Python on the device that runs device_bench")
    workdir: str = Field(default="/tmp/edgeforge-bench", description="a run directory is made (and removed) here")
    connect_timeout_s: int = Field(default=10, ge=1, description="ssh ConnectTimeout")

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class AdbTarget(_TargetBase):
    """An Android device over adb; device_bench runs with a Python on the device (e.g. Termux's)."""

    type: Literal["adb"]
    profile: str = Field(description="profile name, or the path of a profile file")
    serial: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._:-]+$", description="adb serial; needed when several are attached"
    )
    python: str = Field(description="Python on the device that the adb shell user may run")
    workdir: str = Field(default="/data/local/tmp/edgeforge-bench", description="a run directory is made here")
    adb: str = Field(default="adb", description="the adb binary (name on PATH, or a path)")


Target = LocalTarget | SshTarget | AdbTarget
_TARGET_ADAPTER: TypeAdapter[Target] = TypeAdapter(Annotated[Target, Field(discriminator="type")])
DEFAULT_LOCAL = LocalTarget(name="local", type="local", description="this machine (built in)")


def _format_validation_error(path: Path, err: ValidationError) -> str:
    return describe_validation_error(path, err, "target", union_tags=("local", "ssh", "adb"))


def _is_path_like(value: str) -> bool:
    return value.endswith((".yaml", ".yml")) or os.sep in value or value.startswith("~")


def _anchor(value: Path, base: Path) -> Path:
    p = value.expanduser()
    return p if p.is_absolute() else base / p


def load_target_file(path: str | os.PathLike[str]) -> Target:
    """Read and validate one target YAML file; relative paths in it are relative to the file's folder.

    Raises TargetConfigError naming the file and the field.
    """
    p = Path(path)
    data = read_yaml_file(p, "target", TargetConfigError)
    if not isinstance(data, dict):
        raise TargetConfigError(f"{p}: expected a YAML mapping of target fields, found {type(data).__name__}")
    try:
        target = _TARGET_ADAPTER.validate_python(data)
    except ValidationError as e:
        raise TargetConfigError(_format_validation_error(p, e)) from None
    base = p.resolve().parent
    update: dict[str, Any] = {}
    if target.profile and _is_path_like(target.profile):
        update["profile"] = str(_anchor(Path(target.profile), base))
    if isinstance(target, SshTarget):
        update["known_hosts_file"] = _anchor(target.known_hosts_file, base)
        if target.key_file is not None:
            update["key_file"] = _anchor(target.key_file, base)
    return target.model_copy(update=update) if update else target


def target_search_path(extra: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Where targets are looked up: the built-ins, then EDGEFORGE_TARGETS, then ``extra``."""
    env = [Path(p) for p in os.environ.get("EDGEFORGE_TARGETS", "").split(os.pathsep) if p]
    return [BUILTIN_TARGETS_DIR, *env, *(Path(p) for p in extra)]


class TargetRegistry:
    """Targets by name. A second target of the same name is an error, not a silent override."""

    def __init__(self) -> None:
        self._targets: dict[str, Target] = {}
        self._origin: dict[str, Path | None] = {}

    def register(self, target: Target, origin: Path | None) -> None:
        if target.name in self._targets:
            raise TargetConfigError(
                f"{origin}: target name '{target.name}' is already defined by {self._origin[target.name]}; "
                "rename one of them"
            )
        self._targets[target.name] = target
        self._origin[target.name] = origin

    def names(self) -> list[str]:
        return sorted(self._targets)

    def origin(self, name: str) -> Path | None:
        return self._origin[name]

    def get(self, name: str) -> Target:
        try:
            return self._targets[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=4, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise TargetConfigError(
                f"unknown target '{name}'.{hint} (known: {', '.join(self.names())}; or pass a target YAML path)"
            ) from None

    def __iter__(self):
        return iter(self._targets[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._targets)


def load_target_registry(extra: Iterable[str | os.PathLike[str]] = ()) -> TargetRegistry:
    """All targets on the search path, validated; ``local`` is always there (built in unless a file defines it)."""
    registry = TargetRegistry()
    for location in target_search_path(extra):
        if not location.exists():
            if location == BUILTIN_TARGETS_DIR:
                continue
            raise TargetConfigError(f"{location}: target folder or file does not exist")
        for f in yaml_files(location):
            registry.register(load_target_file(f), f)
    if "local" not in registry.names():
        registry.register(DEFAULT_LOCAL, None)
    return registry


def resolve_target(name_or_path: str, extra: Iterable[str | os.PathLike[str]] = ()) -> Target:
    """A target by name, or from a YAML file path."""
    if _is_path_like(name_or_path):
        return load_target_file(Path(name_or_path).expanduser())
    return load_target_registry(extra).get(name_or_path)


def describe_address(target: Target) -> str:
    """Where the target is, in one short string."""
    if isinstance(target, SshTarget):
        return target.address
    if isinstance(target, AdbTarget):
        return f"adb:{target.serial or '(the only device)'}"
    return "this machine"


# ---------------------------------------------------------------- running commands
Cancel = threading.Event


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait(proc: subprocess.Popen, timeout_s: float, cancel: Cancel | None, what: str) -> None:
    """Wait for ``proc``; on cancel, Ctrl-C or timeout stop it and raise (Interrupted / TargetError)."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                proc.wait(timeout=0.2)
                return
            except subprocess.TimeoutExpired:
                pass
            if cancel is not None and cancel.is_set():
                _stop(proc)
                raise Interrupted(f"{what}: interrupted")
            if time.monotonic() > deadline:
                _stop(proc)
                raise TargetError(f"{what}: no answer within {timeout_s:g} s; raise run_timeout_s in the target "
                                  "file if the device is just slow")
    except KeyboardInterrupt:
        if proc.poll() is None:
            _stop(proc)
        raise


def run_process(argv: list[str], *, timeout_s: float, cancel: Cancel | None = None, what: str = "command",
                stdin_writer: Callable[[IO[bytes]], None] | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (never through a local shell), in its own session so a terminal's Ctrl-C reaches only us.

    ``stdin_writer`` streams data into the process's stdin (the tar of a push). Output is captured as text.
    """
    failed: list[OSError] = []  # a local read error while streaming stdin
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_writer else subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, env=env)
        except FileNotFoundError:
            raise TargetError(f"{what}: '{argv[0]}' not found") from None
        if stdin_writer is not None:
            assert proc.stdin is not None
            # Write from a thread, so a process that stops reading (a failed mkdir) cannot block us for good.

            def feed() -> None:
                try:
                    stdin_writer(proc.stdin)  # type: ignore[arg-type]
                except BrokenPipeError:
                    pass  # the process stopped reading: its exit status and stderr say why
                except (OSError, ValueError) as e:
                    failed.append(e if isinstance(e, OSError) else OSError(str(e)))
                finally:
                    with contextlib.suppress(OSError, ValueError):
                        proc.stdin.close()  # type: ignore[union-attr]

            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
        try:
            _wait(proc, timeout_s, cancel, what)
        finally:
            if stdin_writer is not None:
                with contextlib.suppress(OSError, ValueError):
                    proc.stdin.close()  # type: ignore[union-attr]
                feeder.join(timeout=5)
        if failed:
            raise TargetError(f"{what}: reading the local files failed: {failed[0]}")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, proc.returncode, out.read().decode("utf-8", "replace"),
                                           err.read().decode("utf-8", "replace"))


def tail(text: str, n: int = 2) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


class RemoteShell(Protocol):
    """A POSIX shell on a device: run one command string, and push files into a directory."""

    label: str

    def run(self, command: str, *, timeout_s: float, cancel: Cancel | None = None,
            what: str = "command") -> subprocess.CompletedProcess[str]: ...

    def push(self, items: list[tuple[Path, str]], dest_expr: str, *, timeout_s: float,
             cancel: Cancel | None = None) -> None: ...


def remote_path_expr(path: str) -> str:
    """A remote path as a quoted shell word; a leading ``~/`` stays the remote user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class SshShell:
    """The system ``ssh`` binary with strict host-key checking and only the target's key."""

    def __init__(self, target: SshTarget) -> None:
        self.target = target
        self.label = f"{target.name} ({target.address})"

    def ssh_argv(self) -> list[str]:
        t = self.target
        argv = ["ssh", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={t.known_hosts_file}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no", "-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={t.connect_timeout_s}", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR", "-p", str(t.port), "-l", t.user]
        if t.key_file is not None:
            argv += ["-o", "IdentitiesOnly=yes", "-i", str(t.key_file)]
        return argv

    def _preflight(self) -> None:
        t = self.target
        if shutil.which("ssh") is None:
            raise TargetError("ssh not found: install the OpenSSH client (Debian/Ubuntu: apt-get install "
                              "openssh-client)")
        if t.key_file is not None and not t.key_file.is_file():
            raise TargetConfigError(f"target '{t.name}': key_file {t.key_file} does not exist")
        if not t.known_hosts_file.is_file():
            scan, kh = shlex.quote(f"{t.host}.hostkey"), shlex.quote(str(t.known_hosts_file))
            raise HostKeyError(
                f"target '{t.name}': known_hosts_file {t.known_hosts_file} does not exist, so the host key of "
                f"{t.host}:{t.port} cannot be checked; check its fingerprint before trusting it: run `ssh-keyscan "
                f"-p {t.port} -t ed25519 {shlex.quote(t.host)} | tee {scan} | ssh-keygen -lf -` here and `ssh-keygen "
                "-lf /etc/ssh/ssh_host_ed25519_key.pub` on the device's own console (not over the network); only if "
                f"the two SHA256 fingerprints match, add the key: `cat {scan} >> {kh}`"
            )

    def run(self, command: str, *, timeout_s: float, cancel: Cancel | None = None, what: str = "command",
            stdin_writer: Callable[[IO[bytes]], None] | None = None) -> subprocess.CompletedProcess[str]:
        self._preflight()
        argv = [*self.ssh_argv(), "--", self.target.host, command]
        done = run_process(argv, timeout_s=timeout_s, cancel=cancel, what=f"{self.label}: {what}",
                           stdin_writer=stdin_writer)
        if done.returncode == 255:
            self._raise_connection_error(done.stderr)
        return done

    def _raise_connection_error(self, stderr: str) -> None:
        """ssh's own failures exit 255; tell them apart by what ssh printed.

        A remote command killed by a signal also makes ssh exit 255, with no ssh message: that returns, and the
        caller reports it as a failed command.
        """
        t = self.target
        text = stderr.lower()
        where = f"target '{t.name}' ({t.address})"
        if "remote host identification has changed" in text or "host key for" in text and "changed" in text:
            scan, kh = shlex.quote(f"{t.host}.hostkey"), shlex.quote(str(t.known_hosts_file))
            entry = shlex.quote(t.host if t.port == 22 else f"[{t.host}]:{t.port}")
            raise HostKeyError(
                f"{where}: the host key does not match the one in {t.known_hosts_file}: refusing to connect "
                "(a different machine answers, or the device was reinstalled); check the new fingerprint: run "
                f"`ssh-keyscan -p {t.port} -t ed25519 {shlex.quote(t.host)} | tee {scan} | ssh-keygen -lf -` here "
                "and `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the device's own console (not over the "
                f"network); only if they match, replace the old key: `ssh-keygen -R {entry} -f {kh} && cat {scan} "
                f">> {kh}`"
            )
        if "host key verification failed" in text or "no " in text and "host key is known" in text:
            scan, kh = shlex.quote(f"{t.host}.hostkey"), shlex.quote(str(t.known_hosts_file))
            raise HostKeyError(
                f"{where}: its host key is not in {t.known_hosts_file}: refusing to connect to an unknown host; "
                f"check its fingerprint before trusting it: run `ssh-keyscan -p {t.port} -t ed25519 "
                f"{shlex.quote(t.host)} | tee {scan} | ssh-keygen -lf -` here and `ssh-keygen -lf "
                "/etc/ssh/ssh_host_ed25519_key.pub` on the device's own console (not over the network); only if the "
                f"two SHA256 fingerprints match, add the key: `cat {scan} >> {kh}`"
            )
        if "permission denied" in text or "too many authentication failures" in text:
            raise TargetAuthError(
                f"{where}: the device refused the key {t.key_file or '(ssh defaults)'} for user '{t.user}'; add "
                "its public key to that user's ~/.ssh/authorized_keys on the device"
            )
        for marker in ("connection refused", "timed out", "no route to host", "could not resolve hostname",
                       "network is unreachable", "name or service not known", "connection closed",
                       "connection reset"):
            if marker in text:
                raise TargetUnreachableError(
                    f"{where} is unreachable: {tail(stderr, 1)}; check that the device is on, sshd runs and "
                    f"port {t.port} is open"
                )
        if stderr.lower().startswith(("ssh:", "kex_", "unable to negotiate", "bad ")):
            raise TargetUnreachableError(f"{where}: ssh failed: {tail(stderr)}")

    def push(self, items: list[tuple[Path, str]], dest_expr: str, *, timeout_s: float,
             cancel: Cancel | None = None) -> None:
        """Stream ``items`` (local path, name inside dest) as one tar into the existing remote ``dest_expr``."""

        def write_tar(stdin: IO[bytes]) -> None:
            # dereference: a symlinked artifact travels as the file it points to
            with tarfile.open(fileobj=stdin, mode="w|", dereference=True) as tar:
                for local, arcname in items:
                    tar.add(str(local), arcname=arcname, filter=_skip_pycache)

        command = f"cd {dest_expr} && tar -xf -"
        done = self.run(command, timeout_s=timeout_s, cancel=cancel, what="push", stdin_writer=write_tar)
        if done.returncode != 0:
            raise TargetError(f"{self.label}: copying files to the device failed: {tail(done.stderr)} (the "
                              "device needs 'tar' and free space in the workdir)")


def _skip_pycache(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name.split("/") else info


class AdbShell:
    """``adb -s SERIAL shell`` on an Android device; files go with ``adb push`` (paths are not shell-parsed)."""

    def __init__(self, target: AdbTarget) -> None:
        self.target = target
        self.label = f"{target.name} ({describe_address(target)})"
        self._serial: str | None = None

    def _adb(self) -> str:
        found = shutil.which(self.target.adb)
        if found is None:
            raise AdbError(f"adb not found: install Android platform-tools (Debian/Ubuntu: apt-get install adb), "
                           f"or set 'adb:' in target '{self.target.name}' to its path")
        return found

    def serial(self, cancel: Cancel | None = None) -> str:
        """The attached device's serial, checked against ``adb devices``."""
        if self._serial is not None:
            return self._serial
        adb = self._adb()
        done = run_process([adb, "devices"], timeout_s=60, cancel=cancel, what="adb devices")
        if done.returncode != 0:
            raise AdbError(f"'adb devices' failed: {tail(done.stderr)}")
        # "serial<TAB>state" rows; adb may print daemon start-up lines around them
        rows = [ln.split("\t") for ln in done.stdout.splitlines() if "\t" in ln]
        ready = [r[0] for r in rows if r[1].strip() == "device"]
        others = {r[0]: r[1].strip() for r in rows if r[1].strip() != "device"}
        t = self.target
        if t.serial:
            if t.serial in ready:
                self._serial = t.serial
                return t.serial
            state = others.get(t.serial)
            raise AdbError(f"Android device {t.serial} of target '{t.name}' is "
                           + (f"{state} (accept the USB debugging prompt on it?)" if state
                              else f"not attached (attached: {', '.join(ready) or 'none'})"))
        if not ready:
            extra = f" ({', '.join(f'{s}: {st}' for s, st in others.items())})" if others else ""
            raise AdbError(f"no Android device attached{extra}: connect one with USB debugging on and check "
                           "'adb devices'")
        if len(ready) > 1:
            raise AdbError(f"several Android devices attached ({', '.join(ready)}): set 'serial:' in target "
                           f"'{t.name}'")
        self._serial = ready[0]
        return ready[0]

    def run(self, command: str, *, timeout_s: float, cancel: Cancel | None = None,
            what: str = "command") -> subprocess.CompletedProcess[str]:
        argv = [self._adb(), "-s", self.serial(cancel), "shell", command]
        return run_process(argv, timeout_s=timeout_s, cancel=cancel, what=f"{self.label}: {what}")

    def push(self, items: list[tuple[Path, str]], dest_expr: str, *, timeout_s: float,
             cancel: Cancel | None = None) -> None:
        # adb push needs a literal path; ask the device's shell to spell out the (quoted) destination once.
        done = self.run(f"cd {dest_expr} && pwd", timeout_s=60, cancel=cancel, what="locate run dir")
        dest = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None
        if not dest:
            raise TargetError(f"{self.label}: cannot enter the run directory: {tail(done.stderr or done.stdout)}")
        for local, arcname in items:
            parent = os.path.dirname(arcname)
            if parent:
                self.run(f"mkdir -p {shlex.quote(dest + '/' + parent)}", timeout_s=60, cancel=cancel, what="mkdir")
            real = Path(os.path.realpath(local))
            done = run_process([self._adb(), "-s", self.serial(cancel), "push", str(real), f"{dest}/{arcname}"],
                               timeout_s=timeout_s, cancel=cancel, what=f"{self.label}: push")
            if done.returncode != 0:
                raise TargetError(f"{self.label}: adb push of {local} failed: {tail(done.stderr or done.stdout)}")


def shell_for(target: SshTarget | AdbTarget) -> SshShell | AdbShell:
    return SshShell(target) if isinstance(target, SshTarget) else AdbShell(target)


# ---------------------------------------------------------------- targets check
_PROBE_PY = (
    "import importlib.util, json, platform, sys\n"
    "print(json.dumps({'python': sys.version.split()[0], 'machine': platform.machine(),\n"
    "    'llama_cpp': importlib.util.find_spec('llama_cpp') is not None,\n"
    "    'onnxruntime': importlib.util.find_spec('onnxruntime') is not None}))\n"
)


def check_target(target: Target, cancel: Cancel | None = None) -> dict[str, Any]:
    """Reach the target and report its Python, machine, runtimes and whether workdir is writable.

    Installs nothing; ``workdir`` is created if missing (the benchmark would create it too).
    """
    if isinstance(target, LocalTarget):
        python = target.python or sys.executable
        done = run_process([python, "-c", _PROBE_PY], timeout_s=60, cancel=cancel, what="probe")
        writable = True
    else:
        shell = shell_for(target)
        py = shlex.quote(target.python)
        wd = remote_path_expr(target.workdir)
        done = shell.run(f"mkdir -p {wd} && test -w {wd} && echo WRITABLE; {py} -c {shlex.quote(_PROBE_PY)}",
                         timeout_s=120, cancel=cancel, what="check")
        writable = "WRITABLE" in done.stdout
        python = target.python
    if done.returncode != 0:
        raise RemoteRunError(f"target '{target.name}': cannot run '{python}': {tail(done.stderr)}; set 'python:' "
                             "in the target file to the device's Python 3")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return {"name": target.name, "type": target.type, "address": describe_address(target),
            "python_path": python, **info, "workdir_writable": writable}
