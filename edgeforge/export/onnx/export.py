"""ONNX export: a Hugging Face decoder -> optimum graph with KV cache -> weight-only int8/int4 -> one directory.

- The graph comes from optimum-onnx (``main_export``, task ``text-generation-with-past``): inputs ``input_ids``,
  ``attention_mask``, ``position_ids`` and ``past_key_values.N.key/value``; outputs ``logits`` and ``present.*``.
- Quantization is weight-only, block-wise, through onnxruntime's ``MatMulNBitsQuantizer``: every linear layer becomes
  a ``MatMulNBits`` node (int8 or int4 weights, a float scale per block of 32). Activations are only quantized
  inside MatMulNBits, per block of 32, on the fly. optimum's dynamic int8 presets quantize them per tensor and
  destroy small models (mean KLD ~1.8 on SmolLM2-135M against 0.003-0.005 here, measured when this scheme was
  chosen): not used.
- The embedding table is quantized to 8 bits here, outside the quantizer: onnxruntime's quantizer only knows 4-bit
  ``Gather`` and cannot see the tied output head at all (optimum exports it as ``MatMul(x, Transpose(embedding))``,
  which has no constant weight). The table becomes one uint8 initializer read by both a ``GatherBlockQuantized``
  (the embedding lookup) and a ``MatMulNBits`` (the output head), so a tied model stores it once.
- The result directory loads as is with ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained`` and with the
  on-device bench agent (``device_bench``), which reads ``runtime.json`` from it.
- The directory is assembled under ``<out>.partial`` and renamed into place when complete, so a killed export is
  never taken for a finished one; ``edgeforge-export.json`` inside it records how it was made. An existing ``out``
  is replaced only when it is an earlier ONNX export (or with ``force``): ``edgeforge.outputs`` has the rule.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeforge.errors import BadInputError, EdgeforgeError, ModelError
from edgeforge.outputs import ONNX_RECORD_FILE, claim_output, describe_existing, publish

QuantizeMode = Literal["none", "int8", "int4"]
Isa = Literal["auto", "arm64", "avx2", "avx512_vnni"]

QUANTIZE_MODES: tuple[str, ...] = ("none", "int8", "int4")
ISAS: tuple[str, ...] = ("auto", "arm64", "avx2", "avx512_vnni")
#: Architectures exported and checked by this project's tests; optimum may export more, unchecked.
TESTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
#: Weights per quantization block. 32 is what kept SmolLM2-135M at KLD 0.003 in int8 (measured here) and is the
#: block the arm64 int8-dot kernels of onnxruntime (KleidiAI) are built for.
BLOCK_SIZE = 32
#: Bits of the embedding table / output head in both int8 and int4 exports. The head's error lands directly on every
#: logit of the vocabulary, so it is kept at 8 bits even in int4 (llama.cpp's Q4_K_M keeps it at Q6_K for the same
#: reason); for a 135M model the table is a fifth of the weights, so this costs ~14 MB against 4 bits.
EMBEDDING_BITS = 8
MODEL_FILE = "model.onnx"
#: onnxruntime / optimum look for the external-data file under this name next to ``model.onnx``.
EXTERNAL_DATA_FILE = "model.onnx_data"
RECORD_FILE = ONNX_RECORD_FILE
RUNTIME_FILE = "runtime.json"
#: protobuf cannot serialize a message over 2 GiB; stay clear of it with a margin for the graph itself.
_EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
#: Copied from the source model directory when present. ``tokenizer.json`` holds the whole tokenizer; the legacy
#: files below are only copied when it is missing, because a GGUF-derived ``tokenizer.model`` is the entire GGUF
#: (94 MB for SmolLM2) and would double the size of an int8 export for nothing.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_LEGACY_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxExportError(EdgeforgeError):
    """optimum or onnxruntime failed on a model that passed the input checks; the message names the step."""


class UnsupportedArchitectureError(ModelError):
    """optimum has no ONNX text-generation export for the model's architecture."""


