"""How each family's decoder layer holds its projections and norms, so pruning slices every family the same way.

Most families keep separate ``q_proj``/``k_proj``/``v_proj`` and ``gate_proj``/``up_proj``; Phi-3 fuses them into
``qkv_proj`` (rows: queries [n_heads x head_dim], then keys, then values [n_kv x head_dim] each) and
``gate_up_proj`` (rows: gate [intermediate], then up [intermediate]). Pruning works on the parts: ``projections``
splits a fused weight into views, the pruner slices them, ``set_projections`` fuses them again in the same order.

The norms differ too: the norms whose outputs feed a projection (their channels are the hidden importance) are
``input_layernorm`` and ``post_attention_layernorm`` in Llama-style layers, but Gemma 3 normalises the attention and
MLP *outputs* with ``post_attention_layernorm`` / ``post_feedforward_layernorm`` and feeds the MLP from
``pre_feedforward_layernorm``. Qwen3 and Gemma 3's ``q_norm``/``k_norm`` run over head_dim, which no pruning changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from edgeforge.errors import BadInputError


@dataclass(frozen=True)
class DecoderLayout:
    """The module names of one family's decoder layer."""

    fused_qkv: bool = False
    fused_gate_up: bool = False
    #: Norms whose outputs feed a projection: their mean |output| per channel is the hidden importance.
    input_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    #: Every per-layer norm over the hidden (residual) channels: sliced when the hidden size shrinks.
    hidden_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    #: Why the hidden size cannot be pruned in this family (None: it can).
    hidden_pruning_blocked: str | None = None


_LLAMA = DecoderLayout()
_GEMMA3_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm")
LAYOUTS: dict[str, DecoderLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "smollm3": _LLAMA,
    "granite": _LLAMA,
    "phi3": DecoderLayout(fused_qkv=True, fused_gate_up=True),
    "gemma3_text": DecoderLayout(
        input_norms=("input_layernorm", "pre_feedforward_layernorm"), hidden_norms=_GEMMA3_NORMS,
        # Gemma scales the embeddings by sqrt(hidden_size), recomputed from the config when the model loads, and
        # ties them to the output head: a narrower hidden size changes the scale of the logits' input too, so the
        # pruned student would not be the teacher's slice. Depth, MLP and KV-head pruning are exact.
        hidden_pruning_blocked="Gemma 3 scales its tied embeddings by sqrt(hidden_size); prune depth, "
                               "--student-intermediate or --student-kv-heads instead"),
}


def layout_for(model: nn.Module) -> DecoderLayout:
    """The layout of ``model``'s family; BadInputError naming the families pruning knows otherwise."""
    model_type = str(getattr(model.config, "model_type", "?"))
    layout = LAYOUTS.get(model_type)
    inner = getattr(model, "model", None)
    ok = layout is not None and inner is not None and hasattr(inner, "layers") and hasattr(inner, "embed_tokens")
    if ok and len(inner.layers):
        layer = inner.layers[0]
        names = ["self_attn", "mlp", *layout.hidden_norms]
        attn = ["qkv_proj", "o_proj"] if layout.fused_qkv else ["q_proj", "k_proj", "v_proj", "o_proj"]
        mlp = ["gate_up_proj", "down_proj"] if layout.fused_gate_up else ["gate_proj", "up_proj", "down_proj"]
        ok = all(hasattr(layer, a) for a in names) and all(hasattr(layer.self_attn, a) for a in attn) \
            and all(hasattr(layer.mlp, a) for a in mlp)
    if not ok:
        raise BadInputError(f"cannot prune a '{model_type}' model: pruning knows the decoder layouts of "
                            f"{', '.join(LAYOUTS)}; give --student DIR or --init random instead")
    assert layout is not None
    return layout


def linear_from(weight: Any, bias: Any) -> nn.Linear:
    """A new Linear holding a copy of ``weight`` [out, in] and ``bias`` [out] (or none)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin


def _split(lin: nn.Linear, sizes: list[int]) -> list[nn.Linear]:
    ws = lin.weight.detach().split(sizes, dim=0)
    bs = lin.bias.detach().split(sizes, dim=0) if lin.bias is not None else [None] * len(sizes)
    return [linear_from(w, b) for w, b in zip(ws, bs, strict=True)]


def _fuse(parts: list[nn.Linear]) -> nn.Linear:
    import torch

    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    return linear_from(torch.cat([p.weight.detach() for p in parts]), bias)


def attention_projections(layout: DecoderLayout, attn: nn.Module, n_heads: int, n_kv: int,
                          head_dim: int) -> dict[str, nn.Linear]:
    """``{"q_proj", "k_proj", "v_proj", "o_proj"}`` of an attention block (views split from a fused qkv)."""
    if not layout.fused_qkv:
        return {n: getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q, k, v = _split(attn.qkv_proj, [n_heads * head_dim, n_kv * head_dim, n_kv * head_dim])
    return {"q_proj": q, "k_proj": k, "v_proj": v, "o_proj": attn.o_proj}


def set_attention_projections(layout: DecoderLayout, attn: nn.Module, parts: dict[str, nn.Linear]) -> None:
    """Put sliced projections back (fused again, queries then keys then values, where the family fuses them)."""
    if layout.fused_qkv:
        attn.qkv_proj = _fuse([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    else:
        attn.q_proj, attn.k_proj, attn.v_proj = parts["q_proj"], parts["k_proj"], parts["v_proj"]
    attn.o_proj = parts["o_proj"]


def mlp_projections(layout: DecoderLayout, mlp: nn.Module) -> dict[str, nn.Linear]:
    """``{"gate_proj", "up_proj", "down_proj"}`` of an MLP (views split from a fused gate_up)."""
    if not layout.fused_gate_up:
        return {n: getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")}
    half = mlp.gate_up_proj.out_features // 2
    gate, up = _split(mlp.gate_up_proj, [half, half])
    return {"gate_proj": gate, "up_proj": up, "down_proj": mlp.down_proj}


def set_mlp_projections(layout: DecoderLayout, mlp: nn.Module, parts: dict[str, nn.Linear]) -> None:
    """Put sliced MLP projections back (gate then up in one ``gate_up_proj`` where the family fuses them)."""
    if layout.fused_gate_up:
        mlp.gate_up_proj = _fuse([parts["gate_proj"], parts["up_proj"]])
    else:
        mlp.gate_proj, mlp.up_proj = parts["gate_proj"], parts["up_proj"]
    mlp.down_proj = parts["down_proj"]
