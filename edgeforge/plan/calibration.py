"""Published llama.cpp decode measurements, each with its source, that the speed estimator is checked against.

Each row names the device profile, the backend the measurement used, the model's published architecture, the quant
type, the measured tokens/s and its source. ``tests/test_estimator.py`` asserts every row within +-30% and
``benchmarks/estimator_calibration.py`` prints the table for the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Architectures from the models' published config.json files.
TINYLLAMA_1_1B: dict[str, Any] = dict(
    model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)
LLAMA_3_2_3B: dict[str, Any] = dict(
    model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072)
LLAMA_2_7B: dict[str, Any] = dict(
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
LLAMA_3_8B: dict[str, Any] = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192)


@dataclass(frozen=True)
class CalibrationRow:
    profile: str
    backend: str
    model: str
    config: dict[str, Any]
    quant: str
    decode_tokens_per_s: float
    prefill_tokens_per_s: float | None
    source: str


CALIBRATION_ROWS: tuple[CalibrationRow, ...] = (
    CalibrationRow("raspberry-pi-4-4gb", "cpu", "TinyLlama 1.1B", TINYLLAMA_1_1B, "Q8_0", 3.0, 10.0,
                   "justine.lol/matmul"),
    CalibrationRow("raspberry-pi-5-8gb", "cpu", "TinyLlama 1.1B", TINYLLAMA_1_1B, "Q8_0", 9.0, 35.0,
                   "justine.lol/matmul"),
    CalibrationRow("raspberry-pi-5-8gb", "cpu", "Llama 3.2 3B", LLAMA_3_2_3B, "Q4_K_M", 4.61, None,
                   "geerlingguy/ai-benchmarks"),
    CalibrationRow("rtx-3060-12gb", "vulkan", "TinyLlama 1.1B", TINYLLAMA_1_1B, "Q4_K_M", 279.05, None,
                   "geerlingguy/ai-benchmarks#40"),
    CalibrationRow("rtx-4090-24gb", "vulkan", "TinyLlama 1.1B", TINYLLAMA_1_1B, "Q4_K_M", 762.37, None,
                   "geerlingguy/ai-benchmarks#43"),
    CalibrationRow("rtx-4090-24gb", "vulkan", "Llama 3.2 3B", LLAMA_3_2_3B, "Q4_K_M", 334.67, None,
                   "geerlingguy/ai-benchmarks#43"),
    CalibrationRow("apple-m2-8gb", "metal", "Llama-2-7B", LLAMA_2_7B, "Q4_0", 21.91, 179.57,
                   "llama.cpp discussion #4167"),
    CalibrationRow("apple-m2-max-32gb", "metal", "Llama-2-7B", LLAMA_2_7B, "Q4_0", 60.99, None,
                   "llama.cpp discussion #4167"),
    CalibrationRow("jetson-agx-orin-64gb", "cuda", "Llama-2-7B", LLAMA_2_7B, "Q4_0", 22.5, None,
                   "nvidia-holoscan/holohub#170"),
)
