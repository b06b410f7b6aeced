"""Fit a GGUF mix to a byte budget: measure, allocate, and the arguments ``llama-quantize`` writes it with."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeforge.errors import BadInputError
from edgeforge.export.fit.allocate import Option, allocate
from edgeforge.export.fit.groups import (
    FIT_TYPES,
    FileTensor,
    TensorGroup,
    read_tensors,
    tensor_groups,
    tensor_type_args,
)
from edgeforge.export.fit.sensitivity import Quantize, Sensitivity, measure_sensitivity

#: The llama.cpp file type declared in ``general.file_type`` for a mix whose largest share of bytes is at a type
#: (what ``eval`` and verification read to choose thresholds).
FILE_TYPE_OF = {"Q3_K": "Q3_K_M", "IQ4_XS": "IQ4_XS", "Q4_K": "Q4_K_M", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
                "Q5_K": "Q5_K_M", "Q5_1": "Q5_1", "Q6_K": "Q6_K", "Q8_0": "Q8_0"}
#: Bytes kept free for what the export adds after quantizing (edgeforge's lineage metadata) and GGUF padding.
METADATA_MARGIN_BYTES = 64 * 1024
CALIBRATION_CHARS = 6000
CALIBRATION_TOKENS = 384


@dataclass
class FitPlan:
    budget_bytes: int
    file_type: str  # the ftype llama-quantize is called with (the mix overrides every quantizable tensor)
    types: dict[str, str]  # group -> type
    tensor_types: dict[str, str]  # tensor -> the type llama.cpp writes
    group_bytes: int
    fixed_bytes: int  # header, metadata and the tensors no mix changes (norms)
    predicted_mean_kl: float
    sensitivity: Sensitivity
    groups: list[TensorGroup] = field(repr=False)
    calibration_ids: list[int] = field(repr=False, default_factory=list)
    measured_mean_kl: float | None = None  # the written file on the calibration tokens (set by measure_written)

    @property
    def quantize_args(self) -> list[str]:
        return tensor_type_args(self.types, self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget_bytes, "file_type": self.file_type, "group_types": self.types,
                "tensor_types": self.tensor_types, "group_bytes": self.group_bytes, "fixed_bytes": self.fixed_bytes,
                "predicted_mean_kl": self.predicted_mean_kl, "measured_mean_kl": self.measured_mean_kl,
                "sensitivity": {
                    k: v for k, v in self.sensitivity.to_dict().items() if k != "cost"},
                "method": "per-group mean KL measured in llama.cpp, exact multiple-choice knapsack over bytes"}


def calibration_ids(base: Path, text: str) -> list[int]:
    """The calibration tokens: the model's own (llama.cpp) tokens of the start of ``text``."""
    from llama_cpp import Llama

    from edgeforge.quiet import captured_stderr

    with captured_stderr():
        vocab = Llama(str(base), vocab_only=True, verbose=False)
    try:
        ids = vocab.tokenize(text[:CALIBRATION_CHARS].encode(), add_bos=False, special=False)
    finally:
        vocab.close()
    if len(ids) < 64:
        raise BadInputError(f"the calibration text gives {len(ids)} tokens; a fitted mix needs at least 64: pass a "
                            "longer --imatrix-data file")
    return ids[:CALIBRATION_TOKENS]


def _fixed_bytes(base: Path, tensors: list[FileTensor], groups: list[TensorGroup]) -> int:
    """Bytes of the file that no mix changes: the base file minus its group tensors, plus padding room."""
    in_groups = {t.name for g in groups for t in g.tensors}
    group_bytes_in_base = sum(t.n_bytes for t in tensors if t.name in in_groups)
    alignment_room = 32 * len(tensors)  # each tensor is padded to GGUF's 32-byte alignment
    return base.stat().st_size - group_bytes_in_base + alignment_room + METADATA_MARGIN_BYTES


@dataclass(frozen=True)
class Layout:
    """What a fit needs to know of the source file: its tensor groups and the bytes no mix changes."""

    groups: list[TensorGroup]
    fixed_bytes: int


def check_budget(base: Path, max_bytes: int) -> Layout:
    """The layout of ``base``; BadInputError when even the smallest mix is over ``max_bytes`` (checked before any
    importance matrix or measurement is spent)."""
    tensors = read_tensors(base)
    groups = tensor_groups(tensors)
    if not groups:
        raise BadInputError(f"{base}: no quantizable tensor found; nothing to fit")
    fixed = _fixed_bytes(base, tensors, groups)
    smallest = sum(min(g.bytes_at(t) for t in FIT_TYPES) for g in groups)
    if max_bytes - fixed < smallest:
        raise BadInputError(f"--max-bytes {max_bytes:,}: the smallest mix of {', '.join(FIT_TYPES)} is "
                            f"{(smallest + fixed) / 1e6:.1f} MB with its metadata; raise the budget or distill a "
                            "smaller student")
    return Layout(groups, fixed)


