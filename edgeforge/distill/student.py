"""The student of a distillation run: its target shape, the student a run starts from (given, pruned from the teacher
or random), the module the training loop sees (the model plus the layer outputs that hidden-state alignment needs),
and the student saved as an HF directory."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgeforge.distill.config import DistillConfig
from edgeforge.distill.context import RunContext
from edgeforge.distill.teacher import Teacher
from edgeforge.errors import BadInputError
from edgeforge.models.files import read_model_config, tokenizer_files


class StudentForKD(nn.Module):
    """The student, plus (for hidden-state alignment) the layer outputs it exposes and the projector.

    forward(input_ids [B, S]) -> (logits [B, S, V], [hidden of each aligned student layer, [B, S, D_t] through the
    projector when there is one, else [B, S, D_s]]). The projector runs inside forward so that DDP and FSDP see it
    as part of the module they wrap (FSDP gathers its sharded weight only inside the wrapped forward).
    """

    def __init__(self, student: nn.Module, align_layers: list[int], projector: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.align_layers = align_layers

    def forward(self, input_ids: Tensor) -> tuple[Tensor, list[Tensor]]:
        captured = capture_layers(self.student, self.align_layers)
        try:
            logits = self.student(input_ids=input_ids, use_cache=False).logits
        finally:
            captured.remove()
        hidden = captured.outputs
        if self.projector is not None:
            hidden = [self.projector(h) for h in hidden]
        return logits, hidden


class LayerCapture:
    def __init__(self) -> None:
        self.outputs: list[Tensor] = []
        self.handles: list[Any] = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def capture_layers(model: nn.Module, layers: list[int]) -> LayerCapture:
    """Forward hooks that collect the outputs of decoder ``layers`` (in that order)."""
    cap = LayerCapture()
    slots: dict[int, int] = {}
    for j, i in enumerate(layers):
        slots[i] = j
    cap.outputs = [None] * len(layers)  # type: ignore[list-item]

    def hook(i: int):
        def fn(_m: nn.Module, _a: Any, out: Any) -> None:
            cap.outputs[slots[i]] = out[0] if isinstance(out, tuple) else out
        return fn

    for i in layers:
        cap.handles.append(model.model.layers[i].register_forward_hook(hook(i)))
    return cap


# ---------------------------------------------------------------- the student a run starts from
def student_shape(cfg: DistillConfig, teacher: Teacher) -> Any:
    """The target shape (an edgeforge.distill.prune.StudentShape): from the planner (--profile) or from the
    --student-* flags."""
    from edgeforge.distill.prune import StudentShape

    if cfg.profile is None:
        if cfg.student_layers is None:
            layers = int(read_model_config(teacher.hf_dir)["num_hidden_layers"])
        else:
            layers = cfg.student_layers
        return StudentShape(layers, cfg.student_hidden, cfg.student_intermediate, cfg.student_kv_heads)
    from edgeforge.models.refs import ModelRef, read_arch
    from edgeforge.plan import planner
    from edgeforge.plan.profiles import resolve_profile

    arch = read_arch(ModelRef(teacher.name, teacher.path, teacher.format))  # type: ignore[arg-type]
    plan = planner.plan(arch, resolve_profile(cfg.profile, cfg.profiles_dirs), teacher.name)
    if plan.student is None:
        raise BadInputError(f"--profile {cfg.profile}: the plan is '{plan.decision}' ({plan.reason}) and names no "
                            "student shape; give --student-layers N to distill anyway")
    s = plan.student
    return StudentShape(int(s["layers"]), int(s["hidden_size"]), int(s["intermediate_size"]), None)


@dataclass
class StudentStart:
    """The student before training, and how it came to be."""

    student: nn.Module | None  # fp32, on the run's device, trainable; None once handed to the training
    init: dict[str, Any]  # the record's ``student`` entry: the InitReport of edgeforge.distill.prune, or "given"
    align_from: list[int] | None  # the teacher layer each student layer was kept from (None: not pruned by depth)
    kept_hidden: list[int] | None  # the teacher's hidden channels a width-pruned student kept

    def take_student(self) -> nn.Module:
        """The student, handed over once: the start keeps no reference to it, so that a progressive run frees each
        stage's student once the next one is pruned from it."""
        student, self.student = self.student, None
        assert student is not None, "the student was handed over already"
        return student


