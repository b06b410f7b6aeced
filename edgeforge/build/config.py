"""Pipeline files for ``edgeforge build``: every stage's settings in one validated YAML document.

A pipeline file is optional; without one the defaults below run. CLI flags override the file, the file overrides the
defaults. Unknown keys are errors (a misspelt setting must not be silently ignored), and a file opens with a comment
naming the command that runs it (see ``pipelines/*.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeforge.distill.config import DistillSettings
from edgeforge.errors import BadInputError
from edgeforge.finetune.config import FinetuneSettings

Order = Literal["auto", "distill-then-finetune", "finetune-then-distill"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DistillSection(DistillSettings):
    """Distillation (the settings of `edgeforge distill`, docs/distill.md); an unset student shape is the plan's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool | None = Field(None, description="null: when the plan says the teacher is too big or too slow "
                                 "for the device.")
    generated_task_examples: int = Field(6000, ge=0, description="Fine-tune-then-distill on a built-in task: this "
                                         "many more examples generated from the task's training phrasings and "
                                         "values (never its held-out ones) join the task's training examples as "
                                         "distillation data.")


class FinetuneSection(FinetuneSettings):
    """Fine-tuning on the build's task (the settings of `edgeforge finetune`, README: Fine-tuning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool | None = Field(None, description="null: whenever a task is given.")


#: Settings of the distill section that the build itself uses (not DistillConfig fields).
BUILD_ONLY_DISTILL_SETTINGS = {"enabled", "generated_task_examples"}

#: Where the build takes each DistillConfig / FinetuneConfig field that is not a setting of the section above
#: (tests/test_settings.py checks every field is one or the other).
DISTILL_RUN_INPUTS = {
    "out": "the stage folder (OUT/.stages/distill-<key>/student)",
    "teacher": "teacher (with order finetune-then-distill: the fine-tuned teacher)",
    "data": "data (with order finetune-then-distill: plus the task's training examples)",
    "task": "task, when distill.task_loss is not none",
    "seed": "seed",
    "resume": "true when the stage folder holds a checkpoint",
    "profiles_dirs": "edgeforge build --profiles-dir",
    "profile": "not passed: the plan's student shape arrives as student_layers / student_hidden",
    "student_dir": "not passed: the build prunes its student from the teacher",
}
FINETUNE_RUN_INPUTS = {"seed": "seed", "train": "not passed (library callers only)"}


class ExportSettings(_Strict):
    """Which artifacts to make."""

    formats: list[Literal["gguf", "onnx"]] | None = Field(None, description="null: every format the profile runs.")
    gguf_quant: str | None = Field(None, description="null: the plan's type (the student's, when distilling); fit: "
                                   "the per-tensor-group mix that loses least within the profile's GGUF budget.")
    onnx_quantize: Literal["none", "int8", "int4", "fit"] | None = Field(
        None, description="null: the profile's first preferred ONNX mode; fit: 4 or 8 bits per layer group, the mix "
        "that loses least within the profile's budget.")
    # A small distilled student can lose more per bit than the teacher; the record says what was tried.
    fallback: bool = Field(True, description="When the chosen GGUF type fails verification, try the profile's next "
                           "larger preferred type that still fits, and last a mix fitted to the profile's budget when "
                           "a larger preferred type does not fit; ONNX int4 likewise falls back to int8, or to a "
                           "fitted 4/8-bit mix when int8 does not fit.")


class VerifySettings(_Strict):
    """How every artifact is checked against its source model."""

    tokens: int = Field(1000, ge=16, description="Held-out prose tokens for KL / top-1 against the source model.")
    task_examples: int | None = Field(None, ge=1, description="The fixed task evaluation set: the first N held-out "
                                      "examples, the same for the fine-tuning record, the merged model and every "
                                      "artifact; null: all of them (300 for home-commands).")
    task_max_drop: float = Field(0.05, ge=0, le=1, description="With a task, an artifact whose exact match is more "
                                 "than this fraction below its source model's on the fixed set fails verification.")
    task_alpha: float = Field(0.05, gt=0, lt=1, description="With a task, an artifact whose exact match is below its "
                              "source's with a paired (McNemar) p-value under this fails verification.")


class BenchSettings(_Strict):
    """Speed measurements of the shipped artifacts."""

    enabled: bool = Field(True, description="Benchmark at all (--no-bench: false).")
    local: bool = Field(True, description="Also measure on this machine (the target, if given, is measured too).")
    prompt_tokens: int = Field(128, ge=1, description="Prompt length of the prefill measurement.")
    gen_tokens: int = Field(64, ge=1, description="Tokens generated for the decode measurement.")
    repeats: int = Field(3, ge=1, description="Runs per measurement (the median is reported).")
    threads: int | None = Field(None, ge=1, description="CPU threads; null: the runtime's choice.")
    sustained_s: float | None = Field(None, ge=1, description="Also decode without pause this long, reported per "
                                      "10-second window with the device's conditions (plotted in the report); null: "
                                      "no sustained run.")


class PipelineConfig(_Strict):
    """One build: the device, the models, the data and each stage's settings."""

    profile: str | None = Field(None, description="Device profile name or YAML path (edgeforge profiles list).")
    teacher: str | None = Field(None, description="HF dir, .gguf or alias; null: the bundled SmolLM2-135M-Instruct.")
    data: list[str] = Field(default_factory=list, description="Distillation data files (.txt / JSONL / chat JSONL); "
                            "empty: built-in prose + teacher answers.")
    task: str | None = Field("home-commands", description="Fine-tuning task: built-in name or JSONL path; null: no "
                             "fine-tuning.")
    target: str | None = Field(None, description="Also benchmark on this target (targets/*.yaml name or a YAML "
                               "path).")
    order: Order = Field("auto", description="auto: what the plan says; when it distills and a task is given, "
                         "fine-tune the teacher first, then distill the fine-tuned teacher into the student on the "
                         "task's data (benchmarks/pipelines.py).")
    seed: int = Field(0, description="Seed of every stage.")
    context_tokens: int | None = Field(None, ge=64, description="Planning context; null: the planner's default.")
    distill: DistillSection = DistillSection()
    finetune: FinetuneSection = FinetuneSection()
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


