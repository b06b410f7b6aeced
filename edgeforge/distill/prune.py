"""Student initialisation from the teacher: depth and width pruning by measured importance, or a random student.

One calibration pass through the teacher records, with forward hooks:

- block influence of every decoder layer, ``BI = 1 - mean_tokens cos(h_in, h_out)`` (ShortGPT, Men et al. 2024):
  a layer that barely turns its input is the cheapest to drop. Depth pruning keeps the ``n`` most influential layers
  in their original order;
- MLP channel importance, the mean |activation| entering ``down_proj`` (Minitron, Muralidharan et al. 2024);
- attention head importance, the mean L2 norm of each head's output entering ``o_proj``. Under grouped-query
  attention heads are pruned by whole KV groups (a KV head with the query heads that share it; importance summed),
  so every kept query head keeps its own key/value head;
- hidden (embedding) channel importance, the mean |normalised input| of every layer's two RMSNorms.

Width choices use the teacher's statistics of the kept layers, so depth and width pruning combine in one pass.
Pruning copies the teacher and slices its weights: with nothing pruned the student equals the teacher exactly.
Supported: every family in edgeforge.distill.layouts (fused Phi-3 projections are split, sliced and re-fused).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from edgeforge.distill.layouts import (
    attention_projections,
    layout_for,
    linear_from,
    mlp_projections,
    set_attention_projections,
    set_mlp_projections,
)
from edgeforge.errors import BadInputError
from edgeforge.models.support import smollm3_rope_flags

InitMethod = Literal["auto", "depth", "width", "random"]
INIT_METHODS: tuple[str, ...] = ("auto", "depth", "width", "random")


@dataclass(frozen=True)
class StudentShape:
    """The student's dimensions; ``None`` keeps the teacher's value."""

    layers: int
    hidden_size: int | None = None
    intermediate_size: int | None = None
    kv_heads: int | None = None  # KV groups kept; query heads kept = kv_heads x (teacher's query heads per group)


@dataclass
class LayerStats:
    """Statistics of one decoder layer over the calibration tokens."""

    block_influence: float
    mlp_importance: Tensor  # [intermediate_size]
    head_importance: Tensor  # [n_heads]
    hidden_importance: Tensor  # [hidden_size]


@dataclass
class InitReport:
    """What the initialisation did: recorded in distill.json."""

    method: str
    teacher_layers: int
    kept_layers: list[int] = field(default_factory=list)
    block_influence: list[float] = field(default_factory=list)
    layers: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    params: int = 0
    calibration_tokens: int = 0
    kept_hidden_channels: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("kept_hidden_channels")
        return d


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers  # type: ignore[no-any-return]


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    return kwargs["hidden_states"]


def _out_tensor(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def collect_stats(model: nn.Module, calib_ids: Tensor, batch_size: int = 4) -> list[LayerStats]:
    """One pass over ``calib_ids`` [n_seq, seq_len] through ``model`` (in eval mode) with hooks on every layer.

    Returns one LayerStats per decoder layer. Costs ceil(n_seq / batch_size) forward passes.
    """
    layout = layout_for(model)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    layers = _layers(model)
    sums: list[dict[str, Any]] = [{"cos": 0.0, "mlp": 0.0, "head": 0.0, "hidden": 0.0} for _ in layers]
    n_tokens = 0
    handles = []

    def pre_layer(i: int):
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sums[i]["_in"] = _first_tensor(args, kwargs).float()
        return hook

    def post_layer(i: int):
        def hook(_m: nn.Module, _args: Any, _kwargs: Any, out: Any) -> None:
            h_in, h_out = sums[i].pop("_in"), _out_tensor(out).float()
            sums[i]["cos"] += torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum().item()
        return hook

    def pre_down(i: int):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            sums[i]["mlp"] = sums[i]["mlp"] + args[0].float().abs().sum(dim=(0, 1))
        return hook

    def pre_o(i: int):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].float()
            per_head = x.reshape(*x.shape[:-1], n_heads, -1).norm(dim=-1)  # [B, S, n_heads]
            sums[i]["head"] = sums[i]["head"] + per_head.sum(dim=(0, 1))
        return hook

    def post_norm(i: int):
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            sums[i]["hidden"] = sums[i]["hidden"] + _out_tensor(out).float().abs().sum(dim=(0, 1))
        return hook

    for i, layer in enumerate(layers):
        handles += [layer.register_forward_pre_hook(pre_layer(i), with_kwargs=True),
                    layer.register_forward_hook(post_layer(i), with_kwargs=True),
                    layer.mlp.down_proj.register_forward_pre_hook(pre_down(i)),
                    layer.self_attn.o_proj.register_forward_pre_hook(pre_o(i)),
                    *(getattr(layer, n).register_forward_hook(post_norm(i)) for n in layout.input_norms)]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(calib_ids), batch_size):
            x = calib_ids[start:start + batch_size].to(next(model.parameters()).device)
            model.model(input_ids=x, use_cache=False)  # the decoder only: no logits needed
            n_tokens += x.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [LayerStats(block_influence=1.0 - s["cos"] / n_tokens, mlp_importance=(s["mlp"] / n_tokens).cpu(),
                       head_importance=(s["head"] / n_tokens).cpu(), hidden_importance=(s["hidden"] / n_tokens).cpu())
            for s in sums]


def choose_layers(block_influence: list[float], n: int) -> list[int]:
    """Indices of the ``n`` most influential layers, in their original order (ties: the earlier layer)."""
    if not 1 <= n <= len(block_influence):
        raise BadInputError(f"student layers: expected 1..{len(block_influence)} (the teacher has "
                            f"{len(block_influence)}), found {n}")
    order = sorted(range(len(block_influence)), key=lambda i: (-block_influence[i], i))
    return sorted(order[:n])


def _top(importance: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` largest entries, ascending (so keeping everything keeps the original order)."""
    return torch.sort(torch.topk(importance, n, sorted=False).indices).values


