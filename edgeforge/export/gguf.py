"""GGUF export with llama.cpp's own tools: convert (HF -> F16/BF16/F32), importance matrix, quantize, lineage.

- An HF directory is converted by ``convert_hf_to_gguf.py`` from the llama.cpp tree of the installed binding.
- A GGUF teacher is re-quantized directly (llama.cpp dequantizes each tensor and quantizes it again), so its
  original tokenizer metadata, which llama.cpp already tokenizes correctly, is kept as is.
- Quantization goes through ``llama_model_quantize`` of llama-cpp-python; with an importance matrix through the
  ``llama-quantize`` tool of the same tree (the binding cannot pass an imatrix).
- Lineage (edgeforge version, source model, profile, stages) is written into the GGUF metadata with gguf-py.
Every file is written under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from edgeforge import __version__
from edgeforge.errors import BadInputError, EdgeforgeError, ResourceError
from edgeforge.fileio import sha256_file  # noqa: F401  (re-exported: bench and tests import it from here)
from edgeforge.models.refs import ModelRef, read_arch
from edgeforge.outputs import ONNX_RECORD_FILE, claim_output, gguf_record_path, publish
from edgeforge.progress import ProgressStep, progress
from edgeforge.quiet import captured_stderr

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M")
FIT = "fit"  # a per-tensor-group mix fitted to a byte budget (edgeforge.export.fit)
# Q3_K_M is offered with an importance matrix only: its expected KL (plan.planner.EXPECTED_MEAN_KL) was measured so.
NEEDS_IMATRIX = {"IQ4_XS", "Q3_K_M"}
CONVERTER_OUTTYPE = {"F32": "f32", "BF16": "bf16"}  # every other type starts from an F16 conversion


class ExportError(EdgeforgeError):
    """An export step failed; the message names the step and the tool's last words."""


def _ftype(quant: str) -> int:
    import llama_cpp

    name = {"F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16"}.get(quant, f"LLAMA_FTYPE_MOSTLY_{quant}")
    return int(getattr(llama_cpp, name))


def check_hf_exportable(model_dir: Path) -> None:
    """Fail early, naming the architecture, when llama.cpp's converter (as edgeforge uses it) cannot take it.

    Also refuses code shipped with the model: the converter itself calls ``trust_remote_code=True`` for some
    tokenizers (see edgeforge.models.files), so this check stays here even though model resolution makes it too.
    """
    from edgeforge.models.files import check_no_remote_code, read_model_config
    from edgeforge.plan.exportability import gguf_verdict

    check_no_remote_code(model_dir)
    cfg = read_model_config(model_dir)
    ok, why = gguf_verdict([str(a) for a in cfg.get("architectures") or []])
    if not ok:
        raise BadInputError(f"{model_dir}: cannot be exported to GGUF: {why}")
    if not (model_dir / "tokenizer.json").is_file():
        raise BadInputError(f"{model_dir}: no tokenizer.json; the GGUF must carry the tokenizer (save it with "
                            "tokenizer.save_pretrained)")
    if not any(model_dir.glob("*.safetensors")):
        raise BadInputError(f"{model_dir}: no *.safetensors weights (edgeforge never loads pickled checkpoints)")


