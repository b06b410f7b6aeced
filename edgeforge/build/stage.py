"""What a build stage is: a name, the settings and inputs that make its cache key, a run, and an absorb.

A stage is laid out (``edgeforge.build.layout``) once the stages it reads are known, then handed to the one runner
(``edgeforge.build.runner``): the runner computes its key from ``settings()`` and ``inputs()``, runs it in its stage
directory unless that directory already holds a finished record, and passes the record, fresh or cached, to
``absorb``, so a cached stage contributes to the build exactly as a fresh one does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgeforge.build.cache import stage_key

if TYPE_CHECKING:
    from edgeforge.bench.targets import Target
    from edgeforge.build.config import PipelineConfig
    from edgeforge.distill.config import DistillConfig
    from edgeforge.finetune.config import FinetuneConfig
    from edgeforge.models.refs import ModelRef
    from edgeforge.plan.planner import Plan
    from edgeforge.plan.profiles import DeviceProfile

Log = Callable[[str], None]


@dataclass
class BuildState:
    """What the stages have produced so far (each stage's ``absorb`` adds its part)."""

    model_dir: Path | None = None  # the HF model the exports come from
    lineage_stages: list[str] = field(default_factory=list)  # the model stages it went through, in order
    distill: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None  # the fine-tuning record of the model the exports come from
    # fine-tune-then-distill: the fine-tuned teacher's record (the reference the shipped student is compared with)
    teacher_finetune: dict[str, Any] | None = None
    # the exports' source model scored on the fixed task set (per-example ``correct``), by the stage that made it
    source_scores: dict[str, Any] | None = None
    exports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # format -> every type tried, in order
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # the exports that passed verification
    bench: list[dict[str, Any]] = field(default_factory=list)
    stage_rows: list[dict[str, Any]] = field(default_factory=list)  # one per stage run or taken from the cache
    # --dry-run only: stages laid out but not finished, so what reads their outputs cannot be laid out yet
    pending: list[str] = field(default_factory=list)


class BuildContext(Protocol):
    """What the stages read of the build (``edgeforge.build.builder.Builder``): its resolved inputs, their content
    identities, the plan, and the constructors of the stage configs."""

    cfg: PipelineConfig
    out: Path
    log: Log
    profiles_dirs: tuple[Path, ...]
    profile: DeviceProfile
    plan: Plan
    teacher_ref: ModelRef
    target: Target | None
    data_files: list[Path]
    task_path: Path | None  # a task JSONL file; None for a built-in task (or no task)
    teacher_identity: dict[str, Any]
    data_identity: list[dict[str, Any]]
    task_identity: Any  # the task file's identity, or the built-in task's name

    def student_shape(self) -> dict[str, Any]: ...

    def teacher_hf_dir(self) -> Path: ...

    def distill_config(self, out: Path, teacher: str, data: tuple[Path, ...], resume: bool) -> DistillConfig: ...

    def finetune_config(self) -> FinetuneConfig: ...

    def held_out_task(self) -> list[dict[str, Any]]: ...

    def training_task(self) -> list[dict[str, Any]]: ...



class Stage(Protocol):
    """One cached step of a build."""

    @property
    def name(self) -> str:
        """The stage's name, also its directory's prefix: ``OUT/.stages/<name>-<key16>/``."""
        ...

    @property
    def note(self) -> str:
        """One line for the log and ``--dry-run``."""
        ...

    def settings(self) -> dict[str, Any]:
        """The settings that enter the key (recorded as the stage's ``config``)."""
        ...

    def inputs(self) -> dict[str, Any]:
        """The keys of the stages it reads and the content identity of the external files it reads."""
        ...

    def run(self, stage_dir: Path, state: BuildState) -> dict[str, Any]:
        """Produce the outputs in ``stage_dir`` (resuming from a checkpoint there) and return the stage's record."""
        ...

    def absorb(self, record: dict[str, Any], state: BuildState) -> None:
        """Take a finished stage's record (fresh or from the cache) into the build state."""
        ...


def key_of(stage: Stage) -> str:
    """The stage's cache key (full sha256 hex)."""
    return stage_key(stage.name, stage.settings(), stage.inputs())
