"""Every setting of a distillation run, declared once: ``DistillSettings`` (type, default, bounds, help of each) and
``DistillConfig`` (a run: those settings plus its inputs, checked together). ``edgeforge distill``'s options and the
pipeline file's ``distill:`` section are generated from these models; errors name the ``--flag``.

Kept free of torch at import: the command line builds its options from this module on every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from edgeforge.errors import BadInputError
from edgeforge.settings import FlagErrors, StageSettings, flag_of, shown

CHECKPOINT_DIR = ".checkpoint"
STATE_FILE = ".distill-state.json"

# The choices of each setting. The modules that implement them keep their own tuples (prune.INIT_METHODS,
# losses.DIVERGENCES, techniques.*); tests/test_settings.py checks that both say the same.
InitMethod = Literal["auto", "depth", "width", "random"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
HiddenLoss = Literal["none", "mse", "cosine"]
TeacherDtype = Literal["auto", "float32", "bfloat16"]
ParallelMode = Literal["ddp", "fsdp"]
ProgressiveFrom = Literal["previous", "teacher"]
Curriculum = Literal["none", "teacher-loss", "student-loss"]
Pacing = Literal["linear", "root", "step"]
SelfDistill = Literal["none", "pruned", "born-again"]
TaskLoss = Literal["none", "answer", "rationale"]
Routing = Literal["weights", "lowest-loss"]

PARALLEL_MODES = ("ddp", "fsdp")
TECHNIQUE_FIELDS = ("progressive", "progressive_from", "curriculum", "curriculum_pacing", "curriculum_start",
                    "self_distill", "task", "task_loss", "rationale_weight", "task_examples", "task_eval_examples",
                    "rationale_tokens", "extra_teachers", "teacher_weights", "teacher_routing", "on_policy_ratio",
                    "on_policy_tokens")
OFFLINE_TOP_K = 64  # --offline-teacher without --top-k: the cache holds the teacher's 64 most likely tokens


class DistillSettings(StageSettings):
    """How a student is distilled: the settings ``edgeforge distill`` and a pipeline's ``distill:`` share."""

    # The student's shape; unset parts are the teacher's (in a build: the plan's student). The pruner checks each
    # against the teacher, so the bounds here are only the obvious ones.
    student_layers: int | None = Field(None, ge=1, description="Student decoder layers, pruned from the teacher "
                                       "by block influence [default: the teacher's; in a build: the plan's].")
    student_hidden: int | None = Field(None, ge=1, description="Student hidden size, width-pruned by activation "
                                       "importance [default: the teacher's; in a build: the plan's].")
    student_intermediate: int | None = Field(None, ge=1, description="Student MLP width [default: the teacher's].")
    student_kv_heads: int | None = Field(None, ge=1, description="Student KV groups (whole groups pruned with their "
                                         "query heads) [default: the teacher's].")
    init: InitMethod = Field("auto", description="Student initialisation: pruning (depth and/or width, as the shape "
                             "needs; or only depth / only width), or random weights for comparison.")
    generate_answers: bool = Field(True, json_schema_extra={"flag": "--no-generate"},
                                   description="Built-in data: add the teacher's answers to built-in prompts "
                                   "(off, --no-generate: the prose only).")
    loss: Divergence = Field("forward_kl", description="Divergence between teacher and student distributions.")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="Mixture weight of the generalized JSD (--loss jsd).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both models in the KD term (the "
                               "loss scaled back by T^2).")
    alpha: float = Field(0.0, ge=0, le=1, description="Weight of cross-entropy on the data: (1 - alpha) * KD + "
                         "alpha * CE.")
    top_k: int | None = Field(None, ge=1, description="Distill against the teacher's top-k tokens only [offline "
                              f"default: {OFFLINE_TOP_K}].")
    offline_teacher: bool = Field(False, description="Compute the teacher's top-k log-probs once into a cache and "
                                  "train from it.")
    hidden_loss: HiddenLoss = Field("none", description="Also align each student layer's output with its teacher "
                                    "layer (online teacher only).")
    hidden_weight: float = Field(1.0, ge=0, description="Weight of the hidden-state term.")
    teacher_dtype: TeacherDtype = Field("auto", description="Teacher precision for the training signal (evaluation "
                                        "is always fp32).")
    # 150, not the 40 the command once had: the build's demo (a 135M teacher into the Pi Zero's 8-layer student)
    # relies on 150 steps to keep the student's retention above its gate, and `edgeforge distill` now means the same
    # run as the build's distill stage. The README's and docs' quick runs pass --steps 40 explicitly.
    steps: int = Field(150, ge=0, description="Optimizer steps (the budget, unless --max-tokens / --max-seconds "
                       "end it sooner); 0: prune only, no training (the pruned student, e.g. to fine-tune directly).")
    max_tokens: int | None = Field(None, ge=1, description="Stop after this many training tokens (all processes "
                                   "together).")
    max_seconds: float | None = Field(None, gt=0, description="Stop after this much training time (seconds).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (40-step runs on the bundled teacher: 1e-3 beat "
                      "3e-4 and 2e-3).")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warm-up steps [default: 10% of the steps, at "
                                     "most 10].")
    batch_size: int = Field(4, ge=1, description="Sequences per micro-batch (per process).")
    seq_len: int = Field(128, ge=8, description="Tokens per training sequence.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    parallel: ParallelMode = Field("ddp", description="Under torchrun: ddp keeps a full student per process, fsdp "
                                   "shards it over the processes (docs/distill.md, Scale-out); one process: neither.")
    checkpoint_every: int = Field(20, ge=0, description="Steps between checkpoints (0: none, and nothing to "
                                  "--resume).")
    eval_sequences: int = Field(8, ge=1, description="Held-out sequences for the before/after metrics.")
    eval_seq_len: int = Field(256, ge=8, description="Tokens per held-out sequence (built-in data; --data uses "
                              "--seq-len).")
    calib_sequences: int = Field(8, ge=1, description="Training sequences for the pruning importance pass.")
    chunk_size: int = Field(128, ge=1, description="Positions per chunk of the KD loss (memory: chunk x vocabulary "
                            "x 4 bytes per temporary).")
    cache_dir: Path | None = Field(None, description="Teacher / answers cache folder [default: "
                                   "$EDGEFORGE_HOME/kd-cache].")
    # The techniques (docs/techniques.md); every default is "off": plain KD.
    progressive: tuple[PositiveInt, ...] = Field((), json_schema_extra={"example": "20,10"},
                                                 description="Progressive distillation: shrink in stages of these "
                                                 "layer counts (the last is the student's); --steps is split over "
                                                 "the stages.")
    progressive_from: ProgressiveFrom = Field("previous", description="Each progressive stage distils from the "
                                              "previous stage's student or from the teacher.")
    curriculum: Curriculum = Field("none", description="Order the training sequences easy -> hard by the teacher's "
                                   "loss or the initial student's loss.")
    curriculum_pacing: Pacing = Field("root", description="Share of the easiest data available at step t (all of "
                                      "it from 80% of the steps on).")
    curriculum_start: float = Field(0.25, gt=0, le=1, description="Share of the easiest data available at the "
                                    "first step.")
    self_distill: SelfDistill = Field("none", description="Train on the teacher's own generated outputs only: into "
                                      "a pruned copy of itself, or born-again (the teacher's own shape).")
    task_loss: TaskLoss = Field("none", description="Supervised task term: answer-only, or also the teacher's "
                                "step-by-step rationale (distilling step-by-step); needs a task.")
    rationale_weight: float = Field(1.0, ge=0, description="λ in KD + L_answer + λ L_rationale.")
    task_examples: int = Field(128, ge=1, description="Task training examples used (data, task term, rationales).")
    task_eval_examples: int = Field(50, ge=1, description="Held-out task examples for the accuracy before/after.")
    rationale_tokens: int = Field(48, ge=1, description="Longest teacher rationale (tokens).")
    extra_teachers: tuple[str, ...] = Field((), json_schema_extra={"flag": "--extra-teacher"},
                                            description="Multi-teacher: another teacher sharing the teacher's "
                                            "vocabulary (HF dir, .gguf or alias; repeatable).")
    teacher_weights: tuple[float, ...] = Field((), json_schema_extra={"example": "0.5,0.5"},
                                               description="Multi-teacher weights, the teacher first (normalised) "
                                               "[default: equal].")
    teacher_routing: Routing = Field("weights", description="Multi-teacher target: the weighted mixture of the "
                                     "teachers' distributions, or per sample the teacher with the lowest loss.")
    on_policy_ratio: float = Field(0.0, ge=0, le=1, description="On-policy distillation (GKD): share of "
                                   "micro-batches on the student's own samples, scored by the teacher.")
    on_policy_tokens: int = Field(32, ge=1, description="Tokens the student samples per sequence in an on-policy "
                                  "micro-batch.")


