"""What a build reports: the summary the ship folder is written from (manifest, model card, report) and the
headline numbers printed at the end."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from edgeforge.build.stage import BuildContext, BuildState
from edgeforge.build.stages.export import build_slug, size_bytes

LIBRARIES = ("edgeforge", "torch", "transformers", "peft", "optimum-onnx", "onnxruntime", "llama-cpp-python", "gguf")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in LIBRARIES:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def bench_row(r: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one device_bench result (bench.make_result) that the ship folder shows."""
    row = {k: r.get(k) for k in ("target", "profile", "prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms",
                                 "peak_rss_bytes", "threads", "estimated_decode_tokens_per_s",
                                 "decode_ratio_measured_to_estimated")}
    sustained = r.get("sustained")
    if isinstance(sustained, dict):
        row["sustained"] = {k: sustained.get(k) for k in ("windows", "first_window_tokens_per_s",
                                                          "last_window_tokens_per_s", "drop_percent",
                                                          "joules_per_token")}
    return row


def speed_rows(ctx: BuildContext, state: BuildState) -> list[dict[str, Any]]:
    """Estimated and measured decode speed: each artifact on the build's profile, then each other target."""
    from edgeforge.bench.artifact import local_artifact
    from edgeforge.bench.results import estimate_for

    profile = ctx.profile.name
    rows = []
    for a in state.artifacts:
        est = estimate_for(ctx.profile, local_artifact(a["path"]), ctx.cfg.bench.prompt_tokens)
        measured = None
        for r in state.bench:
            if r.get("profile") == profile and Path(str(r.get("artifact", ""))).name == Path(a["path"]).name:
                measured = bench_row(r).get("decode_tokens_per_s")
        rows.append({"profile": profile, "artifact": Path(a["path"]).name,
                     "estimated_decode_tokens_per_s": est.get("estimated_decode_tokens_per_s"),
                     "measured_decode_tokens_per_s": measured})
    for r in state.bench:
        row = bench_row(r)
        if r.get("profile") == profile:
            continue
        rows.append({"profile": f"{r.get('target', '?')} ({r.get('profile', '?')})",
                     "artifact": Path(str(r.get("artifact", "?"))).name,
                     "estimated_decode_tokens_per_s": row.get("estimated_decode_tokens_per_s"),
                     "measured_decode_tokens_per_s": row.get("decode_tokens_per_s")})
    return rows


