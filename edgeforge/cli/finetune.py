"""``edgeforge finetune``: LoRA / DoRA / QLoRA task adaptation with a forgetting check and a verified merge."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("finetune")
@click.argument("model")
@click.option("--task", default=None, help="Built-in task name (home-commands) or a JSONL path.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Task JSONL: chat ('messages') or 'prompt'/'completion' lines; 10% is held out.")
@click.option("--method", type=click.Choice(["lora", "dora", "qlora"]), default="lora", show_default=True,
              help="LoRA; DoRA (weight-decomposed, steadier across ranks); QLoRA (NF4 4-bit base, double quant).")
@click.option("--rank", type=click.IntRange(min=1), default=16, show_default=True,
              help="Adapter rank: 8-16 for tiny models, 32-64 for large ones.")
@click.option("--alpha", type=click.IntRange(min=1), default=None, help="LoRA alpha [default: 2 x rank].")
@click.option("--dropout", type=click.FloatRange(0, 1), default=0.05, show_default=True)
@click.option("--target-modules", default="all-linear", show_default=True,
              help="Comma-separated module names, or all-linear.")
@click.option("--rslora", is_flag=True, help="Rank-stabilised LoRA scaling (alpha / sqrt(rank)).")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--l2sp", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="L2-SP penalty towards the starting weights, to limit forgetting.")
@click.option("--mix-general", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of batches of general text mixed in, to limit forgetting.")
@click.option("--eval-examples", type=click.IntRange(min=1), default=100, show_default=True,
              help="Held-out examples for task accuracy (greedy generation).")
@click.option("--merge", is_flag=True,
              help="Merge the adapter: --out becomes the merged model, the adapter goes to out/adapter.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps between checkpoints (what --resume continues from after a crash or kill).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--rank-sweep", default=None, metavar="R1,R2,...",
              help="LoRA rank selection: train each rank briefly, pick by validation accuracy per trainable "
              "parameter, then run the full budget at that rank (overrides --rank).")
@click.option("--rank-sweep-steps", type=click.IntRange(min=1), default=None,
              help="Steps per swept rank [default: max(10, steps / 5)].")
@click.option("--layerwise-lr-decay", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Layer-wise learning rate: lr x decay^(distance from the top layer) (1: off).")
@click.option("--ewc", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="EWC strength λ against forgetting: λ/2 Σ F (θ − θ0)², F the diagonal Fisher on general text "
              "(normalised to mean 1).")
@click.option("--ewc-batches", type=click.IntRange(min=1), default=8, show_default=True,
              help="General-text sequences for the EWC Fisher estimate.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True)
def finetune_cmd(model: str, task: str | None, data: Path | None, method: str, rank: int, alpha: int | None,
                 dropout: float, target_modules: str, rslora: bool, steps: int, lr: float, batch_size: int, seed: int,
                 l2sp: float, mix_general: float, eval_examples: int, merge: bool, checkpoint_every: int, resume: bool,
                 rank_sweep: str | None, rank_sweep_steps: int | None, layerwise_lr_decay: float, ewc: float,
                 ewc_batches: int, out: Path, as_json: bool) -> None:
    """Fine-tune MODEL on a task with LoRA, DoRA or QLoRA; report task accuracy and forgetting before/after."""
    import json

    from edgeforge.errors import BadInputError
    from edgeforge.finetune.config import FinetuneConfig
    from edgeforge.finetune.run import run_finetune

    if (task is None) == (data is None):
        raise BadInputError("give exactly one of --task NAME and --data PATH")
    from edgeforge.finetune.techniques.rank_sweep import parse_ranks

    try:
        ranks = parse_ranks(rank_sweep) if rank_sweep else ()
    except ValueError as e:
        raise BadInputError(f"--rank-sweep: {e}") from None
    modules: str | list[str] = target_modules if target_modules == "all-linear" else [
        m.strip() for m in target_modules.split(",") if m.strip()]
    cfg = FinetuneConfig(method=method, rank=rank, alpha=alpha, dropout=dropout, target_modules=modules,  # type: ignore[arg-type]
                         rslora=rslora, steps=steps, lr=lr, batch_size=batch_size, seed=seed, l2sp=l2sp,
                         mix_general=mix_general, eval_examples=eval_examples, checkpoint_every=checkpoint_every,
                         rank_sweep=ranks, rank_sweep_steps=rank_sweep_steps, layerwise_lr_decay=layerwise_lr_decay,
                         ewc=ewc, ewc_batches=ewc_batches)
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
