"""Determinism: the same input and settings give byte-identical artifacts (GGUF, ONNX) and identical fine-tuned
adapter weights, so a ship folder's sha256 manifest can be reproduced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgeforge.export.gguf import export_gguf, read_lineage, sha256_file
from edgeforge.models.refs import ModelRef

from .helpers import invoke

#: Anything that looks like a date, a clock time or a Unix timestamp (seconds or milliseconds since 2001).
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}|\d{1,2}:\d{2}:\d{2}|\b1\d{9}(\d{3})?\b")


def _string_fields(path: Path) -> dict[str, str]:
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    return {k: v for k, f in reader.fields.items() if k != "tokenizer.chat_template"
            and isinstance(v := f.contents(), str)}


@pytest.mark.integration
def test_gguf_q8_0_export_is_byte_identical(tmp_path: Path, tiny: Path) -> None:
    ref = ModelRef(str(tiny), tiny, "hf")
    a = export_gguf(ref, "Q8_0", tmp_path / "a" / "tiny-q8.gguf")
    b = export_gguf(ref, "Q8_0", tmp_path / "b" / "other-name.gguf")  # the output name is not in the file
    assert a["sha256"] == b["sha256"] == sha256_file(tmp_path / "b" / "other-name.gguf")
    lineage = read_lineage(tmp_path / "a" / "tiny-q8.gguf")
    assert set(lineage) == {"version", "source_model", "source_format", "profile", "quant", "imatrix_data",
                            "imatrix_file", "stages"}
    stamped = {k: v for k, v in _string_fields(tmp_path / "a" / "tiny-q8.gguf").items() if TIMESTAMP.search(v)}
    assert stamped == {}, f"time-dependent metadata: {stamped}"


@pytest.mark.integration
def test_onnx_int8_export_is_byte_identical(tmp_path: Path, tiny: Path) -> None:
    """Every file of the directory is identical except the export record, whose only differences are the two
    durations it reports (export_seconds, quantize_seconds)."""
    from edgeforge.export.onnx.export import RECORD_FILE, export_onnx

    ra = export_onnx(tiny, tmp_path / "a", quantize="int8")
    rb = export_onnx(tiny, tmp_path / "b", quantize="int8")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.onnx" in names
    a, b = tmp_path / "a", tmp_path / "b"
    differ = [n for n in names if n != RECORD_FILE and sha256_file(a / n) != sha256_file(b / n)]
    assert differ == []
    assert {k for k in ra if ra[k] != rb[k]} <= {"export_seconds", "quantize_seconds"}
    record = json.loads((a / RECORD_FILE).read_text())
    assert not TIMESTAMP.search(json.dumps({k: v for k, v in record.items()
                                            if k not in ("export_seconds", "quantize_seconds")}))


@pytest.mark.integration
def test_finetune_with_the_same_seed_gives_identical_adapter_weights(tmp_path: Path, tiny: Path,
                                                                     task_jsonl: Path) -> None:
    from safetensors.torch import load_file

    for name in ("a", "b"):
        r = invoke("finetune", tiny, "--data", task_jsonl, "--steps", "3", "--batch-size", "2", "--eval-examples",
                   "1", "--seed", "7", "--out", tmp_path / name)
        assert r.exit_code == 0, r.stderr[-2000:]
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and len(a) > 0
    assert all((a[k] == b[k]).all() for k in a)
    assert sha256_file(tmp_path / "a" / "adapter_model.safetensors") == sha256_file(
        tmp_path / "b" / "adapter_model.safetensors")
    curves = [json.loads((tmp_path / n / "finetune.json").read_text())["loss_curve"] for n in ("a", "b")]
    assert [e["loss"] for e in curves[0]] == [e["loss"] for e in curves[1]]
