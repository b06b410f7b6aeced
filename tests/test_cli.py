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


def _task_file(path: Path, n: int, answer_words: int) -> Path:
    rows = [{"prompt": f"question number {i}", "completion": " ".join(["word"] * answer_words) + f" {i}"}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_plan_task_reads_the_examples_for_the_fine_tuning_cost(tmp_path: Path):
    """`plan --task FILE` counts the file's tokens with the teacher's tokenizer (the bundled teacher's GGUF
    vocabulary): the fine-tuning stage's tokens are FinetuneSettings' steps x batch x the mean example length, not
    the generic 2,000,000 the value used to be ignored for."""
    from edgeforge.finetune.config import FinetuneSettings

    task = _task_file(tmp_path / "long.jsonl", 60, answer_words=120)
    code, out, err = run("plan", "--profile", "raspberry-pi-zero-2w", "--task", str(task), "--json")
    assert code == 0, err
    plan = json.loads(out)
    t = plan["task"]
    assert t["train_examples"] + t["heldout_examples"] == 60 and t["heldout_examples"] >= 1
    assert t["mean_answer_tokens"] > 100  # 120 words and a number, each at least one token
    assert t["steps"] == FinetuneSettings().steps and t["batch_size"] == FinetuneSettings().batch_size
    stage = next(s for s in plan["training"]["stages"] if s["stage"].startswith("fine-tune"))
    assert stage["tokens"] == t["finetune_tokens"] != 2_000_000
    mean_tokens = t["mean_prompt_tokens"] + t["mean_answer_tokens"]
    assert abs(t["finetune_tokens"] - t["steps"] * t["batch_size"] * mean_tokens) < t["steps"] * t["batch_size"]
    assert plan["decision"] == "distill+fine-tune"


def test_plan_explicit_finetune_tokens_win_over_the_task():
    from edgeforge.models.refs import read_arch, resolve_model
    from edgeforge.plan.planner import plan
    from edgeforge.plan.profiles import load_registry
    from edgeforge.plan.task_cost import TaskCost

    reg = load_registry()
    cost = TaskCost(source="t", train_examples=100, heldout_examples=10, mean_prompt_tokens=40.0,
                    mean_answer_tokens=20.0, max_example_tokens=90, max_seq_len=256, examples_over_max_seq_len=0,
                    steps=200, batch_size=8, epochs=16.0, finetune_tokens=96_000, seq_len=90)
    arch = read_arch(resolve_model(None))

    def ft_tokens(**kw: object) -> int:
        p = plan(arch, reg.get("raspberry-pi-zero-2w"), "t", train_profile=reg.get("rtx-4090-24gb"), **kw)
        return next(s["tokens"] for s in p.training["stages"] if s["stage"].startswith("fine-tune"))

    assert ft_tokens(task=cost) == 96_000
    assert ft_tokens(task=cost, finetune_tokens=5_000) == 5_000
    assert ft_tokens() == 2_000_000


def test_plan_bad_task_file_is_one_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt here"}\n{"text": "nor here"}\n', encoding="utf-8")
    code, _, err = run("plan", "--profile", "raspberry-pi-zero-2w", "--task", str(bad))
    assert code == 2 and "expected 'messages' or string fields 'prompt' and 'completion'" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run("plan", "--profile", "raspberry-pi-zero-2w", "--task", "no-such-task")
    assert code == 2 and "no-such-task" in err and len(err.strip().splitlines()) == 1


def test_plan_for_onnx_between_int4_and_int8_names_the_onnx_fit(tmp_path: Path):
    """A board whose budget sits between the teacher's ONNX int4 and int8: ``plan --format onnx`` shows the room an
    ONNX 4/8-bit mix fills and the command that measures it (the fit measures on the fp32 graph, a plan makes none);
    in words too."""
    import yaml

    from edgeforge.models.refs import read_arch, resolve_model
    from edgeforge.plan.sizing import kv_cache_bytes, memory_estimate, runtime_overhead_bytes

    arch = read_arch(resolve_model(None))
    weights = {q: memory_estimate(arch, "onnx", q, 2048).weights_bytes for q in ("int4", "int8")}
    budget = (weights["int4"] + weights["int8"]) // 2 + kv_cache_bytes(arch, 2048) + runtime_overhead_bytes(arch, 2048)
    profile = yaml.safe_load((Path(__file__).parent.parent / "profiles" / "rtx-4090-24gb.yaml").read_text())
    profile.update(name="tight-board", memory_budget_bytes=budget)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tight-board.yaml").write_text(yaml.safe_dump(profile))
    args = ("plan", "--profile", "tight-board", "--profiles-dir", str(tmp_path / "profiles"), "--format", "onnx")
    code, out, err = run(*args, "--json")
    assert code == 0, err
    plan = json.loads(out)
    fit = plan["onnx_fit"]
    assert plan["gguf_fit"] is None
    assert fit["between_presets"]
    assert (fit["largest_preset_that_fits"], fit["smallest_preset_over"]) == ("int4", "int8")
    assert fit["room_bytes"] == fit["budget_bytes"] - weights["int4"] > 0
    assert "export onnx smollm2-135m-instruct --quantize fit --profile tight-board --context 2048" in fit["mix_command"]
    code, out, err = run(*args)
    assert code == 0, err
    assert "ONNX budget:" in out and "int8" in out and "export onnx" in out


def test_plan_between_presets_names_the_fit_and_how_to_measure_its_mix(tmp_path: Path):
    """A board whose budget sits between the teacher's Q6_K and Q8_0: plan shows the fitted mix when sensitivities
    of the file were measured, and otherwise the command that measures them (a plan measures nothing)."""
    import yaml

    from edgeforge.models.refs import read_arch, resolve_model
    from edgeforge.plan.sizing import kv_cache_bytes, memory_estimate, runtime_overhead_bytes

    arch = read_arch(resolve_model(None))
    weights = {q: memory_estimate(arch, "gguf", q, 2048).weights_bytes for q in ("Q6_K", "Q8_0")}
    budget = (weights["Q6_K"] + weights["Q8_0"]) // 2 + kv_cache_bytes(arch, 2048) + runtime_overhead_bytes(arch, 2048)
    profile = yaml.safe_load((Path(__file__).parent.parent / "profiles" / "rtx-4090-24gb.yaml").read_text())
    profile.update(name="tight-board", memory_budget_bytes=budget)
    profile["preferred_quants"]["gguf"] = ["Q8_0", "Q6_K", "Q4_K_M"]
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tight-board.yaml").write_text(yaml.safe_dump(profile))
    code, out, err = run("plan", "--profile", "tight-board", "--profiles-dir", str(tmp_path / "profiles"), "--json")
    assert code == 0, err
    fit = json.loads(out)["gguf_fit"]
    assert fit["between_presets"] and fit["largest_preset_that_fits"] == "Q6_K"
    if fit["mix"] is None:  # the teacher's sensitivities not measured on this machine
        assert "--quant fit --profile tight-board" in fit["mix_command"]
    else:
        assert fit["mix"]["planned_file_bytes"] <= fit["budget_bytes"] and fit["mix_command"] is None
        assert sum(fit["mix"]["groups_per_type"].values()) == len(fit["mix"]["group_types"]) > 2 * arch.n_layers
