"""One distillation run as each of its steps sees it: the settings, this process's place among the run's processes,
the device, the progress log, where the run keeps its files, and the teacher forward passes counted so far."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgeforge.distill.config import CHECKPOINT_DIR, STATE_FILE, DistillConfig

Log = Callable[[str], None]
OnLog = Callable[[dict[str, float]], None]


def _no_passes() -> dict[str, int]:
    return {"training": 0, "calibration": 0, "evaluation": 0}


@dataclass
class RunContext:
    cfg: DistillConfig
    rank: int
    world: int  # processes of the run (torchrun); 1 without
    main: bool  # the main process: the only one that writes, evaluates and builds caches
    device: torch.device
    say: Log  # progress lines; a no-op on the other processes
    on_log: OnLog | None  # the training loop's metrics at each of its log steps
    cache_root: Path  # the KD caches: the teacher's answers and rationales, the offline top-k shards
    #: teacher forward passes by purpose (the record's teacher_forward_passes and teacher_forward_passes_other)
    passes: dict[str, int] = field(default_factory=_no_passes)

    @property
    def out(self) -> Path:
        return self.cfg.out

    @property
    def checkpoint_dir(self) -> Path:
        """The training checkpoints (only for --resume: removed when the run ends)."""
        return self.cfg.out / CHECKPOINT_DIR

    @property
    def state_path(self) -> Path:
        """The run's state file (edgeforge.distill.resume)."""
        return self.cfg.out / STATE_FILE