def chat_template(model_dir: Path | None) -> str | None:
    """The model's chat template: tokenizer_config.json's, else chat_template.jinja's, else None."""
    if model_dir is None:
        return None
    tokenizer_cfg = model_dir / "tokenizer_config.json"
    template = None
    if tokenizer_cfg.is_file():
        template = json.loads(tokenizer_cfg.read_text(encoding="utf-8")).get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def summary(ctx: BuildContext, state: BuildState, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The build summary (edgeforge.ship.folder.write_ship): ``rows`` are the shipped artifacts."""
    from edgeforge.ship.folder import scores_summary

    ref = ctx.teacher_ref
    teacher_license = read_gguf_license(ref.path) if ref.format == "gguf" else hf_license(ref.path)
    template = chat_template(state.model_dir)
    distill = state.distill
    return {
        "name": build_slug(ctx),
        "profile": {"name": ctx.profile.name, "backend": ctx.profile.primary_runtime.backend,
                    "memory_budget_bytes": ctx.profile.memory_budget_bytes,
                    "latency_goals": ctx.profile.latency_goals.model_dump()},
        "teacher": {"name": ref.name, "params": ctx.plan.teacher_arch.get("n_params"),
                    "license": teacher_license, "base_model": base_model_id(ref),
                    "perplexity": (distill or {}).get("teacher", {}).get("perplexity"),
                    "size_bytes": size_bytes(ref.path)},
        "plan": {k: v for k, v in ctx.plan.to_dict().items() if k != "candidates"},
        "stages": [{k: v for k, v in r.items() if k != "config"} for r in state.stage_rows],
        "distill": distill,
        "finetune": state.finetune,
        "finetuned_teacher": finetuned_teacher(ctx, state),
        "source_scores": scores_summary(state.source_scores),
        "artifacts": rows,
        "speed": speed_rows(ctx, state),
        "lineage": lineage(ctx, state),
        "quality": {"retention": (distill or {}).get("retention"),
                    "task_accuracy": ((state.finetune or {}).get("after") or {}).get("task_accuracy")},
        "chat_template": template,
        "stop_tokens": ["<|im_end|>"] if template and "<|im_start|>" in template else [],
    }


def finetuned_teacher(ctx: BuildContext, state: BuildState) -> dict[str, Any] | None:
    """The fine-tuned teacher beside the shipped student (fine-tune-then-distill): its task scores on the fixed set
    (base and merged), and what shipping it instead would mean on the profile (the plan's figures for the teacher's
    architecture: the size at the plan's type, the estimated decode speed, fits, meets the latency goals). None when
    the build fine-tuned no teacher."""
    from edgeforge.ship.folder import scores_summary

    f = state.teacher_finetune
    if not f:
        return None
    p = ctx.plan
    return {"name": f"{ctx.teacher_ref.name} + {ctx.cfg.finetune.method} on {ctx.cfg.task}",
            "base": scores_summary(f.get("before")), "task": scores_summary(f.get("merge") or f.get("after")),
            "general_perplexity": (f.get("after") or {}).get("general_perplexity"),
            "quant": p.quant, "weights_bytes": p.weights_bytes,
            "estimated_decode_tokens_per_s": p.estimated_decode_tokens_per_s,
            "estimated_ttft_ms": p.estimated_ttft_ms, "fits": p.fits, "meets_latency_goal": p.meets_latency_goal,
            "train_seconds": f.get("train_seconds")}


def lineage(ctx: BuildContext, state: BuildState) -> dict[str, Any]:
    """Where the shipped model came from: the inputs' identities, each stage's key and settings, the versions."""
    return {"teacher": {"name": ctx.teacher_ref.name, **ctx.teacher_identity},
            "data": ctx.data_identity or "built-in (pydoc_data prose + teacher answers)",
            "task": ctx.task_identity,
            "stage_configs": {r["name"]: {"cache_key": r["cache_key"], "config": r["config"]}
                              for r in state.stage_rows},
            "config": ctx.cfg.model_dump(), "library_versions": library_versions(), "seed": ctx.cfg.seed}


def headline(ctx: BuildContext, ship: Path, summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The few numbers a user wants at the end: retention, task accuracy, size, measured speed, where."""
    arts = []
    for a in summary["artifacts"]:
        local = next((b for b in a["bench"] if b.get("target") == "local"), None) or (a["bench"] or [None])[0]
        arts.append({"file": str(ship / a["path"]), "format": a["format"], "quant": a["quant"],
                     "size_bytes": a["size_bytes"], "mean_kl": a["verify"].get("mean_kl"),
                     "top1_agreement": a["verify"].get("top1_agreement"), "task_accuracy": a.get("task_accuracy"),
                     "measured_decode_tokens_per_s": (local or {}).get("decode_tokens_per_s"),
                     "measured_prefill_tokens_per_s": (local or {}).get("prefill_tokens_per_s"),
                     "measured_on": (local or {}).get("target")})
    from edgeforge.ship.decision import HEADER, decision_rows, kept_share

    source = summary.get("source_scores") or {}
    return {"ship_dir": str(ship), "profile": ctx.profile.name, "decision": ctx.plan.decision,
            "stages": summary["stages"], "retention": (summary["quality"] or {}).get("retention"),
            "task_accuracy": summary["quality"].get("task_accuracy") or source.get("task_accuracy"),
            "finetuned_teacher_task_accuracy": ((summary.get("finetuned_teacher") or {}).get("task") or {}).get(
                "task_accuracy"),
            "teacher_or_student": {"header": HEADER, "rows": decision_rows(summary), "kept": kept_share(summary)},
            "artifacts": arts, "seconds": seconds, "manifest": str(ship / "manifest.json")}


def read_gguf_license(path: Path) -> str | None:
    """``general.license`` of a GGUF file (what the model card's front matter takes), or None."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.license")
    if field is None:
        return None
    return str(field.contents())


def hf_license(path: Path) -> str | None:
    """The ``license:`` of an HF model directory's README front matter, or None."""
    readme = Path(path) / "README.md"
    if readme.is_file():
        import yaml

        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
                return meta.get("license")
            except yaml.YAMLError:
                return None
    return None


def base_model_id(ref: Any) -> str:
    """The Hub id the model card names as the base model (the bundled teacher's alias maps to its repository)."""
    if ref.name == "smollm2-135m-instruct":
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return str(ref.name)
