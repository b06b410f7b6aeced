"""A GGUF teacher as a Hugging Face model directory, with its tokenizer rebuilt from the GGUF's own fields.

transformers rebuilds a GGUF's tokenizer as a ``LlamaTokenizerFast`` with a mixed SentencePiece/byte-level decoder,
a BOS post-processor and the whole GGUF copied as ``tokenizer.model``; llama.cpp's converter then mistakes it for
SentencePiece or does not recognise its pre-tokenizer. So the tokenizer is built here with the ``tokenizers``
library from the GGUF's fields: byte-level BPE with the vocabulary and merges as stored, and the pre-tokenizer that
its ``tokenizer.ggml.pre`` means to llama.cpp: llama.cpp's own regexes, parsed from the pinned tree
(edgeforge.models.llama_vocab), each a ``Split`` in order, then the byte-level mapping; Llama 3's "whole words skip
the merges" as BPE's ``ignore_merges``; no ``tokenizer.model``. A SentencePiece vocabulary gets its
``tokenizer.model`` back and a BPE with byte fallback (edgeforge.models.gguf_sentencepiece). Tested per
pre-tokenizer, and for SentencePiece with and without the space prefix, against llama.cpp's own tokenization of mixed
text (tests/test_gguf_tokenizer.py).
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

#: Raised when what materialize_hf writes changes, so that no cached HF form of an older recipe is reused
#: (2: SentencePiece vocabularies, llama.cpp's Gemma 3 hyperparameters).
MATERIALIZE_RECIPE = 2
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


def tokenizer_fields(gguf_path: Path) -> dict[str, Any]:
    """The GGUF's ``tokenizer.*`` fields, its architecture and its context length."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path), "r")
    fields = {k: _field(reader, k) for k in reader.fields if k.startswith(("tokenizer.", "general.architecture"))}
    fields["context_length"] = _field(reader, f"{fields.get('general.architecture')}.context_length")
    return fields


