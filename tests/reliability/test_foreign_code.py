"""No foreign code: edgeforge never unpickles, never runs code shipped with a model, never builds Python objects from
YAML. A static scan of the source, then behaviour: every payload below would create a marker file if it ran."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from edgeforge.errors import EdgeforgeError
from edgeforge.export.gguf import export_gguf
from edgeforge.models.refs import ModelRef

from .helpers import assert_one_error_line, invoke

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("edgeforge", "device_bench")
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
YAML_UNSAFE = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every unsafe loader in ``source``, found in its syntax tree (comments and docstrings do not count):
    pickle-family imports, torch.load without weights_only=True, trust_remote_code set to anything but False,
    yaml's unsafe loaders (or a Loader= argument), numpy loads with allow_pickle=True, pandas read_pickle, eval and
    exec, and subprocess calls with shell=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name, kw = _dotted(node.func), {k.arg: k.value for k in node.keywords}
        last = name.rsplit(".", 1)[-1]
        if name.endswith("torch.load") and not _is_true(kw.get("weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        if "trust_remote_code" in kw and not (isinstance(kw["trust_remote_code"], ast.Constant)
                                              and kw["trust_remote_code"].value is False):
            found.append(f"{where}: trust_remote_code is set")
        if name.startswith("yaml.") and (last in YAML_UNSAFE or "Loader" in kw):
            found.append(f"{where}: {name}")
        if last == "load" and name.split(".")[0] in ("np", "numpy") and _is_true(kw.get("allow_pickle")):
            found.append(f"{where}: {name} with allow_pickle=True")
        if last == "read_pickle" or name in ("eval", "exec"):
            found.append(f"{where}: {name}")
        if _is_true(kw.get("shell")):
            found.append(f"{where}: {name} with shell=True")
    return found


def test_the_scanner_finds_every_unsafe_pattern() -> None:
    planted = """
