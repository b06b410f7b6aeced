"""Read a task and count what fine-tuning on it costs: the planner's ``--task`` input (``edgeforge.plan.task_cost``).

The counts come from the task's examples as edgeforge's own ``finetune`` would run them: ``FinetuneSettings``'
default steps, batch size and ``max_seq_len`` (declared once there), and every example tokenized with the teacher's
own tokenizer and chat template (``encode_example``, the function training uses).
"""

from __future__ import annotations

import statistics
from typing import Any

from edgeforge.models.refs import ModelRef
from edgeforge.plan.task_cost import TaskCost


def teacher_tokenizer(ref: ModelRef) -> Any:
    """The teacher's tokenizer: from its HF directory, or read from the GGUF file's own vocabulary (transformers'
    GGUF loader reads the metadata only, not the weights; a teacher already materialized for a build is reused)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if ref.format == "hf":
        return AutoTokenizer.from_pretrained(str(ref.path))
    from edgeforge.models.gguf_hf import hf_dir_for
    from edgeforge.paths import edgeforge_home

    cached = hf_dir_for(ref.path, edgeforge_home())
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader's notice on legacy Llama tokenizers is not the user's business
    try:
        return AutoTokenizer.from_pretrained(str(ref.path.parent), gguf_file=ref.path.name)
    finally:
        hf_logging.set_verbosity(verbosity)


def task_cost(task: str, teacher: ModelRef, seed: int = 0) -> TaskCost:
    """Read ``task`` (a built-in task name or a JSONL path, as ``finetune --task`` takes it) and count its tokens.

    Raises BadInputError on an unknown task or a malformed file (the same checks as fine-tuning), before the
    teacher's tokenizer is loaded.
    """
    from edgeforge.finetune.config import FinetuneSettings
    from edgeforge.tasks.examples import IGNORE_INDEX, encode_example, load_task_examples

    train, heldout, source = load_task_examples(task, None, seed)
    tokenizer = teacher_tokenizer(teacher)
    defaults = FinetuneSettings()
    max_len = defaults.max_seq_len
    lengths, prompts, answers = [], [], []
    for ex in train:
        ids, labels = encode_example(tokenizer, ex["messages"], max_len=1 << 30)
        answer = sum(1 for t in labels if t != IGNORE_INDEX)
        lengths.append(len(ids))
        answers.append(answer)
        prompts.append(len(ids) - answer)
    capped = [min(n, max_len) for n in lengths]
    rows = defaults.steps * defaults.batch_size
    return TaskCost(
        source=source,
        train_examples=len(train),
        heldout_examples=len(heldout),
        mean_prompt_tokens=statistics.fmean(prompts),
        mean_answer_tokens=statistics.fmean(answers),
        max_example_tokens=max(lengths),
        max_seq_len=max_len,
        examples_over_max_seq_len=sum(n > max_len for n in lengths),
        steps=defaults.steps,
        batch_size=defaults.batch_size,
        epochs=rows / len(train),
        finetune_tokens=round(rows * statistics.fmean(capped)),
        seq_len=min(max(lengths), max_len),
    )
