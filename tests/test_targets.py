"""Targets: YAML validation, the registry, quoting, adb's error paths, local benchmarks and saved-result comparison.

The SSH paths run against a real sshd in test_bench_ssh.py; here nothing is contacted except this machine and a
private adb server (started on a free port and stopped at the end).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeforge.bench.artifact import local_artifact
from edgeforge.bench.errors import HostKeyError, Interrupted, TargetConfigError, TargetError
from edgeforge.bench.results import RESULT_KEYS, estimate_for, load_results, make_result, result_path
from edgeforge.bench.run import BenchOptions
from edgeforge.bench.targets import (
    BUILTIN_TARGETS_DIR,
    LocalTarget,
    SshTarget,
    load_target_file,
    load_target_registry,
    resolve_target,
)
from edgeforge.bench.transport import SshShell, remote_path_expr, run_process
from edgeforge.cli.app import cli
from edgeforge.errors import BadInputError
from edgeforge.models.refs import resolve_model
from edgeforge.plan.profiles import load_registry

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 300
TINY = ["--threads", "1", "--prompt-tokens", "4", "--gen-tokens", "2", "--repeats", "1"]


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def edgeforge(*args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT_S,
              cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it, in a subprocess with a timeout (a hang fails the test instead of blocking it)."""
    return subprocess.run([sys.executable, "-m", "edgeforge", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def assert_one_error_line(done: subprocess.CompletedProcess[str], fragment: str, exit_code: int = 2) -> str:
    """Failure = exit code, exactly one 'edgeforge: error:' line (the last on stderr), no traceback."""
    assert done.returncode == exit_code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("edgeforge: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], done.stderr
    assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    return resolve_model(None).path


# ---------------------------------------------------------------- YAML and registry
def test_builtin_targets_validate_and_name_real_profiles() -> None:
    """targets/*.yaml load; every profile they name exists; each file opens with the command that uses it."""
    reg = load_target_registry()
    assert {"local", "pi5-lab"} <= set(reg.names())
    profiles = set(load_registry().names())
    for t in reg:
        assert t.profile is None or t.profile in profiles, t.name
        origin = reg.origin(t.name)
        assert origin is not None and origin.read_text().startswith("# "), origin
    pi5 = reg.get("pi5-lab")
    assert isinstance(pi5, SshTarget) and pi5.host == "192.0.2.10"  # documentation address: never contacted
    assert isinstance(reg.get("local"), LocalTarget)


def test_targets_list_json() -> None:
    result = CliRunner().invoke(cli, ["targets", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["pi5-lab"]["address"] == "pi@192.0.2.10:22"
    assert rows["local"]["profile"].startswith("this-machine")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: x\ntype: ssh\nprofile: raspberry-pi-5-8gb\nhost: h\nuser: u\nhostt: typo\n", "unknown field 'hostt'"),
        ("name: x\ntype: ssh\nprofile: raspberry-pi-5-8gb\nuser: u\n", "field 'host' is missing"),
        ("name: x\ntype: ssh\nprofile: p\nhost: h\nuser: u\nport: 70000\n", "field 'port'"),
        ("name: x\ntype: ssh\nprofile: p\nhost: -oProxyCommand=evil\nuser: u\n", "field 'host'"),
        ("name: x\ntype: telnet\nprofile: p\n", "field 'type' must be one of local, ssh, adb"),
        ("name: x\nprofile: p\n", "field 'type' is missing"),
        ("name: 'bad name/..'\ntype: local\n", "field 'name'"),
        ("name: x\ntype: adb\nprofile: p\n", "field 'python' is missing"),
        ("- a list\n", "expected a YAML mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_target_file_names_file_and_field(tmp_path: Path, text: str, fragment: str) -> None:
    path = write_yaml(tmp_path / "t.yaml", text)
    with pytest.raises(TargetConfigError) as err:
        load_target_file(path)
    assert str(path) in str(err.value) and fragment in str(err.value), str(err.value)
    assert isinstance(err.value, BadInputError)
    done = CliRunner().invoke(cli, ["targets", "check", str(path)])
    assert done.exit_code == 2 and fragment in done.stderr and "Traceback" not in done.output


def test_relative_paths_are_relative_to_the_target_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    path = write_yaml(tmp_path / "t.yaml", "name: x\ntype: ssh\nprofile: ./my-profile.yaml\nhost: 192.0.2.1\n"
                      "user: u\nkey_file: keys/id\nknown_hosts_file: keys/known_hosts\n")
    t = load_target_file(path)
    assert isinstance(t, SshTarget)
    assert t.key_file == tmp_path / "keys" / "id" and t.known_hosts_file == tmp_path / "keys" / "known_hosts"
    assert t.profile == str(tmp_path / "my-profile.yaml")


def test_duplicate_target_names_are_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_yaml(tmp_path / "a.yaml", "name: local\ntype: local\n")
    monkeypatch.setenv("EDGEFORGE_TARGETS", str(tmp_path))
    with pytest.raises(TargetConfigError, match="already defined by"):
        load_target_registry()


def test_unknown_target_suggests_close_names() -> None:
    with pytest.raises(TargetConfigError, match="Did you mean: pi5-lab"):
        resolve_target("pi5-labb")


def test_local_exists_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgeforge.bench.targets.BUILTIN_TARGETS_DIR", tmp_path / "none")
    assert resolve_target("local").type == "local"
    assert BUILTIN_TARGETS_DIR.is_dir()


# ---------------------------------------------------------------- quoting and process control
@pytest.mark.parametrize("path", ["/tmp/a b", "/tmp/x';touch PWNED;'", "/tmp/$(touch PWNED)", "rel/dir"])
def test_remote_path_expr_is_one_literal_word(tmp_path: Path, path: str) -> None:
    out = subprocess.run(["sh", "-c", f"printf %s {remote_path_expr(path)}"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=10)
    assert out.stdout == path and not list(tmp_path.iterdir())


def test_remote_path_expr_keeps_home() -> None:
    out = subprocess.run(["sh", "-c", f"printf %s {remote_path_expr('~/a b')}"], capture_output=True, text=True,
                         timeout=10, env={**os.environ, "HOME": "/home/me"})
    assert out.stdout == "/home/me/a b"


def test_ssh_command_line_is_strict(tmp_path: Path) -> None:
    t = SshTarget(name="x", type="ssh", profile="p", host="192.0.2.1", port=2222, user="u", key_file=tmp_path / "k",
                  known_hosts_file=tmp_path / "kh")
    argv = " ".join(SshShell(t).ssh_argv())
    for opt in ("StrictHostKeyChecking=yes", f"UserKnownHostsFile={tmp_path / 'kh'}", "BatchMode=yes",
                "IdentitiesOnly=yes", f"-i {tmp_path / 'k'}", "-p 2222", "ConnectTimeout=", "UpdateHostKeys=no"):
        assert opt in argv


def test_missing_known_hosts_file_is_refused_before_connecting(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("not a key")
    t = SshTarget(name="x", type="ssh", profile="p", host="192.0.2.1", user="u", key_file=tmp_path / "k",
                  known_hosts_file=tmp_path / "absent")
    with pytest.raises(HostKeyError, match="ssh-keyscan"):
        SshShell(t).run("true", timeout_s=5)


def test_run_process_times_out_and_cancels() -> None:
    start = time.monotonic()
    with pytest.raises(TargetError, match="no answer within"):
        run_process(["sleep", "30"], timeout_s=0.5)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    with pytest.raises(Interrupted):
        run_process(["sleep", "30"], timeout_s=30, cancel=cancel)
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------- adb
@pytest.fixture
def adb_target(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "phone.yaml", "# used by: edgeforge bench X --target phone.yaml\nname: phone\n"
                      "type: adb\nprofile: phone-midrange-android\npython: /data/local/tmp/python/bin/python3\n")


def test_adb_not_installed(adb_target: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    assert_one_error_line(edgeforge("targets", "check", str(adb_target), env=env),
                          "adb not found: install Android platform-tools")


def test_adb_without_device(adb_target: Path, bundled_gguf: Path, tmp_path: Path) -> None:
    """The real adb, on a private server port (so no other adb server is touched), sees no device."""
    import shutil

    adb = shutil.which("adb")
    assert adb, "adb is not installed: apt-get install adb (CI installs it)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ANDROID_ADB_SERVER_PORT": str(port)}
    try:
        assert_one_error_line(edgeforge("bench", str(bundled_gguf), "--target", str(adb_target), *TINY, env=env,
                                        cwd=tmp_path, timeout=120), "no Android device attached")
    finally:
        subprocess.run([adb, "kill-server"], env=env, capture_output=True, timeout=30)


# ---------------------------------------------------------------- estimates, results, local runs
def test_estimate_for_gguf(bundled_gguf: Path) -> None:
    profile = load_registry().get("raspberry-pi-5-8gb")
    art = local_artifact(bundled_gguf)
    est = estimate_for(profile, art, 128)
    assert est["estimated_decode_tokens_per_s"] > 0 and est["estimated_prefill_tokens_per_s"] > 0
    assert art.weights_bytes == bundled_gguf.stat().st_size
    report = {"decode_tokens_per_s": est["estimated_decode_tokens_per_s"] / 2, "prefill_tokens_per_s": 1.0,
              "artifact": "/remote/x.gguf"}
    target = LocalTarget(name="local", type="local")
    r = make_result(report, target, profile, art, est)
    assert r["decode_ratio_measured_to_estimated"] == pytest.approx(0.5, abs=1e-3)
    assert r["profile"] == "raspberry-pi-5-8gb" and r["target"] == "local" and r["remote_artifact"] == "/remote/x.gguf"


def test_bad_artifacts_are_one_error_line(tmp_path: Path) -> None:
    assert_one_error_line(edgeforge("bench", str(tmp_path / "none.gguf")), "artifact not found")
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" * 10)
    assert_one_error_line(edgeforge("bench", str(tmp_path / "fake.gguf")), "not a GGUF file")
    (tmp_path / "dir").mkdir()
    assert_one_error_line(edgeforge("bench", str(tmp_path / "dir")), "without model.onnx")
    assert_one_error_line(edgeforge("bench", str(tmp_path / "fake.gguf"), "--target", "nope"), "unknown target")


def test_local_bench_two_artifacts_json_table_and_compare(bundled_gguf: Path, tmp_path: Path) -> None:
    """Two artifacts in one call on a local target that names its profile: a JSON list, results saved next to
    each artifact, and 'bench compare' reads them back."""
    a, b = tmp_path / "a.gguf", tmp_path / "b b.gguf"
    a.symlink_to(bundled_gguf)
    b.symlink_to(bundled_gguf)
    for art in (a, b):  # what ships: device_bench takes threads from here, as no --threads is given
        art.with_name(art.name + ".runtime.json").write_text('{"n_threads": 1, "n_ctx": 256}')
    target = write_yaml(tmp_path / "here.yaml", "name: here\ntype: local\nprofile: laptop-x86-ryzen-7840u\n")
    done = edgeforge("bench", str(a), str(b), "--target", str(target), "--prompt-tokens", "4", "--gen-tokens", "2",
                     "--repeats", "1", "--json")
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert isinstance(results, list) and len(results) == 2
    for r in results:
        for key in RESULT_KEYS:
            assert key in r, key
        assert r["target"] == "here" and r["profile"] == "laptop-x86-ryzen-7840u" and r["runtime"] == "llama.cpp"
        assert r["decode_ratio_measured_to_estimated"] > 0
    # threads only when given: each ships a runtime.json (pushed beside it), which device_bench reads
    assert all(r["threads"] == 1 and r["runtime_config"]["threads_source"] == "runtime.json" for r in results)
    saved = [result_path(a, "here"), result_path(b, "here")]
    assert all(p.is_file() for p in saved)
    assert [r["artifact"] for r in load_results(saved)] == [str(a), str(b)]
    table = edgeforge("bench", "compare", *map(str, saved))
    assert table.returncode == 0 and "a.gguf" in table.stdout and "here" in table.stdout
    assert json.loads(edgeforge("bench", "compare", *map(str, saved), "--json").stdout)[0]["target"] == "here"


def test_local_target_detects_this_machine(bundled_gguf: Path, tmp_path: Path) -> None:
    """--target local with no profile: the estimate is for 'this-machine' (measured bandwidth); one result is a
    single JSON object."""
    art = tmp_path / "teacher.gguf"  # a link, so the result is saved here and not beside the installed package
    art.symlink_to(bundled_gguf)
    done = edgeforge("bench", str(art), "--target", "local", *TINY, "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert isinstance(r, dict) and r["profile"] == "this-machine" and r["estimated_decode_tokens_per_s"] > 0
    assert r["threads"] == 1 and r["runtime_config"]["threads_source"] == "cli"
    assert result_path(art, "local").is_file()


def test_local_sustained_run_and_a_warning_for_settings_that_are_not_the_shipped_ones(bundled_gguf: Path,
                                                                                       tmp_path: Path) -> None:
    """``bench --sustained`` prints the windows table and saves the windows with the device's conditions; a --threads
    other than the artifact's shipped n_threads is measured but warned about (the shipped batch/KV settings are
    used and recorded)."""
    art = tmp_path / "m.gguf"
    art.symlink_to(bundled_gguf)
    art.with_name(art.name + ".runtime.json").write_text(
        '{"n_threads": 2, "n_ctx": 256, "n_batch": 64, "cache_type_k": "f16", "cache_type_v": "f16"}')
    done = edgeforge("bench", str(art), "--target", "local", *TINY, "--sustained", "2", "--window-s", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning: not the shipped settings: threads: the artifact ships 2, measured with 1" in done.stderr
    assert "Sustained decode" in done.stdout and "drop" in done.stdout
    saved = json.loads(result_path(art, "local").read_text())
    assert len(saved["sustained"]["windows"]) == 2 and saved["runtime_details"]["n_batch"] == 64
    assert "cpu_governor" in saved["sustained"]["conditions_before"]
    assert_one_error_line(edgeforge("bench", str(art), "--sustained", "5", "--window-s", "10"),
                          "shorter than one window")
    assert_one_error_line(edgeforge("bench", str(art), "--decode-depths", "512,lots"), "--decode-depths")


def test_compare_rejects_non_results(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    assert_one_error_line(edgeforge("bench", "compare", str(tmp_path / "x.json")), "not a benchmark result")
    assert_one_error_line(edgeforge("bench", "compare", str(tmp_path / "absent.json")), "no such result file")


def test_bench_options_pass_threads_only_when_given() -> None:
    assert "--threads" not in BenchOptions().request().device_bench_args
    assert "--threads" in BenchOptions(threads=2).request().device_bench_args
    assert shlex.join(BenchOptions(setup=True).request().device_bench_args).startswith("--prompt-tokens 128")
