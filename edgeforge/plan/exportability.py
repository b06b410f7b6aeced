"""The exportability gate: before any training, can this model's architecture and tokenizer be shipped in each
format the profile runs? Nobody should distill for an hour into a model that cannot be exported.

The answers come from the installed tools (edgeforge.models.support): the architectures llama.cpp's converter
registers, the model types optimum-onnx exports with a KV cache, the GGUF architectures transformers can load.
A missing tokenizer is its own sentence, so an architecture the tools take never reads as unsupported.
"""

from __future__ import annotations

from typing import Any

from edgeforge.models import support
from edgeforge.models.files import read_model_config
from edgeforge.models.gguf_hf import tokenizer_fields, tokenizer_refusal
from edgeforge.models.refs import ModelRef

NO_TOKENIZER = "No tokenizer.json beside the model: save it with tokenizer.save_pretrained(DIR) and plan again."


def _verdict(ok: bool, reason: str) -> dict[str, Any]:
    return {"ok": ok, "reason": reason}


def _tested_note() -> str:
    return f"families tested end to end: {', '.join(support.TESTED_FAMILIES)}"


def gguf_verdict(archs: list[str]) -> tuple[bool, str]:
    """Whether llama.cpp's converter registers one of ``archs`` (config.json's ``architectures``), and why."""
    known = support.converter_architectures()
    tree = f"llama.cpp's converter (binding {support.binding_version()})"
    if known is None:
        return False, (f"architectures {archs}: {tree} is not fetched yet, so nobody can say; run "
                       "'python -m edgeforge.export.llama_tools' (the Makefile's set-up does)")
    if any(a in known for a in archs):
        return True, f"architectures {archs} are registered by {tree}"
    return False, (f"architectures {archs} are not among the {len(known)} architectures llama.cpp's converter "
                   f"registers (binding {support.binding_version()}; list them: python "
                   f"{support.llama_tree_dir() / 'convert_hf_to_gguf.py'} --print-supported-models); "
                   + _tested_note())


def onnx_verdict(model_type: str) -> tuple[bool, str]:
    """Whether optimum-onnx exports ``model_type`` as a decoder with a KV cache, and why."""
    ok = support.onnx_supports(model_type)
    tool = f"optimum-onnx {support.installed_version('optimum-onnx')}"
    if ok is None:
        return False, f"model_type '{model_type}': optimum-onnx is not installed (pip install optimum-onnx)"
    if ok:
        return True, f"model_type '{model_type}' is exported with a KV cache by {tool}"
    types = sorted(t for t in support.onnx_model_types() or () if "-" not in t)
    return False, (f"model_type '{model_type}' has no '{support.ONNX_TASK}' export in {tool}; it supports "
                   f"{', '.join(types)}")


def _gguf_file(ref: ModelRef) -> dict[str, dict[str, Any]]:
    from gguf import GGUFReader

    reader = GGUFReader(str(ref.path), "r")

    def field(k: str) -> Any:
        f = reader.fields.get(k)
        return None if f is None else f.contents()

    arch, tok, pre = field("general.architecture"), field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")
    loadable = support.gguf_loader_architectures() or frozenset()
    reasons = []
    if arch not in loadable:
        reasons.append(f"transformers {support.installed_version('transformers')} cannot load GGUF architecture "
                       f"'{arch}' into torch (it loads {', '.join(sorted(loadable))})")
    refusal = tokenizer_refusal(tokenizer_fields(ref.path))
    if refusal:
        reasons.append(f"its tokenizer is not rebuilt: {refusal} (give the model's HF directory)")
    hf_ok = not reasons
    why_hf = (f"architecture '{arch}', tokenizer '{tok}' with pre-tokenizer '{pre}': "
              + ("converts to an HF model with a canonical tokenizer" if hf_ok else
                 "cannot be converted to an HF model here: " + "; ".join(reasons)))
    return {
        "gguf": _verdict(True, "a GGUF model is re-quantized directly, its tokenizer kept as is"),
        "onnx": _verdict(hf_ok, why_hf),
        "training": _verdict(hf_ok, why_hf),
    }


def check_exportable(ref: ModelRef) -> dict[str, dict[str, Any]]:
    """Per format ('gguf', 'onnx', 'training'): whether ``ref`` can go there, and why (not)."""
    if ref.format == "gguf":
        return _gguf_file(ref)
    cfg = read_model_config(ref.path)
    archs = [str(a) for a in cfg.get("architectures") or []]
    has_tok = (ref.path / "tokenizer.json").is_file()
    gguf_ok, gguf_why = gguf_verdict(archs)
    onnx_ok, onnx_why = onnx_verdict(str(cfg.get("model_type")))
    tail = "" if has_tok else f". {NO_TOKENIZER}"
    return {
        "gguf": _verdict(gguf_ok and has_tok, gguf_why + tail),
        "onnx": _verdict(onnx_ok and has_tok, onnx_why + tail),
        "training": _verdict(True, "an HF model trains in torch"),
    }
