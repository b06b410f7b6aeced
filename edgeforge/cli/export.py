"""``edgeforge export gguf|onnx`` and ``edgeforge eval``: write a shipped artifact, verified against its source, and
measure any artifact against a reference.

Registered onto the main group by :func:`register` (``edgeforge.cli.app`` calls it); errors are raised as
EdgeforgeError and turned into one line and an exit code there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgeforge.cli.common import FORCE_OPTION, JSON_OPTION, PROFILES_DIR_OPTION, print_json
from edgeforge.errors import BadInputError, EdgeforgeError, QualityGateError


@click.group()
def export() -> None:
    """Export a model to a shipped format (GGUF for llama.cpp, ONNX for onnxruntime), verified against its source."""


def _quant_auto(ref, out: Path, profile_name: str | None, max_kl: float, imatrix_data: Path | None,
                profiles_dirs: tuple[Path, ...]) -> tuple[str, list[dict[str, Any]]]:
    """Measure candidate types smallest first; the first that fits and keeps mean KL <= max_kl wins.

    Each candidate is exported and verified for real (measured, not guessed) in a fresh temporary directory beside
    ``out`` (never under a name the user could own) and then removed; the caller exports the chosen type to ``out``.
    No type within ``max_kl`` is a failed quality gate (exit 1), not bad input.
    """
    import os
    import tempfile

    from edgeforge.export.gguf import compute_imatrix, export_gguf
    from edgeforge.models.refs import ModelRef, read_arch
    from edgeforge.plan.planner import evaluate
    from edgeforge.plan.profiles import resolve_profile
    from edgeforge.plan.sizing import gguf_file_bytes
    from edgeforge.verify.artifact import Reference, verify_artifact

    arch = read_arch(ref)
    profile = resolve_profile(profile_name, profiles_dirs) if profile_name else None
    types = (profile.preferred_quants.gguf if profile else None) or ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]
    if imatrix_data is None:
        types = [t for t in types if t != "IQ4_XS"]
    if profile:
        types = [t for t in types if evaluate(arch, profile, "gguf", t, 2048, 128).fits]
    if not types:
        raise BadInputError(f"no GGUF type fits profile '{profile_name}'; distill a smaller student first "
                            "('edgeforge plan' says how small)")
    reference = Reference(ref)
    tried: list[dict[str, Any]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.auto-") as work_dir:
        # one HF -> F16 conversion (and one importance matrix) for every candidate, not one per candidate
        source = ref
        if ref.format == "hf":
            f16 = Path(work_dir) / "source-F16.gguf"
            export_gguf(ref, "F16", f16)
            source = ModelRef(ref.name, f16, "gguf")
        imatrix = compute_imatrix(source.path, imatrix_data, Path(work_dir) / "imatrix.gguf",
                                  max(1, os.cpu_count() or 1)) if imatrix_data is not None else None
        for t in sorted(types, key=lambda q: gguf_file_bytes(arch, q)):
            cand = Path(work_dir) / f"{out.stem}-{t}.gguf"
            rec = export_gguf(source, t, cand, imatrix_file=imatrix, profile=profile_name)
            v = verify_artifact(cand, reference, t, enforce=False)
            cand.unlink()
            tried.append({"quant": t, "file_bytes": rec["file_bytes"], "mean_kl": v["mean_kl"],
                          "top1_agreement": v["top1_agreement"]})
            if v["mean_kl"] <= max_kl:
                return t, tried
    raise QualityGateError(f"no candidate type keeps mean KL <= {max_kl}: " + ", ".join(
        f"{x['quant']} {x['mean_kl']:.4f}" for x in tried) + "; raise --max-kl or use a device with more memory")


@export.command("gguf")
@click.argument("model")
@click.option("--quant", default="Q4_K_M", show_default=True,
              help="F32, F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_XS and Q3_K_M (need --imatrix-data), auto, "
              "or fit (a per-tensor-group mix measured to lose least within --max-bytes or the --profile's memory).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The .gguf file to write.")
@click.option("--imatrix-data", type=click.Path(path_type=Path), default=None,
              help="Calibration text for an importance matrix ('builtin' for edgeforge's built-in text).")
@click.option("--profile", "profile_name", default=None,
              help="Device profile: recorded, and used by --quant auto and --quant fit (its memory budget).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None,
              help="With --quant fit: the largest file to write, in bytes [default: what fits --profile].")
@click.option("--context", type=click.IntRange(min=1), default=2048, show_default=True,
              help="With --quant fit --profile: the context the KV cache is sized for.")
@click.option("--max-kl", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="With --quant auto: the largest mean KL vs the source model to accept.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the artifact against the source torch model (KL, top-1, perplexity, greedy).")
@FORCE_OPTION
@PROFILES_DIR_OPTION
@JSON_OPTION
def export_gguf_cmd(model: str, quant: str, out: Path, imatrix_data: Path | None, profile_name: str | None,
                    max_bytes: int | None, context: int, max_kl: float, verify: bool, force: bool,
                    profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Export MODEL (HF dir, .gguf, or alias) to a GGUF file that llama.cpp runs."""
    from edgeforge.export.gguf import export_gguf, judged_type, save_record
    from edgeforge.models.refs import resolve_model
    from edgeforge.outputs import claim_output

    ref = resolve_model(model)
    if out.suffix.lower() != ".gguf":
        raise BadInputError(f"--out {out}: expected a path ending in .gguf")
    claim_output(out, kind="gguf", force=force)  # before --quant auto spends minutes measuring candidates
    if quant == "fit":
        max_bytes = _fit_budget(ref, profile_name, max_bytes, context, profiles_dirs)
        imatrix_data = imatrix_data or Path("builtin")  # the mix is measured with an importance matrix
    elif max_bytes is not None:
        raise BadInputError("--max-bytes applies to --quant fit only")
    if imatrix_data is not None and str(imatrix_data) == "builtin":
        from edgeforge.data.builtin import write_calibration_text
        from edgeforge.paths import edgeforge_home

        edgeforge_home().mkdir(parents=True, exist_ok=True)
        imatrix_data = write_calibration_text(edgeforge_home() / "calibration.txt")
    tried = None
    if quant == "auto":
        quant, tried = _quant_auto(ref, out, profile_name, max_kl, imatrix_data, profiles_dirs)
    record = export_gguf(ref, quant, out, imatrix_data, profile_name, force=force, max_bytes=max_bytes)
    if verify:
        from edgeforge.verify.artifact import Reference, Threshold, verify_artifact

        # --quant auto chose the type by the user's KL budget; that budget is then the gate.
        gate = Threshold(max_kl, 0.0) if tried is not None else None
        judged_as = judged_type(record)
        try:
            record["verification"] = verify_artifact(out, Reference(ref), judged_as, enforce=True, threshold=gate)
        except EdgeforgeError as e:
            record["verification"] = {"passed": False, "error": str(e)}
            save_record(out, record)
            raise
    if tried is not None:
        record["auto"] = {"max_kl": max_kl, "tried": tried, "chosen": quant}
    save_record(out, record)
    _report_artifact(record, as_json)


