"""The cost of each tensor group going down one type: measured on real quantized files in llama.cpp.

``llama-quantize`` writes the model with some groups at a lower type and every other group at the top type (Q8_0),
with the importance matrix; llama.cpp runs it over the calibration tokens and a cost is its mean KL to the source
model minus that of the all-top file (which files are measured: ``measure_sensitivity``). Files that would hold
the same tensor types (llama.cpp's shape fallbacks make Q6_K and Q8_0 the same on 576-wide rows) are measured
once. Costs are assumed to add up over groups; ``mix`` reports how well that held by measuring the chosen file.
Results are cached in ``$EDGEFORGE_HOME/fit-sensitivity`` by the source file's content,
the calibration tokens, the imatrix data and the candidate types.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from edgeforge.export.fit.groups import FIT_TYPES, TOP_TYPE, TensorGroup, tensor_type_args

SENSITIVITY_RECIPE = 3  # bump when the measurement changes, so cached results are not reused across recipes


@dataclass(frozen=True)
class Sensitivity:
    top_mean_kl: float  # every group at TOP_TYPE
    cost: dict[str, dict[str, float]]  # group -> type -> mean KL added when the group alone is at the type
    n_tokens: int
    files_measured: int
    seconds: float
    # role -> type -> the role's KL at the type relative to the lowest type; "additivity": the role's groups'
    # summed costs at the lowest type over the measured cost of the whole role there (1.0 = costs add up)
    role_curves: dict[str, dict[str, float]]
    from_cache: bool = False

    def to_dict(self) -> dict:
        return {"top_type": TOP_TYPE, "top_mean_kl": self.top_mean_kl, "cost": self.cost, "n_tokens": self.n_tokens,
                "files_measured": self.files_measured, "seconds": self.seconds, "role_curves": self.role_curves,
                "from_cache": self.from_cache}


class Quantize(Protocol):
    """``edgeforge.export.gguf.quantize``: passed in, so this module does not import the module that calls it."""

    def __call__(self, src: Path, dst: Path, quant: str, threads: int, imatrix: Path | None = None,
                 tensor_types: list[str] | None = None) -> Path: ...


def _cache_key(base: Path, token_ids: list[int], imatrix_key: str, groups: list[TensorGroup],
               runtime_version: str) -> str:
    from edgeforge.fileio import sha256_file

    h = hashlib.sha256()
    h.update(json.dumps({"recipe": SENSITIVITY_RECIPE, "base": sha256_file(base), "tokens": token_ids,
                         "imatrix": imatrix_key, "types": FIT_TYPES, "groups": [g.name for g in groups],
                         "llama-cpp-python": runtime_version}).encode())
    return h.hexdigest()[:24]


def _logprobs(path: Path, token_ids: list[int], threads: int) -> torch.Tensor:
    """[n_tokens, vocab] float32 log-probabilities of the GGUF at ``path`` in llama.cpp.

    In torch rather than verify.metrics' numpy: over a 49k vocabulary numpy's log-softmax and KL take about a second
    per file on 2 cores, and a fit measures dozens of files.
    """
    from edgeforge.verify.artifact import GgufEngine

    engine = GgufEngine(path, n_ctx=len(token_ids) + 8, threads=threads)
    try:
        return torch.log_softmax(torch.from_numpy(engine.logits(token_ids)), dim=-1)
    finally:
        engine.llm.close()


def _mean_kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean over positions of KL(ref || test); both [n_tokens, vocab] log-probabilities."""
    return float((ref.exp() * (ref - test)).sum(-1).mean())


def file_mean_kl(base: Path, path: Path, token_ids: list[int], threads: int) -> float:
    """Mean KL of the GGUF at ``path`` to the one at ``base`` over ``token_ids``, both in llama.cpp."""
    return _mean_kl(_logprobs(base, token_ids, threads), _logprobs(path, token_ids, threads))


def role_of(group: TensorGroup) -> str:
    """A group's role: "attn" or "ffn" for a layer's groups, the group's own name otherwise (embedding, output)."""
    return group.name.rsplit(".", 1)[-1] if group.name.startswith("blk.") else group.name


