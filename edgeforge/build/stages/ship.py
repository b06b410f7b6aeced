"""The last step of a build: the ship folder ``OUT/ship``, assembled in ``OUT/ship.partial`` and renamed into place
when complete (so a killed build never leaves half a ship folder under the final name). It is not a cached stage:
it copies what the stages produced and always runs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgeforge.build.stage import BuildContext, BuildState
from edgeforge.build.summary import bench_row, summary
from edgeforge.fileio import write_json_atomic
from edgeforge.models.files import tokenizer_files

#: Shipped in ``ship/tokenizer/`` beside the tokenizer's own files: what a runtime needs to build its prompt.
MODEL_SIDE_FILES = ("generation_config.json", "config.json")


def ship_folder(ctx: BuildContext, state: BuildState) -> tuple[Path, dict[str, Any]]:
    """Write ``OUT/ship`` from the build state; returns its path and the build summary."""
    from edgeforge.ship.folder import write_ship

    ship = ctx.out / "ship"
    partial = ctx.out / "ship.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    assert state.model_dir is not None
    rows = [copy_artifact(a, partial, state.bench) for a in state.artifacts]
    tok_dir = partial / "tokenizer"
    tok_dir.mkdir()
    side = [state.model_dir / f for f in MODEL_SIDE_FILES if (state.model_dir / f).is_file()]
    for src in [*tokenizer_files(state.model_dir), *side]:
        shutil.copy2(src, tok_dir / src.name)
    write_records(ctx, state, partial / "records")
    build_summary = summary(ctx, state, rows)
    write_ship(partial, build_summary)
    shutil.rmtree(ship, ignore_errors=True)
    partial.rename(ship)
    return ship, build_summary


def copy_artifact(a: dict[str, Any], folder: Path, bench: list[dict[str, Any]]) -> dict[str, Any]:
    """Copy one verified artifact (and a GGUF's export record) into ``folder``; returns its ship row."""
    from edgeforge.export.gguf import record_path
    from edgeforge.ship.runtime_settings import runtime_settings_path

    src = Path(a["path"])
    name = src.name if a["format"] == "gguf" else f"onnx-{a['quant']}"
    dst = folder / name
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
        for side in (record_path(src), runtime_settings_path(src)):
            if side.is_file():
                shutil.copy2(side, folder / side.name)
    measured = [r for r in bench if Path(str(r.get("artifact", ""))).name == src.name]
    return {"path": name, "format": a["format"], "quant": a["quant"], "size_bytes": a["size_bytes"],
            "verify": a["verify"], "task_accuracy": (a.get("task") or {}).get("task_accuracy"),
            "task": a.get("task"), "tried": a.get("tried"), "bench": [bench_row(r) for r in measured]}


def write_records(ctx: BuildContext, state: BuildState, records: Path) -> None:
    """The stage records the ship folder keeps: distill, fine-tune (and the fine-tuned teacher's), the plan, the
    benchmarks."""
    records.mkdir()
    if state.distill is not None:
        write_json_atomic(records / "distill.json", state.distill)
    if state.finetune is not None:
        write_json_atomic(records / "finetune.json", state.finetune)
    if state.teacher_finetune is not None:
        write_json_atomic(records / "finetune-teacher.json", state.teacher_finetune)
    write_json_atomic(records / "plan.json", ctx.plan.to_dict())
    if state.bench:
        write_json_atomic(records / "bench.json", state.bench)
