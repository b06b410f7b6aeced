"""Talking to a device: running one local process safely (its own session, a timeout, cancellation), and the
remote shells that run a command and push files over ``ssh`` (:class:`SshShell`) or ``adb`` (:class:`AdbShell`).

* Every remote command is one string built by the caller from ``shlex.quote``-d pieces; no local shell is used.
* SSH checks host keys strictly against the target's ``known_hosts_file`` only (never auto-adds, never writes it),
  in batch mode, offering only the named key. Files travel as one tar stream over ``ssh`` rather than ``scp``:
  scp's remote paths are parsed by a shell in its legacy mode and not in its SFTP mode, so no single quoting is
  right for both. ``adb push`` paths are not parsed by a shell at all.
* Each local ``ssh``/``adb`` process runs in its own session, so a terminal's Ctrl-C reaches edgeforge only, which
  then stops it and cleans up on the device (see :mod:`edgeforge.bench.remote`).

The shells read their target through the SshEndpoint / AdbEndpoint protocols (edgeforge.bench.targets' SshTarget
and AdbTarget), so this module does not depend on the target files.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from edgeforge.bench.errors import (
    AdbError,
    HostKeyError,
    Interrupted,
    TargetAuthError,
    TargetConfigError,
    TargetError,
    TargetUnreachableError,
)

Cancel = threading.Event


class SshEndpoint(Protocol):
    """What SshShell reads of its target (an edgeforge.bench.targets.SshTarget)."""

    name: str
    host: str
    port: int
    user: str
    key_file: Path | None
    known_hosts_file: Path
    connect_timeout_s: int

    @property
    def address(self) -> str: ...


class AdbEndpoint(Protocol):
    """What AdbShell reads of its target (an edgeforge.bench.targets.AdbTarget)."""

    name: str
    serial: str | None
    adb: str


def adb_address(serial: str | None) -> str:
    """Where an adb target is, in one short string."""
    return f"adb:{serial or '(the only device)'}"


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

    def __init__(self, target: SshEndpoint) -> None:
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

    def __init__(self, target: AdbEndpoint) -> None:
        self.target = target
        self.label = f"{target.name} ({adb_address(target.serial)})"
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
