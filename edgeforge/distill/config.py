"""Every setting of a distillation run (``DistillConfig``), validated in one place; errors name the flag."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgeforge.distill.losses import DEFAULT_CHUNK, DIVERGENCES
from edgeforge.errors import BadInputError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


CHECKPOINT_DIR = ".checkpoint"
STATE_FILE = ".distill-state.json"


PARALLEL_MODES = ("ddp", "fsdp")
TECHNIQUE_FIELDS = ("progressive", "progressive_from", "curriculum", "curriculum_pacing", "curriculum_start",
                    "self_distill", "task", "task_loss", "rationale_weight", "task_examples", "task_eval_examples",
                    "rationale_tokens", "extra_teachers", "teacher_weights", "teacher_routing", "on_policy_ratio",
                    "on_policy_tokens")


@dataclass
class DistillConfig:
    """Every setting of a distillation run; validated in one place (``__post_init__``); errors name the field."""

    out: Path = Path("student")  # the student's HF directory (and distill.json)
    teacher: str | None = None  # HF dir, .gguf or alias [default: the bundled teacher]
    student_layers: int | None = None  # target decoder layers (pruned from the teacher)
    student_hidden: int | None = None  # target hidden size (None: the teacher's)
    student_intermediate: int | None = None  # target MLP width (None: the teacher's)
    student_kv_heads: int | None = None  # target KV groups (None: the teacher's)
    student_dir: Path | None = None  # a student the user gives (HF dir with the teacher's vocabulary)
    profile: str | None = None  # take the student shape from the planner for this device profile
    profiles_dirs: tuple[Path, ...] = ()  # extra profile folders
    init: str = "auto"  # auto | depth | width | random (edgeforge.distill.prune.init_student)
    data: tuple[Path, ...] = ()  # text / JSONL / chat JSONL files [default: built-in data]
    generate_answers: bool = True  # built-in data: add the teacher's answers to built-in prompts
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    jsd_beta: float = 0.5  # mixture weight of the generalized JSD, in (0, 1)
    temperature: float = 1.0  # softmax temperature of both models in the KD term (scaled back by T^2)
    alpha: float = 0.0  # weight of cross-entropy on the data's tokens: (1 - alpha) * KD + alpha * CE
    top_k: int | None = None  # distill against the teacher's top-k only (offline default: 64)
    offline_teacher: bool = False  # teacher top-k from a cache computed once, not the teacher in the loop
    hidden_loss: str = "none"  # none | mse | cosine: also align every student layer's output with its teacher layer
    hidden_weight: float = 1.0  # weight of the hidden-state term
    teacher_dtype: str = "auto"  # precision of the teacher's training signal: auto | float32 | bfloat16
    steps: int = 40  # optimizer steps (the budget, unless max_tokens / max_seconds end it sooner)
    max_tokens: int | None = None  # stop after this many training tokens (all processes together)
    max_seconds: float | None = None  # stop after this much training time
    lr: float = 1e-3  # peak learning rate (40-step runs on the bundled teacher: 1e-3 beat 3e-4 and 2e-3)
    warmup_steps: int | None = None  # None: 10% of the steps, at most 10
    batch_size: int = 4  # sequences per micro-batch (per process)
    seq_len: int = 128  # tokens per training sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    parallel: str = "ddp"  # ddp | fsdp: how a multi-process (torchrun) run spreads the student; 1 process: neither
    seed: int = 0
    checkpoint_every: int = 20  # steps between checkpoints; 0 disables (and disables --resume)
    resume: bool = False  # continue an interrupted run in ``out``
    eval_sequences: int = 8  # held-out sequences for the metrics
    eval_seq_len: int = 256  # tokens per held-out sequence (built-in data; --data uses --seq-len)
    calib_sequences: int = 8  # training sequences for the pruning importance pass
    chunk_size: int = DEFAULT_CHUNK  # positions per chunk of the KD loss
    cache_dir: Path | None = None  # offline teacher / answers cache [default: $EDGEFORGE_HOME/kd-cache]
    # techniques (docs/techniques.md); the defaults are plain KD
    progressive: tuple[int, ...] = ()  # layer counts of successive students, the last the final one (e.g. 20, 10)
    progressive_from: str = "previous"  # previous | teacher: each progressive stage distils from this model
    curriculum: str = "none"  # none | teacher-loss | student-loss: the difficulty that orders the data easy -> hard
    curriculum_pacing: str = "root"  # linear | root | step: the share of the easiest data available at step t
    curriculum_start: float = 0.25  # the share of the pool available at the first step
    self_distill: str = "none"  # none | pruned | born-again: train on the teacher's own generated outputs only
    task: str | None = None  # a built-in task name or task JSONL: its examples join the run, its accuracy is measured
    task_loss: str = "none"  # none | answer | rationale: the supervised task term ("[answer]"/"[rationale]" prefixes)
    rationale_weight: float = 1.0  # λ in KD + L_answer + λ L_rationale
    task_examples: int = 128  # task training examples used (as KD data, the task term and rationales)
    task_eval_examples: int = 50  # held-out task examples for the accuracy before / after
    rationale_tokens: int = 48  # longest teacher rationale, in tokens
    extra_teachers: tuple[str, ...] = ()  # more teachers sharing the teacher's vocabulary (HF dirs, GGUF, aliases)
    teacher_weights: tuple[float, ...] = ()  # one per teacher (--teacher first), normalised; empty: equal
    teacher_routing: str = "weights"  # weights (mixture of distributions) | lowest-loss (per-sample best teacher)
    on_policy_ratio: float = 0.0  # share of micro-batches on the student's own samples, scored by the teacher
    on_policy_tokens: int = 32  # tokens the student samples per sequence in an on-policy micro-batch

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise BadInputError(f"--{name.replace('_', '-')}: expected {expected}, found {getattr(self, name)}")

        self.out = Path(self.out)
        self.data = tuple(Path(p) for p in self.data)
        self.progressive = tuple(int(n) for n in self.progressive)
        self.extra_teachers = tuple(str(t) for t in self.extra_teachers)
        self.teacher_weights = tuple(float(w) for w in self.teacher_weights)
        if self.progressive and self.student_layers is None and self.student_dir is None and self.profile is None:
            self.student_layers = self.progressive[-1]  # --progressive 20,10 alone names the final student
        given = [x for x in (self.student_layers is not None or self.student_hidden is not None
                             or self.student_intermediate is not None or self.student_kv_heads is not None,
                             self.student_dir is not None, self.profile is not None) if x]
        if self.self_distill == "born-again" and not given:
            given = [True]  # born-again: the student has the teacher's own shape
        if len(given) != 1:
            raise BadInputError("the student: expected exactly one of --profile NAME, --student-layers N (with "
                                f"optional --student-hidden/--student-intermediate/--student-kv-heads) or --student "
                                f"DIR, found {len(given)}")
        from edgeforge.distill.prune import INIT_METHODS

        need(self.init in INIT_METHODS, "init", " | ".join(INIT_METHODS))
        need(self.loss in DIVERGENCES, "loss", " | ".join(DIVERGENCES))
        need(0.0 < self.jsd_beta < 1.0, "jsd_beta", "a number strictly between 0 and 1")
        need(self.temperature > 0, "temperature", "a number > 0")
        need(0.0 <= self.alpha <= 1.0, "alpha", "a number in [0, 1]")
        need(self.top_k is None or self.top_k >= 1, "top_k", "an integer >= 1")
        need(self.hidden_loss in ("none", "mse", "cosine"), "hidden_loss", "none | mse | cosine")
        need(not (self.offline_teacher and self.hidden_loss != "none"), "hidden_loss",
             "none with --offline-teacher (the cache holds no hidden states)")
        need(self.hidden_weight >= 0, "hidden_weight", "a number >= 0")
        need(self.teacher_dtype in ("auto", "float32", "bfloat16"), "teacher_dtype", "auto | float32 | bfloat16")
        need(self.parallel in PARALLEL_MODES, "parallel", " | ".join(PARALLEL_MODES))
        for name in ("steps", "batch_size", "grad_accum", "eval_sequences", "calib_sequences", "chunk_size"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.seq_len >= 8, "seq_len", "an integer >= 8")
        need(self.eval_seq_len >= 8, "eval_seq_len", "an integer >= 8")
        need(self.lr > 0, "lr", "a number > 0")
        need(self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
        need(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "an integer >= 1")
        need(self.max_seconds is None or self.max_seconds > 0, "max_seconds", "a number > 0")
        self._check_techniques(need)
        if self.offline_teacher and self.top_k is None:
            self.top_k = 64

    def _check_techniques(self, need: Callable[[bool, str, str], None]) -> None:
        """The technique settings (docs/techniques.md) and the combinations that are not supported."""
        from edgeforge.distill.techniques.curriculum import CURRICULA, PACINGS
        from edgeforge.distill.techniques.multi_teacher import ROUTINGS, normalised_weights
        from edgeforge.distill.techniques.progressive import PROGRESSIVE_FROM
        from edgeforge.distill.techniques.rationale import TASK_LOSSES

        if self.progressive:
            need(all(n >= 1 for n in self.progressive), "progressive", "positive layer counts such as 20,10")
            need(all(b < a for a, b in zip(self.progressive, self.progressive[1:], strict=False)), "progressive",
                 "strictly decreasing layer counts such as 20,10")
            need(self.student_dir is None and self.profile is None, "progressive",
                 "no --student / --profile (the stages prune from the teacher; give --student-layers or nothing)")
            need(self.student_layers == self.progressive[-1], "progressive",
                 f"the final stage to be --student-layers ({self.student_layers})")
            need(self.steps >= len(self.progressive), "progressive", f"at most --steps ({self.steps}) stages")
            need(self.init in ("auto", "depth"), "init", "auto or depth with --progressive (stages are pruned)")
            need(not self.offline_teacher and self.hidden_loss == "none" and not self.extra_teachers,
                 "progressive", "no --offline-teacher, --hidden-loss or --extra-teacher alongside it (not supported)")
        need(self.progressive_from in PROGRESSIVE_FROM, "progressive_from", " | ".join(PROGRESSIVE_FROM))
        need(self.curriculum in CURRICULA, "curriculum", " | ".join(CURRICULA))
        need(self.curriculum_pacing in PACINGS, "curriculum_pacing", " | ".join(PACINGS))
        need(0.0 < self.curriculum_start <= 1.0, "curriculum_start", "a share in (0, 1]")
        need(self.self_distill in ("none", "pruned", "born-again"), "self_distill", "none | pruned | born-again")
        if self.self_distill != "none":
            need(not self.data and self.generate_answers, "self_distill",
                 "the built-in data with the teacher's generated answers (no --data, no --no-generate)")
            need(self.student_dir is None, "self_distill", "a student made from the teacher (no --student DIR)")
        if self.self_distill == "born-again":
            need(self.student_layers is None and self.student_hidden is None and self.student_intermediate is None
                 and self.student_kv_heads is None and self.profile is None, "self_distill",
                 "no --student-* / --profile flags with born-again (the student has the teacher's shape)")
        need(self.task_loss in TASK_LOSSES, "task_loss", " | ".join(TASK_LOSSES))
        need(self.task is not None or self.task_loss == "none", "task_loss", "none unless --task is given")
        need(self.rationale_weight >= 0, "rationale_weight", "a number >= 0")
        for name in ("task_examples", "task_eval_examples", "rationale_tokens", "on_policy_tokens"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.teacher_routing in ROUTINGS, "teacher_routing", " | ".join(ROUTINGS))
        try:
            normalised_weights(self.teacher_weights, 1 + len(self.extra_teachers))
        except ValueError as e:
            need(False, "teacher_weights", str(e).removeprefix("expected "))
        if self.extra_teachers and (self.offline_teacher or self.hidden_loss != "none"):
            found = "--offline-teacher" if self.offline_teacher else f"--hidden-loss {self.hidden_loss}"
            raise BadInputError("--extra-teacher: expected no --offline-teacher or --hidden-loss alongside it (both "
                                f"need a single teacher), found {found}")
        need(0.0 <= self.on_policy_ratio <= 1.0, "on_policy_ratio", "a share in [0, 1]")
        need(self.on_policy_ratio == 0 or self.on_policy_tokens < self.seq_len, "on_policy_tokens",
             f"fewer than --seq-len ({self.seq_len})")
        need(not (self.on_policy_ratio > 0 and self.offline_teacher), "on_policy_ratio",
             "0 with --offline-teacher (the cache cannot hold the student's fresh samples)")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v, Path) else [x if isinstance(x, int | float) else str(x) for x in v]
                         if isinstance(v, tuple) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the interrupted one (the budget may change)."""
        d = self.to_dict()
        for k in ("steps", "max_tokens", "max_seconds", "resume", "checkpoint_every", "out"):
            d.pop(k)
        return d
