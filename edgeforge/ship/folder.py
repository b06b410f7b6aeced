"""The ship folder: what ``edgeforge build`` hands to the user, beside the artifacts the pipeline placed there.

``write_ship`` adds README.md (a Hugging Face model card), an Ollama ``Modelfile`` (when a GGUF is shipped),
``report.html`` (self-contained, see ``edgeforge.ship.report_html``) and, last, ``manifest.json``, which checksums every
other file so ``check_manifest`` can tell whether the folder is intact.

The ``summary`` dict (built by the pipeline; every optional key may be absent or None, and the writers then say
"not measured" rather than invent a number):

- ``name`` (str): the shipped model's name, e.g. ``"smollm2-135m-instruct-raspberry-pi-5-8gb"``.
- ``profile`` (dict): the device profile, at least ``name``; optionally ``backend``, ``description``,
  ``memory_budget_bytes``, ``latency_goals`` {``ttft_ms``, ``decode_tokens_per_s``}.
- ``teacher`` (dict): ``name``, ``params`` (int), ``license`` (SPDX-like id as on the Hub, e.g. ``"apache-2.0"``;
  None when unknown), ``base_model`` (Hub id, e.g. ``"HuggingFaceTB/SmolLM2-135M-Instruct"``), ``perplexity``,
  ``size_bytes``, optionally ``task_accuracy``.
- ``plan`` (dict): ``edgeforge.plan.planner.Plan.to_dict()``; read here: ``decision``, ``reason``, ``quant``,
  ``context_tokens``, ``estimated_decode_tokens_per_s``.
- ``stages`` (list): ``{name, cache_key, cached (bool), seconds}`` in run order.
- ``distill`` (dict | None): the record of ``edgeforge.distill.run``: ``loss_curve`` [{step, tokens, loss, kl, ...}],
  ``before`` / ``after`` {kl_to_teacher, perplexity, top1_agreement, retention}, ``retention``
  {definition, teacher, before, after}, optionally ``student`` {params, ...}.
- ``finetune`` (dict | None): the record of ``edgeforge.finetune.run``: ``loss_curve`` [{step, tokens, loss, ce, ...}],
  ``accuracy_by_step`` [{step, task_accuracy}], ``before`` / ``after`` {task_accuracy, valid_json_rate,
  general_perplexity}, optionally ``config`` {method, rank, steps} and ``forgetting``.
- ``artifacts`` (list): ``{path (relative to the ship folder), format ("gguf" | "onnx"), quant, size_bytes,
  verify: {mean_kl, top1_agreement, passed}, task_accuracy (optional),
  bench: [{target, prefill_tokens_per_s, decode_tokens_per_s, peak_rss_bytes}]}``. The first GGUF that passed its
  verification is the one the Modelfile serves.
- ``speed`` (list): ``{profile, artifact, estimated_decode_tokens_per_s, measured_decode_tokens_per_s (None when not
  measured)}``, one row per profile/target and artifact.
- ``lineage`` (dict): copied verbatim into the manifest: teacher, data hashes, stage configs, library versions, seed.
- ``chat_template`` (str | None): the tokenizer's Jinja chat template.
- ``stop_tokens`` (list[str]): strings that end a reply (e.g. ``["<|im_end|>"]``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import yaml

from edgeforge.fileio import sha256_file, write_text_atomic

MANIFEST_SCHEMA = "edgeforge.manifest/1"
MANIFEST_NAME = "manifest.json"


# ---------------------------------------------------------------- small helpers
def _num(x: Any, spec: str = "{:,.2f}", missing: str = "not measured") -> str:
    """A number for prose and tables; None (not measured, or not applicable) is said, never shown as 0."""
    return missing if x is None else spec.format(x)


def _pct(x: Any, missing: str = "not measured") -> str:
    return _num(x, "{:.1%}", missing)


def _mb(n: Any) -> str:
    return _num(None if n is None else n / 1e6, "{:,.1f} MB", "unknown")


def _get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...`` or None when any level is missing or None: the pipeline fills only what it has."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _artifacts(summary: dict) -> list[dict]:
    return [a for a in summary.get("artifacts") or [] if isinstance(a, dict)]


def primary_gguf(summary: dict) -> dict | None:
    """The GGUF artifact the Modelfile and the run snippets use: the first that passed verification, else the first."""
    ggufs = [a for a in _artifacts(summary) if a.get("format") == "gguf" and a.get("path")]
    passed = [a for a in ggufs if _get(a, "verify", "passed")]
    return (passed or ggufs or [None])[0]


# ---------------------------------------------------------------- Ollama Modelfile
# Ollama's Go template for ChatML. It ranges over .Messages (system, user, assistant, in order; a Modelfile SYSTEM
# line arrives as the first message), then opens the assistant turn the model completes.
_OLLAMA_CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


# A default system prompt written as a literal in the Jinja template (SmolLM2: "You are a helpful AI assistant named
# SmolLM..."), used there when the conversation has none. The newline is a real one or an escaped ``\\n``.
_JINJA_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^{}'\"<]+?)<\|im_end\|>")


def modelfile(gguf_name: str, chat_template_jinja: str | None, stop_tokens: list[str], *,
              num_ctx: int = 2048, num_batch: int | None = None) -> str:
    """An Ollama Modelfile serving ``gguf_name`` (a path relative to the Modelfile's folder).

    ChatML (``<|im_start|>role\\n...<|im_end|>``, as SmolLM2 uses) is recognised from the Jinja template and rewritten
    in Ollama's Go-template syntax, with the template's literal default system prompt (if any) as SYSTEM; any other
    template gets a plain ``{{ .Prompt }}`` template and a comment saying so, because translating arbitrary Jinja is
    not something a regex does correctly. ``num_ctx``: the context the plan was sized for (tokens); ``num_batch``:
    the shipped runtime.json's ``n_batch``.
    """
    chatml = bool(chat_template_jinja) and "<|im_start|>" in chat_template_jinja
    lines = ["# Ollama Modelfile written by edgeforge: ollama create <name> -f Modelfile", f"FROM ./{gguf_name}", ""]
    stops = list(dict.fromkeys(stop_tokens))  # keep order, drop repeats
    if chatml:
        # Without this stop Ollama would keep generating past the end of the assistant turn.
        if "<|im_end|>" not in stops:
            stops.append("<|im_end|>")
        lines += ["# The tokenizer's chat template is ChatML; this is the same format in Ollama's template syntax.",
                  f'TEMPLATE """{_OLLAMA_CHATML}"""']
        m = _JINJA_DEFAULT_SYSTEM.search(chat_template_jinja or "")
        if m:
            # Ollama sends SYSTEM only when the conversation has no system message: what the Jinja template does.
            lines += ["# The default system prompt of the tokenizer's chat template.",
                      f'SYSTEM """{m.group(1).strip()}"""']
    else:
        why = "has no chat template" if not chat_template_jinja else "has a chat template that is not ChatML"
        lines += [f"# The model {why}; edgeforge translates only ChatML, so the prompt is passed through unchanged.",
                  "# Write the TEMPLATE by hand from the tokenizer's chat_template to chat with it.",
                  'TEMPLATE """{{ .Prompt }}"""']
    lines.append("")
    # json.dumps quotes and escapes the stop string the way Ollama's Modelfile parser reads a quoted value.
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines.append(f"PARAMETER num_ctx {int(num_ctx)}")
    if num_batch:
        lines += [f"PARAMETER num_batch {int(num_batch)}",
                  "# The KV cache is f16, as benchmarked (<model>.gguf.runtime.json); Ollama sets its cache type for",
                  "# the whole server (OLLAMA_KV_CACHE_TYPE), not per model."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- model card (README.md)
def _front_matter(summary: dict) -> tuple[dict, bool]:
    """The Hub's YAML metadata, and whether the license is known."""
    teacher = summary.get("teacher") or {}
    arts = _artifacts(summary)
    formats = [f for f in ("gguf", "onnx") if any(a.get("format") == f for a in arts)]
    tags = ["edgeforge", *formats]
    profile = _get(summary, "profile", "name")
    if profile:
        tags.append(str(profile))
    if summary.get("distill"):
        tags.append("distillation")
    if summary.get("finetune"):
        tags.append("fine-tuned")
    license_ = teacher.get("license")
    meta: dict[str, Any] = {
        "base_model": teacher.get("base_model") or teacher.get("name") or "unknown",
        "tags": tags,
        "license": license_ or "other",
        # The Hub's library ids: "gguf" for llama.cpp files, "onnx" for an onnxruntime-only folder.
        "library_name": formats[0] if formats else "transformers",
    }
    if not license_:
        meta["license_name"] = "unknown"
    if summary.get("finetune"):
        meta["base_model_relation"] = "finetune"
    elif not summary.get("distill"):
        meta["base_model_relation"] = "quantized"
    return meta, bool(license_)


def _stages_md(summary: dict) -> list[str]:
    stages = [s for s in summary.get("stages") or [] if isinstance(s, dict)]
    if not stages:
        return ["The pipeline recorded no stages."]
    out = ["| stage | ran or cached | seconds | cache key |", "|---|---|---|---|"]
    for s in stages:
        out.append(f"| {s.get('name', '?')} | {'cached' if s.get('cached') else 'ran'} | "
                   f"{_num(s.get('seconds'), '{:,.1f}', 'n/a')} | `{s.get('cache_key') or 'n/a'}` |")
    return out


def _quality_md(summary: dict) -> list[str]:
    out: list[str] = []
    d = summary.get("distill")
    if d:
        ret = d.get("retention") or {}
        out.append(f"- Distillation retention: {_pct(ret.get('before'))} before, {_pct(ret.get('after'))} after "
                   f"({ret.get('definition') or 'teacher perplexity / student perplexity'}).")
        out.append(f"- Student KL to the teacher: {_num(_get(d, 'before', 'kl_to_teacher'), '{:.4f}')} before, "
                   f"{_num(_get(d, 'after', 'kl_to_teacher'), '{:.4f}')} after distillation; top-1 agreement "
                   f"{_pct(_get(d, 'after', 'top1_agreement'))}.")
    f = summary.get("finetune")
    if f:
        n = _get(f, "after", "n_examples")
        out.append(f"- Task exact match on {n or '?'} held-out examples (95% Wilson interval): "
                   f"{_acc(f.get('before'))} before fine-tuning, {_acc(f.get('after'))} after, "
                   f"{_acc(f.get('merge'))} merged.")
        delta = _get(f, "forgetting", "general_perplexity_delta_pct")
        if delta is not None:
            out.append(f"- Forgetting: general perplexity changed by {delta:+.1f}% "
                       f"({_num(_get(f, 'before', 'general_perplexity'))} -> "
                       f"{_num(_get(f, 'after', 'general_perplexity'))}).")
    from edgeforge.ship.decision import HEADER, decision_rows, kept_share

    rows = decision_rows(summary)
    if rows:
        out += ["", "What distillation cost and what it bought (the same fixed examples; sizes and speeds on the "
                "build's profile, estimated by the planner):", "", "| " + " | ".join(HEADER) + " |",
                "|" + "---|" * len(HEADER)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        share = kept_share(summary)
        if share:
            out += ["", share]
    arts = _artifacts(summary)
    if arts:
        if out:
            out.append("")
        out += ["Each artifact against the model it was exported from:", "",
                "| file | format | quant | size | mean KL | top-1 | verified | task exact match (95% CI) "
                "| vs its source (paired, 95% CI) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for a in arts:
            v = a.get("verify") or {}
            passed = v.get("passed")
            out.append(f"| `{a.get('path')}` | {a.get('format', '?')} | {a.get('quant') or 'n/a'} | "
                       f"{_mb(a.get('size_bytes'))} | {_num(v.get('mean_kl'), '{:.4f}')} | "
                       f"{_pct(v.get('top1_agreement'))} | "
                       f"{'not verified' if passed is None else ('passed' if passed else 'FAILED')} | "
                       f"{_acc(a.get('task'))} | {_paired(a.get('task'))} |")
    return out or ["No quality measurement was recorded."]


def _acc(scores: Any) -> str:
    """``58.0% (52.3%-63.5%)``: an accuracy with its 95% interval, or n/a (edgeforge.ship.decision's format)."""
    from edgeforge.ship.decision import accuracy_text

    return accuracy_text(scores)


def _paired(task: Any) -> str:
    """The artifact minus its source on the same examples, with the paired 95% interval and McNemar p."""
    vs = task.get("versus_source") if isinstance(task, dict) else None
    if not isinstance(vs, dict) or vs.get("difference") is None:
        return "n/a"
    lo, hi = vs.get("difference_ci95") or (None, None)
    ci = f" ({lo:+.1%} to {hi:+.1%})" if lo is not None else ""
    return f"{vs['difference']:+.1%}{ci}, p {vs.get('mcnemar_exact_p', float('nan')):.2g}"


def _speed_md(summary: dict) -> list[str]:
    out: list[str] = []
    rows = [r for r in summary.get("speed") or [] if isinstance(r, dict)]
    if rows:
        out += ["Decode tokens/s, estimated by the planner's model and measured on the device:", "",
                "| profile / target | artifact | estimated | measured |", "|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r.get('profile', '?')} | `{r.get('artifact', '?')}` | "
                       f"{_num(r.get('estimated_decode_tokens_per_s'), '{:,.1f}', 'n/a')} | "
                       f"{_num(r.get('measured_decode_tokens_per_s'), '{:,.1f}')} |")
    bench = [(a, b) for a in _artifacts(summary) for b in a.get("bench") or [] if isinstance(b, dict)]
    if bench:
        if out:
            out.append("")
        out += ["| artifact | target | prefill tok/s | decode tok/s | peak RSS |", "|---|---|---|---|---|"]
        for a, b in bench:
            out.append(f"| `{a.get('path')}` | {b.get('target', '?')} | "
                       f"{_num(b.get('prefill_tokens_per_s'), '{:,.1f}')} | "
                       f"{_num(b.get('decode_tokens_per_s'), '{:,.1f}')} | {_mb(b.get('peak_rss_bytes'))} |")
    return out or ["No speed was estimated or measured."]


def _run_md(summary: dict) -> list[str]:
    name = summary.get("name") or "edgeforge-model"
    out: list[str] = []
    g = primary_gguf(summary)
    if g:
        out += ["llama.cpp:", "", "```", f"llama-cli -m ./{g['path']} -cnv", "```", "",
                "Ollama (the Modelfile in this folder):", "", "```",
                f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", ""]
    onnx = next((a for a in _artifacts(summary) if a.get("format") == "onnx" and a.get("path")), None)
    if onnx:
        out += ["onnxruntime (through optimum; the folder holds the tokenizer too):", "", "```python",
                "from optimum.onnxruntime import ORTModelForCausalLM",
                "from transformers import AutoTokenizer",
                "",
                f'tok = AutoTokenizer.from_pretrained("{onnx["path"]}")',
                f'model = ORTModelForCausalLM.from_pretrained("{onnx["path"]}")',
                "# optimum-onnx 0.1.0 guesses the KV cache's heads and head size from the config, wrongly for",
                "# some families (Phi-3 with grouped KV heads, explicit head_dim): take them from the graph.",
                'past = next(i for i in model.session.get_inputs() if i.name.endswith(".key"))',
                "model.num_key_value_heads, model.embed_size_per_head = past.shape[1], past.shape[3]",
                'msgs = [{"role": "user", "content": "Hello!"}]',
                "ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors='pt')",
                "print(tok.decode(model.generate(ids, max_new_tokens=64)[0][ids.shape[1]:]))", "```", ""]
    return out or ["No runnable artifact was shipped."]


def _limitations_md(summary: dict, license_known: bool) -> list[str]:
    out = ["- A small model: it follows simple instructions and makes factual mistakes; check what it says."]
    for a in _artifacts(summary):
        if _get(a, "verify", "passed") is False:
            out.append(f"- `{a.get('path')}` FAILED its verification against its source "
                       f"(mean KL {_num(_get(a, 'verify', 'mean_kl'), '{:.4f}')}); it is shipped for inspection only.")
    rows = [r for r in summary.get("speed") or [] if isinstance(r, dict)]
    if any(r.get("measured_decode_tokens_per_s") is None for r in rows) or not rows:
        out.append("- Some speeds are estimates only: they were not measured on the device.")
    goal = _get(summary, "profile", "latency_goals", "decode_tokens_per_s")
    slow = [r for r in rows if goal is not None and r.get("measured_decode_tokens_per_s") is not None
            and r["measured_decode_tokens_per_s"] < goal]
    for r in slow:
        out.append(f"- `{r.get('artifact')}` decodes {r['measured_decode_tokens_per_s']:,.1f} tokens/s on "
                   f"{r.get('profile')}, below the profile's goal of {goal:,.1f}.")
    if summary.get("finetune"):
        out.append("- Fine-tuned for one task: task accuracy was measured on that task's held-out set only.")
    if not license_known:
        out.append("- The teacher's license was not recorded, so the metadata says `license: other`; check the base "
                   "model's license before redistributing.")
    return out


def model_card(summary: dict) -> str:
    """README.md: Hugging Face front matter, then what it is, device, how it was made, quality, speed, how to run,
    limitations. Every number comes from ``summary``; what is missing is said to be missing."""
    meta, license_known = _front_matter(summary)
    name = summary.get("name") or "edgeforge-model"
    teacher = summary.get("teacher") or {}
    profile = summary.get("profile") or {}
    plan = summary.get("plan") or {}
    params = teacher.get("params")
    made = []
    if summary.get("distill"):
        sp = _get(summary, "distill", "student", "params")
        made.append("distilled into a smaller student" + (f" ({sp / 1e6:,.0f}M params)" if sp else ""))
    if summary.get("finetune"):
        method = _get(summary, "finetune", "config", "method")
        made.append("fine-tuned" + (f" with {method}" if method else ""))
    made.append("exported and quantized, each artifact verified against its source")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             "## What it is", "",
             f"`{teacher.get('name') or meta['base_model']}`"
             + (f" ({params / 1e6:,.0f}M params)" if params else "")
             + f", made for **{profile.get('name') or 'an unnamed device profile'}** by edgeforge: "
             + ", then ".join(made) + ".", "",
             "## Device profile", "",
             f"- Profile: `{profile.get('name') or 'unknown'}`"
             + (f": {profile['description']}" if profile.get("description") else "")]
    if profile.get("backend"):
        lines.append(f"- Backend: {profile['backend']}")
    if profile.get("memory_budget_bytes"):
        lines.append(f"- Memory budget: {_mb(profile['memory_budget_bytes'])}")
    goal = _get(profile, "latency_goals", "decode_tokens_per_s")
    if goal is not None:
        lines.append(f"- Decode goal: {goal:,.1f} tokens/s")
    lines += [f"- Plan: **{plan.get('decision') or 'n/a'}**" + (f" at {plan['quant']}" if plan.get("quant") else ""),
              f"- Reason: {plan.get('reason') or 'n/a'}", "",
              "## How it was made", "", *_stages_md(summary), "",
              "`manifest.json` records the lineage (teacher, data hashes, stage configs, library versions, seed) and "
              "the sha256 of every file here; `report.html` has the training curves and the size/quality/speed plots.",
              "", "## Quality", "", *_quality_md(summary), "",
              "## Speed", "", *_speed_md(summary), "",
              "## How to run it", "", *_run_md(summary),
              "## Limitations", "", *_limitations_md(summary, license_known), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- manifest
def file_entries(ship_dir: Path) -> dict[str, dict]:
    """Every file under ``ship_dir`` except the top-level manifest.json: relative POSIX path ->
    ``{"sha256": hex, "size_bytes": int}``, sorted by path."""
    ship_dir = Path(ship_dir)
    out: dict[str, dict] = {}
    for p in sorted(ship_dir.rglob("*")):
        rel = p.relative_to(ship_dir).as_posix()
        if rel == MANIFEST_NAME or not p.is_file():
            continue
        out[rel] = {"sha256": sha256_file(p), "size_bytes": p.stat().st_size}
    return out


def scores_summary(scores: Any) -> dict | None:
    """A task scoring as the manifest keeps it: accuracy, interval, example count, paired comparison; not the
    per-example list (records/ keeps that)."""
    return {k: v for k, v in scores.items() if k not in ("correct", "samples")} if isinstance(scores, dict) else None


def _quality(summary: dict) -> dict:
    """Every task score of the build, on the same fixed examples: the base, the adapter and the merged model of the
    fine-tuning record, and each artifact (with its paired difference to the merged model)."""
    d, f = summary.get("distill") or {}, summary.get("finetune") or {}
    return {
        "distill_retention": d.get("retention"),
        "finetune": {"before": scores_summary(f.get("before")), "after": scores_summary(f.get("after")),
                     "merged": scores_summary(f.get("merge"))} if f else None,
        # fine-tune-then-distill: the teacher fine-tuned on the task, on the same fixed examples (the reference the
        # shipped student is compared with), and the distilled student itself
        "finetuned_teacher": {k: v for k, v in t.items() if k != "name"} if (t := summary.get("finetuned_teacher"))
        else None,
        "student": summary.get("source_scores"),
        "artifacts": {a.get("path"): {**(a.get("verify") or {}), "task_accuracy": a.get("task_accuracy"),
                                      "task": scores_summary(a.get("task"))}
                      for a in _artifacts(summary)},
    }


def write_ship(ship_dir: Path, summary: dict) -> dict:
    """Write README.md, Modelfile (when a GGUF is shipped), report.html, then manifest.json, and return the manifest.

    The artifacts and tokenizer are already in ``ship_dir``. The manifest is written last so that it checksums
    everything else; each file is replaced atomically, so a killed run leaves the old file or the new, never half.
    """
    from edgeforge.ship.report_html import render_report  # matplotlib is heavy; only the ship step needs it

    ship_dir = Path(ship_dir)
    ship_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(ship_dir / "README.md", model_card(summary))
    g = primary_gguf(summary)
    if g:
        from edgeforge.ship.runtime_settings import N_BATCH

        ctx = _get(summary, "plan", "context_tokens") or 2048
        write_text_atomic(ship_dir / "Modelfile",
                          modelfile(g["path"], summary.get("chat_template"), list(summary.get("stop_tokens") or []),
                                    num_ctx=ctx, num_batch=N_BATCH))
    write_text_atomic(ship_dir / "report.html", render_report(summary))
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "name": summary.get("name"),
        "files": file_entries(ship_dir),
        "lineage": summary.get("lineage"),
        "quality": _quality(summary),
        "bench": {"artifacts": {a.get("path"): a.get("bench") or [] for a in _artifacts(summary)},
                  "speed": summary.get("speed") or []},
        "plan": summary.get("plan"),
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_text_atomic(ship_dir / MANIFEST_NAME, json.dumps(manifest, indent=1, default=str) + "\n")
    return manifest


def check_manifest(ship_dir: Path) -> list[str]:
    """The relative paths that are not as the manifest recorded them: changed size or sha256, missing, or present
    but not listed (a file added after shipping). Empty: the folder is intact. A missing manifest is reported as
    ``["manifest.json"]``."""
    ship_dir = Path(ship_dir)
    try:
        recorded = json.loads((ship_dir / MANIFEST_NAME).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return [MANIFEST_NAME]
    bad = []
    for rel, entry in recorded.items():
        p = ship_dir / rel
        # Size first: a cheap check that spares hashing a multi-GB file that has plainly changed.
        if not p.is_file() or p.stat().st_size != entry.get("size_bytes") or sha256_file(p) != entry.get("sha256"):
            bad.append(rel)
    extra = [p.relative_to(ship_dir).as_posix() for p in ship_dir.rglob("*") if p.is_file()]
    bad += [rel for rel in extra if rel != MANIFEST_NAME and rel not in recorded]
    return sorted(bad)
