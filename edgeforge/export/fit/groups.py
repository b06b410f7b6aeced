"""Tensor groups of a GGUF model and their bytes at each candidate quant type.

A group is the unit a fitted mix assigns one type to: per layer, its attention tensors (``blk.N.attn_*``) and the
rest of the layer (MLP, ``blk.N.ffn_*`` and anything else in the block), plus each quantizable tensor outside the
blocks (``token_embd``, ``output``). Bytes are exact: rows x the row size of the type llama.cpp really writes, which
for a 256-block type on a row that is not a multiple of 256 is its fallback (``plan.sizing.row_type``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType as Q

from edgeforge.plan.sizing import row_type, tensor_bytes

#: The candidate types a mix is made of, lowest first; the last is the top type every measurement starts from.
#: The 32-block legacy types are candidates of their own: on rows that are not a multiple of 256 (SmolLM2's 576)
#: the K types fall back to them anyway, and Q4_1 re-quantizes a Q4_1 source (the bundled teacher) almost exactly.
FIT_TYPES: tuple[str, ...] = ("Q3_K", "IQ4_XS", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0")
TOP_TYPE = FIT_TYPES[-1]
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Tensor:
    name: str
    row_len: int  # ne[0]: the length of one row, what a block type must divide
    n_rows: int


@dataclass(frozen=True)
class TensorGroup:
    """Tensors that always get the same type; ``pattern`` is the regex ``llama-quantize --tensor-type`` matches."""

    name: str
    tensors: tuple[Tensor, ...]

    @property
    def pattern(self) -> str:
        # one anchored alternative per tensor: llama.cpp applies the first pattern that regex_search-es a name
        return "^(" + "|".join(re.escape(t.name) for t in self.tensors) + ")$"

    def written_types(self, type_name: str) -> tuple[str, ...]:
        """The type llama.cpp writes each tensor as when the group is asked for ``type_name``."""
        return tuple(row_type(Q[type_name], t.row_len).name for t in self.tensors)

    def bytes_at(self, type_name: str) -> int:
        return sum(tensor_bytes(Q[written], t.row_len * t.n_rows)
                   for t, written in zip(self.tensors, self.written_types(type_name), strict=True))


def quantizable(name: str, n_dims: int) -> bool:
    """llama.cpp's rule for the tensors ``llama-quantize`` may change (``tensor_allows_quantization``): 2-D or 3-D
    weights, not norms, not MoE router inputs."""
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


@dataclass(frozen=True)
class FileTensor:
    name: str
    shape: tuple[int, ...]  # ne[0] first, as gguf-py lists it
    type_name: str
    n_bytes: int


def read_tensors(gguf_path: Path) -> list[FileTensor]:
    """Every tensor of a GGUF file, read once with gguf-py (which parses all metadata: ~10 s for a 49k-entry
    vocabulary on 2 cores, so callers pass the result around instead of opening the file again)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path), "r")
    return [FileTensor(t.name, tuple(int(x) for x in t.shape), t.tensor_type.name, int(t.n_bytes))
            for t in reader.tensors]


def tensor_groups(tensors: list[FileTensor]) -> list[TensorGroup]:
    """The groups of a model's tensors (``read_tensors``), in file order of their first tensor."""
    members: dict[str, list[Tensor]] = {}
    for t in tensors:
        if not quantizable(t.name, len(t.shape)):
            continue
        n_rows = 1
        for x in t.shape[1:]:
            n_rows *= x
        m = _BLOCK.match(t.name)
        if m:
            role = "attn" if t.name[m.end():].startswith("attn_") else "ffn"
            key = f"blk.{m.group(1)}.{role}"
        else:
            key = t.name.removesuffix(".weight")
        members.setdefault(key, []).append(Tensor(t.name, t.shape[0], n_rows))
    return [TensorGroup(k, tuple(v)) for k, v in members.items()]


def tensor_type_args(types: dict[str, str], groups: list[TensorGroup]) -> list[str]:
    """``--tensor-type PATTERN=TYPE`` arguments giving each group its type (``types``: group name -> type)."""
    args: list[str] = []
    for g in groups:
        args += ["--tensor-type", f"{g.pattern}={types[g.name].lower()}"]
    return args