def _fit_budget(ref, profile_name: str | None, max_bytes: int | None, context: int,
                profiles_dirs: tuple[Path, ...], option: str = "--quant") -> int:
    """A fitted mix's byte budget: --max-bytes, else the most weight bytes that fit the profile at --context."""
    if max_bytes is not None:
        return max_bytes
    if profile_name is None:
        raise BadInputError(f"{option} fit needs a budget: pass --max-bytes B or --profile NAME")
    from edgeforge.models.refs import read_arch
    from edgeforge.plan.planner import weights_budget_bytes
    from edgeforge.plan.profiles import resolve_profile

    budget = weights_budget_bytes(read_arch(ref), resolve_profile(profile_name, profiles_dirs), context)
    if budget <= 0:
        raise BadInputError(f"profile '{profile_name}' has no memory left for weights at --context {context} (the KV "
                            "cache and runtime take it all); lower --context or distill a smaller student")
    return budget


def _report_artifact(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(record)
        return
    size = record.get("file_bytes") or record.get("total_bytes", 0)
    click.echo(f"wrote {record['path']} ({size / 1e6:.1f} MB, {record.get('quant') or record.get('quantize')})")
    fit = record.get("fit")
    if fit:
        group_types = fit.get("group_types") or {g: f"int{b}" for g, b in fit["group_bits"].items()}
        counts: dict[str, int] = {}
        for t in group_types.values():
            counts[t] = counts.get(t, 0) + 1
        click.echo(f"fitted mix within {fit['budget_bytes'] / 1e6:.1f} MB: {len(group_types)} tensor groups ("
                   + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) + f"); predicted mean KL "
                   f"{fit['predicted_mean_kl']:.4f} on {fit['sensitivity']['n_tokens']} calibration tokens")
    v = record.get("verification")
    if v and "mean_kl" in v:
        click.echo(f"verified vs {v['reference']} on {v['n_tokens']} tokens: mean KL {v['mean_kl']:.4f}, top-1 "
                   f"{v['top1_agreement']:.1%}, perplexity {v['perplexity_reference']:.2f} -> "
                   f"{v['perplexity_artifact']:.2f} ({v['perplexity_delta_pct']:+.1f}%), greedy match "
                   f"{v['greedy_match_rate']:.0%}: {'PASS' if v['passed'] else 'FAIL'}")


@export.command("onnx")
@click.argument("model")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The directory to write.")
@click.option("--quantize", type=click.Choice(["none", "int8", "int4", "fit"]), default="int8", show_default=True,
              help="Weight-only quantization with onnxruntime (every variant is verified); fit: 4 or 8 bits per "
              "layer group, the mix measured to lose least within --max-bytes or the --profile's memory.")
