"""Pipeline files for ``edgeforge build``: every stage's settings in one validated YAML document.

A pipeline file is optional; without one the defaults below run. CLI flags override the file, the file overrides the
defaults. Unknown keys are errors (a misspelt setting must not be silently ignored), and a file opens with a comment
naming the command that runs it (see ``pipelines/*.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeforge.errors import BadInputError

Order = Literal["auto", "distill-then-finetune", "finetune-then-distill"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DistillSettings(_Strict):
    """``edgeforge distill`` settings used by the build (see docs/distill.md)."""

    enabled: bool | None = None  # None: the plan decides
    student_layers: int | None = Field(default=None, ge=1)  # None: the plan's student
    student_hidden: int | None = Field(default=None, ge=8)  # None: the plan's student
    init: Literal["auto", "depth", "width", "random"] = "auto"
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(default=1.0, gt=0)
    alpha: float = Field(default=0.0, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    offline_teacher: bool = False
    steps: int = Field(default=150, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=4, ge=1)
    seq_len: int = Field(default=128, ge=8)
    checkpoint_every: int = Field(default=20, ge=1)
    generate_answers: bool = True  # built-in data: add the teacher's answers to built-in prompts
    # The techniques of docs/techniques.md (each off by default: plain KD)
    progressive: list[int] = Field(default_factory=list)  # e.g. [20, 8]: the last must be the student's layers
    progressive_from: Literal["previous", "teacher"] = "previous"
    curriculum: Literal["none", "teacher-loss", "student-loss"] = "none"
    curriculum_pacing: Literal["linear", "root", "step"] = "root"
    curriculum_start: float = Field(default=0.25, gt=0, le=1)
    self_distill: Literal["none", "pruned", "born-again"] = "none"
    task_loss: Literal["none", "answer", "rationale"] = "none"  # with the build's task: KD + task (+ rationale) terms
    rationale_weight: float = Field(default=1.0, ge=0)
    task_examples: int = Field(default=128, ge=1)
    task_eval_examples: int = Field(default=50, ge=1)
    rationale_tokens: int = Field(default=48, ge=1)
    extra_teachers: list[str] = Field(default_factory=list)  # more teachers sharing the vocabulary
    teacher_weights: list[float] = Field(default_factory=list)
    teacher_routing: Literal["weights", "lowest-loss"] = "weights"
    on_policy_ratio: float = Field(default=0.0, ge=0, le=1)
    on_policy_tokens: int = Field(default=32, ge=1)


class FinetuneSettings(_Strict):
    """``edgeforge finetune`` settings used by the build (see README, Fine-tuning)."""

    enabled: bool | None = None  # None: whenever a task is given
    method: Literal["lora", "dora", "qlora"] = "lora"
    rank: int = Field(default=16, ge=1)
    alpha: int | None = Field(default=None, ge=1)
    steps: int = Field(default=200, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=8, ge=1)
    eval_examples: int = Field(default=100, ge=1)
    checkpoint_every: int = Field(default=50, ge=1)
    # The techniques of docs/techniques.md (each off by default: plain LoRA)
    rank_sweep: list[int] = Field(default_factory=list)  # e.g. [4, 8, 16]: pick by held-out score per parameter
    rank_sweep_steps: int | None = Field(default=None, ge=1)
    layerwise_lr_decay: float = Field(default=1.0, gt=0, le=1)
    ewc: float = Field(default=0.0, ge=0)
    ewc_batches: int = Field(default=8, ge=1)


class ExportSettings(_Strict):
    """Which artifacts to make. None: the formats the profile runs, the plan's GGUF type, the profile's ONNX mode."""

    formats: list[Literal["gguf", "onnx"]] | None = None
    gguf_quant: str | None = None
    onnx_quantize: Literal["none", "int8", "int4"] | None = None
    # When the chosen GGUF type fails verification, try the profile's next larger preferred type that still fits
    # (a small distilled student can lose more per bit than the teacher); the record says what was tried.
    fallback: bool = True


class VerifySettings(_Strict):
    tokens: int = Field(default=1000, ge=16)  # held-out prose tokens for KL / top-1 against the source model
    task_examples: int = Field(default=50, ge=1)  # held-out task examples run through each artifact's own engine


class BenchSettings(_Strict):
    enabled: bool = True
    local: bool = True  # also measure on this machine (the target, if given, is measured too)
    prompt_tokens: int = Field(default=128, ge=1)
    gen_tokens: int = Field(default=64, ge=1)
    repeats: int = Field(default=3, ge=1)
    threads: int | None = Field(default=None, ge=1)


class PipelineConfig(_Strict):
    """One build: the device, the models, the data and each stage's settings."""

    profile: str | None = None
    teacher: str | None = None  # HF dir, .gguf or alias [default: the bundled teacher]
    data: list[str] = Field(default_factory=list)  # distillation data [default: built-in]
    task: str | None = "home-commands"  # built-in task name or a task JSONL path; null: no fine-tuning
    target: str | None = None  # a target name (targets/) or a target YAML path
    order: Order = "auto"  # auto: what the plan says (distill, then fine-tune the student)
    seed: int = 0
    context_tokens: int | None = Field(default=None, ge=64)
    distill: DistillSettings = DistillSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    export: ExportSettings = ExportSettings()
    verify: VerifySettings = VerifySettings()
    bench: BenchSettings = BenchSettings()

    def with_overrides(self, overrides: dict[str, Any]) -> PipelineConfig:
        """A copy with dotted keys replaced (``{"distill.steps": 10}``); None values are ignored (flag not given)."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return validate_pipeline(data, "command-line flags")


def validate_pipeline(data: dict[str, Any], source: str) -> PipelineConfig:
    """Validate a pipeline mapping; errors name the field, what was expected and what was found."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        found = err.get("input")
        found_text = "an unknown key" if err["type"] == "extra_forbidden" else f"{found!r}"[:80]
        raise BadInputError(f"{source}: {where}: {err['msg'].lower()}; found {found_text}") from None


def pipeline_file(ref: Path) -> Path:
    """The file ``--config`` names: a path as given, or else the built-in pipeline of that name
    (``finetune-then-distill``), which an installed edgeforge carries without a ``pipelines/`` folder."""
    if ref.exists() or len(ref.parts) != 1:
        return ref
    from edgeforge.paths import builtin_dir, yaml_files

    builtins = {p.stem: p for p in yaml_files(builtin_dir("pipelines"))}
    name = ref.stem if ref.suffix in (".yaml", ".yml") else ref.name
    if name not in builtins:
        raise BadInputError(f"--config {ref}: no such pipeline file, and no built-in pipeline of that name; "
                            f"expected a YAML path or one of: {', '.join(sorted(builtins))}")
    return builtins[name]


def load_pipeline(path: Path | None) -> PipelineConfig:
    """Read a pipeline YAML file (``yaml.safe_load``) or a built-in pipeline by name; the defaults when ``path`` is
    None."""
    if path is None:
        return PipelineConfig()
    from edgeforge.validation import read_yaml_file

    path = pipeline_file(Path(path))
    try:
        data = read_yaml_file(Path(path), "pipeline", BadInputError)
    except BadInputError as e:
        raise BadInputError(f"--config {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadInputError(f"--config {path}: expected a mapping of settings at the top level, "
                            f"found {type(data).__name__}")
    return validate_pipeline(data, f"--config {path}")
