"""The unknown-host advice checks the fingerprint before trusting a key (issue #19): it used to say
``ssh-keyscan ... >> known_hosts``, which trusts whatever answers on first use.

The advice is followed literally against a real sshd on 127.0.0.1 (``T/test_bench_ssh.py``'s fixture): its
commands print the fingerprint of the key that answers, which equals the device's own ``ssh-keygen -lf`` of its
host key file (run here on the fixture's key, standing in for the device's console), and once the key is added as
advised the connection succeeds.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from test_bench_ssh import SshServer, sshd  # noqa: F401  (sshd: the session fixture, used by name)

from edgeforge.bench.errors import HostKeyError
from edgeforge.bench.targets import SshTarget
from edgeforge.bench.transport import SshShell

DEVICE_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"


def _target(server: SshServer, known_hosts: Path) -> SshTarget:
    return SshTarget(name="loopback", type="ssh", profile="raspberry-pi-5-8gb", host="127.0.0.1", port=server.port,
                     user=server.user, key_file=server.user_key, known_hosts_file=known_hosts)


def _advice(message: str) -> list[str]:
    """The commands of the message: each between backticks."""
    assert "\n" not in message
    commands = re.findall(r"`([^`]+)`", message)
    assert len(commands) == 3, message
    scan, console, add = commands
    assert "ssh-keyscan" in scan and "-t ed25519" in scan and "| ssh-keygen -lf -" in scan, scan
    assert console == f"ssh-keygen -lf {DEVICE_KEY}" and "on the device's own console" in message
    assert "only if" in message and ">>" in add and "ssh-keyscan" not in add, add
    return commands


def _fingerprint(ssh_keygen_output: str) -> str:
    return next(word for word in ssh_keygen_output.split() if word.startswith("SHA256:"))


def _follow(message: str, server: SshServer, where: Path) -> None:
    scan, console, add = _advice(message)
    here = subprocess.run(scan, shell=True, cwd=where, capture_output=True, text=True, timeout=60)
    assert here.returncode == 0, here.stderr
    device = subprocess.run(console.replace(DEVICE_KEY, str(server.host_key) + ".pub"), shell=True,
                            capture_output=True, text=True, timeout=60)
    assert _fingerprint(here.stdout) == _fingerprint(device.stdout)  # the check the advice asks for
    subprocess.run(add, shell=True, cwd=where, check=True, timeout=60)


def test_missing_known_hosts_file_advice_checks_the_fingerprint(sshd: SshServer, tmp_path: Path) -> None:  # noqa: F811
    known = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError) as err:
        SshShell(_target(sshd, known)).run("true", timeout_s=30)
    assert "does not exist" in str(err.value)
    _follow(str(err.value), sshd, tmp_path)
    assert SshShell(_target(sshd, known)).run("true", timeout_s=30).returncode == 0


@pytest.mark.parametrize("case", ["unknown", "changed"])
def test_unknown_or_changed_host_key_advice_checks_the_fingerprint(sshd: SshServer, tmp_path: Path,  # noqa: F811
                                                                   case: str) -> None:
    known = tmp_path / "known_hosts"
    if case == "changed":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "impostor")], check=True,
                       timeout=30)
        impostor = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
        known.write_text(f"[127.0.0.1]:{sshd.port} {impostor}\n")
    else:
        known.write_text("")
    with pytest.raises(HostKeyError) as err:
        SshShell(_target(sshd, known)).run("true", timeout_s=30)
    assert ("does not match" if case == "changed" else "not in") in str(err.value)
    _follow(str(err.value), sshd, tmp_path)
    assert SshShell(_target(sshd, known)).run("true", timeout_s=30).returncode == 0
