"""The ``edgeforge`` command line. Each command's docstring is its help; ``--json`` gives what a script reads.

Library code raises :class:`edgeforge.errors.EdgeforgeError`; this module alone turns errors into one line on
stderr and an exit code (2: bad input, 1: a quality gate failed, 3: an internal error, 130: interrupted).
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from edgeforge import __version__
from edgeforge.cli.common import FORCE_OPTION, JSON_OPTION, PROFILES_DIR_OPTION, print_json
from edgeforge.errors import BadInputError, EdgeforgeError

_print_json = print_json


class EdgeforgeGroup(click.Group):
    """Runs a command and converts every failure into one clear line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = "--debug" in sys.argv[1:] or os.environ.get("EDGEFORGE_DEBUG") == "1"
        if "--json" in sys.argv[1:]:  # a script reads the output: plain progress lines, no bar frames
            from edgeforge.progress import set_style

            set_style("lines")
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if debug:
                raise
            # click's own refusals (a bad number, a choice not offered, a missing option) as one line too, not its
            # usage block: the same contract as every other bad input (exit 2)
            where = e.ctx.command_path if e.ctx is not None else "edgeforge"
            click.echo(f"edgeforge: error: {' '.join(e.format_message().split())} (see '{where} --help')", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except EdgeforgeError as e:
            if debug:
                raise
            # One line, whatever the message carries (a file name or a quoted value may hold a newline).
            click.echo(f"edgeforge: error: {' '.join(str(e).split())}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("edgeforge: interrupted; finished stages are kept and a rerun resumes", err=True)
            ctx.exit(130)
        except Exception as e:  # noqa: BLE001 - the last line of defence against a traceback
            if debug:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"edgeforge: internal error: {type(e).__name__}: {first} (rerun with --debug for the "
                       "traceback, and please report it)", err=True)
            ctx.exit(3)


@click.group(cls=EdgeforgeGroup)
@click.version_option(__version__, prog_name="edgeforge")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """edgeforge: take a language model to an edge device.

    Plan (does it fit, how fast, distill or fine-tune), then build, export, benchmark and ship.
    """


# ---------------------------------------------------------------- profiles
@cli.group()
def profiles() -> None:
    """Device profiles: what a device can hold and how fast it moves bytes."""


def _profile_row(p: Any) -> dict[str, Any]:
    return {
        "name": p.name,
        "description": p.description,
        "memory_budget_bytes": p.memory_budget_bytes,
        "memory_bandwidth_bytes_per_s": p.memory_bandwidth_bytes_per_s,
        "backend": p.primary_runtime.backend,
        "decode_goal_tokens_per_s": p.latency_goals.decode_tokens_per_s,
    }


@profiles.command("list")
@PROFILES_DIR_OPTION
@JSON_OPTION
def profiles_list(profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """List the known device profiles."""
    from edgeforge.plan.profiles import load_registry

    reg = load_registry(profiles_dirs)
    if as_json:
        _print_json([p.model_dump(mode="json") for p in reg])
        return
    from rich.table import Table

    t = Table(title=f"{len(reg)} device profiles")
    for col in ("name", "budget", "bandwidth", "backend", "decode goal", "description"):
        t.add_column(col)
    for p in reg:
        t.add_row(p.name, f"{p.memory_budget_bytes / 2**30:.1f} GiB",
                  f"{p.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s",
                  p.primary_runtime.backend, f"{p.latency_goals.decode_tokens_per_s:g} tok/s", p.description)
    from edgeforge.cli.render import make_console

    make_console().print(t)


@profiles.command("show")
@click.argument("name")
@PROFILES_DIR_OPTION
@JSON_OPTION
def profiles_show(name: str, profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Show one profile (by name, or a YAML file path)."""
    from edgeforge.plan.profiles import resolve_profile

    p = resolve_profile(name, profiles_dirs)
    if as_json:
        _print_json(p.model_dump(mode="json"))
    else:
        import yaml

        click.echo(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False).rstrip())


@profiles.command("validate")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@JSON_OPTION
def profiles_validate(paths: tuple[Path, ...], as_json: bool) -> None:
    """Validate profile files (default: every built-in profile). Exits 2 on the first broken file."""
    from edgeforge.paths import yaml_files
    from edgeforge.plan.profiles import BUILTIN_PROFILES_DIR, load_profile_file

    files = [f for p in (paths or (BUILTIN_PROFILES_DIR,)) for f in yaml_files(Path(p))]
    if not files:
        raise BadInputError("no profile files found to validate")
    errors, names = [], {}
    for f in files:
        try:
            prof = load_profile_file(f)
            if prof.name in names:
                errors.append(f"{f}: profile name '{prof.name}' is already used by {names[prof.name]}")
            names[prof.name] = f
        except EdgeforgeError as e:
            errors.append(str(e))
    if as_json:
        _print_json({"valid": not errors, "files": [str(f) for f in files], "errors": errors})
    else:
        for f in files:
            click.echo(f"ok  {f}" if not any(str(f) in e for e in errors) else f"BAD {f}")
    if errors:
        raise BadInputError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))


@profiles.command("detect")
@click.option("--name", default="this-machine", show_default=True, help="Name of the detected profile.")
@click.option("--out", type=click.Path(path_type=Path), help="Write the profile YAML here.")
@click.option("--calibrate", is_flag=True, default=False,
              help="Also measure llama.cpp's decode here (a read rate per GGML type and the time per layer) on "
              "synthetic models (about three minutes): the speed estimates then use them.")
@FORCE_OPTION
@JSON_OPTION
def profiles_detect(name: str, out: Path | None, calibrate: bool, force: bool, as_json: bool) -> None:
    """Build a profile of this machine: cores, RAM, ISA flags, measured memory bandwidth."""
    from edgeforge.fileio import write_text_atomic
    from edgeforge.outputs import claim_output
    from edgeforge.plan.detect import detect_profile, profile_to_yaml

    if out:
        claim_output(out, kind="profile", force=force)
    p = detect_profile(name)
    if calibrate:
        p = calibrated(p)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, profile_to_yaml(p))
    if as_json:
        _print_json(p.model_dump(mode="json"))
    else:
        click.echo(profile_to_yaml(p).rstrip())
        if out:
            click.echo(f"# written to {out}", err=True)


def calibrated(profile: Any) -> Any:
    """``profile`` calibrated with llama.cpp on the synthetic models (edgeforge.bench.calibrate)."""
    import tempfile

    from edgeforge.bench.calibrate import calibrate_profile
    from edgeforge.export.calibration_model import CALIBRATION_TYPES, calibration_ggufs

    with tempfile.TemporaryDirectory(prefix="edgeforge-calibrate-") as tmp:
        click.echo(f"calibrating: synthetic models at {len(CALIBRATION_TYPES)} GGML types through llama.cpp's "
                   "converter, quantizer and device_bench", err=True)
        return calibrate_profile(profile, calibration_ggufs(Path(tmp), profile.cpu.cores))


# ---------------------------------------------------------------- models
@cli.group()
def models() -> None:
    """Models: aliases, and the architecture read from config.json or GGUF metadata."""


@models.command("show")
@click.argument("model", required=False)
@JSON_OPTION
def models_show(model: str | None, as_json: bool) -> None:
    """Show a model's architecture without loading its weights (default: the bundled teacher)."""
    from edgeforge.models.refs import read_arch, resolve_model

    ref = resolve_model(model)
    arch = read_arch(ref)
    data = {"name": ref.name, "path": str(ref.path), "format": ref.format, **arch.to_dict()}
    if as_json:
        _print_json(data)
    else:
        for k, v in data.items():
            click.echo(f"{k:18} {v}")


@models.command("list")
@JSON_OPTION
def models_list(as_json: bool) -> None:
    """List built-in model aliases."""
    from edgeforge.models.refs import alias_names, resolve_model

    rows = [{"alias": a, "path": str(resolve_model(a).path)} for a in alias_names()]
    if as_json:
        _print_json(rows)
    else:
        for r in rows:
            click.echo(f"{r['alias']}  {r['path']}")


# ---------------------------------------------------------------- plan
@cli.command()
@click.option("--profile", "profile_name", required=True, help="Device profile name or YAML path.")
@click.option("--teacher", default=None, help="HF model dir, .gguf file or alias [default: smollm2-135m-instruct].")
@click.option("--context", default=2048, show_default=True, type=click.IntRange(min=16), help="Context tokens.")
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(min=1),
              help="Prompt length for the TTFT estimate.")
@click.option("--quant", default=None, help="Quant type to plan for (default: the profile's preferred types).")
@click.option("--format", "fmt", type=click.Choice(["gguf", "onnx"]), default=None,
              help="Artifact format (default: the profile's primary runtime).")
@click.option("--task", default=None, help="Fine-tuning task (built-in name or JSONL path): its examples, tokenized "
              "with the teacher's tokenizer, give the fine-tuning tokens and training memory; plan distill+fine-tune "
              "when compressing.")
@click.option("--train-profile", default="rtx-4090-24gb", show_default=True,
              help="Profile of the machine that trains (for time, cost and training memory).")
@click.option("--price-per-hour", type=click.FloatRange(min=0), default=None,
              help="Price of the training machine per hour, for the cost estimate.")
@click.option("--distill-tokens", type=click.IntRange(min=1), default=100_000_000, show_default=True)
@click.option("--finetune-tokens", type=click.IntRange(min=1), default=None,
              help="Fine-tuning tokens for the cost [default: from --task's examples, else 2,000,000].")
@PROFILES_DIR_OPTION
@JSON_OPTION
def plan(profile_name: str, teacher: str | None, context: int, prompt_tokens: int, quant: str | None,
         fmt: str | None, task: str | None, train_profile: str, price_per_hour: float | None, distill_tokens: int,
         finetune_tokens: int | None, profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Does the model fit the device, how fast will it run, and should it be fine-tuned, distilled, or both?"""
    from edgeforge.models.refs import read_arch, resolve_model
    from edgeforge.plan import planner
    from edgeforge.plan.profiles import load_registry, resolve_profile
    from edgeforge.plan.sizing import GGUF_QUANT_TYPES, ONNX_BITS_PER_WEIGHT

    profile = resolve_profile(profile_name, profiles_dirs)
    if quant is not None:
        known = {**GGUF_QUANT_TYPES, **ONNX_BITS_PER_WEIGHT}
        if quant not in known:
            raise BadInputError(f"unknown quant type '{quant}'; expected one of {', '.join(known)}")
        fmt = fmt or ("onnx" if quant in ONNX_BITS_PER_WEIGHT else "gguf")
    train = load_registry(profiles_dirs).get(train_profile) if train_profile else None
    ref = resolve_model(teacher)
    arch = read_arch(ref)
    cost = None
    if task is not None:
        from edgeforge.finetune.task_cost import task_cost

        cost = task_cost(task, ref)
    try:
        result = planner.plan(arch, profile, ref.name, context=context, quant=quant, fmt=fmt,
                              prompt_tokens=prompt_tokens, has_task=task is not None, train_profile=train,
                              price_per_hour=price_per_hour, distill_tokens=distill_tokens,
                              finetune_tokens=finetune_tokens, task=cost)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    from edgeforge.plan.exportability import check_exportable

    gate = check_exportable(ref)
    needed = {r.format for r in profile.runtimes}
    result.exportability = {fmt: v for fmt, v in gate.items() if fmt in needed or fmt == "training"}
    if result.gguf_fit and result.gguf_fit["between_presets"]:
        _attach_fitted_mix(result, ref, teacher, profile.name, context)
    if result.onnx_fit and result.onnx_fit["between_presets"]:
        # the ONNX fit measures its groups on the fp32 graph, which a plan does not make: the command, or the note
        result.onnx_fit["mix"] = None
        if result.student:
            result.onnx_fit["mix_note"] = "measured on the distilled student's graph when the build exports it"
            result.onnx_fit["mix_command"] = None
        else:
            result.onnx_fit["mix_note"] = "measured on the fp32 graph by export onnx --quantize fit (cached after)"
            result.onnx_fit["mix_command"] = (f"edgeforge export onnx {teacher or 'smollm2-135m-instruct'} --quantize "
                                              f"fit --profile {profile.name} --context {context} --out OUT_DIR")
    if as_json:
        _print_json(result.to_dict())
    else:
        from edgeforge.cli.render import print_plan

        print_plan(result)


def _attach_fitted_mix(result: Any, ref: Any, teacher: str | None, profile_name: str, context: int) -> None:
    """The per-group mix ``export gguf --quant fit`` would write for the plan's budget, when the model exists as a
    GGUF file and its sensitivities were measured before (a plan measures nothing); else the command that
    measures it. A student to distill does not exist yet: its mix is measured when the build exports it."""
    fit = result.gguf_fit
    command = (f"edgeforge export gguf {teacher or 'smollm2-135m-instruct'} --quant fit --profile {profile_name} "
               f"--context {context} --out OUT.gguf")
    fit["mix"], fit["mix_command"] = None, None
    if result.student:
        fit["mix_note"] = "measured on the distilled student's file when the build exports it"
        return
    if ref.format != "gguf":
        fit["mix_note"] = "measured on the converted file by export gguf --quant fit"
        fit["mix_command"] = command
        return
    from edgeforge.data.builtin import calibration_text
    from edgeforge.export.fit.mix import cached_fit
    from edgeforge.export.gguf import installed_version
    from edgeforge.paths import edgeforge_home

    mix = cached_fit(ref.path, fit["budget_bytes"], calibration_text(), edgeforge_home() / "fit-sensitivity",
                     installed_version("llama-cpp-python"))
    if mix is None:
        fit["mix_note"] = "not measured yet for this file: the command below measures it, then plan shows it"
        fit["mix_command"] = command
        return
    counts: dict[str, int] = {}
    for t in mix.types.values():
        counts[t] = counts.get(t, 0) + 1
    fit["mix"] = {"group_types": mix.types, "groups_per_type": counts, "planned_file_bytes": mix.group_bytes +
                  mix.fixed_bytes, "predicted_mean_kl": mix.predicted_mean_kl,
                  "calibration_tokens": mix.sensitivity.n_tokens}


# ---------------------------------------------------------------- export / eval
# ---------------------------------------------------------------- demo
@cli.command()
@click.option("--teacher", default=None, help="Model to plan [default: the bundled teacher].")
@JSON_OPTION
def demo(teacher: str | None, as_json: bool) -> None:
    """The main job on the embedded default: the plan for the bundled teacher on every profile."""
    from edgeforge.models.refs import read_arch, resolve_model
    from edgeforge.plan import planner
    from edgeforge.plan.profiles import load_registry

    ref = resolve_model(teacher)
    arch = read_arch(ref)
    reg = load_registry()
    plans = [planner.plan(arch, p, ref.name, has_task=True) for p in reg]
    if as_json:
        _print_json([p.to_dict() for p in plans])
        return
    from edgeforge.cli.render import print_plan_table

    print_plan_table(ref.name, arch, plans)


# Commands that live in their own modules (one concept per module); each module has register(cli).
COMMAND_MODULES = ("edgeforge.cli.bench", "edgeforge.cli.build", "edgeforge.cli.distill", "edgeforge.cli.export",
                   "edgeforge.cli.finetune")


def _register_optional_groups() -> None:
    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(cli)


_register_optional_groups()


def main() -> None:
    cli(prog_name="edgeforge")


if __name__ == "__main__":
    main()