def _slice(lin: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    """A new Linear keeping output ``rows`` and input ``cols`` of ``lin`` (None keeps all)."""
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w[rows.to(w.device)]
        b = b[rows.to(w.device)] if b is not None else None
    if cols is not None:
        w = w[:, cols.to(w.device)]
    return linear_from(w.contiguous(), b)


# ---------------------------------------------------------------- the pruning operations (in place)
def prune_depth(model: nn.Module, keep: list[int]) -> None:
    """Keep decoder layers ``keep`` (ascending), renumbering their cache slots."""
    layers = _layers(model)
    kept = [layers[i] for i in keep]
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    model.model.layers = nn.ModuleList(kept)
    cfg = model.config
    # Per-layer lists of the config follow their layers: Gemma 3's sliding/full attention, SmolLM3's RoPE on/off.
    for per_layer in ("layer_types", "no_rope_layers"):
        if getattr(cfg, per_layer, None) is not None:
            setattr(cfg, per_layer, [getattr(cfg, per_layer)[i] for i in keep])
    if getattr(cfg, "no_rope_layers", None) is not None and len(keep) < cfg.num_hidden_layers:
        # llama.cpp runs SmolLM3 with a fixed rule, RoPE off in every 4th layer (src/models/smollm3.cpp), and no
        # GGUF key can say otherwise: a student keeping the teacher's flags of other positions would run wrong
        # there. So the pruned student follows the rule; distillation then retrains the layers whose flag moved.
        cfg.no_rope_layers = smollm3_rope_flags(len(keep))
        for layer, use_rope in zip(kept, cfg.no_rope_layers, strict=True):
            layer.self_attn.use_rope = use_rope
    cfg.num_hidden_layers = len(keep)


def prune_mlp(model: nn.Module, keep_per_layer: list[Tensor]) -> None:
    """Keep the MLP channels ``keep_per_layer[l]`` ([intermediate'] ascending) of every layer."""
    layout = layout_for(model)
    for layer, keep in zip(_layers(model), keep_per_layer, strict=True):
        mlp = layer.mlp
        p = mlp_projections(layout, mlp)
        set_mlp_projections(layout, mlp, {"gate_proj": _slice(p["gate_proj"], rows=keep),
                                          "up_proj": _slice(p["up_proj"], rows=keep),
                                          "down_proj": _slice(p["down_proj"], cols=keep)})
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)
    model.config.intermediate_size = len(keep_per_layer[0])


def prune_kv_groups(model: nn.Module, keep_groups_per_layer: list[Tensor]) -> None:
    """Keep whole KV groups: group g = KV head g with query heads g*r .. g*r + r - 1 (r = heads per group)."""
    cfg = model.config
    layout = layout_for(model)
    head_dim = _head_dim(cfg)
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    r = n_heads // n_kv
    for layer, groups in zip(_layers(model), keep_groups_per_layer, strict=True):
        attn = layer.self_attn
        q_heads = (groups[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
        q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        p = attention_projections(layout, attn, n_heads, n_kv, head_dim)
        set_attention_projections(layout, attn, {
            "q_proj": _slice(p["q_proj"], rows=q_rows), "k_proj": _slice(p["k_proj"], rows=kv_rows),
            "v_proj": _slice(p["v_proj"], rows=kv_rows), "o_proj": _slice(p["o_proj"], cols=q_rows)})
        for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(groups))):
            if hasattr(attn, name):
                setattr(attn, name, value)
    n_groups = len(keep_groups_per_layer[0])
    cfg.head_dim = head_dim  # explicit: hidden_size // heads no longer gives it
    cfg.num_attention_heads = n_groups * r
    cfg.num_key_value_heads = n_groups


