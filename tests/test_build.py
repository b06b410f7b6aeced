"""edgeforge build on tiny in-test models: stages, cache, resume after SIGKILL, ship folder, exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from tiny_models import make_tiny_model

from edgeforge.cli.app import cli

EDGEFORGE = [sys.executable, "-m", "edgeforge"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("build") / "tiny")


def tiny_pipeline(tmp_path: Path, teacher: Path, **over: dict) -> Path:
    """A pipeline file that runs every stage on the tiny model in seconds."""
    cfg = {
        "teacher": str(teacher),
        "profile": "raspberry-pi-5-8gb",
        # by name: with a task, `auto` is fine-tune-then-distill (its own tests pass order=...)
        "order": "distill-then-finetune",
        "distill": {"enabled": True, "student_layers": 1, "steps": 4, "batch_size": 2, "seq_len": 32,
                    "checkpoint_every": 2, "generate_answers": False},
        "finetune": {"steps": 2, "batch_size": 2, "eval_examples": 2, "checkpoint_every": 1},
        "export": {"formats": ["gguf", "onnx"], "gguf_quant": "Q8_0", "onnx_quantize": "int8"},
        "verify": {"tokens": 256, "task_examples": 2},
        "bench": {"prompt_tokens": 16, "gen_tokens": 8, "repeats": 1},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    path = tmp_path / "pipeline.yaml"
    path.write_text("# edgeforge build --config pipeline.yaml\n" + yaml.safe_dump(cfg), encoding="utf-8")
    return path


def invoke(*args: str):
    return CliRunner().invoke(cli, ["build", *args])


def test_unknown_pipeline_key_is_one_line(tmp_path: Path):
    bad = tmp_path / "p.yaml"
    bad.write_text("profile: raspberry-pi-5-8gb\ndistill: {stepz: 3}\n", encoding="utf-8")
    r = invoke("--config", str(bad), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2
    assert "distill.stepz" in r.stderr and "unknown key" in r.stderr
    assert "Traceback" not in r.output + r.stderr


def test_missing_profile_and_unknown_task_are_bad_input(tmp_path: Path, tiny: Path):
    r = invoke("--teacher", str(tiny), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "--profile" in r.stderr
    r = invoke("--profile", "raspberry-pi-5-8gb", "--teacher", str(tiny), "--task", "no-such-task",
               "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "no-such-task" in r.stderr


def test_plan_decides_the_stages(tmp_path: Path):
    """The bundled teacher is too slow for a Pi Zero 2 W (with a task: fine-tune it, then distill the fine-tuned
    teacher into the student) and fits a Pi 5 (fine-tune only); without a task, no fine-tuning."""
    r = invoke("--profile", "raspberry-pi-zero-2w", "--out", str(tmp_path / "z"), "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    names = [s["stage"] for s in json.loads(r.stdout)["stages"]]
    assert names[:2] == ["finetune-teacher", "distill"] and "export-gguf" in names and names[-1] == "ship"
    r = invoke("--profile", "raspberry-pi-zero-2w", "--no-task", "--out", str(tmp_path / "z"), "--dry-run", "--json")
    assert [s["stage"] for s in json.loads(r.stdout)["stages"]][0] == "distill"
    r = invoke("--profile", "raspberry-pi-5-8gb", "--out", str(tmp_path / "p"), "--dry-run", "--json")
    names = [s["stage"] for s in json.loads(r.stdout)["stages"]]
    assert names[0] == "finetune" and "distill" not in names
    r = invoke("--profile", "raspberry-pi-5-8gb", "--no-task", "--out", str(tmp_path / "p"), "--dry-run", "--json")
    names = [s["stage"] for s in json.loads(r.stdout)["stages"]]
    assert "finetune" not in names and "distill" not in names


def test_flags_override_the_pipeline_file_and_change_the_cache_key(tmp_path: Path, tiny: Path):
    cfg = tiny_pipeline(tmp_path, tiny)
    out = str(tmp_path / "o")
    a = json.loads(invoke("--config", str(cfg), "--out", out, "--dry-run", "--json").stdout)["stages"]
    b = json.loads(invoke("--config", str(cfg), "--out", out, "--dry-run", "--json", "--distill-steps", "5").stdout)
    assert a[0]["stage"] == "distill" and "4 steps" in a[0]["note"] and "5 steps" in b["stages"][0]["note"]
    assert a[0]["key"] != b["stages"][0]["key"]


def test_finetune_then_distill_order(tmp_path: Path, tiny: Path):
    cfg = tiny_pipeline(tmp_path, tiny, order="finetune-then-distill")
    r = invoke("--config", str(cfg), "--out", str(tmp_path / "o"), "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    names = [s["stage"] for s in json.loads(r.stdout)["stages"]]
    assert names[:2] == ["finetune-teacher", "distill"]


def test_tiny_build_ships_a_verified_folder_and_reruns_from_the_cache(tmp_path: Path, tiny: Path):
    from llama_cpp import Llama
    from optimum.onnxruntime import ORTModelForCausalLM

    from edgeforge.ship.folder import check_manifest

    cfg = tiny_pipeline(tmp_path, tiny)
    out = tmp_path / "out"
    r = invoke("--config", str(cfg), "--out", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    assert [s["name"] for s in result["stages"]] == ["distill", "finetune", "export-gguf", "export-onnx", "bench"]
    ship = Path(result["ship_dir"])
    for f in ("manifest.json", "README.md", "Modelfile", "report.html"):
        assert (ship / f).is_file(), f
    manifest = json.loads((ship / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((ship / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    assert check_manifest(ship) == []
    assert manifest["lineage"]["seed"] == 0 and "torch" in manifest["lineage"]["library_versions"]
    ggufs = sorted(ship.glob("*.gguf"))
    assert len(ggufs) == 1
    Llama(str(ggufs[0]), n_ctx=128, verbose=False)
    ORTModelForCausalLM.from_pretrained(str(ship / "onnx-int8"))
    for a in result["artifacts"]:
        assert a["mean_kl"] is not None and a["measured_decode_tokens_per_s"] > 0
    # A second run is served from the cache: every stage cached, same artifacts.
    r2 = invoke("--config", str(cfg), "--out", str(out), "--json")
    assert r2.exit_code == 0, r2.stderr
    again = json.loads(r2.stdout)
    assert all(s["cached"] for s in again["stages"])
    assert json.loads((ship / "manifest.json").read_text())["files"][ggufs[0].name]["sha256"] == \
        manifest["files"][ggufs[0].name]["sha256"]
    # A flipped byte in the shipped GGUF is caught by the manifest.
    with open(ggufs[0], "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert check_manifest(ship) == [ggufs[0].name]


@pytest.mark.integration
def test_sigkill_during_distillation_resumes_from_the_checkpoint(tmp_path: Path, tiny: Path):
    cfg = tiny_pipeline(tmp_path, tiny, distill={"steps": 80, "checkpoint_every": 5}, bench={"enabled": False},
                       export={"formats": ["gguf"]})
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*EDGEFORGE, "build", "--config", str(cfg), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    ckpt = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((out / ".stages").glob("distill-*/student/.checkpoint/*"))
        if found:
            ckpt = found
            time.sleep(1.0)  # let it pass the checkpoint, so the kill lands mid-training
            break
        time.sleep(0.2)
    assert ckpt, "no distillation checkpoint appeared"
    assert proc.poll() is None, "the build ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stage_dir = next((out / ".stages").glob("distill-*"))
    assert not (stage_dir / "stage.json").exists()  # a killed stage is never taken as done
    r = subprocess.run([*EDGEFORGE, "build", "--config", str(cfg), "--out", str(out), "--distill-steps", "80"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming the interrupted run" in r.stderr
    assert (stage_dir / "stage.json").is_file()
    record = json.loads((stage_dir / "student" / "distill.json").read_text())
    assert record["training"]["steps"] == 80


def test_committed_pipeline_files_validate_and_name_their_command():
    from edgeforge.build.config import PipelineConfig, load_pipeline

    files = sorted((Path(__file__).resolve().parent.parent / "pipelines").glob("*.yaml"))
    assert files
    for f in files:
        assert f.read_text(encoding="utf-8").startswith("# edgeforge build --config "), f
        load_pipeline(f)
    default = Path(__file__).resolve().parent.parent / "pipelines" / "default.yaml"
    assert load_pipeline(default) == PipelineConfig()  # the file is the defaults, written out


@pytest.mark.integration
def test_short_build_on_the_bundled_teacher_for_a_pi_zero(tmp_path: Path):
    """The main job with a small budget: the bundled teacher is too slow for a Pi Zero 2 W, so the build fine-tunes
    it on home-commands, distills the fine-tuned teacher into a student, exports, verifies, benchmarks and ships.
    The student is cut to 6 layers here (the plan's 26-layer, width-pruned student takes minutes per stage on 2
    cores; the plan's shape reaching the distill stage is test_build_distills_the_planned_shape_mlp_width_included)."""
    from llama_cpp import Llama

    from edgeforge.ship.folder import check_manifest

    cfg = tmp_path / "short.yaml"
    cfg.write_text("# edgeforge build --config short.yaml --profile raspberry-pi-zero-2w\n" + yaml.safe_dump({
        "distill": {"steps": 30, "student_layers": 6, "seq_len": 128},
        "finetune": {"steps": 6},
        "export": {"formats": ["gguf"]},
        "verify": {"tokens": 300, "task_examples": 5},
        "bench": {"prompt_tokens": 32, "gen_tokens": 16, "repeats": 1},
    }), encoding="utf-8")
    r = invoke("--profile", "raspberry-pi-zero-2w", "--config", str(cfg), "--out", str(tmp_path / "out"), "--json")
    assert r.exit_code == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["decision"] == "distill+fine-tune"
    assert [s["name"] for s in result["stages"]][:2] == ["finetune-teacher", "distill"]  # the default with a task
    ship = Path(result["ship_dir"])
    assert check_manifest(ship) == []
    distill = json.loads((ship / "records" / "distill.json").read_text())
    assert distill["after"]["kl_to_teacher"] < distill["before"]["kl_to_teacher"]
    gguf = next(ship.glob("*.gguf"))
    Llama(str(gguf), n_ctx=256, verbose=False)
    assert result["artifacts"][0]["measured_decode_tokens_per_s"] > 0


def test_build_distills_the_planned_shape_mlp_width_included(tmp_path: Path):
    """The Pi Zero 2 W plan of the bundled teacher prunes the MLP width; the distill stage gets that width (it used
    to get only layers and hidden size, distilling a width-pruned plan at full width), as distill --profile does."""
    from edgeforge.build.builder import Builder
    from edgeforge.build.config import validate_pipeline

    builder = Builder(validate_pipeline({"profile": "raspberry-pi-zero-2w"}, "test"), tmp_path / "o")
    planned = builder.plan.student
    assert planned is not None and planned["intermediate_size"] < builder.plan.teacher_arch["intermediate_size"]
    cfg = builder.distill_config(tmp_path / "s", str(builder.teacher_ref.path), (), resume=False)
    assert (cfg.student_layers, cfg.student_intermediate) == (planned["layers"], planned["intermediate_size"])


def test_the_distill_key_covers_the_task_and_extra_teachers_by_content(tmp_path: Path):
    """Changing the task file's content (with a task loss on) or an extra teacher's files changes the distill key;
    the same content under the same names keeps it (a stale student was reused before)."""
    from edgeforge.build.builder import Builder
    from edgeforge.build.config import validate_pipeline
    from edgeforge.build.stage import key_of
    from edgeforge.build.stages.distill import DistillStage

    task = tmp_path / "lights.jsonl"
    extra = tmp_path / "extra"
    extra.mkdir()
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152}

    def key(answer: str, extra_layers: int) -> str:
        task.write_text("".join(json.dumps({"prompt": f"light {i}", "completion": answer + str(i)}) + "\n"
                                for i in range(8)), encoding="utf-8")
        (extra / "config.json").write_text(json.dumps({**config, "num_hidden_layers": extra_layers}))
        cfg = validate_pipeline({"profile": "raspberry-pi-zero-2w", "task": str(task),
                                 "distill": {"task_loss": "answer", "extra_teachers": [str(extra)],
                                             "teacher_weights": [1.0, 1.0]}}, "test")
        builder = Builder(cfg, tmp_path / "o")
        return key_of(DistillStage(builder, {"teacher": builder.teacher_identity}))

    first = key("on ", 2)
    assert key("on ", 2) == first
    assert key("off ", 2) != first
    assert key("on ", 3) != first


