"""Bytes of a model's weights and KV cache in the shipped formats.

GGUF sizes follow llama.cpp's own per-tensor choices (``llama_tensor_get_type`` in llama-quant.cpp): a quant *mix*
such as Q4_K_M keeps the output matrix at Q6_K, gives half the ``attn_v`` and ``ffn_down`` layers Q6_K, and falls back
to a 32-block type when a row is not a multiple of 256 (SmolLM2's 576-wide rows, for instance). Block sizes come from
the ``gguf`` package, so they stay in step with the format.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from edgeforge.models.refs import ModelArch

QK_K = 256

# The type each llama.cpp file type ("ftype") uses by default, and which tensors it promotes.
GGUF_QUANT_TYPES: dict[str, Q] = {
    "F32": Q.F32,
    "F16": Q.F16,
    "BF16": Q.BF16,
    "Q8_0": Q.Q8_0,
    "Q6_K": Q.Q6_K,
    "Q5_K_M": Q.Q5_K,
    "Q4_K_M": Q.Q4_K,
    "Q4_0": Q.Q4_0,
    "IQ4_XS": Q.IQ4_XS,
    "Q3_K_M": Q.Q3_K,
}
_MIXES_PROMOTING_V_AND_DOWN = {"Q4_K_M", "Q5_K_M"}
# llama.cpp's fallback when a row length is not a multiple of QK_K (tensor_type_fallback in llama-quant.cpp).
_ROW_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.IQ4_NL}

ONNX_BITS_PER_WEIGHT: dict[str, float] = {
    "fp32": 32.0,
    "fp16": 16.0,
    # Nominal figures for the quantized modes (MatMulNBits, symmetric blocks of 32 with an fp32 scale: 8 + 1 and
    # 4 + 1 bits); their sizes are computed tensor by tensor from the export recipe (onnx_weights_bytes).
    "int8": 9.0,
    "int4": 5.0,
}
#: The ONNX export's recipe (edgeforge.export.onnx.quantize; kept equal by tests/test_sizing.py): symmetric blocks
#: of 32 weights along K, one fp32 scale a block, no zero points; the embedding table and the head at 8 bits (a tied
#: table stored once, its scales twice: GatherBlockQuantized and MatMulNBits take them in different shapes); in
#: int4, v_proj, down_proj and every projection of the first and last layer at 8 bits as well.
ONNX_BLOCK = 32
ONNX_SCALE_BYTES = 4
ONNX_INT4_8BIT_PROJECTIONS = ("v_proj", "down_proj")


def tensor_bytes(qtype: Q, n_elements: int) -> int:
    """Bytes of ``n_elements`` weights stored at ``qtype`` (whole blocks)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    return (n_elements + block - 1) // block * type_size


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for which layers of a *_M mix get the bigger type: the first and last eighth, every third."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def row_type(qtype: Q, row_len: int) -> Q:
    """The type llama.cpp writes a tensor with rows of ``row_len`` as when asked for ``qtype``: a 256-block type
    falls back to a 32-block one when the row is not a multiple of 256, and to F16 when not even of 32."""
    if row_len % GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    fallback = _ROW_FALLBACK.get(qtype, Q.Q8_0)
    return fallback if row_len % GGML_QUANT_SIZES[fallback][0] == 0 else Q.F16



