"""ONNX export: a Hugging Face decoder -> optimum graph with KV cache -> weight-only int8/int4 -> one directory.

- The graph comes from optimum-onnx (``main_export``, task ``text-generation-with-past``): inputs ``input_ids``,
  ``attention_mask``, ``position_ids`` and ``past_key_values.N.key/value``; outputs ``logits`` and ``present.*``.
- Quantization is weight-only and block-wise (edgeforge.export.onnx.quantize: one recipe for every target;
  onnxruntime picks the integer kernels for the CPU it runs on); the embedding table and the output head stay at
  8 bits (edgeforge.export.onnx.embedding).
- The result directory loads as is with ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained`` and with the
  on-device bench agent (``device_bench``), which reads ``runtime.json`` from it; its logits against the source
  model's are in edgeforge.export.onnx.logits.
- The directory is assembled under ``<out>.partial`` and renamed into place when complete, so a killed export is
  never taken for a finished one; ``edgeforge-export.json`` inside it records how it was made. An existing ``out``
  is replaced only when it is an earlier ONNX export (or with ``force``): ``edgeforge.outputs`` has the rule.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeforge.errors import BadInputError, EdgeforgeError, ModelError
from edgeforge.export.gguf import installed_version
from edgeforge.export.onnx.quantize import (
    ACCURACY_LEVEL,
    EXTERNAL_DATA_FILE,
    QUANTIZE_MODES,
    QuantizeMode,
    quantize_onnx,
    quiet_logs,
)
from edgeforge.models.files import LEGACY_TOKENIZER_FILES, TOKENIZER_FILES, read_model_config, tokenizer_files
from edgeforge.models.support import TESTED_FAMILIES, onnx_model_types, onnx_supports
from edgeforge.outputs import ONNX_RECORD_FILE, claim_output, describe_existing, publish

#: Architectures exported and checked by this project's tests; optimum may export more, unchecked.
TESTED_MODEL_TYPES: tuple[str, ...] = tuple(TESTED_FAMILIES)
MODEL_FILE = "model.onnx"
RECORD_FILE = ONNX_RECORD_FILE
RUNTIME_FILE = "runtime.json"
#: Copied from the source model directory beside its tokenizer files (edgeforge.models.files.tokenizer_files).
_MODEL_SIDE_FILES = ("config.json", "generation_config.json")


class OnnxExportError(EdgeforgeError):
    """optimum or onnxruntime failed on a model that passed the input checks; the message names the step."""


class UnsupportedArchitectureError(ModelError):
    """optimum has no ONNX text-generation export for the model's architecture."""


# ---------------------------------------------------------------------------------------------------------- inputs


