"""A GGUF teacher as a Hugging Face model directory, with its tokenizer written in canonical form.

transformers rebuilds a GGUF's tokenizer as a ``LlamaTokenizerFast`` with a mixed SentencePiece/byte-level decoder,
a BOS post-processor and the whole GGUF copied as ``tokenizer.model``; llama.cpp's converter then mistakes it for
SentencePiece or does not recognise its pre-tokenizer. So the tokenizer is built here directly
from the GGUF's own fields: GPT-2 byte-level BPE (vocabulary and merges as stored), digits split one by one, a
byte-level decoder, no BOS post-processor, no ``tokenizer.model``. In that form llama.cpp recognises it (the
``smollm`` pre-tokenizer for the bundled teacher) and tokenizes exactly as the HF tokenizer does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgeforge.errors import ModelError
from edgeforge.progress import progress

#: Pre-tokenizers (``tokenizer.ggml.pre``) whose canonical HF form edgeforge writes.
CANONICAL_PRE_TOKENIZERS = frozenset({"smollm", "qwen2", "llama-bpe", "default", "gpt-2"})
# llama.cpp token types (gguf.TokenType): 3 = CONTROL, 4 = USER_DEFINED; both are special (added) tokens.
_SPECIAL_TOKEN_TYPES = {3, 4}


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def canonical_tokenizer_files(gguf_path: Path) -> dict[str, Any]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` contents for a GGUF's vocab.

    Only GPT-2-style byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path), "r")
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"{gguf_path}: tokenizer model '{kind}' is not supported for an HF conversion; expected "
                         "'gpt2' (byte-level BPE, as in SmolLM, Llama 3, Qwen2)")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges") or []
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _field(reader, "tokenizer.ggml.pre") or "default"

    def tok(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty in _SPECIAL_TOKEN_TYPES
    ]
    pretokenizers: list[dict[str, Any]] = []
    if pre in CANONICAL_PRE_TOKENIZERS:
        # SmolLM's own tokenizer.json splits digits individually before the byte-level regex.
        if pre == "smollm":
            pretokenizers.append({"type": "Digits", "individual_digits": True})
    else:
        raise ModelError(f"{gguf_path}: pre-tokenizer '{pre}' has no canonical HF form here; supported: smollm, "
                         "qwen2, llama-bpe, gpt-2")
    pretokenizers.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True})
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    special = {k: v for k, v in {"bos_token": tok("bos"), "eos_token": tok("eos"), "unk_token": tok("unknown"),
                                  "pad_token": tok("padding")}.items() if v is not None}
    config: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length") or 2048),
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        **special,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config, "special_tokens_map.json": special}


def write_canonical_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Write the canonical tokenizer files of ``gguf_path`` into ``out_dir`` (and remove any tokenizer.model)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in canonical_tokenizer_files(gguf_path).items():
        (out_dir / name).write_text(json.dumps(content, ensure_ascii=False, indent=1), encoding="utf-8")
    (out_dir / "tokenizer.model").unlink(missing_ok=True)


def materialize_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model into an HF directory (fp32 safetensors + canonical tokenizer), atomically.

    A finished directory is reused: it is written under a temporary name and renamed only when complete. Progress:
    one phase each for dequantizing, saving and the tokenizer (transformers' own per-tensor bar is kept off, so
    a log gets edgeforge's lines only).
    """
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with progress(f"dequantize {gguf_path.name} to fp32 (first use)", total=3, unit="phase") as p:
            p.update(note="dequantize")
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         dtype=torch.float32)
            p.advance(note="save safetensors")
            model.save_pretrained(staging, safe_serialization=True)
            p.advance(note="tokenizer")
            write_canonical_tokenizer(gguf_path, staging)
            p.advance(note=str(out_dir))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def hf_dir_for(model_path: Path, cache_root: Path) -> Path:
    """Where the HF form of a GGUF teacher is cached: keyed by the file's name, size and mtime."""
    st = model_path.stat()
    return cache_root / "hf-from-gguf" / f"{model_path.stem}-{st.st_size}-{int(st.st_mtime)}"