def tokenizer_refusal(fields: dict[str, Any]) -> str | None:
    """Why the tokenizer of a GGUF with these fields is not rebuilt here, or None when it is."""
    from edgeforge.models.gguf_sentencepiece import sentencepiece_refusal
    from edgeforge.models.llama_vocab import pre_tokenizer_rules
    from edgeforge.models.support import llama_tree_dir

    kind = fields.get("tokenizer.ggml.model")
    if kind == "llama":
        return sentencepiece_refusal(*(fields.get(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type")))
    if kind != "gpt2":
        return (f"tokenizer model '{kind}' is not rebuilt here; expected 'gpt2' (byte-level BPE: SmolLM, Llama 3, "
                "Qwen) or 'llama' (SentencePiece: Llama 2, Gemma, Phi-3)")
    pre = fields.get("tokenizer.ggml.pre") or "default"
    if pre in rebuildable_pre_tokenizers():
        return None
    known = pre in pre_tokenizer_rules(llama_tree_dir())
    return f"pre-tokenizer '{pre}' is " + ("not rebuilt here (not byte-level, or split by hand-written C++ in "
                                           "llama.cpp)" if known else "unknown to the pinned llama.cpp")


def rebuilt_tokenizer(gguf_path: Path) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` of a GGUF's vocabulary (byte-level BPE or SentencePiece), and the GGUF fields
    it was built from."""
    fields = tokenizer_fields(gguf_path)
    refusal = tokenizer_refusal(fields)
    if refusal:
        raise ModelError(f"{gguf_path}: {refusal}; give the model's HF directory instead of its GGUF")
    if fields["tokenizer.ggml.model"] == "llama":
        return _sentencepiece(fields), fields
    return _byte_level_bpe(fields), fields


def _special_id(fields: dict[str, Any], key: str) -> int | None:
    i = fields.get(f"tokenizer.ggml.{key}_token_id")
    n = len(fields["tokenizer.ggml.tokens"])
    return int(i) if i is not None and 0 <= int(i) < n else None


def _adds(fields: dict[str, Any], key: str, default: bool) -> bool:
    value = fields.get(f"tokenizer.ggml.add_{key}_token")
    return default if value is None else bool(value)


def _byte_level_bpe(fields: dict[str, Any]) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from edgeforge.models.llama_vocab import pre_tokenizer_rules
    from edgeforge.models.support import llama_tree_dir

    rule = pre_tokenizer_rules(llama_tree_dir())[fields.get("tokenizer.ggml.pre") or "default"]
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges: list[str] = fields.get("tokenizer.ggml.merges") or []
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     ignore_merges=rule.ignore_merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in rule.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    bos_id = _special_id(fields, "bos")
    if _adds(fields, "bos", False) and bos_id is not None:  # Llama 3: <|begin_of_text|> first
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{tokens[bos_id]} $A",
                                          pair=f"{tokens[bos_id]} $A {tokens[bos_id]} $B",
                                          special_tokens=[(tokens[bos_id], bos_id)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Tokens already in the vocabulary keep their ids.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty in _SPECIAL_TOKEN_TYPES])
    return tok


def _sentencepiece(fields: dict[str, Any]) -> Any:
    from edgeforge.models.gguf_sentencepiece import add_space_prefix, sentencepiece_tokenizer

    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    return sentencepiece_tokenizer(tokens, scores, types, prefix_space=add_space_prefix(fields),
                                   unk_id=_special_id(fields, "unknown"), bos_id=_special_id(fields, "bos"),
                                   eos_id=_special_id(fields, "eos"), add_bos=_adds(fields, "bos", True),
                                   add_eos=_adds(fields, "eos", False))


def canonical_tokenizer_files(gguf_path: Path) -> dict[str, Any]:
    """The tokenizer files of an HF directory for a GGUF's vocabulary: ``tokenizer.json``,
    ``tokenizer_config.json`` and ``special_tokens_map.json`` (JSON contents), and for a SentencePiece vocabulary
    ``tokenizer.model`` (bytes)."""
    tok, fields = rebuilt_tokenizer(gguf_path)
    tokens = fields["tokenizer.ggml.tokens"]
    spm = fields.get("tokenizer.ggml.model") == "llama"

    def special_token(key: str) -> str | None:
        i = _special_id(fields, key)
        return None if i is None else tokens[i]

    tokenizer_json = json.loads(tok.to_str())  # serialised once: the vocabulary can hold 150k entries
    added = tokenizer_json["added_tokens"]
    special = {k: v for k, v in {"bos_token": special_token("bos"), "eos_token": special_token("eos"),
                                  "unk_token": special_token("unknown"),
                                  "pad_token": special_token("padding")}.items() if v is not None}
    config: dict[str, Any] = {
        # A SentencePiece tokenizer.json is loaded as it is: LlamaTokenizerFast would rebuild its post-processor
        # and its space handling from flags of its own.
        "tokenizer_class": "PreTrainedTokenizerFast" if spm else "GPT2Tokenizer",
        "add_bos_token": _adds(fields, "bos", spm),
        "add_eos_token": _adds(fields, "eos", False),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(fields.get("context_length") or 2048),
        "model_input_names": ["input_ids", "attention_mask"],  # a decoder takes no token_type_ids
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        **special,
    }
    files: dict[str, Any] = {}
    if spm:
        from edgeforge.models.gguf_sentencepiece import add_space_prefix, sentencepiece_model_bytes

        # llama.cpp's Llama converter reads the space prefix from here (its default is SentencePiece's own).
        config["add_prefix_space"] = add_space_prefix(fields)
        files["tokenizer.model"] = sentencepiece_model_bytes(
            tokens, fields["tokenizer.ggml.scores"], fields["tokenizer.ggml.token_type"],
            prefix_space=add_space_prefix(fields), unk_id=_special_id(fields, "unknown"),
            bos_id=_special_id(fields, "bos"), eos_id=_special_id(fields, "eos"),
            pad_id=_special_id(fields, "padding"))
    else:
        config["add_prefix_space"] = False
    template = fields.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config,
            "special_tokens_map.json": special, **files}


def write_canonical_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Write the tokenizer files of ``gguf_path`` into ``out_dir``; a ``tokenizer.model`` left from another
    vocabulary is removed (llama.cpp's converter would prefer it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = canonical_tokenizer_files(gguf_path)
    if "tokenizer.model" not in files:
        (out_dir / "tokenizer.model").unlink(missing_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (out_dir / name).write_bytes(content)
        else:
            (out_dir / name).write_text(json.dumps(content, ensure_ascii=False, indent=1), encoding="utf-8")


def apply_llama_cpp_hparams(gguf_path: Path, config: Any) -> None:
    """Set on ``config`` (read from the GGUF by transformers) what llama.cpp computes from the same file but
    transformers' GGUF loader leaves at its own defaults, so that the torch model is the model llama.cpp runs.

    Gemma 3 (llama.cpp src/models/gemma3.cpp): which layers slide (the GGUF's pattern array, else every 6th layer
    full), the query scale (1/sqrt(head_dim), 1/sqrt(hidden/heads) for the 62-layer 27B; transformers would keep
    its default query_pre_attn_scalar of 256), the local RoPE base and the final logit soft-capping. Without this a
    4-layer Gemma 3 came out all-sliding with a query scale of 1/16 instead of 1/4, and a student distilled from
    it failed its own GGUF's verification (mean KL 0.05 at Q8_0).
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path), "r")
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        return
    layers = int(_field(reader, "gemma3.block_count"))
    window = _field(reader, "gemma3.attention.sliding_window")
    pattern = _field(reader, "gemma3.attention.sliding_window_pattern")
    if window:
        sliding = [bool(x) for x in pattern] if isinstance(pattern, list) else [i % 6 < 5 for i in range(layers)]
        config.sliding_window = int(window)
    else:
        sliding = [False] * layers
    config.layer_types = ["sliding_attention" if x else "full_attention" for x in sliding]
    heads = int(_field(reader, "gemma3.attention.head_count"))
    hidden = int(_field(reader, "gemma3.embedding_length"))
    head_dim = int(_field(reader, "gemma3.attention.key_length") or hidden // heads)
    config.query_pre_attn_scalar = hidden // heads if layers == 62 else head_dim
    local_base = _field(reader, "gemma3.rope.freq_base_swa")
    if local_base:
        config.rope_local_base_freq = float(local_base)
    softcap = _field(reader, "gemma3.final_logit_softcapping")
    config.final_logit_softcapping = float(softcap) if softcap else None


def materialize_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model into an HF directory (fp32 safetensors + canonical tokenizer), atomically.

    A finished directory is reused: it is written under a temporary name and renamed only when complete. Progress:
    one phase each for dequantizing, saving and the tokenizer (transformers' own per-tensor bar is kept off, so
    a log gets edgeforge's lines only).
    """
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with progress(f"dequantize {gguf_path.name} to fp32 (first use)", total=3, unit="phase") as p:
            p.update(note="dequantize")
            config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            apply_llama_cpp_hparams(gguf_path, config)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                         config=config, dtype=torch.float32)
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
    """Where the HF form of a GGUF teacher is cached: keyed by the file's name, size and mtime, and the recipe."""
    st = model_path.stat()
    return cache_root / "hf-from-gguf" / f"{model_path.stem}-{st.st_size}-{int(st.st_mtime)}-r{MATERIALIZE_RECIPE}"