class DistillConfig(DistillSettings, FlagErrors):
    """One distillation run: the settings, its inputs (teacher, data, where the student comes from and goes), and
    the rules between them. Built by ``edgeforge distill``, the build and tests; a bad value is one BadInputError."""

    out: Path = Field(Path("student"), description="The student's HF directory (and distill.json).")
    teacher: str | None = Field(None, description="HF model dir, .gguf file or alias [default: "
                                "smollm2-135m-instruct].")
    profile: str | None = Field(None, description="Take the student shape from the plan for this device profile "
                                "(name or YAML path).")
    profiles_dirs: tuple[Path, ...] = Field((), json_schema_extra={"flag": "--profiles-dir"},
                                            description="Extra folder or YAML file of device profiles (repeatable).")
    student_dir: Path | None = Field(None, json_schema_extra={"flag": "--student", "existing_dir": True},
                                     description="Your own student: an HF directory sharing the teacher's "
                                     "tokenizer.")
    data: tuple[Path, ...] = Field((), description="Training text: .txt, JSONL with 'text', or chat JSONL "
                                   "(repeatable) [default: built-in prose plus the teacher's answers].")
    task: str | None = Field(None, description="A built-in task (home-commands) or task JSONL: its examples join "
                             "the training data and its exact-match accuracy is measured before and after.")
    seed: int = Field(0, description="Seed of pruning, data order and sampling.")
    resume: bool = Field(False, description="Continue an interrupted run in --out.")

    @model_validator(mode="after")
    def _check_together(self) -> DistillConfig:
        self._check_student_source()
        _need(self, not (self.offline_teacher and self.hidden_loss != "none"), "hidden_loss",
              "none with --offline-teacher (the cache holds no hidden states)")
        self._check_progressive()
        self._check_self_distill()
        _need(self, self.task is not None or self.task_loss == "none", "task_loss", "none unless --task is given")
        self._check_teachers()
        self._check_on_policy()
        if self.offline_teacher and self.top_k is None:
            self.top_k = OFFLINE_TOP_K
        return self

    def _check_student_source(self) -> None:
        """Exactly one of: a shape (--student-*), a directory (--student), a profile; --progressive alone names the
        final student, born-again needs none (the student has the teacher's shape)."""
        if self.progressive and self.student_layers is None and self.student_dir is None and self.profile is None:
            self.student_layers = self.progressive[-1]
        shape_given = any(v is not None for v in (self.student_layers, self.student_hidden,
                                                  self.student_intermediate, self.student_kv_heads))
        given = sum((shape_given, self.student_dir is not None, self.profile is not None))
        if self.self_distill == "born-again" and not given:
            given = 1
        if given != 1:
            raise BadInputError("the student: expected exactly one of --profile NAME, --student-layers N (with "
                                "optional --student-hidden/--student-intermediate/--student-kv-heads) or --student "
                                f"DIR, found {given}")

    def _check_progressive(self) -> None:
        if not self.progressive:
            return
        stages = self.progressive
        _need(self, all(b < a for a, b in zip(stages, stages[1:], strict=False)), "progressive",
              "strictly decreasing layer counts such as 20,10")
        _need(self, self.student_dir is None and self.profile is None, "progressive",
              "no --student / --profile (the stages prune from the teacher; give --student-layers or nothing)")
        _need(self, self.student_layers == stages[-1], "progressive",
              f"the final stage to be --student-layers ({self.student_layers})")
        _need(self, self.steps >= len(stages), "progressive", f"at most --steps ({self.steps}) stages")
        _need(self, self.init in ("auto", "depth"), "init", "auto or depth with --progressive (stages are pruned)")
        _need(self, not self.offline_teacher and self.hidden_loss == "none" and not self.extra_teachers,
              "progressive", "no --offline-teacher, --hidden-loss or --extra-teacher alongside it (not supported)")

    def _check_self_distill(self) -> None:
        if self.self_distill == "none":
            return
        _need(self, not self.data and self.generate_answers, "self_distill",
              "the built-in data with the teacher's generated answers (no --data, no --no-generate)")
        _need(self, self.student_dir is None, "self_distill", "a student made from the teacher (no --student DIR)")
        if self.self_distill == "born-again":
            _need(self, self.student_layers is None and self.student_hidden is None
                  and self.student_intermediate is None and self.student_kv_heads is None and self.profile is None,
                  "self_distill", "no --student-* / --profile flags with born-again (the student has the teacher's "
                  "shape)")

    def _check_teachers(self) -> None:
        from edgeforge.distill.techniques.multi_teacher import normalised_weights

        try:
            normalised_weights(self.teacher_weights, 1 + len(self.extra_teachers))
        except ValueError as e:  # the message says what was expected and found
            raise BadInputError(f"--teacher-weights: {e}") from None
        if self.extra_teachers and (self.offline_teacher or self.hidden_loss != "none"):
            found = "--offline-teacher" if self.offline_teacher else f"--hidden-loss {self.hidden_loss}"
            raise BadInputError("--extra-teacher: expected no --offline-teacher or --hidden-loss alongside it (both "
                                f"need a single teacher), found {found}")

    def _check_on_policy(self) -> None:
        _need(self, self.on_policy_ratio == 0 or self.on_policy_tokens < self.seq_len, "on_policy_tokens",
              f"fewer than --seq-len ({self.seq_len})")
        _need(self, not (self.on_policy_ratio > 0 and self.offline_teacher), "on_policy_ratio",
              "0 with --offline-teacher (the cache cannot hold the student's fresh samples)")

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON values (paths as text, tuples as lists): the record's ``config``."""
        return self.model_dump(mode="json")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the interrupted one (the budget may change)."""
        d = self.to_dict()
        for k in ("steps", "max_tokens", "max_seconds", "resume", "checkpoint_every", "out"):
            d.pop(k)
        return d


def _need(cfg: DistillConfig, ok: bool, name: str, expected: str) -> None:
    """A rule between settings: ``--flag: expected ..., found <the field's value>`` unless ``ok``."""
    if not ok:
        flag = flag_of(name, DistillConfig.model_fields[name])
        raise BadInputError(f"{flag}: expected {expected}, found {shown(getattr(cfg, name))}")
