"""onnxruntime sessions of an optimum decoder graph and the logits of one forward pass (no edgeforge export import:
``export.onnx.fit`` measures graphs in memory with these while ``export.onnx.export`` calls it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeforge.errors import ModelError

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def make_session(model: Path | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of a graph file or of a serialized ModelProto, quiet below errors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the caller's business
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=options,
                                providers=["CPUExecutionProvider"])


def session_logits(session: Any, config: dict[str, Any], token_ids: list[int], source: Any = "the graph"
                   ) -> np.ndarray:
    """``onnx_logits`` for an open session of an optimum decoder whose config.json is ``config``."""
    n = len(token_ids)
    feeds: dict[str, np.ndarray] = {}
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
            raise ModelError(f"{source}: unexpected graph input '{node.name}'; expected input_ids, "
                                  "attention_mask, position_ids and past_key_values.*")
    (logits,) = session.run(["logits"], feeds)
    return np.asarray(logits[0], dtype=np.float32)


def _static(shape: list[Any], axis: int) -> int | None:
    return shape[axis] if len(shape) > axis and isinstance(shape[axis], int) and shape[axis] > 0 else None
