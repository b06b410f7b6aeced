"""What the installed tools can take, asked of the tools themselves rather than kept in a hand-written list.

- llama.cpp's converter (the tree of the installed llama-cpp-python binding): the HF architectures it registers,
  read from the tree's ``conversion/__init__.py`` (``TEXT_MODEL_MAP``) or, in older trees, from the
  ``@ModelBase.register(...)`` decorators of ``convert_hf_to_gguf.py``. Read as source with ``ast``, not imported:
  importing the converter pulls in torch and its own gguf-py, and the plan must stay light.
- optimum-onnx: the model types whose ``TasksManager`` entry has ``text-generation-with-past`` (a decoder with a KV
  cache, what edgeforge ships).
- transformers' GGUF loader: the GGUF architectures it can dequantize into a torch model (a GGUF teacher trains
  only through it).

Each answer is ``None`` when the tool is not installed or not fetched yet, so a caller can say so instead of
guessing.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgeforge.fileio import write_json_atomic
from edgeforge.paths import edgeforge_home

#: The families edgeforge tests end to end (plan, prune, distill, LoRA, GGUF, ONNX): HF model_type -> architecture.
TESTED_FAMILIES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "granite": "GraniteForCausalLM",
}
ONNX_TASK = "text-generation-with-past"


def smollm3_rope_flags(n_layers: int) -> list[int]:
    """The RoPE flags llama.cpp runs SmolLM3 with, fixed in its code (``src/models/smollm3.cpp``, no GGUF key):
    1 (RoPE) in every layer except every 4th."""
    return [int((i + 1) % 4 != 0) for i in range(n_layers)]


def installed_version(package: str) -> str | None:
    """The installed version of ``package``, or None when it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def binding_version() -> str:
    """The llama-cpp-python binding's version ('unknown' when it is not installed)."""
    return installed_version("llama_cpp_python") or "unknown"


def llama_tree_dir() -> Path:
    """Where the llama.cpp tree of the installed binding lives once fetched."""
    return edgeforge_home() / f"llama.cpp-{binding_version()}"


def _text_model_map(source: str) -> set[str]:
    for node in ast.parse(source).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return set()


_REGISTER = re.compile(r"@ModelBase\.register\(([^)]*)\)")


@functools.cache
def _converter_architectures(tree: Path) -> frozenset[str] | None:
    package = tree / "conversion" / "__init__.py"
    if package.is_file():
        names = _text_model_map(package.read_text(encoding="utf-8"))
        if names:
            return frozenset(names)
    script = tree / "convert_hf_to_gguf.py"
    if not script.is_file():
        return None
    names = {m for args in _REGISTER.findall(script.read_text(encoding="utf-8"))
             for m in re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args)}
    return frozenset(names) or None


def converter_architectures() -> frozenset[str] | None:
    """HF architecture names (``LlamaForCausalLM``, ...) the pinned converter registers; None if not fetched."""
    return _converter_architectures(llama_tree_dir())


def _ask_optimum() -> list[str] | None:
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        return None
    registry = TasksManager._SUPPORTED_MODEL_TYPE  # noqa: SLF001 - the registry has no public listing
    return sorted(t for t, by_exporter in registry.items() if ONNX_TASK in by_exporter.get("onnx", {}))


@functools.cache
def onnx_model_types() -> frozenset[str] | None:
    """HF model types optimum-onnx exports as a decoder with a KV cache (both ``-`` and ``_`` spellings).

    Asking optimum means importing it (about 8 s), so the answer is kept in ``$EDGEFORGE_HOME``, keyed by the
    versions of optimum-onnx, optimum and transformers: a plan pays it once per installation.
    """
    versions = [installed_version(p) for p in ("optimum-onnx", "optimum", "transformers")]
    if None in versions:
        return None
    cache = edgeforge_home() / "tool-support" / f"onnx-{'-'.join(str(v) for v in versions)}.json"
    try:
        types = json.loads(cache.read_text(encoding="utf-8"))["model_types"]
    except (OSError, ValueError, KeyError, TypeError):
        asked = _ask_optimum()
        if asked is None:
            return None
        types = asked
        try:
            write_json_atomic(cache, {"task": ONNX_TASK, "model_types": types})
        except OSError:
            pass  # a read-only home only costs the next plan the same 8 s
    return frozenset({str(t) for t in types} | {str(t).replace("-", "_") for t in types})


def onnx_supports(model_type: str) -> bool | None:
    """Whether optimum-onnx exports ``model_type`` with a KV cache (None: optimum-onnx is not installed)."""
    types = onnx_model_types()
    return None if types is None else (model_type in types or model_type.replace("_", "-") in types)


@functools.cache
def gguf_loader_architectures() -> frozenset[str] | None:
    """GGUF ``general.architecture`` values transformers can load into torch (None: transformers is missing)."""
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    except ImportError:
        return None
    return frozenset(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))
