"""Built-in fine-tuning tasks that need no download, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from edgeforge.errors import BadInputError

# name -> function(seed[, n_train, n_heldout]) -> (train examples, held-out examples); each example
# {"messages": [...]}.
TaskBuilder = Callable[[int], tuple[list[dict], list[dict]]]
_TASKS: dict[str, TaskBuilder] = {}


def register_task(name: str, builder: TaskBuilder) -> None:
    if name in _TASKS:
        raise ValueError(f"task '{name}' is already registered")
    _TASKS[name] = builder


def task_names() -> list[str]:
    return sorted(_TASKS)


def build_task(name: str, seed: int = 0) -> tuple[list[dict], list[dict]]:
    if name not in _TASKS:
        raise BadInputError(f"unknown task '{name}'; built-in tasks: {', '.join(task_names())} (or give a JSONL path)")
    return _TASKS[name](seed)


def generated_training_examples(name: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` more examples of a built-in task drawn like its training split (its training phrasings and values,
    never the held-out ones), from another seed stream than the task's own split; any whose prompt equals a
    held-out prompt is dropped, so they can join training data without touching the fixed evaluation set."""
    _, held = build_task(name, seed)  # refuses an unknown name
    held_prompts = {_prompt(e) for e in held}
    more, _ = _TASKS[name](seed + 1_000_003, n_train=n, n_heldout=0)  # type: ignore[call-arg]
    return [e for e in more if _prompt(e) not in held_prompts]


def _prompt(example: dict) -> str:
    return "\x1e".join(m["content"] for m in example["messages"][:-1])


from edgeforge.tasks import home_commands  # noqa: E402,F401  (registers itself)
