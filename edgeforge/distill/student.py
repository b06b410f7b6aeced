"""The student as the training loop sees it: the model plus the layer outputs that hidden-state alignment needs."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class StudentForKD(nn.Module):
    """The student, plus (for hidden-state alignment) the layer outputs it exposes and the projector.

    forward(input_ids [B, S]) -> (logits [B, S, V], [hidden of each aligned student layer, [B, S, D_t] through the
    projector when there is one, else [B, S, D_s]]). The projector runs inside forward so that DDP and FSDP see it
    as part of the module they wrap (FSDP gathers its sharded weight only inside the wrapped forward).
    """

    def __init__(self, student: nn.Module, align_layers: list[int], projector: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.projector = projector
        self.align_layers = align_layers

    def forward(self, input_ids: Tensor) -> tuple[Tensor, list[Tensor]]:
        captured = capture_layers(self.student, self.align_layers)
        try:
            logits = self.student(input_ids=input_ids, use_cache=False).logits
        finally:
            captured.remove()
        hidden = captured.outputs
        if self.projector is not None:
            hidden = [self.projector(h) for h in hidden]
        return logits, hidden


class LayerCapture:
    def __init__(self) -> None:
        self.outputs: list[Tensor] = []
        self.handles: list[Any] = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def capture_layers(model: nn.Module, layers: list[int]) -> LayerCapture:
    """Forward hooks that collect the outputs of decoder ``layers`` (in that order)."""
    cap = LayerCapture()
    slots: dict[int, int] = {}
    for j, i in enumerate(layers):
        slots[i] = j
    cap.outputs = [None] * len(layers)  # type: ignore[list-item]

    def hook(i: int):
        def fn(_m: nn.Module, _a: Any, out: Any) -> None:
            cap.outputs[slots[i]] = out[0] if isinstance(out, tuple) else out
        return fn

    for i in layers:
        cap.handles.append(model.model.layers[i].register_forward_hook(hook(i)))
    return cap
