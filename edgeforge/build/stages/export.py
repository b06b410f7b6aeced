"""The export stages: the build's model as a GGUF file (llama.cpp) or an ONNX folder (onnxruntime), each verified
against that model (KL, top-1 agreement) and scored on the build's fixed task set through the artifact's own engine.

With a task, an artifact fails verification when its exact match on the fixed set is significantly below its source
model's (paired, McNemar) or more than ``verify.task_max_drop`` below it (edgeforge.tasks.metrics.task_gate), and
its KL / top-1 are gated on the task set's text, general prose being measured beside. A GGUF type that fails
verification falls back to the profile's next larger preferred type that still fits
(``export_with_fallback``); every type tried is recorded with the artifact that passed. When the profile's GGUF
budget sits between two preset types (a larger preferred type exists but does not fit), the last fallback is
``fit``: the per-group mix measured to lose least within that budget (edgeforge.export.fit), which uses the room
the largest fitting preset leaves. ``export.gguf_quant: fit`` asks for it first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeforge.build.stage import BuildContext, BuildState
from edgeforge.build.task_set import fit_calibration_text, held_out_task_examples, source_task_scores, task_text
from edgeforge.errors import BadInputError, QualityGateError
from edgeforge.export.gguf import FIT, judged_type
from edgeforge.models.files import read_model_config
from edgeforge.tasks.metrics import task_gate


@dataclass
class ExportStage:
    """``upstream_key``: the key of the model stage the export reads (or the teacher's identity, as text)."""

    ctx: BuildContext
    fmt: str  # "gguf" or "onnx"
    quant: str  # a GGUF type (Q4_K_M, ...), "fit" (a mix fitted to the profile's budget) or an ONNX mode
    upstream_key: str
    max_bytes: int | None = None  # with quant "fit": the budget the mix fills (fit_budget_bytes)

    @property
    def name(self) -> str:
        return f"export-{self.fmt}"

    @property
    def note(self) -> str:
        return f"{self.fmt} {self.quant}"

    def settings(self) -> dict[str, Any]:
        out = {"format": self.fmt, "quant": self.quant, "verify": self.ctx.cfg.verify.model_dump(),
               "task": self.ctx.task_identity}
        if self.quant == FIT:  # the mix depends on the budget it fills
            out["max_bytes"] = self.max_bytes
        return out

    def inputs(self) -> dict[str, Any]:
        return {"model": self.upstream_key}

    def run(self, stage_dir: Path, state: BuildState) -> dict[str, Any]:
        from edgeforge.models.refs import ModelRef
        from edgeforge.verify.artifact import Reference, artifact_quant

        assert state.model_dir is not None
        ctx = self.ctx
        ref = ModelRef(name=f"{ctx.teacher_ref.name}-{ctx.profile.name}", path=state.model_dir, format="hf")
        reference = Reference(ref)
        path, record = self._export(ref, stage_dir, state, reference.tokenizer)
        examples = held_out_task_examples(ctx)
        verify = self._verify(path, reference, examples, judged_type(record) if self.fmt == "gguf" else
                              artifact_quant(path, record))
        task = None
        if examples:
            task = self._task_metrics(path, reference.tokenizer, examples)
            source = source_task_scores(state, examples, ctx.log)
            v = ctx.cfg.verify
            gate = task_gate(task["correct"], source["correct"], v.task_max_drop, v.task_alpha)
            task["versus_source"] = {**gate, "source": source["model"]}
            ctx.log(f"[{self.name}] task exact match {gate['accuracy_a']:.1%} vs its source's {gate['accuracy_b']:.1%} "
                    f"(difference {gate['difference']:+.1%}, 95% CI {gate['difference_ci95'][0]:+.1%} .. "
                    f"{gate['difference_ci95'][1]:+.1%}, McNemar p {gate['mcnemar_exact_p']:.3g})")
            if not gate["passed"]:
                verify = {**verify, "passed": False, "failures": [*verify["failures"], gate["reason"]]}
        out = {"path": str(path), "format": self.fmt, "quant": self.quant, "verify": verify, "task": task,
               "size_bytes": size_bytes(path), "export": {k: record.get(k) for k in ("seconds", "sha256", "lineage")}}
        if "fit" in record:
            out["fit"] = record["fit"]
        return out

    def _verify(self, path: Path, reference: Any, examples: list[dict[str, Any]], judged_as: str) -> dict[str, Any]:
        """KL / top-1 against the source, at the thresholds of ``judged_as``. With a task, gated on the fixed task
        set's text (the job the model was specialised for) and measured on general prose beside it
        (``general_prose``, not gated); without one, on general prose."""
        from edgeforge.verify.artifact import MIN_VERIFY_TOKENS, verify_artifact

        ctx, n = self.ctx, self.ctx.cfg.verify.tokens
        text = task_text(reference.tokenizer, held_out_task_examples(ctx, every=True)) if examples else ""
        # A small task file holds out little text: verify on all of it when that is fewer than verify.tokens,
        # and on prose alone when it is too short to measure at all (the task gate still scores every example).
        n_task = len(reference.encode(text, n)) if text else 0
        if n_task < MIN_VERIFY_TOKENS:
            if examples:
                ctx.log(f"[{self.name}] the held-out task text has {n_task} tokens (< {MIN_VERIFY_TOKENS}): "
                        "KL and top-1 are measured on held-out prose only")
            ctx.log(f"[{self.name}] verifying {path.name} against {reference.ref.path.name} ({n} tokens of "
                    "held-out prose)")
            return verify_artifact(path, reference, judged_as, n_tokens=n, enforce=False)
        ctx.log(f"[{self.name}] verifying {path.name} against {reference.ref.path.name} ({n_task} tokens of "
                "held-out task examples)")
        verify = verify_artifact(path, reference, judged_as, text, n_tokens=n_task, enforce=False)
        prose = verify_artifact(path, reference, judged_as, n_tokens=n, enforce=False)
        return {**verify, "text": "task", "general_prose": {k: prose[k] for k in (
            "mean_kl", "top1_agreement", "perplexity_reference", "perplexity_artifact", "passed", "failures")}}

    def _export(self, ref: Any, stage_dir: Path, state: BuildState, tokenizer: Any) -> tuple[Path, dict[str, Any]]:
        """Write the artifact into ``stage_dir``; returns its path and the exporter's record. A fitted mix is
        measured on the task's training examples and the built-in prose (``fit_calibration_text``)."""
        if self.fmt == "gguf":
            from edgeforge.export.gguf import NEEDS_IMATRIX, export_gguf

            imatrix_data = None
            if self.quant == FIT:  # a mix is measured with an importance matrix, on text of the model's job
                imatrix_data = stage_dir / "calibration.txt"
                imatrix_data.write_text(fit_calibration_text(self.ctx, tokenizer), encoding="utf-8")
            elif self.quant in NEEDS_IMATRIX:
                from edgeforge.data.builtin import write_calibration_text

                imatrix_data = write_calibration_text(stage_dir / "calibration.txt")
            from edgeforge.ship.runtime_settings import write_runtime_settings

            path = stage_dir / f"{build_slug(self.ctx)}-{self.quant}.gguf"
            record = export_gguf(ref, self.quant, path, imatrix_data, self.ctx.profile.name, [*state.lineage_stages],
                                 max_bytes=self.max_bytes)
            # beside the file from the start: the bench stage measures with the settings that ship
            write_runtime_settings(path, self.ctx.plan.context_tokens)
            return path, record
        from edgeforge.export.onnx.export import export_onnx

        path = stage_dir / "onnx"
        text = fit_calibration_text(self.ctx, tokenizer) if self.quant == FIT else None
        return path, export_onnx(state.model_dir, path, quantize=self.quant,  # type: ignore[arg-type]
                                 max_bytes=self.max_bytes, calibration_text=text)

    def _task_metrics(self, path: Path, tokenizer: Any, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Exact match of the artifact, through its own engine, on the fixed task set."""
        from edgeforge.tasks.metrics import artifact_task_metrics

        self.ctx.log(f"[{self.name}] task accuracy of {path.name} on {len(examples)} held-out examples")
        return artifact_task_metrics(path, tokenizer, examples)

    def absorb(self, record: dict[str, Any], state: BuildState) -> None:
        tried = state.exports.setdefault(self.fmt, [])
        tried.append(record)
        if record["verify"]["passed"]:
            state.artifacts.append({**record, "tried": tried_rows(tried)})


def tried_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the ship folder says about each type tried for one format."""
    return [{"quant": r["quant"], "passed": r["verify"]["passed"], "mean_kl": r["verify"].get("mean_kl"),
             "top1": r["verify"].get("top1_agreement")} for r in records]


def export_formats(ctx: BuildContext) -> list[str]:
    """The formats to export: the pipeline's, or every format the profile's runtimes run."""
    if ctx.cfg.export.formats is not None:
        fmts = list(dict.fromkeys(ctx.cfg.export.formats))
    else:
        fmts = list(dict.fromkeys(r.format for r in ctx.profile.runtimes))
    runs = {r.format for r in ctx.profile.runtimes}
    bad = [f for f in fmts if f not in runs]
    if bad:
        raise BadInputError(f"export.formats: {ctx.profile.name} runs {', '.join(sorted(runs))}, not "
                            f"{', '.join(bad)}")
    return fmts


def onnx_quant(ctx: BuildContext) -> str:
    """The ONNX mode: the pipeline's, else the profile's first preferred one, else int8."""
    return ctx.cfg.export.onnx_quantize or (ctx.profile.preferred_quants.onnx or ["int8"])[0]


def onnx_candidates(ctx: BuildContext, state: BuildState) -> list[str]:
    """The chosen ONNX mode, then (with fallback, from int4) int8 when it fits the profile, else a 4/8-bit mix
    fitted to the profile's budget (export.onnx.fit): the budget sits between int4 and int8."""
    from edgeforge.models.refs import arch_from_config
    from edgeforge.plan.planner import weights_budget_bytes
    from edgeforge.plan.sizing import onnx_weights_bytes

    first = onnx_quant(ctx)
    if not ctx.cfg.export.fallback or first != "int4":
        return [first]
    assert state.model_dir is not None
    arch = arch_from_config(read_model_config(state.model_dir))
    budget = weights_budget_bytes(arch, ctx.profile, ctx.plan.context_tokens)
    if onnx_weights_bytes(arch, "int8") <= budget:
        return [first, "int8"]
    return [first, FIT] if onnx_weights_bytes(arch, "int4") < budget else [first]


def fit_budget_bytes(ctx: BuildContext, state: BuildState, fmt: str = "gguf") -> int:
    """The most weight bytes of the build's model that fit the profile at the plan's context (``plan``'s count)."""
    from edgeforge.models.refs import arch_from_config
    from edgeforge.plan.planner import weights_budget_bytes

    assert state.model_dir is not None
    budget = weights_budget_bytes(arch_from_config(read_model_config(state.model_dir)), ctx.profile,
                               ctx.plan.context_tokens)
    if budget <= 0:
        setting = "gguf_quant" if fmt == "gguf" else "onnx_quantize"
        raise BadInputError(f"export.{setting} fit: {ctx.profile.name} has no memory left for weights at "
                            f"{ctx.plan.context_tokens} tokens of context; choose a preset type or a smaller context")
    return budget


def gguf_candidates(ctx: BuildContext, state: BuildState) -> list[str]:
    """The chosen GGUF type, then (with fallback) every larger preferred type of the profile that still fits, and
    ``fit`` last when a larger preferred type exists that does not fit (the budget sits between two presets)."""
    from edgeforge.models.refs import arch_from_config
    from edgeforge.plan.planner import fit_room
    from edgeforge.plan.sizing import GGUF_QUANT_TYPES, memory_estimate

    first = ctx.cfg.export.gguf_quant
    if first is None:
        first = (ctx.plan.student or {}).get("quant") if state.distill is not None else None
        first = first or ctx.plan.quant
    if first not in GGUF_QUANT_TYPES and first != FIT:
        raise BadInputError(f"export.gguf_quant: expected one of {', '.join(GGUF_QUANT_TYPES)} or {FIT}, found "
                            f"{first}")
    if not ctx.cfg.export.fallback or first == FIT:
        return [first]
    assert state.model_dir is not None
    arch = arch_from_config(read_model_config(state.model_dir))
    ctx_tokens = ctx.plan.context_tokens

    def size(q: str) -> int:
        return memory_estimate(arch, "gguf", q, ctx_tokens).weights_bytes

    larger = sorted((q for q in ctx.profile.preferred_quants.gguf
                     if q in GGUF_QUANT_TYPES and q != first and size(q) > size(first)
                     and memory_estimate(arch, "gguf", q, ctx_tokens).total_bytes <= ctx.profile.memory_budget_bytes),
                    key=size)
    # Every larger type that fits, smallest first: the task gate can refuse several 4-bit types in a row (the demo's
    # 86M student lost 8.7, 10.3 and 2.6 points at IQ4_XS, Q4_0 and Q4_K_M), and stopping at two would fail a
    # build that a 5- or 6-bit type would have shipped.
    between = fit_room(arch, ctx.profile, ctx_tokens)["between_presets"]  # what `plan` prints
    return [first, *larger, *([FIT] if between else [])]


def export_with_fallback(ctx: BuildContext, state: BuildState, fmt: str, upstream_key: str) -> Iterator[ExportStage]:
    """Lay out one format's exports: each type in turn until one passes verification.

    Raises QualityGateError when none passes. Stops without a verdict when the last one laid out has not run
    (``--dry-run``)."""
    quants = gguf_candidates(ctx, state) if fmt == "gguf" else onnx_candidates(ctx, state)
    for attempt, q in enumerate(quants, start=1):
        yield ExportStage(ctx, fmt, q, upstream_key,
                          max_bytes=fit_budget_bytes(ctx, state, fmt) if q == FIT else None)
        tried = state.exports.get(fmt, [])
        if len(tried) < attempt:  # laid out but not run: whether it passes is not known yet
            return
        if tried[-1]["verify"]["passed"]:
            return
        ctx.log(f"[export-{fmt}] {q} failed verification ({why_failed(tried[-1]['verify'])})"
                + ("; trying the next larger type" if q != quants[-1] else ""))
    last = state.exports[fmt][-1]
    raise QualityGateError(f"{fmt}: no type passed verification (tried "
                           f"{', '.join(r['quant'] for r in state.exports[fmt])}; last: {why_failed(last['verify'])}); "
                           f"artifacts kept in {Path(last['path']).parent}")


def why_failed(verify: dict[str, Any]) -> str:
    return "; ".join(verify.get("failures") or []) or "passed"


def build_slug(ctx: BuildContext) -> str:
    """The build's name: the teacher's name (without .gguf) and the profile's (file names, the model card)."""
    base = Path(str(ctx.teacher_ref.name)).name.replace(".gguf", "")
    return f"{base}-{ctx.profile.name}"


def size_bytes(path: Path) -> int:
    """The size of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
