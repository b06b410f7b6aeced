"""The stage cache keys of ``edgeforge build``, pinned to literal values.

A finished stage lives in ``OUT/.stages/<stage>-<key16>/`` and is found again only under the same key, so a change
of key silently throws every existing build cache away. These tests lay out the stages of a few fixed builds (a
config-only teacher directory, fixed data and task files, built-in profile and task) and compare every key with the
value the builder computed when the test was written. A deliberate change of key must update the literal here and
say why in a comment next to it.

Changes so far: the keys were first pinned on the builder before its restructuring into stages, which kept them.
They then changed once, deliberately, when every distill/finetune setting got a single declaration
(edgeforge.distill.config / edgeforge.finetune.config): the pipeline sections now carry every setting (jsd_beta,
hidden_loss, grad_accum, warmup_steps, max_tokens, ...), and a stage's key covers all of them, so a build cache made
before that change is rebuilt once. The export keys changed once more, deliberately, when the task gate came
(issue #14): ``verify`` gained ``task_max_drop`` and ``task_alpha`` and its ``task_examples`` became the fixed task
set the fine-tuning record shares (the fine-tune key of a task file changed with its ``eval_examples``); and the
distill key, when the build began passing the plan's whole student shape (MLP width and KV heads besides layers and
hidden size), which every key downstream of it follows. The bench keys changed once, deliberately, when the bench
section gained ``sustained_s`` (issue #18): a cached bench result says nothing of a sustained run.

The edgeforge version enters every key (a new release starts a fresh cache on purpose); it is fixed here so that a
version bump does not read as a change of the key layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgeforge.build.builder import Builder
from edgeforge.build.config import validate_pipeline
from edgeforge.build.layout import layout
from edgeforge.build.stage import BuildState, key_of
from edgeforge.build.stages.export import ExportStage
from edgeforge.cli.app import cli

PINNED_VERSION = "0.1.0-pinned"

# A tiny llama config: enough for the planner and the GGUF size estimates, no weights needed to compute keys.
TEACHER_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 49152,
    "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True,
}
DATA_TEXT = "The quick brown fox jumps over the lazy dog.\nPack my box with five dozen liquor jugs.\n"
TASK_JSONL = "".join(json.dumps({"messages": [{"role": "user", "content": f"turn on light {i}"},
                                             {"role": "assistant", "content": f'{{"light": {i}}}'}]}) + "\n"
                     for i in range(8))
ARTIFACT_SHA256 = ("a" * 64, "b" * 64)


@pytest.fixture(autouse=True)
def fixed_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edgeforge.build.cache.__version__", PINNED_VERSION)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """Fixed input files under fixed names (a path identity holds the file name and its sha256, not the folder)."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(TEACHER_CONFIG, indent=2, sort_keys=True), encoding="utf-8")
    data = tmp_path / "prose.txt"
    data.write_text(DATA_TEXT, encoding="utf-8")
    task = tmp_path / "lights.jsonl"
    task.write_text(TASK_JSONL, encoding="utf-8")
    target = tmp_path / "bench-box.yaml"
    target.write_text(yaml.safe_dump({"name": "bench-box", "type": "local", "profile": "raspberry-pi-5-8gb"}),
                      encoding="utf-8")
    return {"teacher": teacher, "data": data, "task": task, "target": target, "out": tmp_path / "out"}


