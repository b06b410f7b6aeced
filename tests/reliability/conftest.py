"""Inputs shared by the reliability tests: one tiny HF model, its F16 GGUF, task and text data, a local target.

Made once per session (the tiny model takes seconds, its GGUF export a few more); tests copy before they damage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import make_tiny_model

from edgeforge.export.gguf import export_gguf
from edgeforge.models.refs import ModelRef


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random llama with the bundled teacher's tokenizer (safetensors weights)."""
    return make_tiny_model(tmp_path_factory.mktemp("reliability") / "tiny")


@pytest.fixture(scope="session")
def tiny_f16(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported by edgeforge to GGUF F16 (about 8 MB, 49,152-token vocabulary)."""
    out = tmp_path_factory.mktemp("reliability-gguf") / "tiny-f16.gguf"
    export_gguf(ModelRef(str(tiny), tiny, "hf"), "F16", out)
    return out


@pytest.fixture(scope="session")
def task_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid fine-tuning task file: 12 prompt/completion lines."""
    path = tmp_path_factory.mktemp("reliability-data") / "task.jsonl"
    rows = [{"prompt": f"turn on light {i}", "completion": json.dumps({"device": "light", "id": i})} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain training text for distillation (a few dozen short sequences)."""
    from edgeforge.data.builtin import training_prose

    path = tmp_path_factory.mktemp("reliability-text") / "train.txt"
    path.write_text(training_prose(3000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def local_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This machine as a bench target that names its profile, so no bandwidth detection runs."""
    path = tmp_path_factory.mktemp("reliability-target") / "here.yaml"
    path.write_text("# edgeforge bench --target here.yaml\nname: here\ntype: local\nprofile: raspberry-pi-5-8gb\n",
                    encoding="utf-8")
    return path
