"""The teacher of a distillation run: where it lives (an HF directory, or a GGUF dequantized once into one), the check
that a student or an extra teacher shares its vocabulary, and the precision it computes the training signal in."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeforge.distill.parallel import barrier
from edgeforge.errors import BadInputError, EdgeforgeError
from edgeforge.models.files import read_model_config


@dataclass
class Teacher:
    name: str
    format: str
    path: Path  # what the user named (GGUF file or HF dir)
    hf_dir: Path  # the HF form, loaded by transformers
    gguf: Path | None  # the GGUF file, when the teacher is one (llama.cpp generates answers from it)
    identity: dict[str, Any] = field(default_factory=dict)

    def load(self, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.hf_dir), dtype=dtype).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model


def resolve_teacher(name: str | None, main: bool) -> Teacher:
    """The teacher in HF form (a GGUF is dequantized once, by the main process, into the edgeforge cache)."""
    from edgeforge.distill.teacher_cache import model_identity
    from edgeforge.models.gguf_hf import hf_dir_for, materialize_hf
    from edgeforge.models.refs import resolve_model
    from edgeforge.paths import edgeforge_home

    ref = resolve_model(name)
    if ref.format == "gguf":
        hf_dir = hf_dir_for(ref.path, edgeforge_home())
        if main:
            materialize_hf(ref.path, hf_dir)
        barrier()
        return Teacher(ref.name, "gguf", ref.path, hf_dir, ref.path, model_identity(ref.path))
    return Teacher(ref.name, "hf", ref.path, ref.path, None, model_identity(ref.path))


def has_tokenizer(path: Path) -> bool:
    """Whether the model directory ``path`` carries a tokenizer of its own."""
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def check_vocabulary(teacher_dir: Path, student_dir: Path, teacher_tokenizer: Any | None = None,
                     role: str = "student") -> None:
    """Raise BadInputError unless the ``role`` model's vocabulary (the student's, or an extra teacher's) is the
    teacher's: same size and, when it carries a tokenizer, the same tokens. Runs before any model is loaded."""
    t_cfg, s_cfg = read_model_config(teacher_dir), read_model_config(student_dir)
    tv, sv = t_cfg.get("vocab_size"), s_cfg.get("vocab_size")
    fix = f"distillation compares next-token distributions, so give a{'n' if role[0] in 'aeiou' else ''} {role} " \
          "that uses the teacher's tokenizer"
    if tv != sv:
        raise BadInputError(f"vocabulary mismatch: the teacher ({teacher_dir}) has {tv} tokens, the {role} "
                            f"({student_dir}) has {sv}; {fix}")
    if has_tokenizer(student_dir):
        from transformers import AutoTokenizer

        t_tok = teacher_tokenizer or AutoTokenizer.from_pretrained(str(teacher_dir))
        s_vocab, t_vocab = AutoTokenizer.from_pretrained(str(student_dir)).get_vocab(), t_tok.get_vocab()
        if s_vocab != t_vocab:
            diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda x: x[1])[:1]
            raise BadInputError(f"tokenizer mismatch: the {role}'s tokenizer ({student_dir}, {len(s_vocab)} "
                                f"entries) differs from the teacher's ({len(t_vocab)}), e.g. at {diff}; {fix}")


def resolve_teachers(teacher_name: str | None, extra_names: tuple[str, ...] | list[str], student_dir: Path | None,
                     main: bool) -> tuple[Teacher, list[Teacher]]:
    """The teacher and the extra teachers, each extra teacher (and a given student) checked to share the teacher's
    vocabulary: a mixture or a routing compares distributions over the same tokens."""
    teacher = resolve_teacher(teacher_name, main)
    extras = [resolve_teacher(name, main) for name in extra_names]
    for x in extras:
        check_vocabulary(teacher.hf_dir, x.hf_dir, role="extra teacher")
    if student_dir is not None:
        check_vocabulary(teacher.hf_dir, student_dir)
    return teacher, extras


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def teacher_train_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The teacher's precision for the training signal. ``auto``: bfloat16 where the hardware computes it natively
    (CUDA with bf16, CPUs with AMX-BF16 or AVX512-BF16: several times faster than fp32 here), else float32.
    Evaluation always uses the fp32 teacher."""
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def config_param_count(hf_dir: Path) -> int | None:
    """The parameter count of the model in ``hf_dir``, from its config alone (None when the architecture is not one
    edgeforge reads)."""
    try:
        from edgeforge.models.refs import arch_from_config

        return arch_from_config(read_model_config(hf_dir)).n_params
    except EdgeforgeError:
        return None
