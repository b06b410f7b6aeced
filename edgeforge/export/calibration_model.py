"""The synthetic model ``profiles detect --calibrate`` times llama.cpp's kernels on (edgeforge.bench.calibrate).

Its shape is unlike the bundled teacher's and its students' (8 layers, hidden 1,024 against 30 / 10 layers of
hidden 576), so an estimate the calibrated profile makes for them is a prediction, not the calibration read back.
"""

from __future__ import annotations

from pathlib import Path

#: The synthetic model's shape (Llama, tied embeddings, the bundled teacher's 49,152-token vocabulary).
CALIBRATION_SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                     "num_attention_heads": 16, "num_key_value_heads": 4}
CALIBRATION_QUANT = "Q4_K_M"


def calibration_gguf(work: Path) -> Path:
    """The synthetic model of ``CALIBRATION_SHAPE`` at Q4_K_M in ``work`` (random weights: only its speed is used)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from edgeforge.export.gguf import export_gguf
    from edgeforge.models.gguf_hf import write_canonical_tokenizer
    from edgeforge.models.refs import ModelRef, read_arch, resolve_model

    teacher = resolve_model(None)
    vocab = read_arch(teacher).vocab_size
    hf_dir = work / "calibration-hf"
    config = LlamaConfig(**CALIBRATION_SHAPE, vocab_size=vocab, tie_word_embeddings=True,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(hf_dir, safe_serialization=True)
    del model
    write_canonical_tokenizer(teacher.path, hf_dir)
    out = work / f"calibration-{CALIBRATION_QUANT}.gguf"
    export_gguf(ModelRef("calibration", hf_dir, "hf"), CALIBRATION_QUANT, out)
    return out


def describe() -> str:
    """One line for the profile's sources."""
    s = CALIBRATION_SHAPE
    return (f"a random Llama of {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, MLP "
            f"{s['intermediate_size']}, at {CALIBRATION_QUANT}")
