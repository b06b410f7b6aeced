"""Built-in fine-tuning tasks that need no download, registered by name."""

from __future__ import annotations

from collections.abc import Callable

from edgeforge.errors import BadInputError

# name -> function(seed) -> (train examples, held-out examples); each example {"messages": [...]}.
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


from edgeforge.tasks import home_commands  # noqa: E402,F401  (registers itself)
