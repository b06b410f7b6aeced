"""The exportability gate: before any training, can this model's architecture and tokenizer be shipped in each
format the profile runs? Nobody should distill for an hour into a model that cannot be exported.
"""

from __future__ import annotations

from typing import Any

from edgeforge.models.files import read_model_config
from edgeforge.models.refs import ModelRef

# Architectures both llama.cpp's converter and optimum-onnx's exporter handle, as edgeforge drives them.
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ONNX_MODEL_TYPES = {"llama", "mistral", "qwen2"}
GGUF_FILE_ARCHITECTURES = {"llama", "qwen2"}
# Pre-tokenizers whose canonical HF form edgeforge can write (edgeforge.models.gguf_hf).
CANONICAL_PRE_TOKENIZERS = {"smollm", "qwen2", "llama-bpe", "default", "gpt-2"}


def _verdict(ok: bool, reason: str) -> dict[str, Any]:
    return {"ok": ok, "reason": reason}


def check_exportable(ref: ModelRef) -> dict[str, dict[str, Any]]:
    """Per format ('gguf', 'onnx'): whether ``ref`` can be exported, and why (not)."""
    if ref.format == "gguf":
        from gguf import GGUFReader

        reader = GGUFReader(str(ref.path), "r")

        def field(k: str) -> Any:
            f = reader.fields.get(k)
            return None if f is None else f.contents()

        arch, tok, pre = field("general.architecture"), field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")
        hf_ok = arch in GGUF_FILE_ARCHITECTURES and tok == "gpt2" and pre in CANONICAL_PRE_TOKENIZERS
        why_hf = (f"architecture '{arch}', tokenizer '{tok}' with pre-tokenizer '{pre}': "
                  + ("converts to an HF model with a canonical tokenizer" if hf_ok else
                     f"cannot be converted to an HF model here (supported: {sorted(GGUF_FILE_ARCHITECTURES)} with "
                     f"gpt2 tokenizers, pre-tokenizers {sorted(CANONICAL_PRE_TOKENIZERS)})"))
        return {
            "gguf": _verdict(True, "a GGUF model is re-quantized directly, its tokenizer kept as is"),
            "onnx": _verdict(hf_ok, why_hf),
            "training": _verdict(hf_ok, why_hf),
        }
    cfg = read_model_config(ref.path)
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    has_tok = (ref.path / "tokenizer.json").is_file()
    tok_note = "" if has_tok else "; no tokenizer.json: save the tokenizer with the model"
    gguf_ok = any(a in GGUF_ARCHITECTURES for a in archs) and has_tok
    onnx_ok = model_type in ONNX_MODEL_TYPES and has_tok
    return {
        "gguf": _verdict(gguf_ok, f"architectures {archs}" + (" are supported by llama.cpp's converter" if gguf_ok
                         else f": supported are {sorted(GGUF_ARCHITECTURES)}") + tok_note),
        "onnx": _verdict(onnx_ok, f"model_type '{model_type}'" + (" is supported by optimum-onnx" if onnx_ok
                         else f": supported are {sorted(ONNX_MODEL_TYPES)}") + tok_note),
        "training": _verdict(True, "an HF model trains in torch"),
    }
