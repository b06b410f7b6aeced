"""Weights and KV-cache bytes, checked against hand computation and published GGUF file sizes."""

from __future__ import annotations

import pytest
from conftest import LLAMA_2_7B, LLAMA_3_2_3B, TINYLLAMA_1_1B

from edgeforge.models.refs import arch_from_config
from edgeforge.plan.sizing import gguf_file_bytes, kv_cache_bytes, onnx_weights_bytes


def test_kv_cache_matches_hand_computation_for_gqa():
    # Llama 3.2 3B: 28 layers, 8 KV heads (of 24 query heads), head_dim 128, f16, 4096 tokens.
    arch = arch_from_config(LLAMA_3_2_3B)
    by_hand = 2 * 28 * 8 * 128 * 4096 * 2  # K and V x layers x kv heads x head dim x tokens x 2 bytes
    assert by_hand == 469_762_048
    assert kv_cache_bytes(arch, 4096) == by_hand
    # Counting all 24 query heads (the mistake GQA-unaware tools make) would be 3x larger.
    assert kv_cache_bytes(arch, 4096) * 3 == 2 * 28 * 24 * 128 * 4096 * 2


@pytest.mark.parametrize(
    "config, quant, published_bytes, source",
    [
        (LLAMA_3_2_3B, "Q4_K_M", 2_019_377_696, "geerlingguy/ai-benchmarks, Ollama llama3.2:3b"),
        (TINYLLAMA_1_1B, "Q4_K_M", 636 * 2**20, "geerlingguy/ai-benchmarks#40"),
        (LLAMA_2_7B, "Q4_0", int(3.56 * 2**30), "llama.cpp discussion #4167"),
    ],
)
def test_gguf_size_matches_published_files(config, quant, published_bytes, source):
    estimate = gguf_file_bytes(arch_from_config(config), quant)
    assert estimate == pytest.approx(published_bytes, rel=0.02), source


def test_param_count_of_llama_3_2_3b():
    assert arch_from_config(LLAMA_3_2_3B).n_params == pytest.approx(3.21e9, rel=0.01)


def test_onnx_int8_is_at_least_3x_smaller_than_fp32():
    arch = arch_from_config(TINYLLAMA_1_1B)
    assert onnx_weights_bytes(arch, "fp32") / onnx_weights_bytes(arch, "int8") > 3


def test_unknown_quant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown GGUF quant type 'Q9_9'"):
        gguf_file_bytes(arch_from_config(TINYLLAMA_1_1B), "Q9_9")


@pytest.mark.integration  # ten real exports (llama.cpp's converter and quantizer) of a 9M-parameter model: ~2 min
def test_the_size_estimate_is_the_written_file_for_every_type_the_planner_offers(tmp_path):
    """A tiny Llama with 256-wide rows (so llama.cpp's K-quant blocks apply), 16 layers (so the mixes' per-layer
    rules show) and 4 query heads per KV head (IQ4_XS's grouped-attn_v rule), exported at every type of
    GGUF_QUANT_TYPES: the estimated tensor bytes are the written file's within 3%, and the Q3_K_M file's types for
    attn_v, attn_output and ffn_down are the ones the estimate assumes."""
    from gguf import GGUFReader
    from tiny_models import make_tiny_model

    from edgeforge.data.builtin import write_calibration_text
    from edgeforge.export.gguf import NEEDS_IMATRIX, export_gguf
    from edgeforge.models.refs import ModelRef, read_arch
    from edgeforge.plan.sizing import GGUF_QUANT_TYPES, gguf_weights_bytes

    model = make_tiny_model(tmp_path / "m", layers=16, tokenizer="sentencepiece",
                            overrides={"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
                                       "head_dim": 64, "num_key_value_heads": 1})
    ref = ModelRef("m", model, "hf")
    arch = read_arch(ref)
    calibration = write_calibration_text(tmp_path / "calibration.txt")
    off = {}
    for quant in GGUF_QUANT_TYPES:
        out = tmp_path / f"m-{quant}.gguf"
        export_gguf(ref, quant, out, calibration if quant in NEEDS_IMATRIX else None)
        reader = GGUFReader(str(out))
        written = sum(int(t.n_bytes) for t in reader.tensors)
        off[quant] = gguf_weights_bytes(arch, quant) / written - 1
        if quant == "Q3_K_M":
            types = {t.name: t.tensor_type.name for t in reader.tensors}
            assert (types["blk.0.attn_v.weight"], types["blk.2.attn_v.weight"]) == ("Q5_K", "Q4_K")
            assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q5_K", "Q4_K")
            assert (types["blk.5.attn_output.weight"], types["blk.5.attn_q.weight"]) == ("Q4_K", "Q3_K")
        if quant == "IQ4_XS":
            types = {t.name: t.tensor_type.name for t in reader.tensors}
            assert types["blk.3.attn_v.weight"] == "Q5_K"
    assert all(abs(e) <= 0.03 for e in off.values()), {q: f"{e:+.2%}" for q, e in off.items()}