@click.option("--profile", "profile_name", default=None,
              help="With --quantize fit: the device whose memory budget the weights must fit.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None,
              help="With --quantize fit: the most bytes the graph and its weights may take [default: what fits "
              "--profile].")
@click.option("--context", type=click.IntRange(min=1), default=2048, show_default=True,
              help="With --quantize fit --profile: the context the KV cache is sized for.")
@click.option("--verify/--no-verify", default=True, show_default=True)
@FORCE_OPTION
@PROFILES_DIR_OPTION
@JSON_OPTION
def export_onnx_cmd(model: str, out: Path, quantize: str, profile_name: str | None, max_bytes: int | None,
                    context: int, verify: bool, force: bool, profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Export MODEL to an ONNX decoder with KV cache that optimum's ORTModelForCausalLM loads as is.

    One quantization recipe serves every CPU: onnxruntime picks the integer kernels (ARM SDOT/I8MM, AVX2, AVX-512
    VNNI) on the device when it runs the file, so the export does not depend on the machine that makes it."""
    from edgeforge.export.gguf import save_record
    from edgeforge.export.onnx.export import export_onnx
    from edgeforge.models.refs import resolve_model
    from edgeforge.outputs import claim_output

    ref = resolve_model(model)
    if quantize == "fit":
        max_bytes = _fit_budget(ref, profile_name, max_bytes, context, profiles_dirs, option="--quantize")
    elif max_bytes is not None:
        raise BadInputError("--max-bytes applies to --quantize fit only")
    claim_output(out, kind="onnx", force=force)  # before a GGUF source is dequantized
    if ref.format == "gguf":
        from edgeforge.models.gguf_hf import hf_dir_for, materialize_hf
        from edgeforge.paths import edgeforge_home

        hf_dir = materialize_hf(ref.path, hf_dir_for(ref.path, edgeforge_home()))
    else:
        hf_dir = ref.path
    record = export_onnx(hf_dir, out, quantize=quantize, force=force, max_bytes=max_bytes)  # type: ignore[arg-type]
    record.setdefault("path", str(out))
    record.setdefault("quant", quantize)
    if verify:
        from edgeforge.verify.artifact import Reference, artifact_quant, verify_artifact

        try:
            record["verification"] = verify_artifact(out, Reference(ref), artifact_quant(out, record), enforce=True)
        except EdgeforgeError as e:
            record["verification"] = {"passed": False, "error": str(e)}
            save_record(out, record)
            raise
    save_record(out, record)
    _report_artifact(record, as_json)


@click.command("eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--reference", "reference_model", required=True, help="The source model (HF dir, .gguf, alias).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Held-out UTF-8 text [default: built-in held-out prose].")
@click.option("--tokens", type=click.IntRange(min=16), default=1000, show_default=True)
@click.option("--quant", default=None,
              help="Threshold set to judge by [default: the artifact's own type: a GGUF's general.file_type, an "
              "ONNX model's quantization].")
@JSON_OPTION
def eval_cmd(artifact: Path, reference_model: str, data: Path | None, tokens: int, quant: str | None,
             as_json: bool) -> None:
    """Measure ARTIFACT (.gguf or ONNX dir) against a reference model: KL, top-1, perplexity, greedy match.

    For a distilled student (an HF dir with distill.json): teacher, initial and distilled student side by side.
    """
    from edgeforge.data.builtin import read_text_data
    from edgeforge.export.gguf import load_record
    from edgeforge.models.refs import resolve_model
    from edgeforge.verify.artifact import Reference, artifact_quant, verify_artifact

    if not artifact.exists():
        raise BadInputError(f"{artifact}: artifact not found")
    if artifact.is_dir() and (artifact / "distill.json").is_file():  # a distilled student: side-by-side table
        from edgeforge.cli.distill import eval_student

        return eval_student(artifact, reference_model, data, tokens, as_json)
    text = read_text_data(data) if data else None
    reference = Reference(resolve_model(reference_model))  # first: a refused reference (remote code) is named first
    quant = quant or artifact_quant(artifact, load_record(artifact))
    result = verify_artifact(artifact, reference, quant, text, tokens, enforce=False)
    result["artifact"] = str(artifact)
    if as_json:
        print_json(result)
    else:
        click.echo(f"{artifact} vs {result['reference']} ({result['n_tokens']} tokens, thresholds of {quant})")
        for k in ("mean_kl", "top1_agreement", "perplexity_reference", "perplexity_artifact", "perplexity_delta_pct",
                  "greedy_match_rate"):
            click.echo(f"  {k:22} {result[k]:.4f}")
        click.echo(f"  {'verdict':22} {'PASS' if result['passed'] else 'FAIL: ' + '; '.join(result['failures'])}")
    if not result["passed"]:
        raise click.exceptions.Exit(1)


def register(cli: click.Group) -> None:
    cli.add_command(export)
    cli.add_command(eval_cmd)