def _mix_layer_types(arch: ModelArch, quant: str, base: Q, i_layer: int) -> tuple[Q, Q, Q]:
    """The types llama.cpp's mix ``quant`` gives layer ``i_layer``'s attn_v, attn_output and ffn_down
    (llama_tensor_get_type in llama-quant.cpp, for the non-MoE, non-Falcon, below-70B models edgeforge sizes)."""
    n = arch.n_layers
    if quant in _MIXES_PROMOTING_V_AND_DOWN and _use_more_bits(i_layer, n):
        return Q.Q6_K, base, Q.Q6_K
    if quant == "Q3_K_M":  # attn_v Q5_K in the first two layers, Q4_K after; attn_output Q4_K; ffn_down Q5_K / Q4_K
        return (Q.Q5_K if i_layer < 2 else Q.Q4_K), Q.Q4_K, (Q.Q5_K if i_layer < n // 16 else Q.Q4_K)
    if quant == "IQ4_XS" and arch.n_heads // arch.n_kv_heads >= 4:  # grouped KV heads: attn_v shared, given Q5_K
        return Q.Q5_K, base, base
    return base, base, base


def gguf_bytes_by_type(arch: ModelArch, quant: str, streamed_only: bool = False) -> dict[str, int]:
    """Bytes of tensor data in a GGUF file of ``arch`` at llama.cpp file type ``quant``, by the GGML type each
    tensor is written at ("Q5_0": bytes, ...; metadata excluded). ``streamed_only``: only the tensors a decoded
    token reads in full (an untied token-embedding table is a lookup of one row, so it is left out), what the
    speed estimate of a calibrated profile weighs by each type's measured decode rate."""
    try:
        base = GGUF_QUANT_TYPES[quant]
    except KeyError:
        raise ValueError(f"unknown GGUF quant type '{quant}'; expected one of {', '.join(GGUF_QUANT_TYPES)}") from None
    h, hd = arch.hidden_size, arch.head_dim
    q_out, kv_out = arch.n_heads * hd, arch.n_kv_heads * hd
    unquantized = base in (Q.F32, Q.F16, Q.BF16)
    by_type: dict[str, int] = {}

    def tensor(qtype: Q, row_len: int, n_rows: int, streamed: bool = True) -> None:
        written = qtype if unquantized else row_type(qtype, row_len)
        if streamed or not streamed_only:
            by_type[written.name] = by_type.get(written.name, 0) + tensor_bytes(written, row_len * n_rows)

    # Output matrix (or the tied embedding that serves as output): Q6_K unless the mix is Q8_0 or wider.
    out_type = base if unquantized or base == Q.Q8_0 else Q.Q6_K
    if not unquantized and h % QK_K != 0:
        out_type = Q.Q8_0
    tensor(out_type, h, arch.vocab_size)
    if not arch.tied_embeddings:
        tensor(base, h, arch.vocab_size, streamed=False)
    for i in range(arch.n_layers):
        v_type, o_type, down_type = _mix_layer_types(arch, quant, base, i)
        tensor(base, h, q_out)
        tensor(base, h, kv_out)
        tensor(v_type, h, kv_out)
        tensor(o_type, q_out, h)
        tensor(base, h, arch.intermediate_size)  # gate
        tensor(base, h, arch.intermediate_size)  # up
        tensor(down_type, arch.intermediate_size, h)
        # the two RMSNorm weights (and the q/k/v biases) stay F32
        by_type["F32"] = by_type.get("F32", 0) + 2 * h * 4 + ((q_out + 2 * kv_out) * 4 if arch.qkv_bias else 0)
    by_type["F32"] += h * 4  # the final norm
    return by_type


def gguf_weights_bytes(arch: ModelArch, quant: str) -> int:
    """Bytes of tensor data in a GGUF file of ``arch`` at llama.cpp file type ``quant`` (metadata excluded)."""
    return sum(gguf_bytes_by_type(arch, quant).values())


def gguf_file_bytes(arch: ModelArch, quant: str) -> int:
    """Estimated GGUF file size: tensor data plus tokenizer metadata (about 16 bytes a vocabulary entry)."""
    return gguf_weights_bytes(arch, quant) + arch.vocab_size * 16


def _matmul_nbits_bytes(k: int, n: int, bits: int) -> int:
    """One MatMulNBits weight [K, N]: N x ceil(K / 32) blocks of 32 x bits / 8 bytes plus an fp32 scale."""
    return n * -(-k // ONNX_BLOCK) * (ONNX_BLOCK * bits // 8 + ONNX_SCALE_BYTES)


def onnx_weights_bytes(arch: ModelArch, quant: str) -> int:
    """Bytes of an ONNX decoder's weights at ``quant`` (fp32, fp16; int8 / int4 weight-only as the export writes
    them: see ONNX_BLOCK and the recipe above), embedding and head included."""
    if quant not in ONNX_BITS_PER_WEIGHT:
        raise ValueError(f"unknown ONNX quant '{quant}'; expected one of {', '.join(ONNX_BITS_PER_WEIGHT)}")
    if quant in ("fp32", "fp16"):
        return int(arch.n_params * ONNX_BITS_PER_WEIGHT[quant] / 8)
    h, v, q, kv = arch.hidden_size, arch.vocab_size, arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim
    projections = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                   "gate_proj": (h, arch.intermediate_size), "up_proj": (h, arch.intermediate_size),
                   "down_proj": (arch.intermediate_size, h)}
    total = 0
    for layer in range(arch.n_layers):
        edge = layer in (0, arch.n_layers - 1)
        for name, (k, n) in projections.items():
            bits = 8 if quant == "int8" or edge or name in ONNX_INT4_8BIT_PROJECTIONS else 4
            total += _matmul_nbits_bytes(k, n, bits)
    floats = arch.n_layers * 2 * h + h + (arch.n_layers * (q + 2 * kv) if arch.qkv_bias else 0)  # norms, biases
    head = _matmul_nbits_bytes(h, v, 8)
    scales = v * -(-h // ONNX_BLOCK) * ONNX_SCALE_BYTES
    if h % ONNX_BLOCK:  # the lookup stays float (GatherBlockQuantized needs whole blocks)
        embedding = v * h * 4
    else:  # tied: the head's packed table is shared, its scales stored again; untied: a table of its own
        embedding = scales if arch.tied_embeddings else head
    return int(total + head + embedding + 4 * floats)


def weights_bytes(arch: ModelArch, fmt: str, quant: str) -> int:
    return gguf_file_bytes(arch, quant) if fmt == "gguf" else onnx_weights_bytes(arch, quant)


def kv_cache_bytes(arch: ModelArch, context_tokens: int, bytes_per_element: int = 2) -> int:
    """KV cache at ``context_tokens``: keys and values of shape [n_layers, n_kv_heads, context, head_dim].

    GQA-aware: only the KV heads are cached. Default element size is 2 bytes (f16, llama.cpp's default).
    """
    return 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * context_tokens * bytes_per_element


RUNTIME_BASE_BYTES = 32 * 1024**2  # runtime library, tokenizer and context structs (measured order of magnitude)
UBATCH_TOKENS = 512  # llama.cpp's default physical batch


def runtime_overhead_bytes(arch: ModelArch, context_tokens: int) -> int:
    """Runtime memory beside weights and KV: base plus the compute buffer of one prompt batch.

    The buffer holds, per batch token, the attention scores over the context (n_heads x context) and the
    widest activations (hidden and MLP), in fp32; plus one row of logits.
    """
    per_token = arch.n_heads * min(context_tokens, UBATCH_TOKENS * 4) + 4 * arch.hidden_size + arch.intermediate_size
    return RUNTIME_BASE_BYTES + UBATCH_TOKENS * per_token * 4 + arch.vocab_size * 4


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    runtime_overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.runtime_overhead_bytes


def memory_estimate(arch: ModelArch, fmt: str, quant: str, context_tokens: int) -> MemoryEstimate:
    return MemoryEstimate(
        weights_bytes=weights_bytes(arch, fmt, quant),
        kv_cache_bytes=kv_cache_bytes(arch, context_tokens),
        runtime_overhead_bytes=runtime_overhead_bytes(arch, context_tokens),
    )
