"""Bad input through the real CLI: every case exits non-zero with one 'edgeforge: error:' line naming the problem and
no traceback (helpers.assert_one_error_line). Tiny in-test models only; nothing here trains or exports for real."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from .helpers import assert_one_error_line, invoke, invoke_or_unblock

PROFILE = "raspberry-pi-5-8gb"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- missing, wrong kind of path, unreadable
def _missing_cases(tmp: Path, tiny: Path) -> dict[str, tuple[list, str]]:
    gone = tmp / "no-such"
    return {
        "models show": (["models", "show", gone / "m.gguf"], "not found"),
        "plan --teacher": (["plan", "--profile", PROFILE, "--teacher", gone], "not found"),
        "export gguf": (["export", "gguf", gone, "--out", tmp / "o.gguf"], "not found"),
        "export onnx": (["export", "onnx", gone, "--out", tmp / "o"], "not found"),
        "bench": (["bench", gone / "m.gguf"], "artifact not found"),
        "eval": (["eval", gone / "m.gguf", "--reference", tiny], "artifact not found"),
        "finetune --data": (["finetune", tiny, "--data", gone / "t.jsonl", "--out", tmp / "ft"], "not found"),
        "distill --data": (["distill", "--teacher", tiny, "--student-layers", "1", "--data", gone / "d.txt",
                            "--out", tmp / "ds"], "not found"),
        "profiles show": (["profiles", "show", gone / "p.yaml"], "no such profile file"),
        "profiles --profiles-dir": (["profiles", "list", "--profiles-dir", gone], "does not exist"),
        "targets check": (["targets", "check", gone / "t.yaml"], "no such target file"),
        "build --config": (["build", "--config", gone / "p.yaml", "--out", tmp / "b", "--dry-run"], "p.yaml"),
    }


@pytest.mark.parametrize("case", list(_missing_cases(Path("/x"), Path("/x"))))
def test_missing_path(case: str, tmp_path: Path, tiny: Path) -> None:
    args, fragment = _missing_cases(tmp_path, tiny)[case]
    assert_one_error_line(invoke(*args), [fragment, "no-such"], progress_ok=case.startswith("distill"))


def _wrong_kind_cases(d: Path, tiny: Path) -> dict[str, tuple[list, str]]:
    """``d`` is a directory; each command expects a file there."""
    return {
        "models show": (["models", "show", d], "needs a config.json"),
        "profiles show": (["profiles", "show", d / "p.yaml"], "not a regular file"),
        "targets check": (["targets", "check", d / "t.yaml"], "not a regular file"),
        "build --config": (["build", "--config", d / "p.yaml", "--out", d.parent / "b", "--dry-run"], "p.yaml"),
        "finetune --data": (["finetune", tiny, "--data", d / "t.jsonl", "--out", d.parent / "ft"], "Is a directory"),
        "bench": (["bench", d / "m.gguf"], "without model.onnx"),
    }


@pytest.mark.parametrize("case", list(_wrong_kind_cases(Path("/x"), Path("/x"))))
def test_directory_where_a_file_is_expected(case: str, tmp_path: Path, tiny: Path) -> None:
    d = tmp_path / "dir"
    for name in ("p.yaml", "t.yaml", "t.jsonl", "m.gguf"):
        (d / name).mkdir(parents=True)
    args, fragment = _wrong_kind_cases(d, tiny)[case]
    assert_one_error_line(invoke(*args), fragment)


def _fifo_cases(f: Path, tiny: Path, tmp: Path) -> dict[str, list]:
    """``f`` is a FIFO with the right extension; reading it would block until something writes to it."""
    return {
        "models show": ["models", "show", f.with_suffix(".gguf")],
        "profiles show": ["profiles", "show", f.with_suffix(".yaml")],
        "profiles --profiles-dir": ["profiles", "list", "--profiles-dir", f.parent],
        "targets check": ["targets", "check", f.with_suffix(".yaml")],
        "finetune --data": ["finetune", tiny, "--data", f.with_suffix(".jsonl"), "--out", tmp / "ft"],
        "distill --data": ["distill", "--teacher", tiny, "--student-layers", "1", "--data", f.with_suffix(".txt"),
                           "--out", tmp / "ds"],
        "bench": ["bench", f.with_suffix(".gguf")],
    }


@pytest.mark.parametrize("case", list(_fifo_cases(Path("/x/f"), Path("/x"), Path("/x"))))
def test_fifo_is_refused_not_waited_on(case: str, tmp_path: Path, tiny: Path) -> None:
    """An honest unreadable path when the tests run as root (chmod 000 does not stop root): a FIFO. Before the fix
    every reader here opened it and blocked forever."""
    fifo_dir = tmp_path / "fifos"
    fifo_dir.mkdir()
    fifos = [fifo_dir / f"f{ext}" for ext in (".gguf", ".yaml", ".jsonl", ".txt")]
    for f in fifos:
        os.mkfifo(f)
    args = _fifo_cases(fifo_dir / "f", tiny, tmp_path)[case]
    assert_one_error_line(invoke_or_unblock(args, fifos), "not a regular file",
                          progress_ok=case.startswith("distill"))


def test_pipeline_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    r = invoke_or_unblock(["build", "--config", fifo, "--out", tmp_path / "b", "--dry-run"], [fifo], timeout_s=5)
    assert_one_error_line(r, "not a regular file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file; the FIFO and directory tests cover it")
@pytest.mark.parametrize("kind", ["profile", "target", "data"])
def test_unreadable_file(kind: str, tmp_path: Path, tiny: Path) -> None:
    f = tmp_path / ("x.jsonl" if kind == "data" else "x.yaml")
    f.write_text("name: x\n")
    f.chmod(0)
    args = {"profile": ["profiles", "show", f], "target": ["targets", "check", f],
            "data": ["finetune", tiny, "--data", f, "--out", tmp_path / "o"]}[kind]
    assert_one_error_line(invoke(*args), "Permission denied")


# ---------------------------------------------------------------- GGUF: random bytes and a real file truncated
def test_random_bytes_gguf(tmp_path: Path, tiny: Path, local_target: Path) -> None:
    bad = tmp_path / "random.gguf"
    bad.write_bytes(os.urandom(4096))
    assert_one_error_line(invoke("models", "show", bad), "not a readable GGUF file")
    assert_one_error_line(invoke("plan", "--profile", PROFILE, "--teacher", bad), "not a readable GGUF file")
    assert_one_error_line(invoke("export", "gguf", bad, "--out", tmp_path / "o.gguf"), "not a readable GGUF file")
    assert_one_error_line(invoke("bench", bad, "--target", local_target), "not a GGUF file")
    assert_one_error_line(invoke("eval", bad, "--reference", tiny), "not a readable GGUF file")
    assert not (tmp_path / "o.gguf").exists()


#: Where the tiny GGUF is cut: inside the magic, the header, the vocabulary array, and the tensor data.
TRUNCATIONS = {"magic": 3, "header": 40, "vocabulary": 500_000, "tensor-data": 4_000_000}


@pytest.mark.parametrize("where", list(TRUNCATIONS))
def test_truncated_gguf_model_resolution(where: str, tmp_path: Path, tiny_f16: Path) -> None:
    """plan / models show / export gguf read the GGUF metadata (models.refs.read_arch) before anything else."""
    bad = tmp_path / f"cut-{where}.gguf"
    bad.write_bytes(tiny_f16.read_bytes()[:TRUNCATIONS[where]])
    assert_one_error_line(invoke("plan", "--profile", PROFILE, "--teacher", bad), ["not a readable GGUF", bad.name])
    assert_one_error_line(invoke("export", "gguf", bad, "--quant", "Q8_0", "--out", tmp_path / "o.gguf"),
                          "not a readable GGUF")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("where", ["header", "tensor-data"])
def test_truncated_gguf_bench(where: str, tmp_path: Path, tiny_f16: Path, local_target: Path) -> None:
    """bench checks the magic only; llama.cpp refuses the rest on the device, and that is one line too."""
    bad = tmp_path / f"cut-{where}.gguf"
    bad.write_bytes(tiny_f16.read_bytes()[:TRUNCATIONS[where]])
    line = assert_one_error_line(invoke("bench", bad, "--target", local_target, "--repeats", "1"),
                                 "corrupt, truncated", progress_ok=True)
    assert "llama.cpp could not load" in line
    assert not list(tmp_path.glob("*.bench-*.json"))


def test_truncated_gguf_verify(tmp_path: Path, tiny: Path, tiny_f16: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_f16.read_bytes()[:TRUNCATIONS["tensor-data"]])
    assert_one_error_line(invoke("eval", bad, "--reference", tiny, "--tokens", "32"),
                          ["not a readable GGUF file", "truncated"])


def test_damaged_artifact_record(tmp_path: Path, tiny: Path, tiny_f16: Path) -> None:
    """eval reads the artifact's record (<file>.edgeforge.json) for its quant type; a damaged one is named."""
    art = tmp_path / "a.gguf"
    art.symlink_to(tiny_f16)
    (tmp_path / "a.gguf.edgeforge.json").write_text("{not json", encoding="utf-8")
    assert_one_error_line(invoke("eval", art, "--reference", tiny, "--tokens", "32"),
                          ["a.gguf.edgeforge.json", "not readable JSON"])