def cached_sensitivity(base: Path, groups: list[TensorGroup], token_ids: list[int], imatrix_key: str,
                       cache_dir: Path, runtime_version: str) -> Sensitivity | None:
    """``measure_sensitivity``'s result when it was measured before for exactly these inputs, else None (nothing
    is measured: what ``plan`` uses to show the mix a fit would choose)."""
    cached = cache_dir / f"{_cache_key(base, token_ids, imatrix_key, groups, runtime_version)}.json"
    if not cached.is_file():
        return None
    d = json.loads(cached.read_text(encoding="utf-8"))
    return Sensitivity(d["top_mean_kl"], d["cost"], d["n_tokens"], d["files_measured"], d["seconds"],
                       d["role_curves"], from_cache=True)


def measure_sensitivity(base: Path, groups: list[TensorGroup], token_ids: list[int], imatrix: Path | None,
                        imatrix_key: str, threads: int, cache_dir: Path, quantize: Quantize,
                        runtime_version: str) -> Sensitivity:
    """Cost of every (group, type) of FIT_TYPES for the model in ``base`` (the source GGUF the mix is quantized
    from), on ``token_ids`` (calibration text, tokenized by the model).

    Measured directly: each group alone at the lowest type (the largest, least noisy signal), and every type of a
    group that is alone in its role (the embedding, the output). A layer group's cost at the other types is its own
    cost at the lowest type scaled by its role's measured curve: the KL of a file with every group of the role at
    the type, relative to the role at the lowest type. That keeps the teacher's measurement to 79 files instead of
    about 380 (all types for every group), and rests on KL growing with quantization noise energy alike in the
    layers of one role; ``mix`` measures the chosen file on the same tokens, so the record shows how well it held.
    """
    import time

    from edgeforge.progress import progress

    found = cached_sensitivity(base, groups, token_ids, imatrix_key, cache_dir, runtime_version)
    if found is not None:
        return found
    cached = cache_dir / f"{_cache_key(base, token_ids, imatrix_key, groups, runtime_version)}.json"
    t0 = time.perf_counter()
    ref = _logprobs(base, token_ids, threads)
    top = {g.name: TOP_TYPE for g in groups}
    lowest = FIT_TYPES[0]
    roles: dict[str, list[TensorGroup]] = {}
    for g in groups:
        roles.setdefault(role_of(g), []).append(g)
    # the files to measure: (label, types); "alone" roles get every type, shared roles a curve and an anchor
    plan: list[tuple[str, dict[str, str]]] = [("top", top)]
    for role, members in roles.items():
        if len(members) == 1:
            plan += [(f"{members[0].name}@{t}", {**top, members[0].name: t}) for t in FIT_TYPES[:-1]]
        else:
            plan += [(f"{role}*@{t}", {**top, **{g.name: t for g in members}}) for t in FIT_TYPES[:-1]]
            plan += [(f"{g.name}@{lowest}", {**top, g.name: lowest}) for g in members]
    kl: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgeforge-fit-") as tmp, \
            progress("measure each tensor group's sensitivity", total=len(plan), unit="") as p:
        path = Path(tmp) / "mix.gguf"
        written_kl: dict[tuple, float] = {}  # identical files (same written types) are measured once
        for label, types in plan:
            written = tuple(w for g in groups for w in g.written_types(types[g.name]))
            if written not in written_kl:
                quantize(base, path, TOP_TYPE, threads, imatrix, tensor_type_args(types, groups))
                try:
                    written_kl[written] = _mean_kl(ref, _logprobs(path, token_ids, threads))
                finally:
                    path.unlink(missing_ok=True)
            kl[label] = written_kl[written]
            p.advance(note=label)
    top_kl = kl["top"]

    def added(label: str) -> float:  # a negative difference is noise in the direction of no cost: kept at zero
        return max(0.0, kl[label] - top_kl)

    cost: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, float]] = {}
    for role, members in roles.items():
        if len(members) == 1:
            cost[members[0].name] = {t: added(f"{members[0].name}@{t}") for t in FIT_TYPES[:-1]} | {TOP_TYPE: 0.0}
            continue
        anchor = added(f"{role}*@{lowest}")
        curve = {t: (added(f"{role}*@{t}") / anchor if anchor > 0 else 0.0) for t in FIT_TYPES[:-1]}
        curves[role] = curve | {"additivity": sum(added(f"{g.name}@{lowest}") for g in members) / anchor
                                if anchor > 0 else 1.0}
        for g in members:
            own = added(f"{g.name}@{lowest}")
            cost[g.name] = {t: own * curve[t] for t in FIT_TYPES[:-1]} | {TOP_TYPE: 0.0}
    result = Sensitivity(top_kl, cost, len(token_ids), len(written_kl), time.perf_counter() - t0, curves)
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    part.write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    os.replace(part, cached)
    return result