def convert_hf(model_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """HF directory -> GGUF at ``outtype`` (f32, f16, bf16) with llama.cpp's ``convert_hf_to_gguf.py``.

    Progress: the bytes written so far against the expected size of the result.
    """
    from edgeforge.export.llama_tools import converter_env, ensure_tree, run_logged

    check_hf_exportable(model_dir)
    script = ensure_tree() / "convert_hf_to_gguf.py"
    tmp = out.with_name(f".{out.name}.partial")
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
    # the log goes to the system's temporary folder: the output's disk may be the one that fills up
    with tempfile.TemporaryDirectory(prefix="edgeforge-convert-") as logdir:
        log = Path(logdir) / "convert.log"
        with progress(f"convert {model_dir.name} to {outtype.upper()}", total=_expected_bytes(model_dir, outtype),
                      unit="B") as p:
            code = run_logged(cmd, log, env=converter_env(),
                              on_poll=lambda: p.update(tmp.stat().st_size if tmp.is_file() else 0))
            if code != 0 or not tmp.is_file():
                raise ExportError(_converter_failure(model_dir, out, log, tmp))
            p.update(tmp.stat().st_size)
    fixes = _converter_fixes(model_dir)
    if fixes:
        _rewrite_metadata(tmp, tmp, fixes)
    os.replace(tmp, out)
    return out


def _expected_bytes(model_dir: Path, outtype: str) -> int | None:
    """The converter's output size as estimated from config.json, for its progress; None where it cannot tell."""
    from edgeforge.plan.sizing import gguf_file_bytes

    try:
        return gguf_file_bytes(read_arch(ModelRef(model_dir.name, model_dir, "hf")), outtype.upper())
    except (EdgeforgeError, KeyError, ValueError):
        return None


def _converter_failure(model_dir: Path, out: Path, log: Path, tmp: Path) -> str:
    """The one-line message for a failed conversion: the converter's exception line, not its progress bar."""
    from edgeforge.export.llama_tools import log_tail

    lines = [ln for ln in log_tail(log, 200) if not ln.startswith("$ ")]
    errors = [ln for ln in lines if "Error" in ln.split(":", 1)[0] or ln.startswith("error")]
    last = (errors or lines or ["no output"])[-1]
    if _disk_is_full(ExportError(last), out.parent):  # before the partial file is removed
        last = f"No space left on device ({last[:200]})"
    tmp.unlink(missing_ok=True)
    return f"llama.cpp's convert_hf_to_gguf.py failed on {model_dir}: {last[:300]}"


def compute_imatrix(gguf: Path, data: Path, out: Path, threads: int, chunks: int = 32, ctx: int = 512) -> Path:
    """Importance matrix of ``gguf`` on calibration text ``data`` with llama.cpp's ``llama-imatrix``.

    Progress: the time spent, and the tool's own estimate of the time left once it has made one pass.
    """
    from edgeforge.export.llama_tools import ensure_tools, log_tail, run_logged

    tool = ensure_tools(("llama-imatrix",))["llama-imatrix"]
    if not data.is_file() or data.stat().st_size == 0:
        raise BadInputError(f"{data}: imatrix calibration data is missing or empty; expected a UTF-8 text file")
    tmp = out.with_name(f".{out.name}.partial.gguf")
    cmd = [str(tool), "-m", str(gguf), "-f", str(data), "-o", str(tmp), "-c", str(ctx), "--chunks", str(chunks),
           "-t", str(threads), "--no-ppl"]

    def show_eta(p: ProgressStep) -> None:
        eta = [ln for ln in log_tail(log, 20) if "seconds per pass - ETA" in ln]
        if eta:
            p.update(note="llama-imatrix's ETA: " + eta[-1].split("ETA", 1)[1].strip())

    with tempfile.TemporaryDirectory(prefix="edgeforge-imatrix-") as logdir:
        log = Path(logdir) / "imatrix.log"
        with progress(f"imatrix over {chunks} chunks of {data.name}", unit="") as p:
            code = run_logged(cmd, log, on_poll=lambda: show_eta(p))
            if code != 0 or not tmp.is_file():
                last = [ln for ln in log_tail(log, 3) if not ln.startswith("$ ")][-2:]
                tmp.unlink(missing_ok=True)
                raise ExportError(f"llama-imatrix failed: {' | '.join(last)} (the data needs at least {ctx} tokens)")
    os.replace(tmp, out)
    return out


def quantize(src: Path, dst: Path, quant: str, threads: int, imatrix: Path | None = None,
             tensor_types: list[str] | None = None, pure: bool = False) -> Path:
    """Quantize ``src`` to llama.cpp file type ``quant``; re-quantizing an already quantized file is allowed.

    ``tensor_types``: ``--tensor-type PATTERN=TYPE`` arguments of ``llama-quantize`` (a fitted mix, export.fit).
    ``pure``: every matrix at the file type's base type, no mix (the calibration models, export.calibration_model).
    """
    tmp = dst.with_name(f".{dst.name}.partial")
    if imatrix is not None or tensor_types or pure:
        from edgeforge.export.llama_tools import ensure_tools

        tool = ensure_tools(("llama-quantize",))["llama-quantize"]
        cmd = [str(tool), "--allow-requantize", *(["--pure"] if pure else []),
               *(["--imatrix", str(imatrix)] if imatrix else []),
               *(tensor_types or []), str(src), str(tmp), quant, str(threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        ok = r.returncode == 0
        detail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-2:])
    else:
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = _ftype(quant)
        params.nthread = threads
        params.allow_requantize = True
        with captured_stderr() as log:
            ok = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) == 0
        detail = log.tail() or "llama_model_quantize returned an error"
    if not ok or not tmp.is_file():
        if _disk_is_full(ExportError(detail), dst.parent):  # llama.cpp says "iostream error"; look before cleaning up
            detail = f"No space left on device ({detail})"
        tmp.unlink(missing_ok=True)
        raise ExportError(f"quantizing {src.name} to {quant} failed: {detail}")
    os.replace(tmp, dst)
    return dst