def test_finetune_then_distill_ships_the_student_beside_the_fine_tuned_teacher(tmp_path: Path, tiny: Path):
    """The default order with a task: the fine-tuned teacher's record is the reference, never the exports' source;
    the student is scored once on the fixed set by its own stage, and the ship folder shows both (manifest, card,
    report) on the same examples."""
    cfg = tiny_pipeline(tmp_path, tiny, order="finetune-then-distill", export={"formats": ["gguf"]},
                        bench={"enabled": False}, distill={"generated_task_examples": 40})
    r = invoke("--config", str(cfg), "--out", str(tmp_path / "o"), "--json")
    assert r.exit_code == 0, r.stderr
    ship = Path(json.loads(r.stdout)["ship_dir"])
    q = json.loads((ship / "manifest.json").read_text())["quality"]
    teacher, student = q["finetuned_teacher"], q["student"]
    assert teacher["task"]["n_examples"] == student["n_examples"] == 2
    assert student["model"] == "distilled student" and "task_accuracy_ci95" in teacher["task"]
    (art,) = q["artifacts"].values()
    assert art["task"]["versus_source"]["source"] == "distilled student"
    assert (ship / "records" / "finetune-teacher.json").is_file() and not (ship / "records" / "finetune.json").exists()
    card = (ship / "README.md").read_text()
    assert "fine-tuned teacher" in card and "distilled student" in card
    assert "Fine-tuned teacher or distilled student" in (ship / "report.html").read_text()
