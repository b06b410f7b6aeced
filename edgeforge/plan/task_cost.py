"""What a task costs to fine-tune on, as the planner takes it (``plan --task``): counts only, no tokenizer here.

``edgeforge.finetune.task_cost`` reads the task and fills this in (the planner never imports torch or
transformers, and the task's examples belong to the tasks layer above it). Without ``--task`` the plan keeps its
generic token budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TaskCost:
    """A task as edgeforge's fine-tuning would train on it (token counts with the teacher's tokenizer)."""

    source: str  # what was read, with the split's own description (held out, duplicates dropped)
    train_examples: int
    heldout_examples: int
    mean_prompt_tokens: float  # chat template included (system prompt, role markers)
    mean_answer_tokens: float  # the answer and its end token: what the loss is computed on
    max_example_tokens: int
    max_seq_len: int  # FinetuneSettings.max_seq_len: longer examples are cut (counted below)
    examples_over_max_seq_len: int
    steps: int  # FinetuneSettings.steps
    batch_size: int  # FinetuneSettings.batch_size
    epochs: float  # steps x batch_size / train_examples
    finetune_tokens: int  # steps x batch_size x mean tokens per example (capped at max_seq_len): forward tokens
    seq_len: int  # the longest training row a batch pads to: min(max_example_tokens, max_seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
