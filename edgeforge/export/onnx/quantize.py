"""Weight-only quantization of an exported ONNX decoder, and the one recipe it uses on every target.

- Quantization is weight-only, block-wise, through onnxruntime's ``MatMulNBitsQuantizer``: every linear layer becomes
  a ``MatMulNBits`` node (int8 or int4 weights, a float scale per block of 32). Activations are only quantized
  inside MatMulNBits, per block of 32, on the fly. optimum's dynamic int8 presets quantize them per tensor and
  destroy small models (mean KLD ~1.8 on SmolLM2-135M against 0.003-0.005 here, shared/DESIGN.md): not used.
- The embedding table is quantized to 8 bits here, outside the quantizer: onnxruntime's quantizer only knows 4-bit
  ``Gather`` and cannot see the tied output head at all (optimum exports it as ``MatMul(x, Transpose(embedding))``,
  which has no constant weight). The table becomes one uint8 initializer read by both a ``GatherBlockQuantized``
  (the embedding lookup) and a ``MatMulNBits`` (the output head), so a tied model stores it once
  (edgeforge.export.onnx.embedding).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from edgeforge.errors import BadInputError
from edgeforge.export.onnx.embedding import quantize_embedding_and_head

QuantizeMode = Literal["none", "int8", "int4", "fit"]

#: "fit": 4 or 8 bits per layer group, chosen within a byte budget from measured sensitivity (export.onnx.fit)
QUANTIZE_MODES: tuple[str, ...] = ("none", "int8", "int4", "fit")
#: Weights per quantization block. 32 is what kept SmolLM2-135M at KLD 0.003 in int8 (shared/DESIGN.md) and is the
#: block the arm64 int8-dot kernels of onnxruntime (KleidiAI) are built for.
BLOCK_SIZE = 32
#: Bits of the embedding table / output head in both int8 and int4 exports. The head's error lands directly on every
#: logit of the vocabulary, so it is kept at 8 bits even in int4 (llama.cpp's Q4_K_M keeps it at Q6_K for the same
#: reason); for a 135M model the table is a fifth of the weights, so this costs ~14 MB against 4 bits.
EMBEDDING_BITS = 8
#: onnxruntime / optimum look for the external-data file under this name next to ``model.onnx``.
EXTERNAL_DATA_FILE = "model.onnx_data"
#: protobuf cannot serialize a message over 2 GiB; stay clear of it with a margin for the graph itself.
_EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


#: MatMulNBits' minimum precision of the activations. 4 lets onnxruntime quantize each activation block to int8 on
#: the fly and use integer dot products where the CPU has them (ARM SDOT/I8MM, x86 VPMADDUBSW/VPDPBUSD; elsewhere its
#: portable kernels): measured here (avx512_vnni, 2 threads), int8 weights decode at ~21 tokens/s with 4 and ~1.4
#: with 0, where onnxruntime dequantizes the weights on every call; fp32 ran at ~10 under the same load.
#:
#: One recipe for every target, chosen by the runtime rather than at export: the level is a minimum, and onnxruntime
#: picks the kernel for the CPU it runs on. A per-ISA setting (the former ``export onnx --isa``) wrote identical files
#: for arm64, avx2 and avx512_vnni, so it was removed rather than kept as an option that changes nothing (#16).
ACCURACY_LEVEL = 4
#: Symmetric int4 (no zero points): onnxruntime's arm64 KleidiAI kernels only take blocks without zero points (MLAS
#: UseKleidiAI: BlkLen % 32 == 0, K % BlkLen == 0, no zero point, dotprod), and on SmolLM2-135M asymmetric RTN or
#: k-quant were no better with the int4 recipe below (mean KLD 0.077 / 0.076 against 0.079). A key of INT4_ALGORITHMS.
INT4_ALGORITHM = "rtn_sym"


# ---------------------------------------------------------------------------------------------------- quantization
def quantize_onnx(src: Path, dst: Path, mode: QuantizeMode, int4_algorithm: str = INT4_ALGORITHM,
                  kept_8bit: list[str] | None = None) -> dict[str, Any]:
    """Weight-only quantize the decoder at ``src`` into ``dst``; returns what was done, for the record.

    int8: every linear layer, the embedding and the head at 8 bits, symmetric blocks of 32.
    int4: the linear layers at 4 bits, except ``kept_8bit`` (MatMul node names; by default ``int4_8bit_nodes()``:
    v_proj, down_proj, first and last layer; a fitted mix passes its own) and the embedding/head, which stay at
    8 bits. ``int4_algorithm`` (one of INT4_ALGORITHMS) is for experiments.
    """
    import onnx

    if mode not in ("int8", "int4"):
        raise BadInputError(f"quantize_onnx: mode must be int8 or int4, found '{mode}'")
    model = onnx.load(str(src))  # loads external data too
    level = ACCURACY_LEVEL
    with quiet_logs(logging.WARNING, "onnxruntime.quantization"):
        info = quantize_embedding_and_head(model, EMBEDDING_BITS, BLOCK_SIZE, level)
        linear = linear_nodes(model)
        if mode == "int8":
            algorithm, kept_8bit = "rtn_sym", linear
            model = quantize_body(model, 8, algorithm, level)
        else:
            algorithm = int4_algorithm
            kept_8bit = int4_8bit_nodes(model) if kept_8bit is None else kept_8bit
            model = quantize_body(model, 4, algorithm, level, exclude=kept_8bit)
            model = quantize_body(model, 8, "rtn_sym", level)  # what is left: the layers kept at 8 bits
    save_onnx(model, dst)
    return {
        "algorithm": f"matmulnbits-{algorithm}-{mode}-block{BLOCK_SIZE}",
        "block_size": BLOCK_SIZE,
        "body_bits": 8 if mode == "int8" else 4,
        "linear_layers_int8": len(kept_8bit),
        "linear_layers_int4": len(linear) - len(kept_8bit),
        **info,
    }


#: In int4, these linear layers stay at 8 bits: v_proj and down_proj of every layer, and every projection of the
#: first and last decoder layer. The same places llama.cpp's Q4_K_M gives more bits (attn_v, ffn_down), chosen by
#: measurement on SmolLM2-135M (mean KLD vs fp32 over 1,024 tokens of prose, symmetric RTN): all at 4 bits 0.25;
#: v_proj + down_proj at 8 bits 0.10; + first and last layer 0.079, for 121 MB against 103 MB. Calibration-free, and
#: every node keeps onnxruntime's fast integer kernels.
INT4_8BIT_PROJECTIONS = ("/v_proj/", "/down_proj/")
_LAYER_INDEX = re.compile(r"/layers\.(\d+)/")


def linear_nodes(model: Any) -> list[str]:
    """Names of the MatMul nodes with a constant weight: the linear layers (attention's products are MatMuls too)."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def int4_8bit_nodes(model: Any) -> list[str]:
    """Names of the MatMul nodes an int4 export keeps at 8 bits (see INT4_8BIT_PROJECTIONS)."""
    matmuls = linear_nodes(model)
    layers = {int(m.group(1)) for name in matmuls if (m := _LAYER_INDEX.search(name))}
    edges = {f"/layers.{i}/" for i in (min(layers), max(layers))} if layers else set()
    return [name for name in matmuls if any(p in name for p in (*INT4_8BIT_PROJECTIONS, *edges))]


def _rtn_config(bits: int, symmetric: bool, accuracy_level: int) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    return DefaultWeightOnlyQuantConfig(block_size=BLOCK_SIZE, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                        bits=bits, op_types_to_quantize=("MatMul",))


def _hqq_config(bits: int, symmetric: bool, accuracy_level: int) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    return HQQWeightOnlyQuantConfig(block_size=BLOCK_SIZE, bits=bits, op_types_to_quantize=("MatMul",))


def _kquant_config(bits: int, symmetric: bool, accuracy_level: int) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig

    return KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))