def write_lineage(src: Path, dst: Path, lineage: dict[str, Any]) -> Path:
    """Copy ``src`` to ``dst`` adding ``edgeforge.*`` metadata keys (strings; ``stages`` as JSON)."""
    import gguf

    return _rewrite_metadata(src, dst, {f"edgeforge.{k}": (gguf.GGUFValueType.STRING, v if isinstance(v, str)
                                                           else json.dumps(v, sort_keys=True), None)
                                        for k, v in lineage.items()})


def _rewrite_metadata(src: Path, dst: Path, meta: dict[str, tuple[Any, Any, Any]]) -> Path:
    """Copy ``src`` to ``dst`` with metadata keys set: ``{key: (GGUFValueType, value, array sub-type or None)}``."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(f".{dst.name}.meta-partial")
    writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
    details = {k: MetadataDetails(t, v, sub_type=sub) for k, (t, v, sub) in meta.items()}
    try:
        # gguf-py draws a tqdm progress bar on stderr; keep the CLI's output clean.
        with captured_stderr():
            try:
                copy_with_new_metadata(reader, writer, details, [])
            except BaseException as e:  # close the bar (a local of the failed frame) while stderr is still captured
                traceback.clear_frames(e.__traceback__)
                raise
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed or interrupted copy leaves nothing behind
        raise
    del reader  # its memory map of src, before src may be replaced on the next line
    os.replace(tmp, dst)
    return dst


def _converter_fixes(model_dir: Path) -> dict[str, tuple[Any, Any, Any]]:
    """Metadata the pinned converter leaves out although llama.cpp reads it (BadInputError where no key can help).

    Gemma 3: the converter writes no sliding-window pattern, so llama.cpp assumes Gemma's 5 sliding : 1 full
    layers. A depth-pruned student (or any model whose ``layer_types`` differ) then attends over the wrong window
    in some layers: a tiny [sliding, full] model measured mean KL 0.029 and 42% top-1 agreement at F16 over 128
    tokens before this fix. The per-layer pattern from ``layer_types`` is written as llama.cpp's bool array.
    """
    import gguf

    from edgeforge.models.files import read_model_config
    from edgeforge.models.support import smollm3_rope_flags

    cfg = read_model_config(model_dir)
    no_rope = cfg.get("no_rope_layers")
    if cfg.get("model_type") == "smollm3" and isinstance(no_rope, list):
        rule = smollm3_rope_flags(len(no_rope))
        if [int(bool(v)) for v in no_rope] != rule:
            raise BadInputError(
                f"{model_dir}: SmolLM3 no_rope_layers {no_rope} differ from the rule llama.cpp runs (RoPE off in "
                f"every 4th layer: {rule}, fixed in its code, no GGUF key); the GGUF would compute another model. "
                "Distill with edgeforge (its pruned SmolLM3 students follow the rule) or export to ONNX")
    layer_types = cfg.get("layer_types")
    if cfg.get("model_type") == "gemma3_text" and isinstance(layer_types, list) and cfg.get("sliding_window"):
        return {"gemma3.attention.sliding_window_pattern": (
            gguf.GGUFValueType.ARRAY, [t == "sliding_attention" for t in layer_types], gguf.GGUFValueType.BOOL)}
    return {}


def read_lineage(path: Path) -> dict[str, str]:
    import gguf

    reader = gguf.GGUFReader(str(path), "r")
    return {k[len("edgeforge."):]: f.contents() for k, f in reader.fields.items() if k.startswith("edgeforge.")}


def export_gguf(
    model: ModelRef,
    quant: str,
    out: Path,
    imatrix_data: Path | None = None,
    profile: str | None = None,
    stages: list[str] | None = None,
    threads: int | None = None,
    imatrix_file: Path | None = None,
    force: bool = False,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Export ``model`` to a GGUF file at ``quant``. Returns the artifact record (also saved beside the file).

    ``imatrix_data`` is calibration text to compute an importance matrix from; ``imatrix_file`` an importance
    matrix computed earlier (by ``compute_imatrix``) to reuse. ``quant="fit"``: a per-tensor-group mix measured to
    lose least within ``max_bytes`` for the whole file (edgeforge.export.fit; ``imatrix_data`` is its calibration
    text too). An existing ``out`` is replaced only when it is an earlier GGUF export (its record beside it) or with
    ``force`` (edgeforge.outputs).
    """
    if quant not in GGUF_TYPES and quant != FIT:
        raise BadInputError(f"unknown GGUF quant type '{quant}'; expected one of {', '.join(GGUF_TYPES)}, 'auto' or "
                            f"'{FIT}'")
    if quant in NEEDS_IMATRIX and imatrix_data is None and imatrix_file is None:
        raise BadInputError(f"{quant} needs an importance matrix: pass --imatrix-data PATH (calibration text)")
    if quant == FIT and (max_bytes is None or imatrix_data is None):
        raise BadInputError(f"--quant {FIT} needs a byte budget (--max-bytes B or --profile NAME) and calibration "
                            "text (--imatrix-data PATH or 'builtin')")
    claim_output(out, kind="gguf", force=force)
    threads = threads or max(1, os.cpu_count() or 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(model, "Q8_0" if quant == FIT else quant, out)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".edgeforge-export-") as tmpdir:
        try:
            final = Path(tmpdir) / "final.gguf"
            lineage, seconds, fit = _export_in(Path(tmpdir), model, quant, final, imatrix_data, profile, stages,
                                               threads, imatrix_file, t0, max_bytes)
            record = {
                "kind": "gguf",
                "path": str(out),
                "quant": quant,
                "file_bytes": final.stat().st_size,
                "sha256": sha256_file(final),
                "source_model": model.name,
                "source_path": str(model.path),
                "lineage": lineage,
                "seconds": {**seconds, "total": time.perf_counter() - t0},
                # what verifies the file here, and what ``bench --setup`` pins on a device (edgeforge.bench.setup)
                "runtime_versions": {"llama-cpp-python": installed_version("llama-cpp-python")},
            }
            if fit is not None:
                record["fit"] = fit
            # The record first, then the file: a .gguf at ``out`` always has its record beside it, which is how a
            # rerun knows the file is edgeforge's own to replace (a kill between the two leaves only a record).
            save_record(out, record)
            publish(final, out)
        except (OSError, ExportError) as e:
            if not _disk_is_full(e, out.parent):
                raise
            raise ResourceError(f"the disk at {out.parent} filled up during the export (no space left on device); no "
                                f"partial file is left at {out} and the temporary files are removed: free some space "
                                "or pass another --out") from None
    return record


