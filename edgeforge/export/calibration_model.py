"""The synthetic models ``profiles detect --calibrate`` times llama.cpp's decode on (edgeforge.bench.calibrate).

Their shapes are unlike the bundled teacher's and its students' (8 layers of hidden 1,024 and 24 of hidden 512,
against 30 / 10 layers of hidden 576), so an estimate the calibrated profile makes for them is a prediction, not the
calibration read back. Every row is a multiple of 256, so ``llama-quantize --pure`` writes every matrix at the one
type asked for (no row fallback): the first shape once per type of ``CALIBRATION_TYPES`` (a decode rate per type),
the second at the reference type only (two depths at one type tell the per-layer time from the streaming).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The synthetic models' shapes (Llama, tied embeddings, the bundled teacher's 49,152-token vocabulary).
CALIBRATION_SHAPES = (
    {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
     "num_key_value_heads": 4},
    {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 24, "num_attention_heads": 8,
     "num_key_value_heads": 4},
)
#: The type both shapes are timed at (the per-layer time comes from the pair).
REFERENCE_TYPE = "Q4_K"
#: The GGML types a calibrated profile has a measured decode rate for: every type a preset (Q8_0 ... Q3_K_M,
#: IQ4_XS, F16), a fitted mix (export.fit.groups.FIT_TYPES) or llama.cpp's row fallback (Q5_0, Q5_1, IQ4_NL, Q4_0)
#: writes a matrix at. A type not here is read at decode_efficiency x bandwidth.
CALIBRATION_TYPES = (REFERENCE_TYPE, "Q3_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q5_K", "Q6_K",
                     "Q8_0", "F16")
# llama-quantize's file type whose --pure output is every matrix at the type (the K types' names are their mixes').
_PURE_FTYPE = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


@dataclass(frozen=True)
class CalibrationModel:
    """One synthetic GGUF: every matrix at ``qtype``; ``label`` says which shape."""

    path: Path
    qtype: str
    label: str


def calibration_ggufs(work: Path, threads: int = 2) -> list[CalibrationModel]:
    """The first shape at every type of ``CALIBRATION_TYPES`` and the second at ``REFERENCE_TYPE``, in ``work``
    (random weights: only speed is used), the two reference models first."""
    from edgeforge.export.gguf import quantize

    sources = [_f16_gguf(work, i, shape) for i, shape in enumerate(CALIBRATION_SHAPES)]
    labels = describe()
    models: list[CalibrationModel] = []
    for i, qtype in [(0, REFERENCE_TYPE), (1, REFERENCE_TYPE)] + [(0, t) for t in CALIBRATION_TYPES[1:]]:
        if qtype == "F16":
            path = sources[i]
        else:
            path = quantize(sources[i], work / f"calibration-{i}-{qtype}.gguf", _PURE_FTYPE.get(qtype, qtype),
                            threads, pure=True)
        models.append(CalibrationModel(path, qtype, labels[i]))
    return models


def _f16_gguf(work: Path, index: int, shape: dict[str, int]) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from edgeforge.export.gguf import convert_hf
    from edgeforge.models.gguf_hf import write_canonical_tokenizer
    from edgeforge.models.refs import read_arch, resolve_model

    teacher = resolve_model(None)
    vocab = read_arch(teacher).vocab_size
    hf_dir = work / f"calibration-{index}-hf"
    config = LlamaConfig(**shape, vocab_size=vocab, tie_word_embeddings=True,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(hf_dir, safe_serialization=True)
    del model
    write_canonical_tokenizer(teacher.path, hf_dir)
    return convert_hf(hf_dir, work / f"calibration-{index}-F16.gguf", "f16")


def describe() -> list[str]:
    """One label per synthetic shape, for the profile's sources."""
    return [f"a random Llama of {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, MLP "
            f"{s['intermediate_size']}" for s in CALIBRATION_SHAPES]