# ---------------------------------------------------------------- ONNX and safetensors
def test_corrupt_onnx(tmp_path: Path, tiny: Path, local_target: Path) -> None:
    d = tmp_path / "onnx"
    d.mkdir()
    (d / "model.onnx").write_bytes(os.urandom(3000))
    shutil.copy(tiny / "config.json", d / "config.json")
    line = assert_one_error_line(invoke("bench", d, "--target", local_target, "--repeats", "1"), "model.onnx",
                                 progress_ok=True)
    assert "onnxruntime could not load" in line
    assert_one_error_line(invoke("eval", d, "--reference", tiny, "--tokens", "32"), "not a readable ONNX model")


def _damage_safetensors(model_dir: Path, kind: str) -> None:
    st = model_dir / "model.safetensors"
    data = st.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if kind == "truncated":
        st.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        st.write_bytes(os.urandom(4096))
    elif kind == "header-not-json":
        st.write_bytes(data[:8] + b"{garbage" + data[16:])
    elif kind == "header-lies":  # one tensor claims more bytes than its shape holds; the file length still adds up
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
        raw = json.dumps(header).encode().ljust(n)
        st.write_bytes(data[:8] + raw[:n] + data[8 + n:])
    elif kind == "missing-shard":
        st.rename(model_dir / "model-00001-of-00002.safetensors")
        (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


SAFETENSORS_DAMAGE = ["truncated", "random", "header-not-json", "header-lies", "missing-shard"]


@pytest.mark.parametrize("kind", SAFETENSORS_DAMAGE)
def test_corrupt_safetensors(kind: str, tmp_path: Path, tiny: Path, task_jsonl: Path, text_data: Path) -> None:
    """Refused when the model is resolved, before transformers, optimum or llama.cpp's converter read the weights."""
    d = _copy(tiny, tmp_path / "model")
    _damage_safetensors(d, kind)
    fragment = "model-00002-of-00002" if kind == "missing-shard" else "safetensors"
    commands = [
        ["export", "onnx", d, "--out", tmp_path / "onnx", "--no-verify"],
        ["export", "gguf", d, "--quant", "Q8_0", "--out", tmp_path / "o.gguf", "--no-verify"],
        ["finetune", d, "--data", task_jsonl, "--steps", "1", "--out", tmp_path / "ft"],
        ["distill", "--teacher", d, "--student-layers", "1", "--data", text_data, "--out", tmp_path / "ds"],
        ["plan", "--profile", PROFILE, "--teacher", d],
    ]
    for args in commands:
        assert_one_error_line(invoke(*args), fragment)
    assert not any((tmp_path / n).exists() for n in ("onnx", "o.gguf", "ft", "ds"))


# ---------------------------------------------------------------- YAML: profiles, targets, pipelines
PROFILE_YAML = (Path(__file__).resolve().parents[2] / "profiles" / f"{PROFILE}.yaml").read_text(encoding="utf-8")
BAD_YAML = {
    "syntax": ("name: [unclosed\n", "not valid YAML"),
    "not-a-mapping": ("- a\n- b\n", "expected a"),
    "python-tag": ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "impossible-date": ("name: x\nsince: 2001-02-30\n", "not valid YAML"),
    "too-deep": ("[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    "not-utf8": ("name: caf\xe9\n", "not UTF-8"),
}


def _write_yaml(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("latin-1") if "\xe9" in text else text.encode("utf-8"))
    return path


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_malformed_profile_yaml(case: str, tmp_path: Path) -> None:
    text, fragment = BAD_YAML[case]
    d = tmp_path / "profiles"
    d.mkdir()
    _write_yaml(d / "bad.yaml", text)
    assert_one_error_line(invoke("profiles", "list", "--profiles-dir", d), ["bad.yaml", fragment])
    assert_one_error_line(invoke("plan", "--profile", PROFILE, "--profiles-dir", d), ["bad.yaml", fragment])


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_malformed_target_yaml(case: str, tmp_path: Path) -> None:
    text, fragment = BAD_YAML[case]
    f = _write_yaml(tmp_path / "bad.yaml", text)
    assert_one_error_line(invoke("targets", "check", f), ["bad.yaml", fragment])


PIPELINE_BAD = {"syntax": ("name: [unclosed\n", "not valid YAML"),
                "not-a-mapping": ("- a\n- b\n", "expected a mapping"),
                "python-tag": ("!!python/object/apply:os.system ['true']\n", "not valid YAML")}


@pytest.mark.parametrize("case", list(PIPELINE_BAD))
def test_malformed_pipeline_yaml(case: str, tmp_path: Path) -> None:
    text, fragment = PIPELINE_BAD[case]
    f = _write_yaml(tmp_path / "bad.yaml", text)
    assert_one_error_line(invoke("build", "--config", f, "--out", tmp_path / "b", "--dry-run"), ["bad.yaml", fragment])


@pytest.mark.parametrize("case", ["impossible-date", "too-deep", "not-utf8"])
def test_malformed_pipeline_yaml_file(case: str, tmp_path: Path) -> None:
    text, fragment = BAD_YAML[case]
    f = _write_yaml(tmp_path / "bad.yaml", text)
    assert_one_error_line(invoke("build", "--config", f, "--out", tmp_path / "b", "--dry-run"), ["bad.yaml", fragment])


def test_wrongly_typed_fields(tmp_path: Path) -> None:
    d = tmp_path / "profiles"
    d.mkdir()
    (d / "mine.yaml").write_text(PROFILE_YAML.replace(f"name: {PROFILE}", "name: mine").replace(
        "memory_total_bytes: ", "memory_total_bytes: lots  #"), encoding="utf-8")
    assert_one_error_line(invoke("profiles", "list", "--profiles-dir", d),
                          ["mine.yaml", "field 'memory_total_bytes'", "lots"])
    target = tmp_path / "t.yaml"
    target.write_text(f"name: pi\ntype: ssh\nhost: h\nuser: u\nprofile: {PROFILE}\nport: ninety\n", encoding="utf-8")
    assert_one_error_line(invoke("targets", "check", target), ["t.yaml", "field 'port'", "ninety"])
    for text, fragment in [("distill:\n  steps: many\n", "distill.steps"), ("distill: 5\n", "distill"),
                           ("bench:\n  repeats: -1\n", "bench.repeats"), ("seed: [1, 2]\n", "seed")]:
        pipeline = tmp_path / "p.yaml"
        pipeline.write_text(text, encoding="utf-8")
        assert_one_error_line(invoke("build", "--config", pipeline, "--out", tmp_path / "b", "--dry-run"),
                              ["p.yaml", fragment])


# ---------------------------------------------------------------- unknown names
def test_unknown_profile_target_and_model_alias(tmp_path: Path, tiny_f16: Path) -> None:
    assert_one_error_line(invoke("plan", "--profile", "raspberry-pi-9"), ["unknown profile 'raspberry-pi-9'",
                                                                          "Did you mean"])
    assert_one_error_line(invoke("bench", tiny_f16, "--target", "pi9-lab"), "unknown target 'pi9-lab'")
    assert_one_error_line(invoke("plan", "--profile", PROFILE, "--teacher", "smollm3-1b"),
                          ["model 'smollm3-1b' not found", "smollm2-135m-instruct"])
    target = tmp_path / "t.yaml"
    target.write_text("name: pi\ntype: ssh\nhost: h\nuser: u\nprofile: raspberry-pi-9\n", encoding="utf-8")
    assert_one_error_line(invoke("targets", "check", target), "unknown profile 'raspberry-pi-9'")


# ---------------------------------------------------------------- data files for finetune and distill
DATA_FILES = {
    "empty": (b"", "data file is empty"),
    "blank-lines": (b"\n  \n\n", "data file is empty"),
    "not-utf8": ('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"), "not UTF-8"),
    "malformed-line-3": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{oops\n',
                         ":3: malformed JSON"),
    "not-an-object": (b'{"prompt": "a", "completion": "b"}\n[1, 2]\n', ":2: expected a JSON object"),
}


@pytest.mark.parametrize("case", list(DATA_FILES))
def test_bad_data_file_finetune(case: str, tmp_path: Path, tiny: Path) -> None:
    raw, fragment = DATA_FILES[case]
    f = tmp_path / "task.jsonl"
    f.write_bytes(raw)
    assert_one_error_line(invoke("finetune", tiny, "--data", f, "--steps", "1", "--out", tmp_path / "ft"),
                          ["task.jsonl", fragment])
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("case", [*DATA_FILES, "text-not-utf8"])
def test_bad_data_file_distill(case: str, tmp_path: Path, tiny: Path) -> None:
    raw, fragment = DATA_FILES.get(case) or ("caf\xe9 au lait. ".encode("latin-1") * 50, "not UTF-8")
    f = tmp_path / ("train.txt" if case.startswith("text") else "train.jsonl")
    f.write_bytes(raw)
    r = invoke("distill", "--teacher", tiny, "--student-layers", "1", "--data", f, "--steps", "1", "--out",
               tmp_path / "ds")
    assert_one_error_line(r, [f.name, fragment], progress_ok=True)
    assert not (tmp_path / "ds" / "model.safetensors").exists()


def test_tokenizer_mismatch_with_the_same_vocabulary_size(tmp_path: Path, tiny: Path, text_data: Path) -> None:
    """Same 49,152 entries, one token renamed: still a different tokenizer, refused before any model loads.
    (A different vocabulary size: tests/test_distill.py::test_vocabulary_mismatch_is_one_clear_error.)"""
    student = _copy(tiny, tmp_path / "student")
    tok = json.loads((student / "tokenizer.json").read_text(encoding="utf-8"))
    special = next(a for a in tok["added_tokens"] if a["content"] == "<|im_start|>")
    special["content"] = "<|im_begin|>"
    tok["model"]["vocab"]["<|im_begin|>"] = tok["model"]["vocab"].pop("<|im_start|>")
    (student / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    r = invoke("distill", "--teacher", tiny, "--student", student, "--data", text_data, "--out", tmp_path / "ds")
    assert_one_error_line(r, ["tokenizer mismatch", "im_"], progress_ok=True)
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------- unsupported architecture
def test_unsupported_architecture_for_export(tmp_path: Path, tiny: Path) -> None:
    d = _copy(tiny, tmp_path / "foo")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg.update(architectures=["FooForCausalLM"], model_type="foo")
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert_one_error_line(invoke("export", "gguf", d, "--quant", "Q8_0", "--out", tmp_path / "o.gguf"),
                          ["FooForCausalLM", "are not among the", "--print-supported-models", "qwen3, gemma3_text"])
    assert_one_error_line(invoke("export", "onnx", d, "--out", tmp_path / "onnx"),
                          ["FooForCausalLM", "foo", "optimum-onnx", "qwen3", "gemma3_text", "phi3"])
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "onnx").exists()