def installed_version(dist: str) -> str:
    """The installed version of distribution ``dist`` (what an export record names), or "not installed"."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _disk_is_full(err: BaseException, where: Path) -> bool:
    """Whether a failed write was the disk filling up. Checked while the temporary files still exist: a full disk
    does not always say so (numpy's tofile raises OSError without an errno, llama.cpp's quantizer reports an
    iostream error)."""
    if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "No space left on device" in str(err):
        return True
    import shutil

    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def _export_in(tmp: Path, model: ModelRef, quant: str, out: Path, imatrix_data: Path | None, profile: str | None,
               stages: list[str] | None, threads: int, imatrix_file: Path | None, t0: float,
               max_bytes: int | None = None) -> tuple[dict[str, Any], dict[str, float], dict[str, Any] | None]:
    """The export steps inside the temporary directory ``tmp``; the result is written to ``out`` (inside ``tmp``).
    Returns the lineage, the seconds per step and, for a fitted mix, its plan (else None)."""
    if model.format == "hf":
        base = convert_hf(model.path, tmp / "base.gguf", CONVERTER_OUTTYPE.get(quant, "f16"))
    else:
        base = model.path
    convert_s = time.perf_counter() - t0
    layout = None
    if quant == FIT:
        from edgeforge.export.fit.mix import check_budget

        assert max_bytes is not None  # export_gguf checked it
        layout = check_budget(base, max_bytes)  # before an importance matrix is spent on a budget nothing fits
    imatrix = imatrix_file
    if imatrix is None and imatrix_data is not None:
        imatrix = compute_imatrix(base, imatrix_data, tmp / "imatrix.gguf", threads)
    imatrix_s = time.perf_counter() - t0 - convert_s
    same_type = model.format == "hf" and quant in ("F16", "F32", "BF16")
    fit: dict[str, Any] | None = None
    if quant == FIT:
        from edgeforge.data.builtin import read_text_data
        from edgeforge.export.fit.mix import check_written, fit_mix, measure_written
        from edgeforge.paths import edgeforge_home

        assert max_bytes is not None and imatrix_data is not None  # export_gguf checked both
        plan = fit_mix(base, max_bytes, read_text_data(imatrix_data), imatrix, threads,
                       edgeforge_home() / "fit-sensitivity", quantize, installed_version("llama-cpp-python"), layout)
        quantized = quantize(base, tmp / "quantized.gguf", plan.file_type, threads, imatrix, plan.quantize_args)
        check_written(quantized, plan)
        measure_written(base, quantized, plan, threads)
        fit = plan.to_dict()
    else:
        quantized = base if same_type else quantize(base, tmp / "quantized.gguf", quant, threads, imatrix)
    quantize_s = time.perf_counter() - t0 - convert_s - imatrix_s
    lineage = {
        "version": __version__,
        "source_model": model.name,
        "source_format": model.format,
        "profile": profile or "",
        "quant": quant,
        "imatrix_data": str(imatrix_data) if imatrix_data else "",
        "imatrix_file": str(imatrix_file) if imatrix_file else "",
        "stages": [*(stages or []), "export-gguf"],
    }
    write_lineage(quantized, out, lineage)
    if max_bytes is not None and out.stat().st_size > max_bytes:
        raise ExportError(f"the fitted file is {out.stat().st_size:,} bytes, over --max-bytes {max_bytes:,} once "
                          "edgeforge's lineage is written; report it")
    return lineage, {"convert": convert_s, "imatrix": imatrix_s, "quantize": quantize_s}, fit


def record_path(artifact: Path) -> Path:
    """Where an artifact's record lives: ``<file>.edgeforge.json``, or ``<dir>/edgeforge-export.json``."""
    return artifact / ONNX_RECORD_FILE if artifact.is_dir() else gguf_record_path(artifact)


