"""Logits of an ONNX export and of its source model, one forward pass each, for the verification of the export."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeforge.errors import BadInputError, ModelError
from edgeforge.export.onnx.export import MODEL_FILE
from edgeforge.export.onnx.session import make_session, session_logits
from edgeforge.models.files import read_model_config


def onnx_logits(onnx_dir: Path, token_ids: list[int], threads: int | None = None) -> np.ndarray:
    """Logits of one forward pass over ``token_ids`` with an empty KV cache: float32 [n_tokens, vocab].

    A raw onnxruntime session rather than ORTModelForCausalLM: it needs no torch and returns every position's
    logits (generate() only keeps the last). Position i is the distribution of token i + 1.
    """
    onnx_dir = Path(onnx_dir)
    model_file = onnx_dir / MODEL_FILE
    if not model_file.is_file():
        raise ModelError(f"{onnx_dir}: expected an ONNX export directory holding {MODEL_FILE}, found none")
    if not token_ids:
        raise BadInputError("onnx_logits needs at least one token id, found an empty list")
    return session_logits(make_session(model_file, threads), read_model_config(onnx_dir), token_ids, model_file)


def torch_logits(model_dir: Path, token_ids: list[int]) -> np.ndarray:
    """Reference logits from transformers in float32: [n_tokens, vocab], one forward pass, no cache."""
    import torch
    from transformers import AutoModelForCausalLM

    read_model_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids], dtype=torch.long)).logits  # [1, n, vocab]
    return logits[0].float().numpy()
