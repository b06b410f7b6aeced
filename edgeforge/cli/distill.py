"""``edgeforge distill``: knowledge distillation of a teacher into a smaller student (edgeforge.distill.run).

Also the side-by-side table ``edgeforge eval STUDENT_DIR --reference TEACHER`` prints for a distilled student
(``eval_student``, dispatched from the ``eval`` command for HF directories holding a distill.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgeforge.cli.common import FORCE_OPTION
from edgeforge.cli.options import options_from
from edgeforge.outputs import claim_output_in_place


def _echo_err(msg: str) -> None:
    click.echo(msg, err=True)


def register(cli: click.Group) -> None:
    """Add the ``distill`` command to ``cli``; its options are DistillConfig's fields (edgeforge.cli.options)."""
    from edgeforge.distill.config import DistillConfig

    if "distill" in cli.commands:
        raise ValueError("a 'distill' command is already registered")

    @cli.command("distill")
    @options_from(DistillConfig, skip=("out",))
    @click.option("--out", type=click.Path(path_type=Path), required=True, help="The student's HF directory.")
    @click.option("--json", "as_json", is_flag=True, help="Print distill.json's headline as JSON.")
    @FORCE_OPTION
    def distill_cmd(out: Path, as_json: bool, force: bool, **settings: Any) -> None:
        """Distill a teacher into a smaller student and write it as an HF directory (+ distill.json).

        The student comes from --profile (the planner's shape), --student-layers N (pruned from the teacher), or
        --student DIR. Works the same under `torchrun --nproc_per_node N -m edgeforge distill ...` (DDP, or FSDP
        with --parallel fsdp).

        Techniques (docs/techniques.md), each measured against plain KD: --progressive, --curriculum,
        --self-distill, --task-loss rationale (distilling step-by-step), --extra-teacher (multi-teacher),
        --on-policy-ratio (on-policy, GKD-style).
        """
        from edgeforge.distill.record import record_summary
        from edgeforge.distill.run import run_distill
        from edgeforge.train.loop import is_main_process

        if is_main_process():  # under torchrun the main process alone checks (and with --force clears) --out
            claim_output_in_place(out, "distill", force)
        record = run_distill(DistillConfig(out=out, **settings), log=None if as_json else _echo_err)
        if not is_main_process():
            return
        if as_json:
            click.echo(json.dumps(record_summary(record), indent=2, default=str))
            return
        click.echo(f"wrote {out} (student {record['student']['params'] / 1e6:.1f}M params; distill.json)")
        print_table(_rows_from_record(record))


def _rows_from_record(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": "teacher", **record["teacher"]}, {"model": "initial student", **record["before"]},
            {"model": "distilled student", **record["after"]}]


def print_table(rows: list[dict[str, Any]]) -> None:
    """Teacher, initial and distilled student side by side."""
    click.echo(f"{'model':<48} {'perplexity':>10} {'KL(teacher||model)':>19} {'top-1':>7} {'retention':>9}")
    for r in rows:
        click.echo(f"{r['model'][:48]:<48} {r['perplexity']:>10.2f} {r['kl_to_teacher']:>19.4f} "
                   f"{r['top1_agreement']:>7.1%} {r['retention']:>9.3f}")
    click.echo("retention = teacher perplexity / model perplexity on the held-out text")


def eval_student(student_dir: Path, reference: str | None, data: Path | None, tokens: int, as_json: bool) -> None:
    """``edgeforge eval`` on a distilled student's HF directory: teacher / initial / distilled student.

    Without --data and --tokens the held-out set is the distill run's own (the built-in held-out prose, same number
    of sequences and length), so the initial student's row, read from distill.json, is measured on the same tokens.
    """
    from click.core import ParameterSource

    from edgeforge.data.builtin import read_text_data
    from edgeforge.distill.evaluate import compare

    text = read_text_data(data) if data else None
    seq_len, n_seq = min(256, tokens), max(1, tokens // min(256, tokens))
    ctx = click.get_current_context(silent=True)
    record_path = student_dir / "distill.json"
    if ctx is not None and ctx.get_parameter_source("tokens") == ParameterSource.DEFAULT and record_path.is_file():
        info = json.loads(record_path.read_text(encoding="utf-8")).get("data", {})
        if info.get("heldout_sequences"):
            n_seq = int(info["heldout_sequences"])
            seq_len = int(info["heldout_tokens"]) // n_seq
    result = compare(student_dir, reference, text, n_seq=n_seq, seq_len=seq_len)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(f"{student_dir} vs {result['teacher']} on {result['n_tokens']} held-out tokens")
    print_table(result["rows"])
