"""``edgeforge build``: one command from a device profile to a ship folder (see edgeforge/build/builder.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgeforge.cli.common import FORCE_OPTION, JSON_OPTION, PROFILES_DIR_OPTION, print_json
from edgeforge.outputs import claim_output, claim_output_in_place


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def register(cli: click.Group) -> None:
    cli.add_command(build_cmd)


@click.command("build")
@click.option("--profile", "profile_name", default=None, help="Device profile name or YAML (edgeforge profiles list).")
@click.option("--teacher", default=None, help="HF dir, .gguf or alias [default: the bundled teacher].")
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Distillation data: .txt / JSONL / chat JSONL (repeatable) [default: built-in].")
@click.option("--task", default=None, help="Fine-tuning task: built-in name or JSONL path [default: home-commands].")
@click.option("--no-task", is_flag=True, help="No fine-tuning task (the plan then distills or ships as is).")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Pipeline YAML path, or a built-in pipeline's name (finetune-then-distill); flags override "
                   "it.")
@click.option("--target", default=None, help="Also benchmark on this target (name in targets/ or a YAML path).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("edgeforge-build"), show_default=True,
              help="Build folder: stage cache in OUT/.stages, the ship folder in OUT/ship.")
@click.option("--distill-steps", type=click.IntRange(min=1), default=None, help="Override distill.steps.")
@click.option("--finetune-steps", type=click.IntRange(min=1), default=None, help="Override finetune.steps.")
@click.option("--seed", type=int, default=None, help="Override seed.")
@click.option("--no-bench", is_flag=True, help="Skip benchmarking.")
@click.option("--dry-run", is_flag=True, help="Print the stages, their cache keys and which would be skipped.")
@FORCE_OPTION
@PROFILES_DIR_OPTION
@JSON_OPTION
def build_cmd(profile_name: str | None, teacher: str | None, data: tuple[Path, ...], task: str | None, no_task: bool,
              config_path: Path | None, target: str | None, out: Path, distill_steps: int | None,
              finetune_steps: int | None, seed: int | None, no_bench: bool, dry_run: bool, force: bool,
              profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Plan, distill and/or fine-tune, export, verify, benchmark and ship a model for a device profile.

    Exit codes: 0 success; 1 a quality gate failed (artifacts kept, reason printed); 2 bad input.
    """
    from edgeforge.build.builder import Builder, run_build
    from edgeforge.build.builder import dry_run as describe
    from edgeforge.build.config import load_pipeline
    from edgeforge.errors import BadInputError

    if task is not None and no_task:
        raise BadInputError("give --task NAME|PATH or --no-task, not both")
    cfg = load_pipeline(config_path)
    cfg = cfg.with_overrides({
        "profile": profile_name, "teacher": teacher, "data": [str(p) for p in data] or None,
        "task": task, "target": target, "distill.steps": distill_steps, "finetune.steps": finetune_steps,
        "seed": seed, "bench.enabled": False if no_bench else None,
    })
    if no_task:
        cfg = cfg.model_copy(update={"task": None})
    if dry_run:  # writes nothing: only refuses what a real run would refuse
        claim_output(out, "build", force)
    else:
        claim_output_in_place(out, "build", force)
    # Progress goes to stderr in every mode (stdout carries the JSON summary with --json).
    builder = Builder(cfg, out, tuple(profiles_dirs), log=_echo_err)
    if dry_run:
        rows = describe(builder)
        if as_json:
            print_json({"plan": {"decision": builder.plan.decision, "reason": builder.plan.reason}, "stages": rows})
            return
        click.echo(f"plan: {builder.plan.decision}: {builder.plan.reason}")
        click.echo(f"{'stage':<18} {'cache key':<26} {'state':<7} note")
        for r in rows:
            click.echo(f"{r['stage']:<18} {r['key']:<26} {r['state']:<7} {r['note']}")
        return
    result = run_build(builder)
    if as_json:
        print_json(result)
        return
    print_summary(result)


def print_summary(result: dict[str, Any]) -> None:
    """The end of a build: retention, task accuracy, size, measured speed, where the files are."""
    def pct(x: Any) -> str:
        return "-" if x is None else f"{x:.1%}"

    click.echo("")
    click.echo(f"build for {result['profile']} ({result['decision']}) in {result['seconds']:.0f} s; stages: "
               + ", ".join(f"{s['name']}{' (cached)' if s['cached'] else ''}" for s in result["stages"]))
    ret = result.get("retention") or {}
    after = ret.get("after") if isinstance(ret, dict) else ret
    if after is not None:
        click.echo(f"retention (teacher perplexity / student perplexity): {after:.3f}")
    if result.get("task_accuracy") is not None:
        click.echo(f"task accuracy (the exported model, fixed held-out set): {pct(result['task_accuracy'])}")
    decision = result.get("teacher_or_student") or {}
    if decision.get("rows"):
        click.echo("fine-tuned teacher or distilled student (the same fixed examples; planner estimates on the "
                   "profile):")
        for row in decision["rows"]:
            click.echo("  " + " | ".join(row))
        if decision.get("kept"):
            click.echo("  " + decision["kept"])
    click.echo(f"{'artifact':<52} {'size MB':>8} {'mean KL':>8} {'top-1':>7} {'task':>7} {'decode tok/s':>12}")
    for a in result["artifacts"]:
        dec = a.get("measured_decode_tokens_per_s")
        click.echo(f"{Path(a['file']).name[:52]:<52} {a['size_bytes'] / 1e6:>8.1f} {a['mean_kl']:>8.4f} "
                   f"{pct(a['top1_agreement']):>7} {pct(a['task_accuracy']):>7} "
                   f"{'-' if dec is None else f'{dec:.1f}':>12}")
    click.echo(f"ship folder: {result['ship_dir']} (manifest.json, README.md, Modelfile, report.html)")