def prune_hidden(model: nn.Module, keep: Tensor) -> None:
    """Keep hidden (residual stream) channels ``keep`` everywhere: embeddings, norms, projections, head."""
    cfg = model.config
    layout = layout_for(model)
    if layout.hidden_pruning_blocked:
        raise BadInputError(f"cannot prune the hidden size of a '{cfg.model_type}' model: "
                            f"{layout.hidden_pruning_blocked}")
    cfg.head_dim = _head_dim(cfg)
    emb = model.model.embed_tokens
    new_emb = nn.Embedding(emb.num_embeddings, len(keep), padding_idx=emb.padding_idx, device=emb.weight.device,
                           dtype=emb.weight.dtype)
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight[:, keep.to(emb.weight.device)])
    model.model.embed_tokens = new_emb

    def norm(m: nn.Module) -> None:
        with torch.no_grad():
            m.weight = nn.Parameter(m.weight.detach()[keep.to(m.weight.device)].clone())

    for layer in _layers(model):
        for name in layout.hidden_norms:
            norm(getattr(layer, name))
        a, f = layer.self_attn, layer.mlp
        pa = attention_projections(layout, a, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        set_attention_projections(layout, a, {**{n: _slice(pa[n], cols=keep) for n in ("q_proj", "k_proj", "v_proj")},
                                              "o_proj": _slice(pa["o_proj"], rows=keep)})
        pf = mlp_projections(layout, f)
        set_mlp_projections(layout, f, {"gate_proj": _slice(pf["gate_proj"], cols=keep),
                                        "up_proj": _slice(pf["up_proj"], cols=keep),
                                        "down_proj": _slice(pf["down_proj"], rows=keep)})
        if hasattr(f, "hidden_size"):
            f.hidden_size = len(keep)
    norm(model.model.norm)
    cfg.hidden_size = len(keep)
    if getattr(cfg, "tie_word_embeddings", False):
        model.lm_head = nn.Linear(len(keep), emb.num_embeddings, bias=False, device=emb.weight.device,
                                  dtype=emb.weight.dtype)
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head = _slice(model.lm_head, cols=keep)


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------- the student
def _validate_shape(cfg: Any, shape: StudentShape) -> None:
    def bad(name: str, expected: str, found: int) -> BadInputError:
        return BadInputError(f"student {name}: expected {expected}, found {found}")

    if not 1 <= shape.layers <= cfg.num_hidden_layers:
        raise bad("layers", f"1..{cfg.num_hidden_layers} (the teacher has {cfg.num_hidden_layers})", shape.layers)
    if shape.hidden_size is not None and not 1 <= shape.hidden_size <= cfg.hidden_size:
        raise bad("hidden size", f"1..{cfg.hidden_size} (the teacher's)", shape.hidden_size)
    if shape.intermediate_size is not None and not 1 <= shape.intermediate_size <= cfg.intermediate_size:
        raise bad("intermediate size", f"1..{cfg.intermediate_size} (the teacher's)", shape.intermediate_size)
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    if shape.kv_heads is not None and not 1 <= shape.kv_heads <= n_kv:
        raise bad("KV heads", f"1..{n_kv} (the teacher's KV groups)", shape.kv_heads)


def _changes_width(cfg: Any, shape: StudentShape) -> bool:
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    return any(v is not None and v != full for v, full in ((shape.hidden_size, cfg.hidden_size),
                                                           (shape.intermediate_size, cfg.intermediate_size),
                                                           (shape.kv_heads, n_kv)))


def random_student(teacher_config: Any, shape: StudentShape, seed: int = 0) -> nn.Module:
    """A randomly initialised model of the teacher's architecture at ``shape`` (for comparison with pruning)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher_config)
    head_dim = _head_dim(cfg)
    r = cfg.num_attention_heads // (cfg.num_key_value_heads or cfg.num_attention_heads)
    cfg.head_dim = head_dim
    cfg.num_hidden_layers = shape.layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = cfg.layer_types[: shape.layers]
    if getattr(cfg, "no_rope_layers", None) is not None:
        cfg.no_rope_layers = smollm3_rope_flags(shape.layers)
    if shape.hidden_size is not None:
        cfg.hidden_size = shape.hidden_size
    if shape.intermediate_size is not None:
        cfg.intermediate_size = shape.intermediate_size
    if shape.kv_heads is not None:
        cfg.num_key_value_heads = shape.kv_heads
        cfg.num_attention_heads = shape.kv_heads * r
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def init_student(teacher: nn.Module, shape: StudentShape, method: InitMethod, calib_ids: Tensor | None,
                 seed: int = 0, stats: list[LayerStats] | None = None) -> tuple[nn.Module, InitReport]:
    """Build the student of ``shape`` from ``teacher`` (left unchanged).

    method: ``auto`` prunes depth and/or width, whatever ``shape`` needs; ``depth`` only drops layers (the width
    must equal the teacher's); ``width`` only narrows (the layer count must equal the teacher's); ``random`` is a
    fresh model of the teacher's architecture at ``shape``. ``calib_ids`` [n_seq, seq_len] feeds the importance
    measurement (or pass precomputed ``stats``).
    """
    cfg = teacher.config
    _validate_shape(cfg, shape)
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    report = InitReport(method=method, teacher_layers=cfg.num_hidden_layers)
    if method == "random":
        student = random_student(cfg, shape, seed)
    else:
        if method not in INIT_METHODS:
            raise BadInputError(f"--init: expected one of {', '.join(INIT_METHODS)}, found '{method}'")
        layout = layout_for(teacher)
        if layout.hidden_pruning_blocked and shape.hidden_size not in (None, cfg.hidden_size):
            raise BadInputError(f"cannot prune the hidden size of a '{cfg.model_type}' model: "
                                f"{layout.hidden_pruning_blocked}")
        if method == "depth" and _changes_width(cfg, shape):
            raise BadInputError("--init depth drops whole layers only, but a narrower width was asked for; use "
                                "--init auto (depth and width) or --init width")
        if method == "width" and shape.layers != cfg.num_hidden_layers:
            raise BadInputError(f"--init width keeps every layer ({cfg.num_hidden_layers}), but {shape.layers} "
                                "layers were asked for; use --init auto (depth and width) or --init depth")
        if stats is None:
            if calib_ids is None:
                raise ValueError("pruning needs calibration ids or precomputed stats")
            stats = collect_stats(teacher, calib_ids)
            report.calibration_tokens = int(calib_ids.numel())
        bi = [s.block_influence for s in stats]
        keep_layers = choose_layers(bi, shape.layers)
        report.block_influence = [round(b, 6) for b in bi]
        report.kept_layers = keep_layers
        student = copy.deepcopy(teacher)
        kept_stats = [stats[i] for i in keep_layers]
        prune_depth(student, keep_layers)
        r = cfg.num_attention_heads // n_kv
        if shape.kv_heads is not None and shape.kv_heads != n_kv:
            groups = [_top(s.head_importance.view(n_kv, r).sum(-1), shape.kv_heads) for s in kept_stats]
            prune_kv_groups(student, groups)
        if shape.intermediate_size is not None and shape.intermediate_size != cfg.intermediate_size:
            prune_mlp(student, [_top(s.mlp_importance, shape.intermediate_size) for s in kept_stats])
        if shape.hidden_size is not None and shape.hidden_size != cfg.hidden_size:
            hidden_imp = torch.stack([s.hidden_importance for s in kept_stats]).mean(0)
            keep_hidden = _top(hidden_imp, shape.hidden_size)
            prune_hidden(student, keep_hidden)
            report.kept_hidden_channels = keep_hidden.tolist()
    scfg = student.config
    report.layers = scfg.num_hidden_layers
    report.hidden_size = scfg.hidden_size
    report.intermediate_size = scfg.intermediate_size
    report.n_heads = scfg.num_attention_heads
    report.n_kv_heads = scfg.num_key_value_heads or scfg.num_attention_heads
    report.params = count_params(student)
    return student, report


def teacher_layer_for(student_layer: int, n_student: int, n_teacher: int, kept: list[int] | None) -> int:
    """The teacher layer whose output a student layer is aligned with: its origin when depth-pruned, else the
    proportional position (the last student layer maps to the last teacher layer)."""
    if kept:
        return kept[student_layer]
    return max(0, math.ceil((student_layer + 1) * n_teacher / n_student) - 1)
