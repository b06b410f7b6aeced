"""Tiny random models made in-test, sharing the bundled teacher's real tokenizer (49,152 tokens).

An embedding of 49,152 x 64 is only 3M parameters, so export and tokenizer paths run for every supported family in
seconds with no download. Each family keeps what sets it apart from Llama, at a tiny size: Qwen3's q/k norms,
Gemma 3's sliding-window and full layers with pre/post norms and scaled embeddings, Phi-3's fused projections with
partial rotary, SmolLM3's layers without RoPE, Granite's multipliers, Qwen2's q/k/v biases.

The families whose real checkpoints ship a SentencePiece vocabulary (Llama 2, Gemma) can instead get one trained
in-test with the ``sentencepiece`` package (``tokenizer="sentencepiece"``), saved as ``tokenizer.model`` and
``tokenizer.json`` by transformers' own tokenizer classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgeforge.models.gguf_hf import write_canonical_tokenizer
from edgeforge.models.refs import resolve_model

VOCAB = 49152
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "smollm3", "granite")


#: Text that trips tokenizers: non-ASCII, emoji and ZWJ sequences, CJK, code, digit runs, contractions, whitespace.
MIXED_TEXT = [
    "Héllo wörld! naïve café, Ελληνικά, русский текст",
    "🤖🚀 emoji 👍🏽 and ZWJ 👨\u200d👩\u200d👧 sequences",
    "日本語のテキスト、中文字符。한국어 텍스트",
    "def f(x):\n    return x**2  # comment\n\n\tindented\r\n",
    "digits 1234567890 12 345 6789012 3.14159 1e-5 0x1F $100.00",
    "contractions: don't I'll WE'RE they've she's it'd You'LL",
    "spaces   and  tabs\t\t and\n\n\nnewlines   ",
    '<tag attr="v"> -- \'quoted\' "double" ...!!! ~^|+=<>',
]
SPM_CORPUS = [*MIXED_TEXT, "the quick brown fox jumps over the lazy dog, 0123456789 times",
              "Repeat: red blue green cat dog sun moon tree. Colour of sky? blue. The model answers in one word."]


LLAMA_SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
GEMMA_SPECIAL_IDS = {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3}  # transformers' GemmaConverter assumes these


def train_tiny_sentencepiece(path: Path, corpus: list[str] | None = None, vocab_size: int = 700,
                             special_ids: dict[str, int] | None = None) -> Path:
    """A SentencePiece BPE model with byte fallback, as Llama 2's and Gemma's are (``<unk>``, ``<s>``, ``</s>``,
    ``<pad>`` at ``special_ids``, Llama's order by default; 256 byte pieces, then merges), trained in-test on
    ``corpus``."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter((corpus or SPM_CORPUS) * 3), model_writer=buf,
                                   model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
                                   character_coverage=0.98, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True,
                                   allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2,
                                   **(special_ids or LLAMA_SPECIAL_IDS))
    path.write_bytes(buf.getvalue())
    return path


def write_sentencepiece_tokenizer(out: Path, arch: str) -> tuple[int, dict[str, int]]:
    """Train a tiny SentencePiece model and save it as ``arch``'s own tokenizer class does (Gemma's: no space
    prefix, its special-token ids; Llama's otherwise); the vocabulary size and the special ids."""
    import tempfile

    from transformers import GemmaTokenizerFast, LlamaTokenizerFast

    gemma = arch.startswith("gemma")
    ids = GEMMA_SPECIAL_IDS if gemma else LLAMA_SPECIAL_IDS
    with tempfile.TemporaryDirectory() as tmp:
        model_file = train_tiny_sentencepiece(Path(tmp) / "tokenizer.model", special_ids=ids)
        cls = GemmaTokenizerFast if gemma else LlamaTokenizerFast
        tok = cls(vocab_file=str(model_file), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                  pad_token="<pad>", legacy=False)
        tok.save_pretrained(out)
    return len(tok), ids


def tiny_config(arch: str = "llama", layers: int = 2) -> Any:
    """A transformers config of family ``arch`` (a ``model_type`` in FAMILIES) at a tiny size."""
    import transformers as tf

    common: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                  max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                                  tie_word_embeddings=True)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "gemma3_text":
        # layer 0 slides over 16 positions, layer 1 attends fully: both kinds in two layers.
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                                   + ["sliding_attention"] * (layers % 2), pad_token_id=0)
    if arch == "phi3":
        return tf.Phi3Config(**{**common, "tie_word_embeddings": False}, partial_rotary_factor=0.5,
                             pad_token_id=0)
    if arch == "smollm3":
        # RoPE off in every 4th layer: the rule llama.cpp hard-codes for SmolLM3 (and SmolLM3-3B's own).
        return tf.SmolLM3Config(**common, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(layers)],
                                pad_token_id=0)
    if arch == "granite":
        return tf.GraniteConfig(**common, embedding_multiplier=2.0, residual_multiplier=0.5,
                                attention_multiplier=0.25, logits_scaling=2.0)
    raise ValueError(f"unknown tiny family '{arch}': expected one of {FAMILIES}")


def make_tiny_model(out: Path, arch: str = "llama", seed: int = 0, layers: int = 2,
                    embedding_std: float = 0.08, tokenizer: str = "bundled",
                    overrides: dict[str, Any] | None = None) -> Path:
    """Save a random decoder of family ``arch`` (see FAMILIES) with the bundled teacher's tokenizer to ``out``
    (``tokenizer="sentencepiece"``: a SentencePiece vocabulary trained in-test, see write_sentencepiece_tokenizer).

    ``overrides``: config fields set on the tiny config (hidden_size, heads, ...).
    ``embedding_std`` above the other weights' 0.08 gives (tied) output logits with wider margins, so a quantized
    artifact's top-1 agreement measures the export rather than near-ties of a flat random distribution.
    """
    from transformers import AutoModelForCausalLM

    if tokenizer not in ("bundled", "sentencepiece"):
        raise ValueError(f"tokenizer '{tokenizer}': expected 'bundled' or 'sentencepiece'")
    config = tiny_config(arch, layers)
    for key, value in (overrides or {}).items():  # e.g. rows wide enough for llama.cpp's 256-weight K-quant blocks
        setattr(config, key, value)
    if tokenizer == "sentencepiece":
        config.vocab_size, ids = write_sentencepiece_tokenizer(out, arch)
        config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["bos_id"], ids["eos_id"], ids["pad_id"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init give peaked, testable distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        if embedding_std != 0.08:  # (the default leaves the random stream, and so every pinned model, as it was)
            model.get_input_embeddings().weight.normal_(0, embedding_std)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer == "bundled":
        write_canonical_tokenizer(resolve_model(None).path, out)
    return out
