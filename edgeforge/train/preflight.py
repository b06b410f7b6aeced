"""Pre-flight: before a training stage loads anything, does this machine have the memory the stage will need?

The prediction is the planner's own (``edgeforge.plan.training_cost.training_memory_bytes``, the figure ``plan`` shows),
for this device: fp32 weights as edgeforge loads them, activations in fp32 on a CPU and bf16 under CUDA autocast.
It errs high for fine-tuning (it counts logits at every position, where fine-tuning computes them at the answer
tokens only) and is checked against real runs by ``benchmarks/train_memory.py``, so a refusal
means the run would most likely be killed by the kernel's out-of-memory killer part-way, losing the work so far.

What is available: psutil's available memory, capped by a cgroup v2 limit when the process runs in a container;
on CUDA the device's free memory. ``EDGEFORGE_AVAILABLE_MEMORY_BYTES`` overrides the figure (a machine shared with
other jobs; tests).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from edgeforge.errors import BadInputError, ResourceError
from edgeforge.models.refs import ModelArch
from edgeforge.plan.training_cost import Method, training_memory_bytes

AVAILABLE_MEMORY_ENV = "EDGEFORGE_AVAILABLE_MEMORY_BYTES"
_CGROUP = Path("/sys/fs/cgroup")


def _cgroup_headroom_bytes() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), or None when unlimited or unknown."""
    try:
        limit = (_CGROUP / "memory.max").read_text().strip()
        used = (_CGROUP / "memory.current").read_text().strip()
    except OSError:
        return None
    if limit == "max" or not limit.isdigit() or not used.isdigit():
        return None
    return max(0, int(limit) - int(used))


def available_memory_bytes(device: str = "cpu") -> int:
    """Bytes a stage may still allocate on ``device`` ('cpu' or 'cuda')."""
    override = os.environ.get(AVAILABLE_MEMORY_ENV)
    if override:
        try:
            return int(float(override))
        except ValueError:
            raise BadInputError(f"{AVAILABLE_MEMORY_ENV}={override!r}: expected a number of bytes") from None
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    available = int(psutil.virtual_memory().available)
    headroom = _cgroup_headroom_bytes()
    return available if headroom is None else min(available, headroom)


def check_training_memory(stage: str, method: Method, arch: ModelArch, batch: int, seq_len: int, device: str = "cpu",
                          teacher: ModelArch | None = None, checkpointing: bool = False) -> int:
    """Raise ResourceError when ``stage`` would need more memory than is available; returns the prediction."""
    need = training_memory_bytes(method, arch, batch, seq_len, teacher, checkpointing=checkpointing,
                                 device="cpu" if device == "cpu" else "cuda")
    have = available_memory_bytes(device)
    if need > have:
        fix = ("lower --batch-size or --seq-len, or distill into a smaller student" if method == "distill"
               else "lower --batch-size, or use --method qlora")
        raise ResourceError(
            f"{stage}: not enough memory: training {arch.architecture} ({arch.n_params / 1e6:.0f}M parameters, "
            f"{method}) at batch {batch} x {seq_len} tokens needs about {_size(need)}, {_size(have)} are available "
            f"on {device}; {fix}, or free memory ({AVAILABLE_MEMORY_ENV} overrides the available figure)")
    return need


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_distill_memory(teacher_dir: Path, student_dir: Path | None, shape: Any, batch: int, seq_len: int,
                         device: str = "cpu") -> int:
    """The distillation pre-flight, from config files only: the teacher's HF directory, and the student's
    (``--student``) or its target ``shape`` (a ``distill.prune.StudentShape``: None fields keep the teacher's)."""
    from edgeforge.models.files import read_json_object
    from edgeforge.models.refs import arch_from_config, count_params

    teacher = arch_from_config(read_json_object(teacher_dir / "config.json"), str(teacher_dir / "config.json"))
    if student_dir is not None:
        student = arch_from_config(read_json_object(student_dir / "config.json"), str(student_dir / "config.json"))
    else:
        hidden = shape.hidden_size or teacher.hidden_size
        inter = shape.intermediate_size or teacher.intermediate_size
        kv = shape.kv_heads or teacher.n_kv_heads
        heads = kv * max(1, teacher.n_heads // teacher.n_kv_heads)
        student = dataclasses.replace(
            teacher, n_layers=shape.layers, hidden_size=hidden, intermediate_size=inter, n_heads=heads, n_kv_heads=kv,
            n_params=count_params(shape.layers, hidden, heads, kv, teacher.head_dim, inter, teacher.vocab_size,
                                  teacher.tied_embeddings, teacher.qkv_bias))
    return check_training_memory("distill", "distill", student, batch, seq_len, device, teacher=teacher)