def _architecture(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    return f"{archs[0] if archs else '?'} (model_type '{config.get('model_type', '?')}')"


def check_exportable(config: dict[str, Any]) -> None:
    """Raise UnsupportedArchitectureError unless optimum can export ``config``'s model type with a KV cache."""
    if not onnx_supports(str(config.get("model_type", ""))):
        raise UnsupportedArchitectureError(_unsupported_message(config))


def _unsupported_message(config: dict[str, Any], detail: str = "") -> str:
    tail = f" ({detail})" if detail else ""
    supported = ", ".join(sorted(t for t in onnx_model_types() or () if "-" not in t))
    return (f"architecture {_architecture(config)} cannot be exported to ONNX with a KV cache by optimum-onnx "
            f"{installed_version('optimum-onnx')}{tail}; it exports {supported}; tested end to end: "
            f"{', '.join(TESTED_MODEL_TYPES)}")


# ---------------------------------------------------------------------------------------------------------- export


def export_onnx(
    model_dir: Path,
    out_dir: Path,
    quantize: QuantizeMode = "int8",
    threads: int | None = None,
    force: bool = False,
    max_bytes: int | None = None,
    calibration_text: str | None = None,
) -> dict[str, Any]:
    """Export a Hugging Face decoder to an ONNX directory with KV cache, weight-only quantized.

    Args:
        model_dir: Hugging Face model directory (config.json, safetensors, tokenizer files).
        out_dir: the directory to create; an earlier export there is replaced only once the new one is complete.
        quantize: "none" (fp32), "int8" (8-bit blocks of 32, symmetric) or "int4" (4-bit linear layers except
            those of ``int4_8bit_nodes()``; 8-bit embedding and output head) or "fit" (4 or 8 bits per layer group,
            the least-loss mix whose weights fit ``max_bytes``: edgeforge.export.onnx.fit).
        threads: intra-op threads written to ``runtime.json`` for the device (None: the runtime's default).
        force: replace whatever is at ``out_dir`` (by default only an earlier export or an empty directory).
        max_bytes: with "fit", the most bytes the graph and its weights may take (required).
        calibration_text: with "fit", the text the sensitivities are measured on [default: the built-in training
            prose, the GGUF importance matrix's text].

    Returns:
        The export record, also written to ``out_dir/edgeforge-export.json``.
    """
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    if quantize not in QUANTIZE_MODES:
        raise BadInputError(f"unknown quantize '{quantize}': expected one of {', '.join(QUANTIZE_MODES)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0):
        raise BadInputError(f"threads must be a positive integer or None, found {threads!r}")
    if (quantize == "fit") != (max_bytes is not None):
        raise BadInputError("quantize='fit' needs max_bytes, and max_bytes applies to 'fit' only")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise BadInputError(f"max_bytes must be a positive integer, found {max_bytes!r}")
    config = read_model_config(model_dir)
    check_exportable(config)
    fit = _FitRequest(max_bytes, calibration_text) if quantize == "fit" else None
    claim_output(out_dir, kind="onnx", force=force)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    _remove_stale_partial(partial, out_dir)
    quant_info, seconds = _assemble(model_dir, out_dir, partial, config, quantize, fit)
    runtime = {"n_threads": threads, "n_ctx": int(config.get("max_position_embeddings") or 2048)}
    (partial / RUNTIME_FILE).write_text(json.dumps(runtime, indent=2) + "\n", encoding="utf-8")
    record = _export_record(partial, model_dir, config, quantize, quant_info, seconds, runtime)
    (partial / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    publish(partial, out_dir)  # out_dir was claimed before the export began; the old one goes only afterwards
    return record


@dataclass(frozen=True)
class _FitRequest:
    max_bytes: int
    calibration_text: str | None


def _assemble(model_dir: Path, out_dir: Path, partial: Path, config: dict[str, Any],
              quantize: str, fit: _FitRequest | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """optimum's export (in a temporary directory beside ``out_dir``), quantized into ``partial`` with the side
    files; returns (the quantization's record fields, {"export": s, "quantize": s}). ``partial`` is removed when
    anything fails."""
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.optimum-") as raw_dir:
        raw = Path(raw_dir)
        t0 = time.perf_counter()
        _run_optimum(model_dir, raw, config)
        export_s = time.perf_counter() - t0

        partial.mkdir()
        try:
            t0 = time.perf_counter()
            quant_info = _quantize_step(raw, partial, quantize, model_dir, config, fit)
            quantize_s = time.perf_counter() - t0
            # optimum's config.json is the one its ORTModel classes are tested with; take it, then the source's
            # tokenizer and generation files untouched (optimum re-saves the tokenizer, with the GGUF blob if any).
            shutil.copy2(raw / "config.json", partial / "config.json")
            _copy_side_files(model_dir, partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    return quant_info, {"export": export_s, "quantize": quantize_s}


def _export_record(partial: Path, model_dir: Path, config: dict[str, Any], quantize: str,
                   quant_info: dict[str, Any], seconds: dict[str, float], runtime: dict[str, Any]) -> dict[str, Any]:
    """The record of the export assembled in ``partial`` (written beside its files as RECORD_FILE)."""
    files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}
    return {
        "format": "onnx",
        "quantize": quantize,
        "accuracy_level": ACCURACY_LEVEL if quantize != "none" else None,
        **quant_info,
        "model_type": config.get("model_type"),
        "files": files,  # every file of the directory except this record
        "total_bytes": sum(files.values()),
        "export_seconds": round(seconds["export"], 3),
        "quantize_seconds": round(seconds["quantize"], 3),
        "source_model_dir": str(model_dir),
        "runtime": runtime,
        "versions": {name: installed_version(name) for name in
                     ("onnxruntime", "optimum", "optimum-onnx", "onnx", "transformers", "torch")},
    }


def _quantize_step(raw: Path, partial: Path, quantize: str, model_dir: Path, config: dict[str, Any],
                   fit: _FitRequest | None) -> dict[str, Any]:
    """Move (none) or quantize (int8/int4/fit) optimum's graph from ``raw`` into ``partial``; returns record
    fields."""
    if quantize == "none":
        for name in (MODEL_FILE, EXTERNAL_DATA_FILE):
            if (raw / name).exists():
                shutil.move(raw / name, partial / name)
        return {"algorithm": "fp32"}
    try:
        if fit is not None:
            from edgeforge.data.builtin import training_prose
            from edgeforge.export.onnx.fit import calibration_ids, fit_onnx
            from edgeforge.paths import edgeforge_home

            ids = calibration_ids(model_dir, fit.calibration_text or training_prose())
            return fit_onnx(raw / MODEL_FILE, partial / MODEL_FILE, fit.max_bytes, ids, config,
                            edgeforge_home() / "fit-sensitivity")
        return quantize_onnx(raw / MODEL_FILE, partial / MODEL_FILE, quantize)
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
        with warnings.catch_warnings(), quiet_logs(logging.ERROR, "optimum", "transformers", "torch.onnx"):
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
    side = [model_dir / n for n in _MODEL_SIDE_FILES if (model_dir / n).is_file()]
    for src in [*side, *tokenizer_files(model_dir)]:
        if not (dest / src.name).exists():
            shutil.copy2(src, dest / src.name)


#: Every name an export writes into its directory: a ``.partial`` holding only these was left by a killed export.
_EXPORT_FILE_NAMES = frozenset((MODEL_FILE, EXTERNAL_DATA_FILE, RECORD_FILE, RUNTIME_FILE, *_MODEL_SIDE_FILES,
                                *TOKENIZER_FILES, *LEGACY_TOKENIZER_FILES))


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


# ---------------------------------------------------------------------------------------------------------- helpers


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


__all__ = [
    "OnnxExportError", "UnsupportedArchitectureError", "check_exportable", "export_onnx", "load_record",
]
