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
