"""Every supported family, as tiny random models: the gate asks the tools, pruning slices each layout exactly,
LoRA's default targets reach each family's projections (fused ones included), GGUF and ONNX exports verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, SPM_CORPUS, make_tiny_model, tiny_config

from edgeforge.models import support
from edgeforge.models.refs import resolve_model

CALIB = torch.randint(0, 49152, (4, 24), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(1))


def _model(family: str, layers: int = 4):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def test_the_tested_families_are_the_tiny_ones() -> None:
    assert tuple(support.TESTED_FAMILIES) == FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_the_installed_tools_take_every_family(family: str) -> None:
    converter = support.converter_architectures()
    assert converter is not None and support.TESTED_FAMILIES[family] in converter
    assert support.onnx_supports(family) is True


def test_the_gate_names_each_reason_in_its_own_sentence(config_dir) -> None:
    from edgeforge.plan.exportability import check_exportable

    qwen3 = config_dir({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}, "qwen3")
    verdict = check_exportable(resolve_model(str(qwen3)))
    assert not verdict["gguf"]["ok"] and not verdict["onnx"]["ok"]  # no tokenizer
    reason = verdict["gguf"]["reason"]
    assert "are registered by llama.cpp's converter" in reason and "No tokenizer.json" in reason
    assert "supported" not in reason.split("No tokenizer.json")[0].replace("registered", "")
    made_up = config_dir({"architectures": ["NopeForCausalLM"], "model_type": "nope"}, "nope")
    (made_up / "tokenizer.json").write_text("{}")
    verdict = check_exportable(resolve_model(str(made_up)))
    assert "are not among the" in verdict["gguf"]["reason"] and "--print-supported-models" in verdict["gguf"]["reason"]
    assert "has no 'text-generation-with-past' export" in verdict["onnx"]["reason"]
    assert "qwen3" in verdict["onnx"]["reason"] and "No tokenizer" not in verdict["onnx"]["reason"]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_nothing_gives_the_teacher(family: str) -> None:
    from edgeforge.distill.prune import StudentShape, init_student

    teacher = _model(family)
    cfg = teacher.config
    student, _ = init_student(teacher, StudentShape(layers=4, hidden_size=cfg.hidden_size,
                                                    intermediate_size=cfg.intermediate_size, kv_heads=2),
                              "auto", CALIB)
    with torch.no_grad():
        assert torch.equal(student(IDS).logits, teacher(IDS).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_student_runs_and_survives_a_reload(family: str, tmp_path: Path) -> None:
    """Depth, MLP width and KV groups (and the hidden size where the family allows it) pruned at once; the saved
    student reloads to the same logits, so the config describes the sliced (and re-fused) weights."""
    from transformers import AutoModelForCausalLM

    from edgeforge.distill.layouts import LAYOUTS
    from edgeforge.distill.prune import StudentShape, init_student
    from edgeforge.models.support import smollm3_rope_flags

    teacher = _model(family)
    hidden = None if LAYOUTS[family].hidden_pruning_blocked else 48
    student, report = init_student(teacher, StudentShape(layers=3, hidden_size=hidden, intermediate_size=64,
                                                         kv_heads=1), "auto", CALIB)
    assert (report.layers, report.intermediate_size, report.n_kv_heads) == (3, 64, 1)
    assert report.hidden_size == (hidden or 64)
    student.eval()
    with torch.no_grad():
        logits = student(IDS).logits
    assert logits.shape == (2, 20, 49152) and torch.isfinite(logits).all()
    student.save_pretrained(tmp_path / "s", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(IDS).logits, logits, atol=1e-5)
    if getattr(teacher.config, "layer_types", None) is not None:
        assert reloaded.config.layer_types == [teacher.config.layer_types[i] for i in report.kept_layers]
    if family == "smollm3":  # llama.cpp's fixed rule, not the kept layers' flags (see prune_depth)
        assert reloaded.config.no_rope_layers == smollm3_rope_flags(3) == [1, 1, 1]


def test_a_smollm3_off_the_llama_cpp_rope_rule_is_refused_for_gguf(tmp_path: Path) -> None:
    from edgeforge.errors import BadInputError
    from edgeforge.export.gguf import _converter_fixes

    d = make_tiny_model(tmp_path / "s", "smollm3", layers=4)
    assert _converter_fixes(d) == {}
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "no_rope_layers": [1, 0, 1, 1]}))
    with pytest.raises(BadInputError, match="every 4th layer"):
        _converter_fixes(d)


def test_gemma3_refuses_hidden_pruning_before_any_work() -> None:
    from edgeforge.distill.prune import StudentShape, init_student
    from edgeforge.errors import BadInputError

    with pytest.raises(BadInputError, match="sqrt\\(hidden_size\\)"):
        init_student(_model("gemma3_text"), StudentShape(layers=4, hidden_size=48), "auto", calib_ids=None)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_lora_targets_reach_attention_and_mlp(family: str) -> None:
    from peft import LoraConfig, get_peft_model

    from edgeforge.finetune.config import ALL_LINEAR

    model = get_peft_model(_model(family, layers=2), LoraConfig(r=4, target_modules=ALL_LINEAR))
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    attention = {"qkv_proj", "o_proj"} if family == "phi3" else {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = {"gate_up_proj", "down_proj"} if family == "phi3" else {"gate_proj", "up_proj", "down_proj"}
    assert attention | mlp <= adapted and "lm_head" not in adapted


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    # Not named after the family: llama.cpp keys Phi-3's special tokens on a model *name* holding "phi3" and aborts
    # when the vocabulary (the bundled teacher's, here) lacks them; a real Phi-3 vocabulary has them.
    return {f: make_tiny_model(root / f"tiny-{i}", f, seed=3, layers=4) for i, f in enumerate(FAMILIES)
            if f in ("gemma3_text", "smollm3", "phi3")}


# The families whose GGUF needed edgeforge's own handling (Gemma 3's sliding-window pattern, SmolLM3's RoPE rule,
# Phi-3's fused projections and name rule); every family's GGUF is checked by test_family_end_to_end as well.
@pytest.mark.parametrize("family", ["gemma3_text", "smollm3", "phi3"])
def test_gguf_export_loads_in_llama_cpp_and_matches_torch(family: str, tiny_dirs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    from edgeforge.export.gguf import export_gguf
    from edgeforge.verify.artifact import Reference, verify_artifact

    ref = resolve_model(str(tiny_dirs[family]))
    out = Path(export_gguf(ref, "F16", tmp_path / f"{family}.gguf")["path"])
    result = verify_artifact(out, Reference(ref), "F16", n_tokens=128)
    assert result["top1_agreement"] >= 0.97, result


def _cli(*args: str) -> dict:
    from click.testing import CliRunner

    from edgeforge.cli.app import cli

    r = CliRunner().invoke(cli, [*args, "--json"])
    assert r.exit_code == 0, f"edgeforge {' '.join(args[:2])}: exit {r.exit_code}: {r.stderr[-600:]}"
    return json.loads(r.stdout)


def _text_and_task(tmp_path: Path) -> tuple[Path, Path]:
    """A text corpus (built-in prose) and a tiny task JSONL for the end-to-end runs."""
    from edgeforge.data.builtin import training_prose

    text = tmp_path / "text.txt"
    text.write_text(training_prose(1500), encoding="utf-8")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Repeat: {w}\n", "completion": f"{w}"}) + "\n"
                            for w in ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree") * 3))
    return text, task


@pytest.mark.integration
@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family: str, tmp_path: Path) -> None:
    """plan -> prune (depth and MLP width) -> distill a few steps -> LoRA a few steps -> merge -> GGUF Q8_0 and
    ONNX int8, each verified against the merged student by the export's own gate."""

    teacher = make_tiny_model(tmp_path / "teacher", family, seed=5, layers=4)
    text, task = _text_and_task(tmp_path)
    plan = _cli("plan", "--teacher", str(teacher), "--profile", "raspberry-pi-5-4gb")
    assert plan["exportability"]["gguf"]["ok"] and plan["exportability"]["onnx"]["ok"], plan["exportability"]
    student = tmp_path / "student"
    _cli("distill", "--teacher", str(teacher), "--data", str(text), "--student-layers", "3",
                  "--student-intermediate", "96", "--init", "auto", "--steps", "3", "--batch-size", "2",
                  "--seq-len", "32", "--eval-sequences", "2", "--calib-sequences", "2",
                  "--cache-dir", str(tmp_path / "cache"), "--out", str(student))
    assert json.loads((student / "config.json").read_text())["num_hidden_layers"] == 3
    merged = tmp_path / "merged"
    _cli("finetune", str(student), "--data", str(task), "--steps", "3", "--batch-size", "4",
         "--eval-examples", "4", "--merge", "--out", str(merged))
    gguf = _cli("export", "gguf", str(merged), "--quant", "Q8_0", "--out", str(tmp_path / "m.gguf"))
    assert gguf["verification"]["passed"], gguf["verification"]
    onnx = _cli("export", "onnx", str(merged), "--quantize", "int8", "--out", str(tmp_path / "onnx"))
    assert onnx["verification"]["passed"], onnx["verification"]


