"""Every setting of a fine-tuning run (``FinetuneConfig``), validated in one place; errors name the flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from edgeforge.errors import BadInputError

Method = Literal["lora", "dora", "qlora"]


@dataclass
class FinetuneConfig:
    method: Method = "lora"
    rank: int = 16  # small models do well at 8-16; 32-64 suits large ones. DoRA is steadier across ranks.
    alpha: int | None = None  # default 2 x rank
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    rslora: bool = False
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 8
    max_seq_len: int = 256
    seed: int = 0
    l2sp: float = 0.0  # weight of the L2-SP penalty towards the starting weights
    mix_general: float = 0.0  # fraction of micro-batches drawn from general text instead of the task
    eval_examples: int = 100
    checkpoint_every: int = 50
    # techniques (docs/techniques.md); the defaults are plain LoRA
    rank_sweep: tuple[int, ...] = ()  # ranks tried on a short budget first; the full run uses the pick (ft_rank_sweep)
    rank_sweep_steps: int | None = None  # steps per swept rank [default: max(10, steps // 5)]
    layerwise_lr_decay: float = 1.0  # lr x decay^(distance from the top layer); 1: off (ft_layerwise_lr)
    ewc: float = 0.0  # EWC strength λ: penalty λ/2 Σ F (θ − θ0)², F the diagonal Fisher on general text (ft_ewc)
    ewc_batches: int = 8  # general-text sequences for the Fisher estimate
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rank_sweep = tuple(int(r) for r in self.rank_sweep)
        problems = [(name, expected) for name, ok, expected in (
            ("rank_sweep", all(r >= 1 for r in self.rank_sweep), "positive ranks such as 4,8,16"),
            ("rank_sweep_steps", self.rank_sweep_steps is None or self.rank_sweep_steps >= 1, "an integer >= 1"),
            ("layerwise_lr_decay", 0.0 < self.layerwise_lr_decay <= 1.0, "a number in (0, 1]"),
            ("ewc", self.ewc >= 0, "a number >= 0"),
            ("ewc_batches", self.ewc_batches >= 1, "an integer >= 1")) if not ok]
        if problems:
            name, expected = problems[0]
            raise BadInputError(f"--{name.replace('_', '-')}: expected {expected}, found {getattr(self, name)}")
