"""Shared fixtures: tiny config-only model directories and an isolated environment (no network, temp home)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The llama.cpp tree and tools built by the Makefile, and the dequantized teacher, live in the real home's cache;
# pin it before the fixture below gives each test a temporary HOME.
os.environ.setdefault("EDGEFORGE_HOME", str(Path.home() / ".cache" / "edgeforge"))
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from edgeforge.plan.calibration import LLAMA_2_7B, LLAMA_3_2_3B, LLAMA_3_8B, TINYLLAMA_1_1B  # noqa: F401 (re-exported)


def write_config_dir(root: Path, config: dict) -> Path:
    """A model directory holding only config.json (enough for planning)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **config}))
    return root


@pytest.fixture
def config_dir(tmp_path: Path):
    def make(config: dict, name: str = "model") -> Path:
        return write_config_dir(tmp_path / name, config)

    return make


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    monkeypatch.delenv("EDGEFORGE_PROFILES", raising=False)
