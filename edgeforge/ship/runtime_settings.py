"""The runtime settings a shipped GGUF runs with, written once beside it as ``<model>.gguf.runtime.json``.

The same file is read by device_bench (so every benchmark of the artifact runs with what ships, and says when a flag
overrode a shipped value) and summarised in the Ollama Modelfile. Declared here once:

* ``n_ctx``: the context the plan sized the model's memory for;
* ``n_batch`` / ``n_ubatch``: llama.cpp's own defaults for applications (llama-server ``-b 2048 -ub 512``);
* ``cache_type_k`` / ``cache_type_v``: ``f16``, llama.cpp's default (a quantized KV cache changes the model's
  outputs, which the verification did not measure);
* no ``n_threads``: a device runs best with one thread per physical core, which device_bench (and llama.cpp's
  tools) use when nothing is set; a fixed count would be wrong on a machine that benchmarks another device's build.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeforge.fileio import write_text_atomic

RUNTIME_SUFFIX = ".runtime.json"
N_BATCH = 2048
N_UBATCH = 512
KV_CACHE_TYPE = "f16"


def runtime_settings(context_tokens: int) -> dict[str, Any]:
    """The settings a GGUF ships with for a plan of ``context_tokens`` tokens."""
    return {"n_ctx": int(context_tokens), "n_batch": N_BATCH, "n_ubatch": N_UBATCH,
            "cache_type_k": KV_CACHE_TYPE, "cache_type_v": KV_CACHE_TYPE}


def runtime_settings_path(gguf: Path) -> Path:
    """``<model>.gguf.runtime.json``, where device_bench looks for it."""
    return gguf.with_name(gguf.name + RUNTIME_SUFFIX)


def write_runtime_settings(gguf: Path, context_tokens: int) -> Path:
    """Write the settings beside ``gguf`` (atomically); returns the file's path."""
    path = runtime_settings_path(gguf)
    write_text_atomic(path, json.dumps(runtime_settings(context_tokens), indent=1) + "\n")
    return path
