"""Layer-wise learning-rate decay for fine-tuning (``--layerwise-lr-decay γ``; Howard & Ruder 2018, ELECTRA, BEiT).

A parameter in decoder layer i of L gets ``lr × γ^(L − 1 − i)``: the top layer trains at the full rate, each layer
below at γ times the one above, so the general features of the lower layers change least. Parameters outside the
decoder layers: the embedding (the bottom) gets ``γ^L``; the final norm and the output head (the top) get 1.
The loop (edgeforge.train.loop) multiplies its scheduled learning rate by each group's ``lr_scale``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBEDDING = ("embed_tokens", "wte", "word_embeddings")


def layer_of(name: str) -> int | None:
    """The decoder layer index in a parameter name (``...layers.3.mlp...`` -> 3), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def lr_scale(name: str, n_layers: int, decay: float) -> float:
    """The multiplier of the learning rate for parameter ``name`` (see module doc)."""
    i = layer_of(name)
    if i is not None:
        return decay ** (n_layers - 1 - i)
    if any(e in name for e in _EMBEDDING):
        return decay ** n_layers
    return 1.0


def layerwise_param_groups(model: nn.Module, n_layers: int, decay: float) -> list[dict[str, Any]]:
    """The trainable parameters grouped by learning-rate scale: [{"params": [...], "lr_scale": s, "names": [...]}],
    top first. ``decay`` in (0, 1]; 1 gives one group at scale 1."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer-wise lr decay: expected a number in (0, 1], found {decay}")
    groups: dict[float, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        s = lr_scale(name, n_layers, decay)
        g = groups.setdefault(s, {"params": [], "lr_scale": s, "names": []})
        g["params"].append(p)
        g["names"].append(name)
    return sorted(groups.values(), key=lambda g: -g["lr_scale"])


def layerwise_setup(model: nn.Module, decay: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The parameter groups for edgeforge.train.loop.train and what the record says about them."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_layers = int(core.config.num_hidden_layers)
    groups = layerwise_param_groups(model, n_layers, decay)
    info = {"decay": decay, "layers": n_layers, "rule": "lr x decay^(layers - 1 - layer index); embedding "
            "decay^layers; final norm and head 1",
            "groups": [{"lr_scale": g["lr_scale"], "tensors": len(g["params"]),
                        "parameters": sum(p.numel() for p in g["params"]),
                        "layers": sorted({i for n in g["names"] if (i := layer_of(n)) is not None})}
                       for g in groups]}
    return groups, info
