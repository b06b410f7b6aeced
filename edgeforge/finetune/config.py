"""Every setting of a fine-tuning run, declared once: ``FinetuneSettings`` (type, default, bounds, help of each) and
``FinetuneConfig`` (a run). ``edgeforge finetune``'s options and the pipeline file's ``finetune:`` section are
generated from these models; errors name the ``--flag``. Kept free of torch at import (the CLI reads it at start).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, field_validator, model_validator

from edgeforge.settings import FlagErrors, StageSettings

Method = Literal["lora", "dora", "qlora", "full"]
ALL_LINEAR = "all-linear"


class FinetuneSettings(StageSettings):
    """How an adapter is trained: the settings ``edgeforge finetune`` and a pipeline's ``finetune:`` share."""

    method: Method = Field("lora", description="LoRA; DoRA (weight-decomposed, steadier across ranks); QLoRA (NF4 "
                           "4-bit base, double quant); full (every weight trained, no adapter: for small models; "
                           "use a lower --lr, e.g. 1e-4).")
    rank: int = Field(16, ge=1, description="Adapter rank: 8-16 for tiny models, 32-64 for large ones.")
    alpha: int | None = Field(None, ge=1, description="LoRA alpha [default: 2 x rank].")
    dropout: float = Field(0.05, ge=0, le=1, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field(ALL_LINEAR, description="Comma-separated module names, or all-linear.")
    rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(rank)).")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Examples per batch.")
    max_seq_len: int = Field(256, ge=8, description="Longest training example (tokens; longer ones are cut).")
    gradient_checkpointing: bool = Field(False, description="Recompute each layer's activations in the backward "
                                         "pass instead of keeping them: less memory, about a third more compute "
                                         "(the pre-flight and the planner's training memory follow it).")
    l2sp: float = Field(0.0, ge=0, description="L2-SP penalty towards the starting weights, to limit forgetting.")
    mix_general: float = Field(0.0, ge=0, le=1, description="Fraction of batches of general text mixed in, to "
                               "limit forgetting.")
    eval_examples: int = Field(100, ge=1, description="Held-out examples for task accuracy (greedy generation).")
    # >= 0 as in distillation (the CLI once refused 0 here though the loop has always taken 0 for "no checkpoints").
    checkpoint_every: int = Field(50, ge=0, description="Steps between checkpoints, what --resume continues from "
                                  "(0: none).")
    # The techniques (docs/techniques.md); every default is "off": plain LoRA.
    rank_sweep: tuple[PositiveInt, ...] = Field((), json_schema_extra={"example": "4,8,16"},
                                                description="LoRA rank selection: train each rank briefly, pick by "
                                                "validation accuracy per trainable parameter, then run the full "
                                                "budget at that rank (overrides --rank).")
    rank_sweep_steps: int | None = Field(None, ge=1, description="Steps per swept rank [default: max(10, steps / "
                                         "5)].")
    layerwise_lr_decay: float = Field(1.0, gt=0, le=1, description="Layer-wise learning rate: lr x "
                                      "decay^(distance from the top layer) (1: off).")
    ewc: float = Field(0.0, ge=0, description="EWC strength λ against forgetting: λ/2 Σ F (θ − θ0)², F the diagonal "
                       "Fisher on general text (normalised to mean 1).")
    ewc_batches: int = Field(8, ge=1, description="General-text sequences for the EWC Fisher estimate.")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _module_names(cls, value: Any) -> Any:
        """``"q_proj, v_proj"`` -> ["q_proj", "v_proj"]; ``all-linear`` (peft's every-linear-layer) stays text."""
        if isinstance(value, str) and value != ALL_LINEAR:
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("rank_sweep")
    @classmethod
    def _distinct_ranks(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        """Each rank once, smallest first (the order the sweep reports them in)."""
        return tuple(sorted(set(value)))


class FinetuneConfig(FinetuneSettings, FlagErrors):
    """One fine-tuning run's settings (the model, task and output are ``run_finetune``'s arguments)."""

    @model_validator(mode="after")
    def _sweep_needs_an_adapter(self) -> FinetuneConfig:
        """A rank sweep chooses an adapter's rank: full fine-tuning has none."""
        if self.rank_sweep and self.method == "full":
            from edgeforge.errors import BadInputError

            raise BadInputError(f"--rank-sweep: expected no sweep with --method full (it has no adapter rank), "
                                f"found {','.join(map(str, self.rank_sweep))}")
        return self

    seed: int = Field(0, description="Seed of the adapter's initialisation and the batch order.")
    train: dict[str, Any] = Field(default_factory=dict, json_schema_extra={"internal": True},
                                  description="Extra edgeforge.train.loop.TrainConfig fields, for library callers; "
                                  "not a command-line or pipeline setting.")