@pytest.mark.integration
@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_a_users_own_model_builds_to_a_ship_folder(family: str, tmp_path: Path) -> None:
    """A model the user made with transformers, their own task JSONL and text corpus, through ``edgeforge build
    --teacher DIR --task FILE --data FILE --profile P`` (the pipeline file only shortens the stages)."""
    import yaml
    from click.testing import CliRunner

    from edgeforge.cli.app import cli
    from edgeforge.data.builtin import training_prose
    from edgeforge.ship.folder import check_manifest

    teacher = make_tiny_model(tmp_path / "my-model", family, seed=7, layers=2, embedding_std=0.3)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(training_prose(1500), encoding="utf-8")
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"Colour of {w}?\n", "completion": c}) + "\n"
                            for w, c in [("sky", "blue"), ("grass", "green"), ("snow", "white"),
                                         ("coal", "black"), ("blood", "red"), ("sun", "yellow")] * 10))
    short = {"distill": {"enabled": True, "student_layers": 1, "steps": 3, "batch_size": 2, "seq_len": 32,
                         "generate_answers": False},
             "finetune": {"steps": 2, "batch_size": 2, "eval_examples": 2},
             "export": {"formats": ["gguf", "onnx"], "gguf_quant": "Q8_0", "onnx_quantize": "int8"},
             "verify": {"tokens": 256, "task_examples": 2}}
    pipeline = tmp_path / "short.yaml"
    pipeline.write_text(yaml.safe_dump(short), encoding="utf-8")
    r = CliRunner().invoke(cli, ["build", "--teacher", str(teacher), "--task", str(task), "--data", str(corpus),
                                 "--profile", "raspberry-pi-5-8gb", "--config", str(pipeline), "--no-bench",
                                 "--out", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.stderr[-1500:]
    result = json.loads(r.stdout)
    ship = Path(result["ship_dir"])
    assert check_manifest(ship) == []
    assert len(list(ship.glob("*.gguf"))) == 1 and (ship / "onnx-int8" / "model.onnx").is_file()
    config = json.loads((ship / "onnx-int8" / "config.json").read_text())
    assert config["model_type"] == family and config["num_hidden_layers"] == 1


def test_models_show_reads_the_sliding_window_from_config_and_gguf(tmp_path: Path, config_dir) -> None:
    from edgeforge.models.refs import arch_from_config

    cfg = tiny_config("gemma3_text", layers=4).to_dict()
    arch = arch_from_config(cfg)
    assert (arch.sliding_window, arch.sliding_layers) == (16, 2)
    older = {**cfg, "layer_types": None, "sliding_window_pattern": 6, "num_hidden_layers": 26}
    assert arch_from_config(older).sliding_layers == 26 - 4  # every 6th layer full
    assert arch_from_config(tiny_config("llama").to_dict()).sliding_window is None


@pytest.mark.integration
def test_gguf_metadata_gives_the_same_sliding_layers(tmp_path: Path) -> None:
    from edgeforge.export.gguf import convert_hf
    from edgeforge.models.refs import arch_from_config, arch_from_gguf

    d = make_tiny_model(tmp_path / "g", "gemma3_text", layers=4)
    gguf = convert_hf(d, tmp_path / "g.gguf")
    from_gguf, from_config = arch_from_gguf(gguf), arch_from_config(json.loads((d / "config.json").read_text()))
    assert (from_gguf.sliding_window, from_gguf.sliding_layers) == (from_config.sliding_window,
                                                                    from_config.sliding_layers) == (16, 2)


@pytest.mark.integration
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_sentencepiece_model_and_its_gguf_as_teacher(family: str, tmp_path: Path) -> None:
    """A model with a SentencePiece vocabulary (Llama 2's with the space prefix, Gemma's without), trained in-test:
    its GGUF (the converter reads ``tokenizer.model``) becomes the teacher, whose tokenizer edgeforge rebuilds from
    the GGUF and tokenizes as llama.cpp does; the student distilled from it, fine-tuned and merged, exports to a
    GGUF with the teacher's vocabulary (pieces, scores, types) and verifies against torch, and to ONNX int8."""
    import gguf as gguf_py
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from edgeforge.models.gguf_hf import hf_dir_for, materialize_hf
    from edgeforge.verify.artifact import Reference, verify_artifact

    source = make_tiny_model(tmp_path / "hf", family, seed=5, layers=4, embedding_std=0.3, tokenizer="sentencepiece")
    teacher = tmp_path / f"{family}-teacher.gguf"  # the name keys the HF form cached in EDGEFORGE_HOME
    exported = _cli("export", "gguf", str(source), "--quant", "Q8_0", "--out", str(teacher))
    assert exported["verification"]["passed"], exported["verification"]

    def vocab(path: Path) -> tuple[list, list, list]:
        r = gguf_py.GGUFReader(str(path), "r")
        return tuple(r.fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))

    hf_dir = materialize_hf(teacher, hf_dir_for(teacher, tmp_path / "home"))
    # The torch form of the GGUF teacher is the model llama.cpp runs (Gemma 3: its sliding layers, query scale).
    assert verify_artifact(teacher, Reference(resolve_model(str(hf_dir))), "Q8_0", n_tokens=128)["passed"]
    rebuilt = AutoTokenizer.from_pretrained(hf_dir)
    llm = Llama(str(teacher), vocab_only=True, verbose=False)
    for text in SPM_CORPUS:
        assert rebuilt(text, add_special_tokens=False)["input_ids"] == \
            llm.tokenize(text.encode("utf-8"), add_bos=False, special=False), text

    text, task = _text_and_task(tmp_path)
    plan = _cli("plan", "--teacher", str(teacher), "--profile", "raspberry-pi-5-4gb")
    assert plan["exportability"]["training"]["ok"], plan["exportability"]
    student = tmp_path / "student"
    _cli("distill", "--teacher", str(teacher), "--data", str(text), "--student-layers", "3", "--init", "auto",
         "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-sequences", "2", "--calib-sequences", "2",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(student))
    merged = tmp_path / "merged"
    _cli("finetune", str(student), "--data", str(task), "--steps", "3", "--batch-size", "4",
         "--eval-examples", "4", "--merge", "--out", str(merged))
    out = tmp_path / "student.gguf"
    result = _cli("export", "gguf", str(merged), "--quant", "Q8_0", "--out", str(out))
    assert result["verification"]["passed"], result["verification"]
    assert vocab(out) == vocab(teacher)
    onnx = _cli("export", "onnx", str(merged), "--quantize", "int8", "--out", str(tmp_path / "onnx"))
    assert onnx["verification"]["passed"], onnx["verification"]
