"""The CLI through click's CliRunner: JSON output, and every bad input as one clear line with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import LLAMA_3_2_3B

from edgeforge.cli.app import cli


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_help_lists_command_groups():
    code, out, _ = run("--help")
    assert code == 0
    for group in ("profiles", "plan", "models", "demo"):
        assert group in out


def test_profiles_list_json_has_sources():
    code, out, _ = run("profiles", "list", "--json")
    profiles = json.loads(out)
    assert code == 0 and len(profiles) >= 17 and all(p["sources"] for p in profiles)


def test_profiles_validate_builtins_and_broken_file(tmp_path: Path):
    assert run("profiles", "validate")[0] == 0
    broken = tmp_path / "broken.yaml"
    broken.write_text('name: broken\nmemory_total_bytes: "lots"\nbogus_field: 1\n')
    code, _, err = run("profiles", "validate", str(broken))
    assert code == 2
    assert "broken.yaml" in err and "memory_total_bytes" in err and "bogus_field" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_profile_suggests_close_names():
    code, _, err = run("plan", "--profile", "rtx-4090")
    assert code == 2 and "unknown profile 'rtx-4090'" in err and "rtx-4090-24gb" in err


def test_missing_model_path_says_so():
    code, _, err = run("plan", "--profile", "rtx-4090-24gb", "--teacher", "/nonexistent/model")
    assert code == 2 and "'/nonexistent/model' not found" in err


def test_unknown_quant():
    code, _, err = run("plan", "--profile", "rtx-4090-24gb", "--quant", "Q9")
    assert code == 2 and "unknown quant type 'Q9'" in err


def test_plan_json_keys_on_config_only_dir(config_dir):
    d = config_dir(LLAMA_3_2_3B)
    code, out, err = run("plan", "--profile", "raspberry-pi-5-8gb", "--teacher", str(d), "--json")
    assert code == 0, err
    plan = json.loads(out)
    for key in ("fits", "weights_bytes", "kv_cache_bytes", "total_bytes", "budget_bytes",
                "estimated_decode_tokens_per_s", "estimated_prefill_tokens_per_s", "decision", "reason", "student",
                "quant"):
        assert key in plan


def test_plan_default_teacher_on_small_profile_distills():
    code, out, _ = run("plan", "--profile", "raspberry-pi-zero-2w", "--json")
    plan = json.loads(out)
    assert code == 0 and "distill" in plan["decision"] and plan["student"]["layers"] < 30


def test_human_plan_output_has_the_decision():
    code, out, _ = run("plan", "--profile", "rtx-4090-24gb")
    assert code == 0 and "decision:" in out and "fine-tune" in out


def test_detect_builds_a_valid_profile(tmp_path: Path):
    out = tmp_path / "me.yaml"
    code, stdout, err = run("profiles", "detect", "--json", "--out", str(out))
    assert code == 0, err
    me = json.loads(stdout)
    assert me["memory_bandwidth_bytes_per_s"] > 1e8 and me["cpu"]["cores"] >= 1
    assert run("profiles", "validate", str(out))[0] == 0
    # The detected file can be used for planning by path.
    assert run("plan", "--profile", str(out), "--json")[0] == 0


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    code, _, err = run("models", "show", str(bad))
    assert code == 2 and "not a readable GGUF file" in err


@pytest.mark.parametrize("args", [["plan", "--profile", "nope"], ["profiles", "show", "nope"]])
def test_real_process_prints_no_traceback(args):
    exe = Path(sys.executable).parent / "edgeforge"
    r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("edgeforge: error:")


def test_export_errors_are_one_line(tmp_path: Path):
    code, _, err = run("export", "gguf", "/no/such/model", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "not found" in err
    code, _, err = run("export", "gguf", "smollm2-135m-instruct", "--quant", "Q3_X", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and "unknown GGUF quant type 'Q3_X'" in err
    code, _, err = run("export", "gguf", "smollm2-135m-instruct", "--out", str(tmp_path / "x.bin"))
    assert code == 2 and "ending in .gguf" in err
    code, _, err = run("eval", str(tmp_path / "missing.gguf"), "--reference", "smollm2-135m-instruct")
    assert code == 2 and "artifact not found" in err