def fit_mix(base: Path, max_bytes: int, calibration_text: str, imatrix: Path | None, threads: int,
            cache_dir: Path, quantize: Quantize, runtime_version: str, layout: Layout | None = None) -> FitPlan:
    """The least-loss mix of FIT_TYPES for the model in ``base`` whose file is at most ``max_bytes``
    (``quantize``: export.gguf's, which writes every measured file; ``runtime_version``: llama-cpp-python's, part of
    the cache key; ``layout``: ``check_budget``'s result when the caller has it)."""
    layout = layout or check_budget(base, max_bytes)
    ids = calibration_ids(base, calibration_text)
    key = hashlib.sha256(calibration_text.encode()).hexdigest()
    sens = measure_sensitivity(base, layout.groups, ids, imatrix, key, threads, cache_dir, quantize, runtime_version)
    return _choose(layout, sens, ids, max_bytes)


def cached_fit(base: Path, max_bytes: int, calibration_text: str, cache_dir: Path,
               runtime_version: str) -> FitPlan | None:
    """The mix ``fit_mix`` would choose for ``base`` within ``max_bytes``, from sensitivities measured before
    (``export gguf --quant fit`` of the same file and calibration text); None when they were not, or when nothing
    fits. Measures nothing: ``plan`` shows it."""
    from edgeforge.export.fit.sensitivity import cached_sensitivity

    try:
        layout = check_budget(base, max_bytes)
    except BadInputError:
        return None
    ids = calibration_ids(base, calibration_text)
    key = hashlib.sha256(calibration_text.encode()).hexdigest()
    sens = cached_sensitivity(base, layout.groups, ids, key, cache_dir, runtime_version)
    return _choose(layout, sens, ids, max_bytes) if sens is not None else None


def _choose(layout: Layout, sens: Sensitivity, ids: list[int], max_bytes: int) -> FitPlan:
    """The least predicted-loss mix of the measured ``sens`` within ``max_bytes`` (exact knapsack)."""
    groups, fixed = layout.groups, layout.fixed_bytes
    budget = max_bytes - fixed
    options: dict[str, list[Option]] = {}
    for g in groups:
        seen: set[tuple[str, ...]] = set()
        opts = []
        for t in FIT_TYPES:
            written = g.written_types(t)
            if written not in seen:  # a type llama.cpp writes the same as a smaller-named one is the same option
                seen.add(written)
                opts.append(Option(t, g.bytes_at(t), sens.cost[g.name][t]))
        options[g.name] = opts
    picked = allocate(options, budget)
    types = {name: o.type_name for name, o in picked.items()}
    by_type: dict[str, int] = {}
    for o in picked.values():
        by_type[o.type_name] = by_type.get(o.type_name, 0) + o.file_bytes
    main_type = max(by_type, key=lambda t: by_type[t])
    tensor_types = {t.name: w for g in groups for t, w in zip(g.tensors, g.written_types(types[g.name]), strict=True)}
    return FitPlan(budget_bytes=max_bytes, file_type=FILE_TYPE_OF[main_type], types=types, tensor_types=tensor_types,
                   group_bytes=sum(o.file_bytes for o in picked.values()), fixed_bytes=fixed,
                   predicted_mean_kl=sens.top_mean_kl + sum(o.cost for o in picked.values()), sensitivity=sens,
                   groups=groups, calibration_ids=ids)


def measure_written(base: Path, path: Path, plan: FitPlan, threads: int) -> float:
    """The written mix's mean KL to ``base`` on the calibration tokens the prediction was made on."""
    from edgeforge.export.fit.sensitivity import file_mean_kl

    plan.measured_mean_kl = file_mean_kl(base, path, plan.calibration_ids, threads)
    return plan.measured_mean_kl


def check_written(path: Path, plan: FitPlan) -> dict[str, str]:
    """The tensor types in the written file (read with gguf-py); raises when they are not the plan's."""
    from edgeforge.errors import EdgeforgeError

    found = {t.name: t.type_name for t in read_tensors(path) if t.name in plan.tensor_types}
    wrong = {n: (plan.tensor_types[n], found.get(n)) for n in plan.tensor_types if found.get(n) != plan.tensor_types[n]}
    if wrong:
        n, (want, got) = next(iter(wrong.items()))
        raise EdgeforgeError(f"llama-quantize wrote {len(wrong)} tensor(s) at other types than the fitted mix (e.g. "
                             f"{n}: expected {want}, found {got}); this llama.cpp's type rules differ from edgeforge's "
                             "(export.fit.groups): report it, and use a preset --quant meanwhile")
    if path.stat().st_size > plan.budget_bytes:
        raise EdgeforgeError(f"the fitted file is {path.stat().st_size:,} bytes, over the budget of "
                             f"{plan.budget_bytes:,}; report it (the size rule in export.fit.groups is off)")
    return found


