"""``edgeforge build``: plan -> (distill) -> fine-tune -> merge -> export -> verify -> bench -> ship.

``Builder`` resolves a build's inputs (profile, teacher, data and task files, their content identities, the plan)
and constructs the stage configs from the pipeline settings; ``edgeforge.build.layout`` decides the stages and
``edgeforge.build.runner`` runs each of them against the stage cache (``edgeforge.build.cache``) under
``OUT/.stages``, so a rerun skips finished stages and a killed run resumes from the stage's own checkpoint. The ship
folder ``OUT/ship`` is assembled in ``OUT/ship.partial`` and renamed into place when complete.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeforge.build.cache import StageCache
from edgeforge.build.config import BUILD_ONLY_DISTILL_SETTINGS, PipelineConfig
from edgeforge.build.layout import layout
from edgeforge.build.runner import StageRunner
from edgeforge.build.stage import BuildState, Log
from edgeforge.build.stages.export import export_formats
from edgeforge.build.stages.ship import ship_folder
from edgeforge.build.summary import headline
from edgeforge.build.task_set import held_out_task_examples
from edgeforge.errors import BadInputError, QualityGateError
from edgeforge.fileio import content_identity, write_json_atomic

if TYPE_CHECKING:
    from edgeforge.distill.config import DistillConfig
    from edgeforge.finetune.config import FinetuneConfig
    from edgeforge.models.refs import ModelRef
    from edgeforge.plan.planner import Plan
    from edgeforge.plan.profiles import DeviceProfile


class Builder:
    """One build's resolved inputs and stage configs (the ``BuildContext`` every stage reads)."""

    def __init__(self, cfg: PipelineConfig, out: Path, profiles_dirs: tuple[Path, ...] = (),
                 log: Log = lambda _m: None) -> None:
        from edgeforge.models.refs import resolve_model
        from edgeforge.plan.profiles import resolve_profile

        if cfg.profile is None:
            raise BadInputError("no device profile: pass --profile NAME (see `edgeforge profiles list`) or set "
                                "`profile:` in the pipeline file")
        self.cfg = cfg
        self.out = Path(out)
        self.log = log
        self.profiles_dirs = profiles_dirs
        self.profile = resolve_profile(cfg.profile, profiles_dirs)
        self.teacher_ref = resolve_model(cfg.teacher)
        self.data_files = data_files(cfg.data)
        self.task_path = task_file(cfg.task)
        self.target = None
        if cfg.target is not None:
            from edgeforge.bench.targets import resolve_target

            self.target = resolve_target(cfg.target)
        self.plan = build_plan(cfg, self.profile, self.teacher_ref)
        self.cache = StageCache(self.out / ".stages")
        self.state = BuildState()
        self.teacher_identity = content_identity(self.teacher_ref.path)
        self.data_identity = [content_identity(p) for p in self.data_files]
        self.task_identity = content_identity(self.task_path) if self.task_path else cfg.task
        self._task_split: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None

    def _split_task(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(training, held-out) examples of the task, split once per build: the task file's identity is taken once
        at the start too, and a built-in task is generated, so splitting again per stage only cost time."""
        if self._task_split is None:
            self._task_split = ([], [])
            if self.cfg.task is not None:
                from edgeforge.tasks.examples import load_task_examples

                train, held, _ = load_task_examples(None if self.task_path else self.cfg.task, self.task_path,
                                                    self.cfg.seed)
                self._task_split = (train, held)
        return self._task_split

    def held_out_task(self) -> list[dict[str, Any]]:
        """Every held-out example of the task (none without one)."""
        return self._split_task()[1]

    def training_task(self) -> list[dict[str, Any]]:
        """Every training example of the task (none without one): what calibration may read, never the held-out."""
        return self._split_task()[0]

    def student_shape(self) -> dict[str, Any]:
        """The student's layers, hidden size, MLP width and KV heads: the pipeline's, else the plan's (None: the
        teacher's), so ``build`` distills the shape ``plan`` printed and ``distill --profile`` would make."""
        s = self.plan.student or {}
        d, teacher = self.cfg.distill, self.plan.teacher_arch
        layers = d.student_layers or s.get("layers")
        hidden = d.student_hidden or s.get("hidden_size")
        intermediate = d.student_intermediate or s.get("intermediate_size")
        kv_heads = d.student_kv_heads or s.get("n_kv_heads")
        return {"layers": layers,
                "hidden": None if hidden == teacher.get("hidden_size") else hidden,
                "intermediate": None if intermediate == teacher.get("intermediate_size") else intermediate,
                "kv_heads": None if kv_heads == teacher.get("n_kv_heads") else kv_heads}

    def teacher_hf_dir(self) -> Path:
        """The teacher as an HF directory (a GGUF teacher is dequantized into the cache once)."""
        from edgeforge.finetune.adapter import base_model_dir

        return base_model_dir(str(self.teacher_ref.path))[0]

    # ------------------------------------------------------------------ stage configs
    def distill_config(self, out: Path, teacher: str, data: tuple[Path, ...], resume: bool) -> DistillConfig:
        """The distill stage's DistillConfig from the pipeline's ``distill:`` section."""
        from edgeforge.distill.config import DistillConfig

        d = self.cfg.distill
        shape = self.student_shape()
        # Every distill: setting as it is, the plan's shape where the section leaves it unset (student_shape).
        settings = {**d.model_dump(exclude=BUILD_ONLY_DISTILL_SETTINGS), "student_layers": shape["layers"],
                    "student_hidden": shape["hidden"], "student_intermediate": shape["intermediate"],
                    "student_kv_heads": shape["kv_heads"]}
        task = (str(self.task_path) if self.task_path else self.cfg.task) if d.task_loss != "none" else None
        return DistillConfig(**settings, out=out, teacher=teacher, data=data, task=task, seed=self.cfg.seed,
                             resume=resume, profiles_dirs=self.profiles_dirs)

    def finetune_config(self) -> FinetuneConfig:
        """The fine-tune stage's FinetuneConfig from the pipeline's ``finetune:`` section."""
        from edgeforge.finetune.config import FinetuneConfig

        settings = self.cfg.finetune.model_dump(exclude={"enabled"})
        # The fine-tuning record (base, adapter, merged model) is scored on the build's fixed task set, the one every
        # artifact is scored on, so they compare example by example.
        settings["eval_examples"] = len(held_out_task_examples(self)) or settings["eval_examples"]
        return FinetuneConfig(**settings, seed=self.cfg.seed)


def data_files(paths: list[str]) -> list[Path]:
    """The distillation data files, each checked to exist (empty: the built-in data)."""
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise BadInputError(f"--data {p}: expected a text or JSONL file, found nothing there")
    return files


def task_file(task: str | None) -> Path | None:
    """The task JSONL file when ``task`` is not a built-in task name (None for a built-in task or none)."""
    if task is None:
        return None
    from edgeforge.tasks import task_names

    if task in task_names():
        return None
    path = Path(task)
    if not path.is_file():
        raise BadInputError(f"--task {task}: expected a built-in task ({', '.join(task_names())}) "
                            "or a task JSONL file, found neither")
    return path


def build_plan(cfg: PipelineConfig, profile: DeviceProfile, teacher_ref: ModelRef) -> Plan:
    """The plan for the teacher on the profile (it decides the model stages and the GGUF type)."""
    from edgeforge.models.refs import read_arch
    from edgeforge.plan.planner import plan

    kwargs: dict[str, Any] = {"has_task": cfg.task is not None}
    if cfg.context_tokens:
        kwargs["context"] = cfg.context_tokens
    return plan(read_arch(teacher_ref), profile, teacher_ref.name, **kwargs)


def run_build(builder: Builder) -> dict[str, Any]:
    """Run every stage and ship; returns the build summary (also ``OUT/build.json``)."""
    t0 = time.perf_counter()
    p = builder.plan
    builder.log(f"plan: {p.decision} for {builder.profile.name}: {p.reason}")
    StageRunner(builder.cache, builder.state, builder.log).run_all(layout(builder, builder.state))
    ship, summary = ship_folder(builder, builder.state)
    result = headline(builder, ship, summary, time.perf_counter() - t0)
    write_json_atomic(builder.out / "build.json", result)
    return result


def dry_run(builder: Builder) -> list[dict[str, Any]]:
    """The stages the build would run, their cache keys and whether each would be skipped: the build's own loop,
    with nothing run. A stage is listed once the stages it reads are in the cache (the model stages always are;
    the exports once the model stages are cached, the bench stage once the exports are); the rest as placeholders."""
    runner = StageRunner(builder.cache, BuildState(), builder.log, dry_run=True)
    try:
        runner.run_all(layout(builder, runner.state))
    except QualityGateError:
        pass  # every cached type of a format failed verification: nothing after the exports is laid out
    rows = runner.rows
    if not any(r["stage"].startswith("export-") for r in rows):
        rows += [{"stage": f"export-{f}", "key": "(after the model stages)", "state": "run", "dir": "",
                  "note": ""} for f in export_formats(builder)]
    if not any(r["stage"] == "bench" for r in rows):
        rows.append({"stage": "bench", "key": "(after export)", "state": "run" if builder.cfg.bench.enabled
                     else "skip", "dir": "", "note": "local" + (f" + {builder.target.name}" if builder.target else "")})
    rows.append({"stage": "ship", "key": "-", "state": "run", "dir": str(builder.out / "ship"), "note": ""})
    return rows