import pickle
from dill import loads
import torch, yaml, numpy as np, subprocess
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
AutoModel.from_pretrained("d", trust_remote_code=True)
yaml.load(text)
yaml.unsafe_load(text)
yaml.load(text, Loader=yaml.Loader)
np.load("a.npy", allow_pickle=True)
eval("1 + 1")
subprocess.run("ls", shell=True)
torch.load("ok.pt", weights_only=True)
yaml.safe_load(text)
model.eval()
"""
    found = unsafe_uses(planted)
    assert len(found) == 11, found
    assert not any(":15:" in f or ":16:" in f or ":17:" in f for f in found)  # the safe calls are not flagged


def test_source_has_no_pickle_remote_code_or_unsafe_yaml() -> None:
    files = [f for d in SCANNED for f in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30
    found = [u for f in files for u in unsafe_uses(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert found == []


# ---------------------------------------------------------------- behaviour: payloads that would leave a marker
class _Payload:
    """Unpickling this calls open(marker, 'w'): the file appears only if the pickle is ever loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_module(model_dir: Path, marker: Path) -> None:
    (model_dir / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    pass\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n", encoding="utf-8")


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def _commands(d: Path, tmp: Path, task: Path, text: Path) -> dict[str, list]:
    return {
        "plan": ["plan", "--profile", "raspberry-pi-5-8gb", "--teacher", d],
        "export gguf": ["export", "gguf", d, "--quant", "F16", "--no-verify", "--out", tmp / "o.gguf"],
        "export onnx": ["export", "onnx", d, "--no-verify", "--out", tmp / "onnx"],
        "finetune": ["finetune", d, "--data", task, "--steps", "1", "--out", tmp / "ft"],
        "distill": ["distill", "--teacher", d, "--student-layers", "1", "--data", text, "--steps", "1",
                    "--out", tmp / "ds"],
        "eval --reference": ["eval", tmp / "x.gguf", "--reference", d],
    }


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_model_with_remote_code_is_refused_and_its_code_never_runs(where: str, tmp_path: Path, tiny: Path,
                                                                   task_jsonl: Path, text_data: Path) -> None:
    d = tmp_path / "model"
    shutil.copytree(tiny, d)
    marker = tmp_path / "MARKER"
    _evil_module(d, marker)
    auto_map = ({"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"} if where == "config.json"
                else {"AutoTokenizer": ["evil.EvilTokenizer", None]})
    _edit_json(d / where, auto_map=auto_map)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    for name, args in _commands(d, tmp_path, task_jsonl, text_data).items():
        assert_one_error_line(invoke(*args), [where, "custom code", "auto_map"])
        assert not marker.exists(), f"{name} ran the model's own code"


def test_tokenizer_code_llama_cpp_converter_would_trust_is_never_run(tmp_path: Path, tiny: Path) -> None:
    """llama.cpp's converter calls AutoTokenizer.from_pretrained(dir, trust_remote_code=True) for a tokenizer_class
    of HybridDNATokenizer, which imports the model's own .py (it did, before edgeforge refused auto_map). Refused by
    model resolution, and again by the converter step itself when a ModelRef is built without resolution (as
    edgeforge build does for its own stage outputs)."""
    d = tmp_path / "model"
    shutil.copytree(tiny, d)
    marker = tmp_path / "MARKER"
    _evil_module(d, marker)
    _edit_json(d / "tokenizer_config.json", tokenizer_class="HybridDNATokenizer",
               auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    r = invoke("export", "gguf", d, "--quant", "F16", "--no-verify", "--out", tmp_path / "o.gguf")
    assert_one_error_line(r, ["tokenizer_config.json", "custom code"])
    with pytest.raises(EdgeforgeError, match="custom code"):
        export_gguf(ModelRef(str(d), d, "hf"), "F16", tmp_path / "o.gguf")
    assert not marker.exists() and not (tmp_path / "o.gguf").exists()


def test_pickled_weights_are_never_loaded(tmp_path: Path, tiny: Path, task_jsonl: Path, text_data: Path) -> None:
    """A model whose weights are only a pytorch_model.bin with a __reduce__ payload: refused, never unpickled."""
    d = tmp_path / "model"
    shutil.copytree(tiny, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, d / "pytorch_model.bin")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    for name, args in _commands(d, tmp_path, task_jsonl, text_data).items():
        assert_one_error_line(invoke(*args), ["pytorch_model.bin", "pickles", "safetensors"])
        assert not marker.exists(), f"{name} unpickled the checkpoint"


@pytest.mark.integration
def test_pickle_beside_safetensors_is_ignored(tmp_path: Path, tiny: Path, task_jsonl: Path) -> None:
    """Beside safetensors weights a malicious pytorch_model.bin is never read: fine-tuning (transformers) and GGUF
    export (llama.cpp's converter) both load the safetensors and succeed."""
    d = tmp_path / "model"
    shutil.copytree(tiny, d)
    marker = tmp_path / "MARKER"
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, d / "pytorch_model.bin")
    r = invoke("finetune", d, "--data", task_jsonl, "--steps", "1", "--batch-size", "2", "--eval-examples", "1",
               "--out", tmp_path / "ft")
    assert r.exit_code == 0, r.stderr[-2000:]
    r = invoke("export", "gguf", d, "--quant", "F16", "--no-verify", "--out", tmp_path / "o.gguf")
    assert r.exit_code == 0, r.stderr[-2000:]
    assert not marker.exists()


def _planted_checkpoint(out: Path, marker: Path) -> None:
    """A fine-tuning checkpoint whose optimizer state is a pickle payload (weights and state look valid)."""
    from safetensors.torch import save_file

    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True)
    save_file({}, str(ckpt / "trainable.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "tokens": 10, "seconds": 1.0, "loss_curve": []}))
    torch.save({"optimizer": _Payload(marker)}, ckpt / "optimizer.pt")


@pytest.mark.integration
def test_pickled_optimizer_state_in_a_checkpoint_is_never_run(tmp_path: Path, tiny: Path, task_jsonl: Path) -> None:
    """--resume reads the optimizer state with torch.load(weights_only=True), which refuses the payload."""
    marker = tmp_path / "MARKER"
    _planted_checkpoint(tmp_path / "ft", marker)
    r = invoke("finetune", tiny, "--data", task_jsonl, "--steps", "2", "--batch-size", "2", "--eval-examples", "1",
               "--resume", "--out", tmp_path / "ft")
    assert r.exit_code != 0 and "Traceback" not in r.stderr
    assert not marker.exists()


@pytest.mark.integration
def test_damaged_checkpoint_is_one_clear_line(tmp_path: Path, tiny: Path, task_jsonl: Path) -> None:
    _planted_checkpoint(tmp_path / "ft", tmp_path / "MARKER")
    r = invoke("finetune", tiny, "--data", task_jsonl, "--steps", "2", "--batch-size", "2", "--eval-examples", "1",
               "--resume", "--out", tmp_path / "ft")
    assert_one_error_line(r, "checkpoint", progress_ok=True)


def test_yaml_python_tags_never_build_objects(tmp_path: Path) -> None:
    """Profiles, targets and pipeline files are read with yaml.safe_load: a python/object tag is a syntax error."""
    marker = tmp_path / "MARKER"
    payload = f"!!python/object/apply:os.system ['touch {marker}']\n"
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "evil.yaml").write_text(payload, encoding="utf-8")
    (tmp_path / "evil.yaml").write_text(payload, encoding="utf-8")
    assert_one_error_line(invoke("profiles", "list", "--profiles-dir", profiles), "not valid YAML")
    assert_one_error_line(invoke("targets", "check", tmp_path / "evil.yaml"), "not valid YAML")
    assert_one_error_line(invoke("build", "--config", tmp_path / "evil.yaml", "--out", tmp_path / "b", "--dry-run"),
                          "not valid YAML")
    assert not marker.exists()