#: Calibration-free weight-only algorithms of onnxruntime's quantizer: name -> (config factory, symmetric).
#: rtn = round to nearest per block (onnxruntime's C++ kernels); k_quant = llama.cpp's search of scale/min per
#: block; hqq = half-quadratic optimisation of a float zero point per block. HQQ is the most accurate on
#: SmolLM2-135M (KLD 0.0014 all-4-bit, against 0.22 for RTN), but only because that teacher was dequantized from
#: Q4_1, whose float block minimum HQQ's float zero point reproduces; and MatMulNBits with float zero points has no
#: prepacked CPU kernel: onnxruntime dequantizes every weight on every call (3 tokens/s, slower than fp32). So it is
#: kept for experiments, never a default. GPTQ (calibrated) was no better than RTN here (0.22, 16 minutes).
INT4_ALGORITHMS: dict[str, tuple[Any, bool]] = {
    "rtn_sym": (_rtn_config, True),
    "rtn_asym": (_rtn_config, False),
    "hqq": (_hqq_config, False),
    "k_quant": (_kquant_config, False),
}


def quantize_body(model: Any, bits: int, algorithm: str, accuracy_level: int, exclude: list[str] | None = None) -> Any:
    """Every MatMul with a constant weight, except ``exclude`` (node names) -> MatMulNBits at ``bits``.

    Returns the ModelProto (the quantizer may wrap it or replace it).
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if algorithm not in INT4_ALGORITHMS:
        raise BadInputError(f"unknown weight-only algorithm '{algorithm}': expected one of "
                            f"{', '.join(INT4_ALGORITHMS)}")
    make_config, symmetric = INT4_ALGORITHMS[algorithm]
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=symmetric, accuracy_level=accuracy_level,
        nodes_to_exclude=exclude or [], algo_config=make_config(bits, symmetric, accuracy_level),
    )
    # The k-quant path prints a progress bar to stdout; a library keeps stdout for its caller.
    with contextlib.redirect_stdout(io.StringIO()):
        quantizer.process()
    result = quantizer.model
    proto = getattr(result, "model", result)  # an ONNXModel wrapper (default/hqq/k_quant paths) or a ModelProto
    for node in proto.graph.node:
        # HQQ writes MatMulNBits without accuracy_level; give every node the level chosen for the target.
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(_int_attribute("accuracy_level", accuracy_level))
    return proto


def _int_attribute(name: str, value: int) -> Any:
    from onnx import helper

    return helper.make_attribute(name, value)


def save_onnx(model: Any, path: Path) -> None:
    """Save ``model`` to ``path``; weights go to ``model.onnx_data`` beside it when the graph nears protobuf's 2 GiB."""
    import onnx

    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > _EXTERNAL_DATA_THRESHOLD_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


@contextlib.contextmanager
def quiet_logs(level: int, *names: str) -> Iterator[None]:
    """Raise the named loggers to ``level`` for the block, and undo onnxruntime's import-time logging.basicConfig.

    onnxruntime's matmul_nbits_quantizer calls logging.basicConfig(level=INFO) when imported, which would make every
    library in the process log at INFO and would log one line per quantized node.
    """
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    loggers = [logging.getLogger(n) for n in names]
    saved_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its basicConfig runs here, once)

        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        yield
    finally:
        for lg, saved in zip(loggers, saved_levels, strict=True):
            lg.setLevel(saved)
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
