"""Fit an ONNX decoder to a byte budget: 4 or 8 bits per linear layer, chosen from measured sensitivity.

The ONNX counterpart of ``edgeforge.export.fit`` (GGUF). The choice per MatMul is the one onnxruntime's
``MatMulNBits`` offers a fast prepacked CPU kernel for: symmetric blocks of 32 at 4 or 8 bits (the recipe of
``export.onnx.quantize``; the embedding and the head stay at 8 bits, as in every export).

- **Groups.** Per decoder layer: the attention's q/k/o projections, its v projection, the MLP's gate/up, its down
  projection (``GROUP_OF_PROJECTION``): v and down are where llama.cpp's mixes and the fixed int4 recipe give
  more bits, so they are groups of their own. A projection this table does not know is a group by its own name.
- **Sensitivity.** The fp32 graph is quantized once at 8 bits and once at 4 bits (onnxruntime's quantizer, two
  calls in all). A group's cost is the mean KL to the fp32 graph of the 8-bit graph with only that group's
  MatMulNBits nodes taken from the 4-bit graph, minus that of the all-8-bit graph, each run in onnxruntime over
  the calibration tokens. Composing the graphs instead of quantizing again per group costs one session a group
  (~2-4 s for SmolLM2-135M on 2 cores) instead of one quantizer run (~30 s). Cached by the source graph's
  content, the calibration tokens, the groups and the onnxruntime version.
- **Allocation.** ``export.fit.allocate``'s exact multiple-choice knapsack over the groups' exact bytes (read
  from the quantized initializers), the same solver as the GGUF fit.
- **Writing.** onnxruntime's quantizer once more, 4 bits except the nodes chosen at 8 (what ``quantize_onnx``
  does for the int4 recipe with its fixed list); the written graph is measured on the calibration tokens
  and its size checked against the budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeforge.errors import BadInputError, EdgeforgeError
from edgeforge.export.fit.allocate import Option, allocate

#: projection name in optimum's node names (``/model/layers.3/self_attn/q_proj/MatMul``) -> the group it joins
GROUP_OF_PROJECTION = {"q_proj": "attn_qko", "k_proj": "attn_qko", "o_proj": "attn_qko", "v_proj": "attn_v",
                       "gate_proj": "mlp_gate_up", "up_proj": "mlp_gate_up", "down_proj": "mlp_down"}
_LAYER = re.compile(r"/layers\.(\d+)/")
_PROJECTION = re.compile(r"/(\w+?)/MatMul")
#: Bytes kept free for what the written graph may differ from the measured one by (node and initializer names):
#: the fixed part is the serialized all-8-bit graph less its linear layers' weights, so framing is counted already.
GRAPH_MARGIN_BYTES = 4096
CALIBRATION_CHARS = 6000
CALIBRATION_TOKENS = 384
SENSITIVITY_RECIPE = 1  # bump when the measurement changes, so cached results are not reused across recipes
#: in-memory sessions: protobuf cannot serialize a graph over 2 GiB
_MAX_IN_MEMORY_BYTES = 1_900_000_000


def group_name(node_name: str) -> str:
    """The group of a linear layer's MatMul node: ``layer.N.<role>`` (GROUP_OF_PROJECTION) or the node's name."""
    layer, proj = _LAYER.search(node_name), _PROJECTION.search(node_name)
    if layer and proj:
        return f"layer.{int(layer.group(1))}.{GROUP_OF_PROJECTION.get(proj.group(1), proj.group(1))}"
    return node_name


def linear_groups(node_names: list[str]) -> dict[str, list[str]]:
    """group -> its MatMul node names, in graph order of the groups' first nodes."""
    groups: dict[str, list[str]] = {}
    for name in node_names:
        groups.setdefault(group_name(name), []).append(name)
    return groups