# ---------------------------------------------------------------- pipelines/default.yaml, generated
DEFAULT_PIPELINE_HEADER = """\
# edgeforge build --config pipelines/default.yaml --profile raspberry-pi-zero-2w
# The defaults of `edgeforge build`, written out: every key is optional, unknown keys are errors, and command-line
# flags (--profile, --teacher, --data, --task, --target, --distill-steps, --finetune-steps, --seed) override this file.
# Generated from the settings models: python -m edgeforge.build.config > pipelines/default.yaml
"""


def _yaml_value(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()  # a lone scalar ends its document with "..."


def _comment(text: str, indent: str) -> list[str]:
    import textwrap

    return [f"{indent}# {line}" for line in textwrap.wrap(text, width=118 - len(indent), break_on_hyphens=False)]


def _yaml_lines(model: type[BaseModel], values: dict[str, Any], indent: str = "") -> list[str]:
    """Each field of ``model`` as ``key: value`` under its description (and choices), sections nested."""
    from typing import get_args, get_origin

    from edgeforge.settings import fields_in_order, without_none

    lines: list[str] = []
    for name, info in fields_in_order(model):
        section = info.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            lines += _comment((section.__doc__ or "").strip().splitlines()[0], indent)
            lines += [f"{indent}{name}:", *_yaml_lines(section, values[name], indent + "  ")]
            continue
        about = info.description or ""
        choices = without_none(info.annotation)
        if get_origin(choices) is Literal:
            about += f" [{' | '.join(map(str, get_args(choices)))}]"
        lines += [*_comment(about.strip(), indent), f"{indent}{name}: {_yaml_value(values[name])}"]
    return lines


def default_pipeline_yaml() -> str:
    """The text of ``pipelines/default.yaml``: every key of every section with its default and its help."""
    values = PipelineConfig().model_dump(mode="json")
    return DEFAULT_PIPELINE_HEADER + "\n".join(_yaml_lines(PipelineConfig, values)) + "\n"


if __name__ == "__main__":
    print(default_pipeline_yaml(), end="")
