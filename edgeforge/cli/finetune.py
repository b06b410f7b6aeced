"""``edgeforge finetune``: LoRA / DoRA / QLoRA task adaptation with a forgetting check and a verified merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgeforge.cli.common import FORCE_OPTION
from edgeforge.cli.options import options_from
from edgeforge.finetune.config import FinetuneConfig
from edgeforge.outputs import claim_output_in_place


@click.command("finetune")
@click.argument("model")
@click.option("--task", default=None, help="Built-in task name (home-commands) or a JSONL path.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Task JSONL: chat ('messages') or 'prompt'/'completion' lines; 10% is held out.")
@options_from(FinetuneConfig)
@click.option("--merge", is_flag=True,
              help="Merge the adapter: --out becomes the merged model, the adapter goes to out/adapter.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True)
@FORCE_OPTION
def finetune_cmd(model: str, task: str | None, data: Path | None, merge: bool, resume: bool, out: Path,
                 as_json: bool, force: bool, **settings: Any) -> None:
    """Fine-tune MODEL on a task with LoRA, DoRA or QLoRA; report task accuracy and forgetting before/after."""
    import json

    from edgeforge.errors import BadInputError
    from edgeforge.finetune.run import run_finetune

    if (task is None) == (data is None):
        raise BadInputError("give exactly one of --task NAME and --data PATH")
    cfg = FinetuneConfig(**settings)
    claim_output_in_place(out, "finetune", force)

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    record = run_finetune(model, out, cfg, task=task, data=data, merge=merge, resume=resume, log=log)
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
        return
    b, a = record["before"], record["after"]
    click.echo(f"task accuracy {b['task_accuracy']:.1%} -> {a['task_accuracy']:.1%}; valid JSON "
               f"{b['valid_json_rate']:.1%} -> {a['valid_json_rate']:.1%}; general perplexity "
               f"{b['general_perplexity']:.2f} -> {a['general_perplexity']:.2f}")
    if "merge" in record:
        m = record["merge"]
        click.echo(f"merged model in {out} (adapter in {out / 'adapter'}): max |logit diff| "
                   f"{m['logit_max_abs_diff']:.2e}, task accuracy {m['task_accuracy']:.1%}")
    else:
        click.echo(f"adapter in {out}")


def register(cli: click.Group) -> None:
    cli.add_command(finetune_cmd)