@dataclass(frozen=True)
class IsaSettings:
    """Settings chosen for a target instruction set; recorded in the export record.

    ``accuracy_level`` is MatMulNBits' minimum precision of the activations: 4 lets onnxruntime quantize each
    activation block to int8 on the fly and use integer dot products (ARM SDOT/I8MM, x86 VPMADDUBSW/VPDPBUSD).
    Measured here (avx512_vnni, 2 threads), int8 weights decode at ~21 tokens/s with 4 and ~1.4 with 0, where
    onnxruntime dequantizes the weights on every call; fp32 ran at ~10 under the same load.
    ``int4_algorithm`` is a key of INT4_ALGORITHMS.
    """

    isa: str
    accuracy_level: int
    int4_algorithm: str
    why: str


# All three targets take the same settings today; the table is where a target that needs others would differ.
# Symmetric int4 (no zero points) everywhere: onnxruntime's arm64 KleidiAI kernels only take blocks without zero
# points (MLAS UseKleidiAI: BlkLen % 32 == 0, K % BlkLen == 0, no zero point, dotprod), and on SmolLM2-135M
# asymmetric RTN or k-quant were no better with the int4 recipe below (mean KLD 0.077 / 0.076 against 0.079).
ISA_SETTINGS: dict[str, IsaSettings] = {
    "arm64": IsaSettings("arm64", 4, "rtn_sym", "int8 dot products (SDOT/I8MM); symmetric int4 takes KleidiAI"),
    "avx2": IsaSettings("avx2", 4, "rtn_sym", "int8 dot products (VPMADDUBSW)"),
    "avx512_vnni": IsaSettings("avx512_vnni", 4, "rtn_sym", "int8 dot products (VPDPBUSD)"),
}


def resolve_isa(isa: str) -> IsaSettings:
    """``isa`` ("auto" = the machine running the export) -> its settings. Raises BadInputError when unknown.

    An export is usually made on another machine than the device: pass the device's ISA then, not "auto".
    """
    if isa not in ISAS:
        raise BadInputError(f"unknown isa '{isa}': expected one of {', '.join(ISAS)}")
    if isa != "auto":
        return ISA_SETTINGS[isa]
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ISA_SETTINGS["arm64"]
    from edgeforge.plan.detect import cpu_info

    flags = set(cpu_info()["isa_flags"])
    if "avx512_vnni" in flags:
        return ISA_SETTINGS["avx512_vnni"]
    if "avx2" in flags:
        return ISA_SETTINGS["avx2"]
    raise BadInputError(f"isa 'auto': this machine ({machine}, flags {sorted(flags) or 'none'}) is none of arm64, "
                        "avx2, avx512_vnni; pass the target device's isa explicitly")


# ---------------------------------------------------------------------------------------------------------- inputs


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face model directory; raises ModelError with the fix when it is unusable."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        what = "a file" if model_dir.exists() else "missing"
        raise ModelError(f"{model_dir}: expected a Hugging Face model directory (config.json, *.safetensors, "
                         f"tokenizer files), found {what}; pass the directory the model was saved to")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: a model directory needs a config.json, found none; save the model with "
                         "save_pretrained() or point at the directory that holds config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: expected a JSON object, cannot parse it: {_one_line(err)}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return f"{archs[0] if archs else '?'} (model_type '{config.get('model_type', '?')}')"