def initial_student(ctx: RunContext, t_model: nn.Module, shape: Any, train: Tensor) -> StudentStart:
    """The user's student (--student-dir), or one initialised from the fp32 teacher ``t_model`` to ``shape`` (pruned,
    calibrated on the first training sequences ``train`` [N, S], or random)."""
    from transformers import AutoModelForCausalLM

    from edgeforge.distill.prune import count_params, init_student

    cfg = ctx.cfg
    if cfg.student_dir is not None:
        student = AutoModelForCausalLM.from_pretrained(str(cfg.student_dir), dtype=torch.float32)
        start = StudentStart(student, {"method": "given", "path": str(cfg.student_dir),
                                       "params": count_params(student)}, None, None)
    else:
        calib = train[: cfg.calib_sequences]
        student, report = init_student(t_model, shape, cfg.init, calib, seed=cfg.seed)  # type: ignore[arg-type]
        if cfg.init != "random":
            ctx.passes["calibration"] += math.ceil(len(calib) / 4)
        start = StudentStart(student, report.to_dict(), report.kept_layers or None, report.kept_hidden_channels)
        ctx.say(f"student: {report.layers} layers (kept {report.kept_layers or 'random init'}), hidden "
                f"{report.hidden_size}, MLP {report.intermediate_size}, {report.n_heads}/{report.n_kv_heads} heads, "
                f"{report.params / 1e6:.1f}M params")
    student = student.to(ctx.device).requires_grad_(True)  # a pruned copy inherits the frozen teacher's flags
    if student.config.vocab_size != t_model.config.vocab_size:
        raise BadInputError(f"vocabulary mismatch: teacher {t_model.config.vocab_size} tokens, student "
                            f"{student.config.vocab_size}")
    start.student = student
    return start


def load_student(path: Path, device: torch.device) -> nn.Module:
    """A student saved by ``save_student``, fp32 and trainable on ``device``."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return student.to(device).requires_grad_(True)


@dataclass
class HiddenAlignment:
    """Hidden-state alignment: (student layer, teacher layer) pairs and the projector to the teacher's width."""

    pairs: list[tuple[int, int]]
    projector: nn.Module | None  # None: same width, or no alignment


def hidden_alignment_setup(cfg: DistillConfig, start: StudentStart, teacher_dir: Path,
                           device: torch.device) -> HiddenAlignment:
    """The alignment pairs and projector of --hidden-loss (one-stage runs only: validated in DistillConfig); none
    without it."""
    from edgeforge.distill.losses import HiddenProjector
    from edgeforge.distill.prune import teacher_layer_for

    if cfg.hidden_loss == "none":
        return HiddenAlignment([], None)
    student_config = start.student.config  # type: ignore[union-attr]
    n_s = student_config.num_hidden_layers
    n_t = int(read_model_config(teacher_dir)["num_hidden_layers"])
    pairs = [(i, teacher_layer_for(i, n_s, n_t, start.align_from)) for i in range(n_s)]
    t_width = int(read_model_config(teacher_dir)["hidden_size"])
    projector = None
    if student_config.hidden_size != t_width:
        projector = HiddenProjector(student_config.hidden_size, t_width, start.kept_hidden).to(device)
    return HiddenAlignment(pairs, projector)


def save_student(student: nn.Module, out: Path, tokenizer_dir: Path) -> None:
    """The student as an HF directory: fp32 safetensors, config, and the teacher's tokenizer files as they are."""
    out.mkdir(parents=True, exist_ok=True)
    student.config.use_cache = True
    student.save_pretrained(out, safe_serialization=True)
    for src in tokenizer_files(tokenizer_dir):
        shutil.copyfile(src, out / src.name)