@dataclass
class OnnxFit:
    budget_bytes: int
    group_bits: dict[str, int]
    node_bits: dict[str, int]  # MatMul node name (before quantization) -> bits
    group_bytes: int
    fixed_bytes: int
    predicted_mean_kl: float
    int8_mean_kl: float  # every linear layer at 8 bits
    cost: dict[str, float]  # group -> mean KL added when it alone is at 4 bits
    n_tokens: int
    sensitivity_seconds: float
    from_cache: bool
    measured_mean_kl: float | None = None

    @property
    def judged_as(self) -> str:
        """The thresholds the mix is verified at: int4's when any linear layer is at 4 bits, else int8's."""
        return "int4" if 4 in self.node_bits.values() else "int8"

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "group_bits": self.group_bits, "node_bits": self.node_bits,
                "group_bytes": self.group_bytes, "fixed_bytes": self.fixed_bytes,
                "predicted_mean_kl": self.predicted_mean_kl, "measured_mean_kl": self.measured_mean_kl,
                "judged_as": self.judged_as,
                "sensitivity": {"int8_mean_kl": self.int8_mean_kl, "cost_at_4_bits": self.cost,
                                "n_tokens": self.n_tokens, "seconds": self.sensitivity_seconds,
                                "from_cache": self.from_cache},
                "method": "per-group mean KL at 4 bits measured in onnxruntime on composed int8/int4 graphs, exact "
                          "multiple-choice knapsack over bytes"}


# ------------------------------------------------------------------------------------------------------ sessions
def _session(model: Any, threads: int | None) -> Any:
    from edgeforge.export.onnx.session import make_session

    data = model.SerializeToString()
    if len(data) > _MAX_IN_MEMORY_BYTES:
        raise BadInputError(f"a fitted ONNX mix measures graphs in memory, which protobuf limits to 2 GiB; this one "
                            f"is {len(data) / 1e9:.1f} GB at 8 bits: use --quantize int4 or int8 for it")
    return make_session(data, threads)


def _logprobs(session: Any, config: dict[str, Any], token_ids: list[int]) -> Any:
    """[n_tokens, vocab] float32 log-probabilities of a session (torch: fast over a 49k vocabulary)."""
    import torch

    from edgeforge.export.onnx.session import session_logits

    return torch.log_softmax(torch.from_numpy(session_logits(session, config, token_ids)), dim=-1)


def _mean_kl(ref: Any, test: Any) -> float:
    return float((ref.exp() * (ref - test)).sum(-1).mean())


# --------------------------------------------------------------------------------------------------- composition
def _nbits_nodes(model: Any) -> dict[str, Any]:
    """output tensor name -> MatMulNBits node (the quantizer keeps the MatMul's output name)."""
    return {n.output[0]: n for n in model.graph.node if n.op_type == "MatMulNBits"}


def _initializer_bytes(model: Any) -> dict[str, int]:
    return {t.name: len(t.raw_data) if t.raw_data else t.ByteSize() for t in model.graph.initializer}


class _Composer:
    """The all-8-bit graph, into which groups of 4-bit nodes are swapped and out again (in place: one copy)."""

    def __init__(self, m8: Any, m4: Any, outputs_of: dict[str, str]) -> None:
        self.m8 = m8
        self.outputs_of = outputs_of  # MatMul node name -> its output tensor
        self.index8 = {n.output[0]: i for i, n in enumerate(m8.graph.node) if n.op_type == "MatMulNBits"}
        self.nodes4 = _nbits_nodes(m4)
        self.inits4 = {t.name: t for t in m4.graph.initializer}
        nodes8 = _nbits_nodes(m8)
        sizes8, sizes4 = _initializer_bytes(m8), _initializer_bytes(m4)
        self.bytes8 = {name: sum(sizes8.get(i, 0) for i in nodes8[out].input[1:])
                       for name, out in outputs_of.items()}
        self.bytes4 = {name: sum(sizes4.get(i, 0) for i in self.nodes4[out].input[1:])
                       for name, out in outputs_of.items()}

    def swapped(self, node_names: list[str]) -> _Swap:
        return _Swap(self, node_names)