def judged_type(record: dict[str, Any]) -> str:
    """The type whose verification thresholds an exported GGUF is judged at: its quant, or for a fitted mix the type
    holding most of its bytes (the ``general.file_type`` it declares)."""
    return record["fit"]["file_type"] if "fit" in record else record["quant"]


def save_record(artifact: Path, record: dict[str, Any]) -> Path:
    p = record_path(artifact)
    tmp = p.with_name(f".{p.name}.partial")
    try:
        tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, p)
    return p


def load_record(artifact: Path) -> dict[str, Any]:
    """The artifact's record, or {} when it has none; a damaged record is one BadInputError naming it."""
    p = record_path(artifact)
    if not p.is_file():
        return {}
    try:
        record = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadInputError(f"{p}: the artifact's record is not readable JSON ({' '.join(str(e).split())[:120]}); "
                            "remove it (or export again) and pass --quant to say which thresholds apply") from None
    if not isinstance(record, dict):
        raise BadInputError(f"{p}: the artifact's record is not a JSON object; remove it or export again")
    return record


def _check_disk(model: ModelRef, quant: str, out: Path) -> None:
    """Refuse before writing when the disk cannot hold the intermediate F16 file and the result."""
    import shutil

    from edgeforge.plan.sizing import gguf_file_bytes

    arch = read_arch(model)
    need = gguf_file_bytes(arch, quant) + (gguf_file_bytes(arch, "F16") if model.format == "hf" else 0)
    free = shutil.disk_usage(out.parent).free
    if free < need * 1.1:
        raise ResourceError(f"not enough disk at {out.parent}: the export needs about {need / 1e6:.1f} MB, "
                            f"{free / 1e6:.1f} MB are free; free some space or pass another --out")
