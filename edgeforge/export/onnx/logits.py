"""Logits of an ONNX export and of its source model, one forward pass each, for the verification of the export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeforge.errors import BadInputError, ModelError
from edgeforge.export.onnx.export import MODEL_FILE, OnnxExportError
from edgeforge.models.files import read_model_config

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def onnx_logits(onnx_dir: Path, token_ids: list[int], threads: int | None = None) -> np.ndarray:
    """Logits of one forward pass over ``token_ids`` with an empty KV cache: float32 [n_tokens, vocab].

    A raw onnxruntime session rather than ORTModelForCausalLM: it needs no torch and returns every position's
    logits (generate() only keeps the last). Position i is the distribution of token i + 1.
    """
    import onnxruntime as ort

    onnx_dir = Path(onnx_dir)
    model_file = onnx_dir / MODEL_FILE
    if not model_file.is_file():
        raise ModelError(f"{onnx_dir}: expected an ONNX export directory holding {MODEL_FILE}, found none")
    if not token_ids:
        raise BadInputError("onnx_logits needs at least one token id, found an empty list")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the caller's business
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])
    n = len(token_ids)
    feeds: dict[str, np.ndarray] = {}
    config = read_model_config(onnx_dir)
    for node in session.get_inputs():
        ids_dtype = np.int32 if node.type == "tensor(int32)" else np.int64
        if node.name == "input_ids":
            feeds[node.name] = np.asarray([token_ids], dtype=ids_dtype)
        elif node.name == "attention_mask":
            feeds[node.name] = np.ones((1, n), dtype=ids_dtype)
        elif node.name == "position_ids":
            feeds[node.name] = np.arange(n, dtype=ids_dtype)[None, :]
        elif node.name.startswith("past_key_values"):
            # [batch, kv_heads, past_len = 0, head_dim]; heads and head_dim are static in optimum's graphs.
            kv_heads = _static(node.shape, 1) or int(config.get("num_key_value_heads")
                                                     or config["num_attention_heads"])
            head_dim = _static(node.shape, 3) or int(config.get("head_dim")
                                                     or config["hidden_size"] // config["num_attention_heads"])
            feeds[node.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=_ORT_TO_NUMPY.get(node.type, np.float32))
        else:
            raise OnnxExportError(f"{model_file}: unexpected graph input '{node.name}'; expected input_ids, "
                                  "attention_mask, position_ids and past_key_values.*")
    (logits,) = session.run(["logits"], feeds)
    return np.asarray(logits[0], dtype=np.float32)


def torch_logits(model_dir: Path, token_ids: list[int]) -> np.ndarray:
    """Reference logits from transformers in float32: [n_tokens, vocab], one forward pass, no cache."""
    import torch
    from transformers import AutoModelForCausalLM

    read_model_config(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        logits = model(torch.tensor([token_ids], dtype=torch.long)).logits  # [1, n, vocab]
    return logits[0].float().numpy()


def _static(shape: list[Any], axis: int) -> int | None:
    return shape[axis] if len(shape) > axis and isinstance(shape[axis], int) and shape[axis] > 0 else None
