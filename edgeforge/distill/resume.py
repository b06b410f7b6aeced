"""What lets an interrupted distillation run continue (--resume): the run's state file (``OUT/STATE_FILE``: the
settings' fingerprint, the teacher's and the initial student's held-out metrics, the finished progressive stages) and
the check that a run never silently overwrites, or resumes with other settings, an interrupted one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeforge.distill.config import TECHNIQUE_FIELDS, DistillConfig
from edgeforge.errors import BadInputError


def check_out_dir(cfg: DistillConfig, ckpt: Path, state_path: Path) -> None:
    """A new run never silently overwrites an interrupted one; a resumed run must be the same run."""
    if cfg.resume:
        if state_path.is_file():
            saved = json.loads(state_path.read_text(encoding="utf-8")).get("fingerprint")
            if saved is not None:  # a run started before a setting existed ran with its default
                defaults = DistillConfig(out=cfg.out, student_layers=1).to_dict()
                saved = {**{k: defaults[k] for k in TECHNIQUE_FIELDS}, "parallel": "ddp", **saved}
            now = cfg.fingerprint()
            diff = sorted(k for k in set(saved or {}) | set(now) if (saved or {}).get(k) != now.get(k))
            if diff:
                raise BadInputError(f"--resume: {cfg.out} holds a run with other settings ({', '.join(diff)}); "
                                    "resume with the same settings or choose another --out")
        return
    if ckpt.exists() or state_path.exists():
        raise BadInputError(f"{cfg.out} holds an interrupted run; pass --resume to continue it, or remove the "
                            "directory / choose another --out to start over")


def read_state(cfg: DistillConfig, state_path: Path) -> dict[str, Any] | None:
    """The state an interrupted run left (with --resume), else None: the run starts afresh."""
    return json.loads(state_path.read_text(encoding="utf-8")) if cfg.resume and state_path.is_file() else None


def write_state(state_path: Path, state: dict[str, Any]) -> None:
    state_path.write_text(json.dumps(state, indent=1), encoding="utf-8")