class _Swap:
    def __init__(self, composer: _Composer, node_names: list[str]) -> None:
        self.c, self.names = composer, node_names

    def __enter__(self) -> Any:
        g = self.c.m8.graph
        self.saved: list[tuple[int, Any]] = []
        self.added = 0
        for name in self.names:
            out = self.c.outputs_of[name]
            i = self.c.index8[out]
            old = type(g.node[i])()
            old.CopyFrom(g.node[i])
            self.saved.append((i, old))
            new = self.c.nodes4[out]
            g.node[i].CopyFrom(new)
            del g.node[i].input[1:]
            for inp in new.input[1:]:  # the 4-bit initializers, renamed so they cannot collide with the 8-bit ones
                t = g.initializer.add()
                t.CopyFrom(self.c.inits4[inp])
                t.name = f"{inp}.fit4"
                g.node[i].input.append(t.name)
                self.added += 1
        return self.c.m8

    def __exit__(self, *exc: object) -> None:
        g = self.c.m8.graph
        for i, old in self.saved:
            g.node[i].CopyFrom(old)
        if self.added:
            del g.initializer[-self.added:]


# ------------------------------------------------------------------------------------------------------------- fit
def calibration_ids(model_dir: Path, text: str) -> list[int]:
    """The calibration tokens: the model's own tokens of the start of ``text`` (its Hugging Face tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    ids = tok(text[:CALIBRATION_CHARS], add_special_tokens=False)["input_ids"]
    if len(ids) < 64:
        raise BadInputError(f"the calibration text gives {len(ids)} tokens; a fitted mix needs at least 64")
    return list(ids[:CALIBRATION_TOKENS])


def _cache_key(src: Path, token_ids: list[int], groups: dict[str, list[str]]) -> str:
    from edgeforge.export.gguf import installed_version
    from edgeforge.fileio import sha256_file

    data = src.with_name(src.name + "_data")
    h = hashlib.sha256()
    h.update(json.dumps({"recipe": SENSITIVITY_RECIPE, "graph": sha256_file(src),
                         "data": sha256_file(data) if data.is_file() else "", "tokens": token_ids,
                         "groups": groups, "onnxruntime": installed_version("onnxruntime")}).encode())
    return h.hexdigest()[:24]


def fit_onnx(src: Path, dst: Path, max_bytes: int, token_ids: list[int], config: dict[str, Any],
             cache_dir: Path, threads: int | None = None) -> dict[str, Any]:
    """Write the least-loss 4/8-bit mix of the fp32 decoder at ``src`` whose weights (``dst`` and its data) are at
    most ``max_bytes``; returns the quantization's record fields with ``fit`` (OnnxFit.to_dict()).

    ``token_ids``: calibration tokens (``calibration_ids``); ``config``: the model's config.json (for the KV
    inputs); ``cache_dir``: where sensitivities are kept. Raises BadInputError when even every layer at 4 bits is
    over ``max_bytes``.
    """
    import onnx

    from edgeforge.export.onnx.embedding import quantize_embedding_and_head
    from edgeforge.export.onnx.quantize import (
        ACCURACY_LEVEL,
        BLOCK_SIZE,
        EMBEDDING_BITS,
        linear_nodes,
        quantize_body,
        quantize_onnx,
        quiet_logs,
    )
    from edgeforge.progress import progress

    fp32 = onnx.load(str(src))
    ref = _logprobs(_session(fp32, threads), config, token_ids) if fp32.ByteSize() < _MAX_IN_MEMORY_BYTES else \
        _file_logprobs(src, config, token_ids, threads)
    with quiet_logs(30, "onnxruntime.quantization"):
        quantize_embedding_and_head(fp32, EMBEDDING_BITS, BLOCK_SIZE, ACCURACY_LEVEL)
        linear = linear_nodes(fp32)
        outputs_of = {n.name: n.output[0] for n in fp32.graph.node if n.name in set(linear)}
        groups = linear_groups(linear)
        m4 = type(fp32)()
        m4.CopyFrom(fp32)
        m8 = quantize_body(fp32, 8, "rtn_sym", ACCURACY_LEVEL)  # fp32 is consumed: the quantizer works in place
        m4 = quantize_body(m4, 4, "rtn_sym", ACCURACY_LEVEL)
    del fp32
    composer = _Composer(m8, m4, outputs_of)
    group_bytes8 = {g: sum(composer.bytes8[n] for n in names) for g, names in groups.items()}
    group_bytes4 = {g: sum(composer.bytes4[n] for n in names) for g, names in groups.items()}
    fixed = m8.ByteSize() - sum(group_bytes8.values()) + GRAPH_MARGIN_BYTES
    smallest = fixed + sum(group_bytes4.values())
    if smallest > max_bytes:
        raise BadInputError(f"--max-bytes {max_bytes:,}: every linear layer at 4 bits is {smallest / 1e6:.1f} MB "
                            "with the 8-bit embedding; raise the budget or distill a smaller student")

    key = _cache_key(src, token_ids, groups)
    cached = cache_dir / f"onnx-{key}.json"
    t0 = time.perf_counter()
    if cached.is_file():
        d = json.loads(cached.read_text(encoding="utf-8"))
        int8_kl, cost, from_cache, seconds = d["int8_mean_kl"], d["cost"], True, d["seconds"]
    else:
        int8_kl = _mean_kl(ref, _logprobs(_session(m8, threads), config, token_ids))
        cost = {}
        with progress("measure each layer group at 4 bits", total=len(groups), unit="") as p:
            for g, names in groups.items():
                with composer.swapped(names) as mixed:
                    kl = _mean_kl(ref, _logprobs(_session(mixed, threads), config, token_ids))
                cost[g] = max(0.0, kl - int8_kl)  # below the all-8-bit KL is noise toward no cost
                p.advance(note=g)
        seconds, from_cache = time.perf_counter() - t0, False
        cache_dir.mkdir(parents=True, exist_ok=True)
        part = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
        part.write_text(json.dumps({"int8_mean_kl": int8_kl, "cost": cost, "seconds": seconds}), encoding="utf-8")
        os.replace(part, cached)
    del composer, m4, m8

    options = {g: [Option("int4", group_bytes4[g], cost[g]), Option("int8", group_bytes8[g], 0.0)] for g in groups}
    room = max_bytes - fixed
    for _attempt in range(3):  # the written graph can differ from the measured one by a few names' bytes
        picked = allocate(options, room)
        group_bits = {g: 4 if picked[g].type_name == "int4" else 8 for g in groups}  # in graph order
        node_bits = {n: group_bits[g] for g, names in groups.items() for n in names}
        info = quantize_onnx(src, dst, "int4", kept_8bit=[n for n, b in node_bits.items() if b == 8])
        written = weights_file_bytes(dst)
        if written <= max_bytes or room <= smallest - fixed:
            break
        room -= written - max_bytes
    if written > max_bytes:
        raise EdgeforgeError(f"the fitted ONNX weights are {written:,} bytes, over the budget of {max_bytes:,}; "
                             "report it (the size rule in export.onnx.fit is off)")
    plan = OnnxFit(budget_bytes=max_bytes, group_bits=group_bits, node_bits=node_bits,
                   group_bytes=sum(o.file_bytes for o in picked.values()), fixed_bytes=fixed,
                   predicted_mean_kl=int8_kl + sum(o.cost for o in picked.values()), int8_mean_kl=int8_kl, cost=cost,
                   n_tokens=len(token_ids), sensitivity_seconds=seconds, from_cache=from_cache)
    plan.measured_mean_kl = _mean_kl(ref, _file_logprobs(dst, config, token_ids, threads))
    return {**info, "algorithm": f"matmulnbits-rtn_sym-fit-block{BLOCK_SIZE}", "fit": plan.to_dict()}


def _file_logprobs(path: Path, config: dict[str, Any], token_ids: list[int], threads: int | None) -> Any:
    from edgeforge.export.onnx.session import make_session

    return _logprobs(make_session(path, threads), config, token_ids)


def weights_file_bytes(model_file: Path) -> int:
    """Bytes of an ONNX graph and its external data file, if any: what a budget counts."""
    data = model_file.with_name(model_file.name + "_data")
    return model_file.stat().st_size + (data.stat().st_size if data.is_file() else 0)
