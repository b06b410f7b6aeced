"""Readable terminal output for plans (rich tables)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from edgeforge.models.refs import ModelArch
from edgeforge.plan.planner import Plan


def make_console() -> Console:
    """A console that keeps tables whole when stdout is a pipe or a file (rich would assume 80 columns)."""
    c = Console()
    return c if c.is_terminal else Console(width=160)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def _duration(hours: float) -> str:
    """Hours as a reader takes them: a task fine-tune of seconds is not "0.00 h"."""
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"


def print_plan(plan: Plan, console: Console | None = None) -> None:
    """One plan: the candidates table, then the decision and its reason."""
    console = console or make_console()
    a = plan.teacher_arch
    console.print(f"[bold]{plan.teacher}[/] ({a['architecture']}, {a['n_layers']} layers, hidden {a['hidden_size']}, "
                  f"{a['n_params'] / 1e6:.0f}M params) on [bold]{plan.profile}[/] "
                  f"({plan.format} via {plan.backend}, context {plan.context_tokens})")
    t = Table()
    for col in ("quant", "weights", "KV cache", "overhead", "total", "budget", "fits", "decode tok/s",
                "prefill tok/s", "TTFT ms", "goal"):
        t.add_column(col, justify="right")
    for c in plan.candidates:
        t.add_row(c["quant"], _mb(c["weights_bytes"]), _mb(c["kv_cache_bytes"]), _mb(c["runtime_overhead_bytes"]),
                  _mb(c["total_bytes"]), _mb(plan.budget_bytes), "yes" if c["fits"] else "[red]no[/]",
                  f"{c['estimated_decode_tokens_per_s']:.1f}", f"{c['estimated_prefill_tokens_per_s']:.0f}",
                  f"{c['estimated_ttft_ms']:.0f}", "met" if c["meets_latency_goal"] else "[red]missed[/]")
    console.print(t)
    console.print(f"[bold]decision:[/] {plan.decision}   [bold]quant:[/] {plan.quant}")
    console.print(f"[bold]reason:[/] {plan.reason}")
    if plan.student:
        s = plan.student
        console.print(f"[bold]student:[/] {s['layers']} layers, hidden {s['hidden_size']}, MLP "
                      f"{s['intermediate_size']}, {s['params'] / 1e6:.0f}M params, {_mb(s['weights_bytes'])} at "
                      f"{s['quant']}, ~{s['estimated_decode_tokens_per_s']:.1f} tok/s"
                      + (f", expected mean KL {s['expected_mean_kl']:.3f} (measured on the bundled teacher)"
                         if s.get("expected_mean_kl") is not None else ""))
    for label, f in (("GGUF", plan.gguf_fit), ("ONNX", plan.onnx_fit)):
        if f:
            _print_fit_room(console, label, f, "the student" if plan.student else "the teacher", plan.context_tokens)
    console.print(f"[bold]serving energy:[/] {plan.serving_energy_wh_per_million_tokens:.0f} Wh per million tokens")
    for fmt, v in plan.exportability.items():
        mark = "ok" if v["ok"] else "[red]BLOCKED[/]"
        what = "trainable in torch" if fmt == "training" else f"exportable to {fmt}"
        console.print(f"[bold]{what}:[/] {mark}: {v['reason']}")
    if plan.task:
        t = plan.task
        over = (f"; {t['examples_over_max_seq_len']} longer than max_seq_len {t['max_seq_len']} (cut)"
                if t["examples_over_max_seq_len"] else "")
        console.print(f"[bold]task:[/] {t['source']}: {t['train_examples']:,} training examples, "
                      f"{t['mean_prompt_tokens']:.0f} prompt + {t['mean_answer_tokens']:.0f} answer tokens on average "
                      f"(longest {t['max_example_tokens']}){over}; fine-tuning as edgeforge runs it: {t['steps']} "
                      f"steps x batch {t['batch_size']} = {t['epochs']:.2f} epochs, {t['finetune_tokens']:,} tokens")
    tr = plan.training
    if tr:
        for st in tr["stages"]:
            cost = "" if st["cost"] is None else f", cost {st['cost']:.2f}"
            console.print(f"[bold]{st['stage']}:[/] {st['tokens']:,} tokens, {st['flops']:.2e} FLOPs, "
                          f"{_duration(st['hours'])} on {st['training_profile']}{cost}")
        mem = ", ".join(f"{m} {'fits' if f['fits'] else 'does not fit'}"
                        + (f" (batch {f['max_batch_size']})" if f["fits"] else f" ({_mb(f['bytes_at_batch_1'])})")
                        for m, f in tr["memory"].items())
        console.print(f"[bold]training memory on {tr['training_profile']}:[/] {mem}")


def _print_fit_room(console: Any, label: str, f: dict[str, Any], who: str, context_tokens: int) -> None:
    """A plan's budget for a fitted mix of ``label`` (GGUF, ONNX) between presets, and the mix or how to get it."""
    where = (f"largest preferred preset that fits: {f['largest_preset_that_fits']} "
             f"({_mb(f['largest_preset_bytes'])})" if f["largest_preset_that_fits"] else "no preferred preset fits")
    nxt = (f"; {f['smallest_preset_over']} ({_mb(f['smallest_over_bytes'])}) does not: --quant fit fills the "
           f"{_mb(f['room_bytes'])} between with a measured per-tensor mix (build's last fallback)"
           if f["between_presets"] else "; every preferred preset fits")
    console.print(f"[bold]{label} budget:[/] {_mb(f['budget_bytes'])} for {who} at {context_tokens} tokens of "
                  f"context ({where}{nxt})")
    mix = f.get("mix")
    if mix:
        console.print(f"[bold]fitted mix:[/] {sum(mix['groups_per_type'].values())} tensor groups ("
                      + ", ".join(f"{n} {t}" for t, n in sorted(mix["groups_per_type"].items()))
                      + f"), {_mb(mix['planned_file_bytes'])}, predicted mean KL {mix['predicted_mean_kl']:.4f} "
                      f"on {mix['calibration_tokens']} calibration tokens (from measured sensitivities)")
    elif f.get("mix_note"):
        command = f": {f['mix_command']}" if f.get("mix_command") else ""
        console.print(f"[bold]fitted mix:[/] {f['mix_note']}{command}")


def print_plan_table(teacher: str, arch: ModelArch, plans: list[Plan], console: Console | None = None) -> None:
    """One line per profile: the demo's overview."""
    console = console or make_console()
    t = Table(title=f"{teacher}: {arch.n_params / 1e6:.0f}M params, {arch.n_layers} layers, on every profile")
    for col in ("profile", "quant", "total", "budget", "fits", "est. decode tok/s", "goal", "decision", "student"):
        t.add_column(col)
    for p in plans:
        s = p.student
        t.add_row(p.profile, p.quant, _mb(p.total_bytes), _mb(p.budget_bytes), "yes" if p.fits else "[red]no[/]",
                  f"{p.estimated_decode_tokens_per_s:.1f}", f"{p.latency_goals['decode_tokens_per_s']:g}", p.decision,
                  f"{s['layers']} layers, {s['params'] / 1e6:.0f}M" if s else "-")
    console.print(t)
