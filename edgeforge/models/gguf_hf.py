"""A GGUF teacher as a Hugging Face model directory, with its tokenizer rebuilt from the GGUF's own fields.

transformers rebuilds a GGUF's tokenizer as a ``LlamaTokenizerFast`` with a mixed SentencePiece/byte-level decoder,
a BOS post-processor and the whole GGUF copied as ``tokenizer.model``; llama.cpp's converter then mistakes it for
SentencePiece or does not recognise its pre-tokenizer. So the tokenizer is built here with the ``tokenizers``
library from the GGUF's fields: byte-level BPE with the vocabulary and merges as stored, and the pre-tokenizer that
its ``tokenizer.ggml.pre`` means to llama.cpp: llama.cpp's own regexes, parsed from the pinned tree
(edgeforge.models.llama_vocab), each a ``Split`` in order, then the byte-level mapping; Llama 3's "whole words skip
the merges" as BPE's ``ignore_merges``. No ``tokenizer.model``. Tested per pre-tokenizer against llama.cpp's own
tokenization of mixed text (tests/test_gguf_tokenizer.py).
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

# llama.cpp token types (gguf.TokenType): 3 = CONTROL, 4 = USER_DEFINED; both are special (added) tokens.
_SPECIAL_TOKEN_TYPES = {3, 4}


def _field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def rebuildable_pre_tokenizers() -> frozenset[str]:
    """The ``tokenizer.ggml.pre`` values whose tokenizer edgeforge rebuilds: every byte-level one llama.cpp knows."""
    from edgeforge.models.llama_vocab import pre_tokenizer_rules
    from edgeforge.models.support import llama_tree_dir

    try:
        rules = pre_tokenizer_rules(llama_tree_dir())
    except ModelError:
        return frozenset()
    return frozenset(n for n, r in rules.items() if r.byte_encode and not r.opaque_regexes
                     and all(_compiles(x) for x in r.regexes))


def _compiles(regex: str) -> bool:
    """Whether the ``tokenizers`` regex engine (Oniguruma) takes ``regex``; a few of llama.cpp's are placeholders
    for hand-written C++ splitters (``\\p{AFMoE_digits}``) that no regex engine knows."""
    from tokenizers import Regex

    try:
        Regex(regex)
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad pattern
        return False
    return True


def rebuilt_tokenizer(gguf_path: Path) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` of a byte-level BPE GGUF, and the GGUF fields it was built from."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from edgeforge.models.llama_vocab import pre_tokenizer_rules
    from edgeforge.models.support import llama_tree_dir

    reader = GGUFReader(str(gguf_path), "r")
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"{gguf_path}: tokenizer model '{kind}' is not supported for an HF conversion; expected "
                         "'gpt2' (byte-level BPE, as in SmolLM, Llama 3, Qwen); give the model's HF directory")
    pre = _field(reader, "tokenizer.ggml.pre") or "default"
    rule = pre_tokenizer_rules(llama_tree_dir()).get(pre)
    if rule is None or pre not in rebuildable_pre_tokenizers():
        raise ModelError(f"{gguf_path}: pre-tokenizer '{pre}' is "
                         + ("not rebuilt here (not byte-level, or split by hand-written C++ in llama.cpp)" if rule
                            else "unknown to the pinned llama.cpp")
                         + "; give the model's HF directory instead of its GGUF")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: list[str] = _field(reader, "tokenizer.ggml.merges") or []
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     ignore_merges=rule.ignore_merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rule.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Tokens already in the vocabulary keep their ids.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty in _SPECIAL_TOKEN_TYPES])
    return tok, {"reader": reader, "tokens": tokens, "pre": pre}


def canonical_tokenizer_files(gguf_path: Path) -> dict[str, Any]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` contents for a GGUF's vocab.

    Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported.
    """
    tok, fields = rebuilt_tokenizer(gguf_path)
    reader, tokens = fields["reader"], fields["tokens"]

    def special_token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    tokenizer_json = json.loads(tok.to_str())  # serialised once: the vocabulary can hold 150k entries
    added = tokenizer_json["added_tokens"]
    special = {k: v for k, v in {"bos_token": special_token("bos"), "eos_token": special_token("eos"),
                                  "unk_token": special_token("unknown"),
                                  "pad_token": special_token("padding")}.items() if v is not None}
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
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config,
            "special_tokens_map.json": special}


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