def check_exportable(config: dict[str, Any]) -> None:
    """Raise UnsupportedArchitectureError unless optimum can export ``config``'s model type with a KV cache."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs with TasksManager)
    from optimum.exporters.tasks import TasksManager

    model_type = str(config.get("model_type", "")).replace("_", "-")
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    if "text-generation-with-past" not in tasks:
        raise UnsupportedArchitectureError(_unsupported_message(config))


def _unsupported_message(config: dict[str, Any], detail: str = "") -> str:
    tail = f" ({detail})" if detail else ""
    return (f"architecture {_architecture(config)} cannot be exported to ONNX with a KV cache by optimum "
            f"{_version('optimum-onnx')}{tail}; supported and tested: {', '.join(TESTED_MODEL_TYPES)}")


# ---------------------------------------------------------------------------------------------------------- export


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    quantize: QuantizeMode = "int8",
    isa: Isa = "auto",
    threads: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Export a Hugging Face decoder to an ONNX directory with KV cache, weight-only quantized.

    Args:
        model_dir: Hugging Face model directory (config.json, safetensors, tokenizer files).
        out_dir: the directory to create; an earlier export there is replaced only once the new one is complete.
        quantize: "none" (fp32), "int8" (8-bit blocks of 32, symmetric) or "int4" (4-bit linear layers except
            those of ``int4_8bit_nodes()``; 8-bit embedding and output head).
        isa: target instruction set, for the activation precision of MatMulNBits ("auto": this machine).
        threads: intra-op threads written to ``runtime.json`` for the device (None: the runtime's default).
        force: replace whatever is at ``out_dir`` (by default only an earlier export or an empty directory).

    Returns:
        The export record, also written to ``out_dir/edgeforge-export.json``.
    """
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    if quantize not in QUANTIZE_MODES:
        raise BadInputError(f"unknown quantize '{quantize}': expected one of {', '.join(QUANTIZE_MODES)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0):
        raise BadInputError(f"threads must be a positive integer or None, found {threads!r}")
    settings = resolve_isa(isa)
    config = read_model_config(model_dir)
    check_exportable(config)
    claim_output(out_dir, kind="onnx", force=force)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    _remove_stale_partial(partial, out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.optimum-") as raw_dir:
        raw = Path(raw_dir)
        t0 = time.perf_counter()
        _run_optimum(model_dir, raw, config)
        export_s = time.perf_counter() - t0

        partial.mkdir()
        try:
            t0 = time.perf_counter()
            quant_info = _quantize_step(raw, partial, quantize, settings)
            quantize_s = time.perf_counter() - t0
            # optimum's config.json is the one its ORTModel classes are tested with; take it, then the source's
            # tokenizer and generation files untouched (optimum re-saves the tokenizer, with the GGUF blob if any).
            shutil.copy2(raw / "config.json", partial / "config.json")
            _copy_side_files(model_dir, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    runtime = {"n_threads": threads, "n_ctx": int(config.get("max_position_embeddings") or 2048)}
    (partial / RUNTIME_FILE).write_text(json.dumps(runtime, indent=2) + "\n", encoding="utf-8")

    files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}
    record: dict[str, Any] = {
        "format": "onnx",
        "quantize": quantize,
        "isa": settings.isa,
        "isa_requested": isa,
        "accuracy_level": settings.accuracy_level if quantize != "none" else None,
        "isa_why": settings.why,
        **quant_info,
        "model_type": config.get("model_type"),
        "files": files,  # every file of the directory except this record
        "total_bytes": sum(files.values()),
        "export_seconds": round(export_s, 3),
        "quantize_seconds": round(quantize_s, 3),
        "source_model_dir": str(model_dir),
        "runtime": runtime,
        "versions": {name: _version(name) for name in
                     ("onnxruntime", "optimum", "optimum-onnx", "onnx", "transformers", "torch")},
    }
    (partial / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    publish(partial, out_dir)  # out_dir was claimed before the export began; the old one goes only afterwards
    return record


def _quantize_step(raw: Path, partial: Path, quantize: str, settings: IsaSettings) -> dict[str, Any]:
    """Move (none) or quantize (int8/int4) optimum's graph from ``raw`` into ``partial``; returns record fields."""
    if quantize == "none":
        for name in (MODEL_FILE, EXTERNAL_DATA_FILE):
            if (raw / name).exists():
                shutil.move(raw / name, partial / name)
        return {"algorithm": "fp32"}
    try:
        return quantize_onnx(raw / MODEL_FILE, partial / MODEL_FILE, quantize, settings)
    except EdgeforgeError:
        raise
    except Exception as err:  # onnxruntime's quantizer asserts and raises plain errors on graphs it cannot handle
        raise OnnxExportError(f"onnxruntime's weight-only quantizer failed on the exported graph ({quantize}): "
                              f"{_one_line(err)[:300]}; quantize='none' gives the float graph") from None


def load_record(onnx_dir: Path) -> dict[str, Any]:
    """The record of a finished export; raises ModelError when ``onnx_dir`` is not one."""
    path = Path(onnx_dir) / RECORD_FILE
    if not path.is_file():
        raise ModelError(f"{onnx_dir}: expected a finished ONNX export holding {RECORD_FILE}, found none; "
                         "run the export again")
    return json.loads(path.read_text(encoding="utf-8"))


def _run_optimum(model_dir: Path, dest: Path, config: dict[str, Any]) -> None:
    """optimum's export of ``model_dir`` into ``dest`` (model.onnx [+ model.onnx_data], config, tokenizer)."""
    import torch
    from optimum.exporters.onnx import main_export

    try:
        # ERROR: optimum warns that the tied embedding/head weights look duplicated, then deduplicates them itself.
        with warnings.catch_warnings(), _quiet_logs(logging.ERROR, "optimum", "transformers", "torch.onnx"):
            # The tracer warns about every Python branch on a tensor in transformers' masking code; all of them are
            # shape checks that hold for the traced dynamic axes. They say nothing to a user of edgeforge.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # Raised for the advanced indexing in the causal-mask code, whose indices are aranges (never negative).
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            # optimum-onnx 0.1 drives torch's TorchScript exporter, which torch >= 2.9 calls legacy: not actionable.
            warnings.simplefilter("ignore", DeprecationWarning)
            main_export(
                str(model_dir), dest, task="text-generation-with-past", device="cpu", local_files_only=True,
                # optimum's validation compares against torch with a fixed atol and fails or warns on its own; the
                # verify stage measures KLD/top-1 on real text with verify_metrics.agreement() instead.
                do_validation=False,
            )
    except (KeyError, ValueError, NotImplementedError) as err:
        message = _one_line(err)
        if "not supported" in message or "unsupported" in message.lower():
            raise UnsupportedArchitectureError(_unsupported_message(config, message[:200])) from None
        raise OnnxExportError(f"optimum could not export {model_dir} ({_architecture(config)}): {message[:300]}"
                              ) from None
    except (OSError, RuntimeError) as err:
        raise OnnxExportError(f"optimum could not export {model_dir} ({_architecture(config)}): "
                              f"{_one_line(err)[:300]}; check that the weights load with transformers") from None
    if not (dest / MODEL_FILE).is_file():
        raise OnnxExportError(f"optimum exported {model_dir} but wrote no {MODEL_FILE} (found "
                              f"{sorted(p.name for p in dest.iterdir())}); expected a single decoder graph")


def _copy_side_files(model_dir: Path, dest: Path) -> None:
    """Tokenizer, chat template and generation config from the source directory (config.json from optimum)."""
    for name in _SIDE_FILES:
        if (model_dir / name).is_file() and not (dest / name).exists():
            shutil.copy2(model_dir / name, dest / name)
    if not (model_dir / "tokenizer.json").is_file():
        for name in _LEGACY_TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, dest / name)


#: Every name an export writes into its directory: a ``.partial`` holding only these was left by a killed export.
_EXPORT_FILE_NAMES = frozenset((MODEL_FILE, EXTERNAL_DATA_FILE, RECORD_FILE, RUNTIME_FILE, *_SIDE_FILES,
                                *_LEGACY_TOKENIZER_FILES))


def _remove_stale_partial(partial: Path, out_dir: Path) -> None:
    """Remove ``<out>.partial`` left by a killed export (never resumed: its content is unknown). Anything else of
    that name is the user's, beside --out rather than in it: refused, never deleted."""
    if not os.path.lexists(partial):
        return
    if partial.is_dir() and not partial.is_symlink() and all(
            p.is_file() and p.name in _EXPORT_FILE_NAMES for p in partial.iterdir()):
        shutil.rmtree(partial)
        return
    raise BadInputError(f"{partial}: expected nothing there or an interrupted export of --out {out_dir} (the export "
                        f"assembles its directory under that name), found {describe_existing(partial)}; move it "
                        "away or choose another --out")


# ---------------------------------------------------------------------------------------------------- quantization


def quantize_onnx(src: Path, dst: Path, mode: QuantizeMode, settings: IsaSettings,
                  int4_algorithm: str | None = None) -> dict[str, Any]:
    """Weight-only quantize the decoder at ``src`` into ``dst``; returns what was done, for the record.

    int8: every linear layer, the embedding and the head at 8 bits, symmetric blocks of 32.
    int4: the linear layers at 4 bits, except ``int4_8bit_nodes()`` (v_proj, down_proj, first and last layer) and
    the embedding/head, which stay at 8 bits. ``int4_algorithm`` overrides ``settings.int4_algorithm`` (one of
    INT4_ALGORITHMS), for experiments.
    """
    import onnx

    if mode not in ("int8", "int4"):
        raise BadInputError(f"quantize_onnx: mode must be int8 or int4, found '{mode}'")
    model = onnx.load(str(src))  # loads external data too
    level = settings.accuracy_level
    with _quiet_logs(logging.WARNING, "onnxruntime.quantization"):
        info = quantize_embedding_and_head(model, EMBEDDING_BITS, BLOCK_SIZE, level)
        linear = _linear_nodes(model)
        if mode == "int8":
            algorithm, kept_8bit = "rtn_sym", linear
            model = _quantize_body(model, 8, algorithm, level)
        else:
            algorithm = int4_algorithm or settings.int4_algorithm
            kept_8bit = int4_8bit_nodes(model)
            model = _quantize_body(model, 4, algorithm, level, exclude=kept_8bit)
            model = _quantize_body(model, 8, "rtn_sym", level)  # what is left: the layers kept at 8 bits
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


def _linear_nodes(model: Any) -> list[str]:
    """Names of the MatMul nodes with a constant weight: the linear layers (attention's products are MatMuls too)."""
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def int4_8bit_nodes(model: Any) -> list[str]:
    """Names of the MatMul nodes an int4 export keeps at 8 bits (see INT4_8BIT_PROJECTIONS)."""
    matmuls = _linear_nodes(model)
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


def _quantize_body(model: Any, bits: int, algorithm: str, accuracy_level: int, exclude: list[str] | None = None) -> Any:
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


def quantize_embedding_and_head(model: Any, bits: int, block_size: int, accuracy_level: int) -> dict[str, Any]:
    """Quantize the token embedding (``Gather``) and the output head (the ``MatMul`` producing ``logits``) in place.

    Both are stored as blocks of ``block_size`` along the hidden dimension H of the [V, H] table: ``packed`` uint8
    [V, H / block_size, block_size * bits / 8] and float scales [V, H / block_size], symmetric (no zero points).
    That is the B layout of MatMulNBits with N = V, K = H, and GatherBlockQuantized reads the same bytes as
    [V, k_blocks, block] quantized along its last axis, so a tied table is stored once. Only the scales are
    duplicated (an eighth of the uint8 table: 3.5 MB for SmolLM2), because the two ops insist on different scale
    ranks ([V, k_blocks] for MatMulNBits, the data's rank for GatherBlockQuantized).

    Returns {"embedding": ..., "lm_head": ..., "tied_embedding_shared": bool} describing what was done.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    info: dict[str, Any] = {"embedding": "float (not found)", "lm_head": "float (not found)",
                            "tied_embedding_shared": False}

    gather = next((n for n in graph.node if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == "input_ids"
                   and n.input[0] in inits and len(inits[n.input[0]].dims) == 2), None)
    table_name = gather.input[0] if gather is not None else None

    head = producers.get("logits")
    head_weight: np.ndarray | None = None  # [K = H, N = V], as MatMul's B
    transpose = None
    tied = False
    if head is not None and head.op_type == "MatMul":
        b_name = head.input[1]
        if b_name in inits and len(inits[b_name].dims) == 2:
            head_weight = numpy_helper.to_array(inits[b_name])
        elif b_name in producers and producers[b_name].op_type == "Transpose":
            transpose = producers[b_name]
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
            if transpose.input[0] == table_name and perm == [1, 0]:
                head_weight = numpy_helper.to_array(inits[table_name]).T
                tied = True
    replacements: dict[int, list[Any]] = {}  # id(old node) -> new nodes, in graph order
    packed_head = None
    if head is not None and head_weight is not None:
        packed_head, scales, dtype = _block_quantize(head_weight, bits, block_size)
        k, n = head_weight.shape
        q_name, s_name = f"lm_head.weight_Q{bits}", "lm_head.weight_scales"
        graph.initializer.extend([numpy_helper.from_array(packed_head, q_name),
                                  numpy_helper.from_array(scales.astype(dtype), s_name)])
        replacements[id(head)] = [helper.make_node(
            "MatMulNBits", [head.input[0], q_name, s_name], list(head.output), name=f"{head.name}_Q{bits}",
            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)]
        info["lm_head"] = f"int{bits} block{block_size} symmetric"
    elif head is not None:
        info["lm_head"] = f"float (its {head.op_type} has no constant or tied weight)"

    if gather is not None:
        table = numpy_helper.to_array(inits[table_name])  # [V, H]
        vocab, hidden = table.shape
        if hidden % block_size:
            info["embedding"] = f"float (hidden size {hidden} is not a multiple of the block size {block_size})"
        else:
            if tied and packed_head is not None:
                packed, q_name = packed_head, f"lm_head.weight_Q{bits}"
                scales = numpy_helper.to_array(next(t for t in graph.initializer if t.name == "lm_head.weight_scales"))
                info["tied_embedding_shared"] = True
            else:
                packed, scales, dtype = _block_quantize(np.ascontiguousarray(table.T), bits, block_size)
                scales = scales.astype(dtype)
                q_name = f"{table_name}_Q{bits}"
                graph.initializer.append(numpy_helper.from_array(packed, q_name))
            s3_name, shape_name = f"{table_name}_scales3", f"{table_name}_hidden_shape"
            graph.initializer.extend([
                numpy_helper.from_array(scales.reshape(vocab, -1, 1), s3_name),
                # [batch, seq, k_blocks, block * bits / 8 ...] -> [batch, seq, H]; 0 copies the input's dim.
                numpy_helper.from_array(np.array([0, 0, hidden], dtype=np.int64), shape_name),
            ])
            blocks_out = gather.output[0] + "_blocks"
            replacements[id(gather)] = [
                helper.make_node("GatherBlockQuantized", [q_name, gather.input[1], s3_name], [blocks_out],
                                 name=f"{gather.name}_Q{bits}", domain="com.microsoft", gather_axis=0,
                                 quantize_axis=2, block_size=block_size, bits=bits),
                helper.make_node("Reshape", [blocks_out, shape_name], list(gather.output),
                                 name=f"{gather.name}_Q{bits}_reshape"),
            ]
            info["embedding"] = f"int{bits} block{block_size} symmetric"

    if not replacements:
        return info
    new_nodes = []
    for node in graph.node:
        new_nodes.extend(replacements.get(id(node), [node]))
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    used = _used_names(graph)
    if transpose is not None and not any(o in used or o in _graph_outputs(graph) for o in transpose.output):
        kept = [n for n in graph.node if n is not transpose and list(n.output) != list(transpose.output)]
        graph.ClearField("node")
        graph.node.extend(kept)
        used = _used_names(graph)
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return info


def _block_quantize(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """Symmetric block quantization of a MatMul weight [K, N] with onnxruntime's own kernels.

    Returns packed uint8 [N, ceil(K / block), block * bits / 8], float32 scales [N, ceil(K / block)] and the
    weight's dtype (scales must be stored in it: MatMulNBits takes scales of the activations' type).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    kernel = {8: quantize_matmul_8bits, 4: quantize_matmul_4bits}[bits]
    dtype = weight.dtype
    rows, cols = weight.shape
    k_blocks = (rows + block_size - 1) // block_size
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if k_blocks * block_size != rows:
        w = np.pad(w, ((0, k_blocks * block_size - rows), (0, 0)))
    packed = np.zeros((cols, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    zero_points = np.zeros((cols, (k_blocks + 1) // 2), dtype=np.uint8)  # unused: symmetric
    kernel(packed, w, scales, zero_points, block_size, cols, rows, True)
    return packed, scales, dtype


def _used_names(graph: Any) -> set[str]:
    """Every value name read by a node of ``graph`` or of its subgraphs (If/Loop bodies), plus graph outputs."""
    names = set(_graph_outputs(graph))
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                names.update(_used_names(sub))
    return names


def _graph_outputs(graph: Any) -> set[str]:
    return {o.name for o in graph.output}


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


# ----------------------------------------------------------------------------------------------------- verification


def onnx_logits(onnx_dir: Path, token_ids: list[int], threads: int | None = None) -> np.ndarray:
    """Logits of one forward pass over ``token_ids`` with an empty KV cache: float32 [n_tokens, vocab].

    A raw onnxruntime session rather than ORTModelForCausalLM: it needs no torch and returns every position's
    logits (generate() only keeps the last). Position i is the distribution of token i + 1.
    """
    import onnxruntime as ort

    onnx_dir = Path(onnx_dir)
    model_file = onnx_dir / MODEL_FILE
    if not model_file.is_file():
        raise ModelError(f"{onnx_dir}: expected an ONNX export directory holding {MODEL_FILE}, found none")
    if not token_ids:
        raise BadInputError("onnx_logits needs at least one token id, found an empty list")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the caller's business
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])
    n = len(token_ids)
    feeds: dict[str, np.ndarray] = {}
    config = read_model_config(onnx_dir)
    for node in session.get_inputs():
        ids_dtype = np.int32 if node.type == "tensor(int32)" else np.int64
        if node.name == "input_ids":
            feeds[node.name] = np.asarray([token_ids], dtype=ids_dtype)
        elif node.name == "attention_mask":
            feeds[node.name] = np.ones((1, n), dtype=ids_dtype)
        elif node.name == "position_ids":
            feeds[node.name] = np.arange(n, dtype=ids_dtype)[None, :]
        elif node.name.startswith("past_key_values"):
            # [batch, kv_heads, past_len = 0, head_dim]; heads and head_dim are static in optimum's graphs.
            kv_heads = _static(node.shape, 1) or int(config.get("num_key_value_heads")
                                                     or config["num_attention_heads"])
            head_dim = _static(node.shape, 3) or int(config.get("head_dim")
                                                     or config["hidden_size"] // config["num_attention_heads"])
            feeds[node.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=_ORT_TO_NUMPY.get(node.type, np.float32))
        else:
            raise OnnxExportError(f"{model_file}: unexpected graph input '{node.name}'; expected input_ids, "
                                  "attention_mask, position_ids and past_key_values.*")
    (logits,) = session.run(["logits"], feeds)
    return np.asarray(logits[0], dtype=np.float32)


def torch_logits(model_dir: Path, token_ids: list[int]) -> np.ndarray:
    """Reference logits from transformers in float32: [n_tokens, vocab], one forward pass, no cache."""
    import torch
    from transformers import AutoModelForCausalLM

    read_model_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids], dtype=torch.long)).logits  # [1, n, vocab]
    return logits[0].float().numpy()


# ---------------------------------------------------------------------------------------------------------- helpers


def _static(shape: list[Any], axis: int) -> int | None:
    return shape[axis] if len(shape) > axis and isinstance(shape[axis], int) and shape[axis] > 0 else None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@contextlib.contextmanager
def _quiet_logs(level: int, *names: str) -> Iterator[None]:
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


__all__ = [
    "BLOCK_SIZE", "EMBEDDING_BITS", "INT4_8BIT_PROJECTIONS", "INT4_ALGORITHMS", "ISA_SETTINGS", "IsaSettings",
    "OnnxExportError", "UnsupportedArchitectureError", "check_exportable", "export_onnx", "int4_8bit_nodes",
    "load_record", "onnx_logits", "quantize_onnx", "read_model_config", "resolve_isa", "save_onnx", "torch_logits",
]
