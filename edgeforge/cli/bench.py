"""``edgeforge bench`` and ``edgeforge targets``: measure artifacts on real devices, and manage those devices.

Registered onto the main group by :func:`register` (``edgeforge.cli.app`` calls it); errors are raised as
``EdgeforgeError`` and printed as one line by the main group.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from edgeforge.cli.common import JSON_OPTION, PROFILES_DIR_OPTION, print_json

TARGETS_DIR_OPTION = click.option(
    "--targets-dir", "targets_dirs", multiple=True, type=click.Path(path_type=Path),
    help="Extra folder or YAML file of targets (repeatable; also EDGEFORGE_TARGETS).",
)
_print_json = print_json


def _log(message: str) -> None:
    click.echo(f"edgeforge: {message}", err=True)


def _console() -> Any:
    from edgeforge.cli.render import make_console

    return make_console()


class DefaultCommandGroup(click.Group):
    """A group that runs its default command when the first argument is not one of its subcommands.

    ``edgeforge bench model.gguf --target local`` runs ``bench run``; ``edgeforge bench compare a.json`` compares.
    """

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a benchmark like Ctrl-C does: every target cleans up, then exit 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- bench
@click.group(cls=DefaultCommandGroup)
def bench() -> None:
    """Measure artifacts on real devices: edgeforge bench ARTIFACT... [--target local|NAME|PATH.yaml] [options].

    Runs device_bench (llama.cpp for .gguf, onnxruntime for ONNX export directories) on each target, shows the
    planner's estimate beside each measurement, and saves each result as <artifact>.bench-<target>.json.
    'edgeforge bench compare RESULT.json...' compares saved results. Options: 'edgeforge bench run --help'.
    """


@bench.command("run")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--target", "target_names", multiple=True, default=("local",), show_default=True,
              help="local, a target name, or a target YAML path; repeat to measure several devices in parallel.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads [default: what the artifact ships in its runtime.json, else the device's cores].")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompt length for TTFT and prefill.")
@click.option("--gen-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Tokens to decode.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Counted runs per measurement (after one warm-up).")
@click.option("--decode-depths", default="", metavar="N[,N...]",
              help="Also decode --gen-tokens after a prompt of each depth N (llama-bench's tg @ dN).")
@click.option("--sustained", "sustained_s", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
              help="First decode without pause for SECONDS: tokens/s per window, CPU frequency and governor, "
                   "temperatures and energy before and after (what the device exposes).")
@click.option("--window-s", type=click.FloatRange(min=1), default=10.0, show_default=True,
              help="Window length of --sustained, seconds.")
@click.option("--setup", is_flag=True,
              help="Install the runtime on the target with pip --user when it is missing (otherwise nothing is "
                   "installed).")
@TARGETS_DIR_OPTION
@PROFILES_DIR_OPTION
@JSON_OPTION
def bench_run(artifacts: tuple[Path, ...], target_names: tuple[str, ...], threads: int | None, prompt_tokens: int,
              gen_tokens: int, repeats: int, decode_depths: str, sustained_s: float | None, window_s: float,
              setup: bool, targets_dirs: tuple[Path, ...], profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Benchmark ARTIFACT... (.gguf files, ONNX export directories) on each --target."""
    from edgeforge.bench.artifact import local_artifact
    from edgeforge.bench.results import results_table, sustained_table
    from edgeforge.bench.run import BenchOptions, jobs_for, run_benchmarks
    from edgeforge.bench.targets import resolve_target

    targets = [resolve_target(n, targets_dirs) for n in dict.fromkeys(target_names)]
    for a in artifacts:  # a wrong path fails now, not after this machine's bandwidth has been measured
        local_artifact(a)
    if sustained_s is not None and sustained_s < window_s:
        raise click.BadParameter(f"{sustained_s:g} s is shorter than one window (--window-s {window_s:g})",
                                 param_hint="'--sustained'")
    options = BenchOptions(threads=threads, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeats=repeats,
                           setup=setup, decode_depths=_depths(decode_depths), sustained_s=sustained_s,
                           window_s=window_s)
    with _sigterm_as_interrupt():
        jobs = jobs_for(targets, profiles_dirs, log=_log)
        results = run_benchmarks(artifacts, jobs, options, log=_log)
    if as_json:
        _print_json(results[0] if len(results) == 1 else results)
        return
    _console().print(results_table(results))
    for r in results:
        if r.get("sustained"):
            _console().print(sustained_table(r))


def _depths(text: str) -> tuple[int, ...]:
    """``--decode-depths``: comma-separated whole numbers >= 1."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"expected comma-separated token counts such as 512,2048, got {text!r}",
                                 param_hint="'--decode-depths'")
    return tuple(sorted({int(p) for p in parts}))


@bench.command("compare")
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@JSON_OPTION
def bench_compare(results: tuple[Path, ...], as_json: bool) -> None:
    """Compare saved results (<artifact>.bench-<target>.json, or a list from 'bench --json') in one table."""
    from edgeforge.bench.results import load_results, results_table

    loaded = load_results(results)
    if as_json:
        _print_json(loaded)
        return
    _console().print(results_table(loaded, title=f"{len(loaded)} benchmark results"))


# ---------------------------------------------------------------- targets
@click.group()
def targets() -> None:
    """Targets: the devices 'edgeforge bench' runs on (local, ssh, adb), defined in targets/*.yaml."""


@targets.command("list")
@TARGETS_DIR_OPTION
@JSON_OPTION
def targets_list(targets_dirs: tuple[Path, ...], as_json: bool) -> None:
    """List the known targets (nothing is contacted)."""
    from edgeforge.bench.targets import describe_address, load_target_registry

    reg = load_target_registry(targets_dirs)
    rows = [{"name": t.name, "type": t.type, "address": describe_address(t),
             "profile": t.profile or "this-machine (detected)", "file": str(reg.origin(t.name) or "(built in)"),
             "description": t.description} for t in reg]
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} targets")
    for col in ("name", "type", "address", "profile", "file"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["type"], r["address"], r["profile"], r["file"])
    _console().print(table)


@targets.command("check")
@click.argument("name")
@TARGETS_DIR_OPTION
@PROFILES_DIR_OPTION
@JSON_OPTION
def targets_check(name: str, targets_dirs: tuple[Path, ...], profiles_dirs: tuple[Path, ...],
                  as_json: bool) -> None:
    """Validate target NAME (or a YAML path), resolve its profile, reach it and list its Python and runtimes.

    Installs nothing on the target.
    """
    from edgeforge.bench.run import target_profile
    from edgeforge.bench.targets import check_target, resolve_target

    target = resolve_target(name, targets_dirs)
    if target.profile is None:
        profile_name = "this-machine (detected at bench time)"
    else:
        profile_name = target_profile(target, profiles_dirs).name
    with _sigterm_as_interrupt():
        info = check_target(target)
    info["profile"] = profile_name
    if as_json:
        _print_json(info)
        return
    for key in ("name", "type", "address", "profile", "python_path", "python", "machine", "llama_cpp",
                "onnxruntime", "workdir_writable"):
        click.echo(f"{key:18} {info[key]}")
    if not (info["llama_cpp"] or info["onnxruntime"]):
        click.echo("note: no runtime found; 'edgeforge bench --setup' installs the one an artifact needs", err=True)


def register(cli: click.Group) -> None:
    """Add the ``bench`` and ``targets`` groups to the main CLI (a duplicate name is an error)."""
    for group in (bench, targets):
        if group.name in cli.commands:
            raise ValueError(f"command '{group.name}' is already registered")
        cli.add_command(group)
