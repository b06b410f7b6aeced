"""edgeforge device benchmark agent.

A standalone package pushed to an edge device next to a model artifact. It loads the artifact with the
runtime the device already has (llama.cpp through ``llama_cpp`` for GGUF, ``onnxruntime`` for ONNX), measures
load time, time to first token, prefill and decode throughput and peak memory, and prints one JSON document.

It depends on the Python standard library only; the runtimes are imported lazily, and only the one the
artifact needs. Run it as ``python -m device_bench ARTIFACT``.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: Version tag of the JSON document printed by the agent; bump the suffix on any breaking change.
SCHEMA_VERSION = "edgeforge.bench/1"

__all__ = ["SCHEMA_VERSION", "__version__"]
