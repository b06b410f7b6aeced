"""Tiny random models made in-test, sharing the bundled teacher's real tokenizer (49,152 tokens).

An embedding of 49,152 x 64 is only 3M parameters, so export and tokenizer paths run for Llama, Qwen2 and Mistral
configurations in seconds with no download.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edgeforge.models.gguf_hf import write_canonical_tokenizer
from edgeforge.models.refs import resolve_model

VOCAB = 49152


def make_tiny_model(out: Path, arch: str = "llama", seed: int = 0, layers: int = 2) -> Path:
    """Save a random decoder of ``arch`` (llama, qwen2, mistral) with the bundled teacher's tokenizer to ``out``."""
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=2048, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=True)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init give peaked, testable distributions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    write_canonical_tokenizer(resolve_model(None).path, out)
    return out