def pipeline(inputs: dict[str, Path], **over: object) -> dict:
    cfg: dict = {
        "teacher": str(inputs["teacher"]), "profile": "raspberry-pi-5-8gb", "data": [str(inputs["data"])],
        "distill": {"enabled": True, "student_layers": 1, "steps": 4, "batch_size": 2, "seq_len": 32,
                    "checkpoint_every": 2, "generate_answers": False},
        "finetune": {"steps": 2, "batch_size": 2, "eval_examples": 2, "checkpoint_every": 1},
        "export": {"formats": ["gguf", "onnx"], "gguf_quant": "Q4_K_M", "onnx_quantize": "int8"},
        "verify": {"tokens": 64, "task_examples": 2},
        "bench": {"prompt_tokens": 16, "gen_tokens": 8, "repeats": 1},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def laid_out_keys(builder: Builder) -> dict[str, str]:
    """Every stage key the build's own layout yields, driven as the runner drives it but with a made-up record
    absorbed for each stage: each model stage "produces" the teacher's config (the GGUF fallback types are sized
    from the model's config.json), every GGUF type but Q8_0 fails verification (so each fallback is laid out),
    and each passing export has a fixed sha256 (the bench stage's inputs)."""
    keys: dict[str, str] = {}
    state = BuildState()
    shas = iter(ARTIFACT_SHA256)
    for stage in layout(builder, state):
        if isinstance(stage, ExportStage):
            keys[f"{stage.name}-{stage.quant}"] = key_of(stage)
            passed = stage.quant in ("Q8_0", "int8")
            stage.absorb({"path": f"/nowhere/{stage.name}-{stage.quant}", "format": stage.fmt, "quant": stage.quant,
                          "verify": {"passed": passed, "failures": [] if passed else ["mean KL too high"]},
                          "export": {"sha256": next(shas) if passed else "f" * 64}}, state)
        else:
            keys[stage.name] = key_of(stage)
            stage.absorb({"model_dir": str(builder.cfg.teacher), "record": {}, "loss_curve": [], "results": []},
                         state)
    return keys


def make_builder(inputs: dict[str, Path], **over: object) -> Builder:
    return Builder(validate_pipeline(pipeline(inputs, **over), "test"), inputs["out"])


def test_distill_then_finetune_keys(inputs: dict[str, Path]) -> None:
    # The order by name: with a task, `auto` means fine-tune-then-distill since issue #14 (its keys are below).
    builder = make_builder(inputs, target=str(inputs["target"]), order="distill-then-finetune")
    assert laid_out_keys(builder) == {
        "distill": "d4d702920b2f49e32fa01701edff95f95e17f6da50d5c048501c6559c97ea8c6",
        "finetune": "291e167f274927f70d6e92ba39b50c5ac6cf36fad50ce17122c7304f39c80373",
        "export-gguf-Q4_K_M": "fcb6535f9d895b07d5f78f77902a3817eaa6de860d6622ffbc0b725dc8d4718c",
        "export-gguf-Q5_K_M": "993ff34bc0359f69985b61800888f5a4077990f34a331bdde33fac85e071301b",
        "export-gguf-Q8_0": "b8db0443b5683de4663fafbc3919c6493d7770ef8ad7b9eabe7e32765fb9d61b",
        "export-onnx-int8": "935e19a769057a9f11a08248d1024ae5627738ef1e01aabc2b4e98d2623e97f8",
        "bench": "a5b9214ea7510448045fd868671b0564d863b2f7654ba4f92e61fe3120cd314e",
    }


def test_finetune_then_distill_keys(inputs: dict[str, Path]) -> None:
    builder = make_builder(inputs, order="finetune-then-distill", export={"formats": ["gguf"], "gguf_quant": None},
                           bench={"enabled": False})
    assert laid_out_keys(builder) == {
        "finetune-teacher": "a3e431d737b472d9ef5af83e332a78954f4e9689ae9b7ed828a640dcfbe8dc2b",
        # Changed deliberately (issue #14): the distill stage after a fine-tuned teacher now scores its student on
        # the fixed task set itself and may add generated task examples to its data (``fixed_set_examples`` and
        # ``generated_task_examples`` in its settings), and the export follows its key.
        "distill": "ba2081eb4c39aed892912fb2bab3e307ef674d4ff983e1ec2da5833b918b0475",
        "export-gguf-Q8_0": "15c9146fd85db50eda37f584d9ba732d9614a6a4551f71e34331d6b57d9cf1a0",
    }


def test_auto_order_with_a_task_is_finetune_then_distill_with_the_same_keys(inputs: dict[str, Path]) -> None:
    """`auto` lays out exactly the stages (and keys) of the explicit order, so a build made either way is reused by
    the other (benchmarks/pipelines.py's variant b and `make demo` share their cache)."""
    kw = {"export": {"formats": ["gguf"], "gguf_quant": None}, "bench": {"enabled": False}}
    explicit = laid_out_keys(make_builder(inputs, order="finetune-then-distill", **kw))
    assert laid_out_keys(make_builder(inputs, **kw)) == explicit


def test_finetune_only_on_a_task_file_keys(inputs: dict[str, Path]) -> None:
    builder = make_builder(inputs, task=str(inputs["task"]), distill={"enabled": False},
                           export={"formats": ["gguf"], "gguf_quant": "Q4_K_M"})
    assert laid_out_keys(builder) == {
        "finetune": "cb8a5a337668abda7cccf4d0542ea62eaf0e0246003d733c23895d94fa2980e9",
        "export-gguf-Q4_K_M": "5cffafbbde8ab565df4bdead27eb7b85f2012e6ecb2b41c684d801bc4d78d72e",
        "export-gguf-Q5_K_M": "7ffc9c9c57a9834ddec92fbf423c41e254bd9117e30413075330701919a41ef2",
        "export-gguf-Q8_0": "ba0875adee4937269941182dc3312815aaf32d645a68186c1ea9a667386882e0",
        # over the one GGUF artifact
        "bench": "3dde9bb87436a3017894f8b28d83488c0c3861613347ff6d8a39c615562fc692",
    }


def test_export_straight_from_the_teacher_keys(inputs: dict[str, Path]) -> None:
    """No task and no distillation: the exports read the teacher itself (its identity is the upstream key)."""
    builder = make_builder(inputs, task=None, distill={"enabled": False}, export={"formats": ["onnx"]},
                           bench={"local": False})
    assert laid_out_keys(builder) == {
        "export-onnx-int8": "5a0b9bb9e8e097360351aa746e5ca6b1edef0bf1ad8c7da3ef8d4e615304273e",
    }


def test_dry_run_shows_the_pinned_keys_and_finds_cached_stages(inputs: dict[str, Path]) -> None:
    """``--dry-run`` prints the first 16 hex digits of each key (the stage directory's suffix); with the model stages
    finished it lays out the exports too."""
    cfg = inputs["out"].parent / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(pipeline(inputs, order="distill-then-finetune",
                                           export={"formats": ["gguf"], "gguf_quant": "Q8_0", "fallback": False})),
                   encoding="utf-8")
    args = ["build", "--config", str(cfg), "--out", str(inputs["out"]), "--dry-run", "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["stages"]
    assert [(s["stage"], s["key"], s["state"]) for s in rows] == [
        ("distill", "d4d702920b2f49e3", "run"),
        ("finetune", "291e167f274927f7", "run"),
        ("export-gguf", "(after the model stages)", "run"),
        ("bench", "(after export)", "run"),
        ("ship", "-", "run"),
    ]
    for s in rows[:2]:  # finish the model stages by hand: the teacher's config stands in for each output
        marker = {"stage": s["stage"], "seconds": 1.0,
                  "result": {"model_dir": str(inputs["teacher"]), "record": {}, "loss_curve": []}}
        Path(s["dir"]).mkdir(parents=True)
        (Path(s["dir"]) / "stage.json").write_text(json.dumps(marker), encoding="utf-8")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)["stages"]
    assert [(s["stage"], s["key"], s["state"]) for s in rows][:3] == [
        ("distill", "d4d702920b2f49e3", "cached"),
        ("finetune", "291e167f274927f7", "cached"),
        ("export-gguf", "b8db0443b5683de4", "run"),  # the Q8_0 export of test_distill_then_finetune_keys
    ]
    assert Path(rows[2]["dir"]).name == f"export-gguf-{rows[2]['key']}"
    # With the export finished and verified too, the bench stage is laid out over it. (Before the build became one
    # loop of stages, --dry-run always listed bench as "(after export)"; now it shows the key the run would use.)
    marker = {"stage": "export-gguf", "seconds": 1.0,
              "result": {"path": "/nowhere/a.gguf", "format": "gguf", "quant": "Q8_0", "verify": {"passed": True},
                         "export": {"sha256": ARTIFACT_SHA256[0]}}}
    Path(rows[2]["dir"]).mkdir(parents=True)
    (Path(rows[2]["dir"]) / "stage.json").write_text(json.dumps(marker), encoding="utf-8")
    rows = json.loads(CliRunner().invoke(cli, args).stdout)["stages"]
    assert [(s["stage"], s["state"]) for s in rows] == [("distill", "cached"), ("finetune", "cached"),
                                                        ("export-gguf", "cached"), ("bench", "run"), ("ship", "run")]
    assert Path(rows[3]["dir"]).name == f"bench-{rows[3]['key']}" and rows[3]["note"] == "local"
