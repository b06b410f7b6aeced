"""ONNX decoder exported by optimum (``text-generation-with-past``), run with onnxruntime on the CPU.

The graph takes ``input_ids``, ``attention_mask``, optionally ``position_ids``, and one
``past_key_values.N.key/value`` pair per layer shaped ``[batch, kv_heads, past_len, head_dim]``; it returns
``logits`` and ``present.N.key/value``. Prefill feeds the whole prompt with an empty past (``past_len`` 0);
decode feeds one token at a time with the previous step's ``present.*`` as ``past_key_values.*``.

numpy is used here only because onnxruntime itself requires it; the GGUF path never imports it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from device_bench.errors import BenchError, RuntimeMissingError
from device_bench.runner import Runner

_MISSING = "onnxruntime is not installed on this device; install it or pass --setup from edgeforge"
_PAST_PREFIX = "past_key_values"
_PRESENT_PREFIX = "present"
#: Text tokenized for the prompt when the export ships a tokenizer: real text exercises real token ids.
_PROMPT_TEXT = (
    "Edge devices run language models close to their users. The benchmark measures how quickly this device "
    "reads a prompt, how soon the first token appears, and how fast the following tokens are generated. "
)
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


class OnnxRunner(Runner):
    """onnxruntime runner for an optimum decoder export with a KV cache."""

    format = "onnx"
    runtime = "onnxruntime"

    def __init__(self, *args: Any, verbose: bool = False, **kwargs: Any) -> None:
        """See :class:`Runner`; ``verbose`` lowers onnxruntime's log threshold to warnings."""
        super().__init__(*args, **kwargs)
        self.verbose = verbose
        self._ort: Any = None
        self._np: Any = None
        self._session: Any = None
        self._inputs: dict[str, Any] = {}
        self._past_inputs: list[str] = []
        self._present_to_past: dict[str, str] = {}
        self._output_names: list[str] = []
        self._kv_shape: tuple[int, int] = (0, 0)
        self._kv_dtype = "float32"
        self._ids_dtype = "int64"
        self._vocab_size = 0
        self._tokenizer_ids: list[int] | None = None

    @property
    def runtime_version(self) -> str:
        """``onnxruntime.__version__``."""
        return str(getattr(self._ort, "__version__", "unknown")) if self._ort else "unknown"

    def import_runtime(self) -> None:
        """Import onnxruntime (and numpy, which it needs)."""
        self._ort, self._np = _import_onnxruntime()

    def load(self) -> None:
        """Create the inference session and work out the KV-cache layout; raise BenchError if unusable."""
        ort = self._ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        # One graph runs at a time: inter-op parallelism would only add threads competing for the same cores.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 2 if self.verbose else 3
        try:
            self._session = ort.InferenceSession(
                self.artifact.model_file, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own pybind classes (InvalidProtobuf, Fail, ...)
            reason = " ".join(str(err).split())[:300]
            raise BenchError(f"onnxruntime could not load {self.artifact.model_file}: {reason}") from None
        self._inspect_graph()
        self._tokenizer_ids = self._tokenize_prompt()

    def prefill(self, n_tokens: int) -> float:
        """The whole prompt in one run with an empty past."""
        feeds = self._feeds(self._prompt_ids(n_tokens), self._empty_past(), past_len=0)
        start_ns = time.perf_counter_ns()
        self._session.run(self._output_names, feeds)
        return (time.perf_counter_ns() - start_ns) / 1e9

    def ttft(self, n_tokens: int) -> float:
        """Prefill plus the greedy choice of the first token from the last position's logits."""
        feeds = self._feeds(self._prompt_ids(n_tokens), self._empty_past(), past_len=0)
        start_ns = time.perf_counter_ns()
        outputs = self._session.run(self._output_names, feeds)
        int(outputs[0][0, -1].argmax())
        return (time.perf_counter_ns() - start_ns) / 1e9

    def decode(self, n_tokens: int, depth: int = 0) -> tuple[float, list[float]]:
        """``n_tokens`` single-token runs, each feeding back the previous presents.

        They start after a ``depth``-token prompt run untimed (0: from an empty past).
        """
        session, names = self._session, self._output_names
        feed_ids = self._random_ids(n_tokens)
        past = self._empty_past()
        if depth:
            outputs = session.run(names, self._feeds(self._random_ids(depth), past, past_len=0))
            past = {self._present_to_past[name]: value for name, value in zip(names[1:], outputs[1:])}
        per_token_ns: list[int] = []
        clock = time.perf_counter_ns
        start_ns = previous_ns = clock()
        for step, token in enumerate(feed_ids, start=depth):
            # Building the feeds is part of every real generation step, so it stays inside the timing.
            outputs = session.run(names, self._feeds([token], past, past_len=step))
            past = {self._present_to_past[name]: value for name, value in zip(names[1:], outputs[1:])}
            now_ns = clock()
            per_token_ns.append(now_ns - previous_ns)
            previous_ns = now_ns
        return (previous_ns - start_ns) / 1e9, [ns / 1e9 for ns in per_token_ns]

    def details(self) -> dict[str, Any]:
        """Graph facts and session settings, for comparing runs."""
        if self._session is None:
            return {}
        kv_heads, head_dim = self._kv_shape
        return {
            "providers": list(self._session.get_providers()),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "layers": len(self._past_inputs) // 2,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "kv_dtype": self._kv_dtype,
            "vocab_size": self._vocab_size,
            "prompt_source": "tokenizer" if self._tokenizer_ids else "random",
            "decode_depth_tokens": 0,
        }

    def close(self) -> None:
        """Drop the session (onnxruntime frees its arena when the session object goes away)."""
        self._session = None

    def _inspect_graph(self) -> None:
        """Find inputs, the present->past mapping, KV heads/head dim, dtypes and the vocabulary size."""
        self._inputs = {node.name: node for node in self._session.get_inputs()}
        if "input_ids" not in self._inputs:
            raise BenchError(f"{self.artifact.model_file} has no input_ids input: not a decoder language model")
        self._ids_dtype = "int32" if self._inputs["input_ids"].type == "tensor(int32)" else "int64"
        self._past_inputs = sorted(name for name in self._inputs if name.startswith(_PAST_PREFIX))
        if not self._past_inputs:
            raise BenchError(
                f"{self.artifact.model_file} has no past_key_values inputs: export it with "
                "task text-generation-with-past so decoding reuses the KV cache"
            )
        outputs = [node.name for node in self._session.get_outputs()]
        if "logits" not in outputs:
            raise BenchError(f"{self.artifact.model_file} has no logits output")
        presents = [name for name in outputs if name.startswith(_PRESENT_PREFIX)]
        self._present_to_past = {name: _PAST_PREFIX + name[len(_PRESENT_PREFIX) :] for name in presents}
        missing = sorted(set(self._past_inputs) - set(self._present_to_past.values()))
        if missing:
            raise BenchError(f"{self.artifact.model_file}: no present output feeds {missing[0]}")
        # logits first, then the presents in a fixed order, so decode() can zip them back to past inputs.
        self._output_names = ["logits", *presents]
        first_past = self._inputs[self._past_inputs[0]]
        self._kv_dtype = _ORT_DTYPES.get(first_past.type, "float32")
        config = self._read_config()
        self._kv_shape = (
            _static_dim(first_past.shape, 1) or _config_kv_heads(config),
            _static_dim(first_past.shape, 3) or _config_head_dim(config),
        )
        if not all(self._kv_shape):
            raise BenchError(
                f"cannot tell KV heads/head dim of {self.artifact.model_file}: the graph has symbolic shapes "
                "and config.json does not give num_key_value_heads/head_dim"
            )
        logits_shape = next(node.shape for node in self._session.get_outputs() if node.name == "logits")
        self._vocab_size = _static_dim(logits_shape, 2) or int(config.get("vocab_size") or 0)
        if self._vocab_size <= 0:
            raise BenchError(f"cannot tell the vocabulary size of {self.artifact.model_file}")

    def _read_config(self) -> dict[str, Any]:
        """``config.json`` next to the model (optional: the graph usually has static KV dims)."""
        path = os.path.join(self.artifact.model_dir, "config.json")
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _tokenize_prompt(self) -> list[int] | None:
        """Prompt ids from the export's tokenizer.json when ``tokenizers`` is installed, else None (random ids)."""
        path = os.path.join(self.artifact.model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        try:
            from tokenizers import Tokenizer
        except ImportError:
            return None
        try:
            tokenizer = Tokenizer.from_file(path)
            ids: list[int] = []
            while len(ids) < self.max_prompt_tokens:
                ids.extend(tokenizer.encode(_PROMPT_TEXT, add_special_tokens=False).ids)
        except Exception:  # a tokenizer the installed version cannot read: fall back to random ids
            return None
        if not ids or max(ids) >= self._vocab_size:
            return None  # a tokenizer that does not match the model's vocabulary
        return ids[: self.max_prompt_tokens]

    def _prompt_ids(self, n_tokens: int) -> list[int]:
        """The first ``n_tokens`` of the tokenized prompt, or random ids when there is no tokenizer."""
        if self._tokenizer_ids and len(self._tokenizer_ids) >= n_tokens:
            return self._tokenizer_ids[:n_tokens]
        return self._random_ids(n_tokens)

    def _random_ids(self, n_tokens: int) -> list[int]:
        """Uniform random token ids (the seed makes them repeatable)."""
        return [self.rng.randrange(self._vocab_size) for _ in range(n_tokens)]

    def _empty_past(self) -> dict[str, Any]:
        """Zero-length KV tensors ``[1, kv_heads, 0, head_dim]`` for every past input."""
        kv_heads, head_dim = self._kv_shape
        empty = self._np.zeros((1, kv_heads, 0, head_dim), dtype=self._kv_dtype)
        return {name: empty for name in self._past_inputs}

    def _feeds(self, ids: list[int], past: dict[str, Any], past_len: int) -> dict[str, Any]:
        """Input feeds for ``ids`` appended after ``past_len`` cached positions."""
        np = self._np
        n_tokens = len(ids)
        feeds: dict[str, Any] = {"input_ids": np.array([ids], dtype=self._ids_dtype)}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = np.ones((1, past_len + n_tokens), dtype=self._ids_dtype)
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + n_tokens, dtype=self._ids_dtype)[None, :]
        if "use_cache_branch" in self._inputs:  # older merged exports switch branches on this flag
            feeds["use_cache_branch"] = np.array([past_len > 0], dtype=bool)
        feeds.update(past)
        return feeds


def _static_dim(shape: list[Any], index: int) -> int:
    """A dimension of an ONNX shape when it is a fixed integer, else 0 (symbolic names are strings)."""
    if len(shape) > index and isinstance(shape[index], int) and shape[index] > 0:
        return shape[index]
    return 0


def _config_kv_heads(config: dict[str, Any]) -> int:
    """KV heads from a transformers config (GQA models set num_key_value_heads)."""
    return int(config.get("num_key_value_heads") or config.get("num_attention_heads") or 0)


def _config_head_dim(config: dict[str, Any]) -> int:
    """Head dim from a transformers config: explicit head_dim, else hidden_size / attention heads."""
    if config.get("head_dim"):
        return int(config["head_dim"])
    heads = int(config.get("num_attention_heads") or 0)
    return int(config.get("hidden_size") or 0) // heads if heads else 0


def _import_onnxruntime() -> tuple[Any, Any]:
    """Import onnxruntime and numpy, or raise RuntimeMissingError with the install hint."""
    try:
        import numpy
        import onnxruntime
    except ImportError as err:
        if err.name in ("onnxruntime", "numpy"):
            raise RuntimeMissingError(_MISSING) from None
        reason = " ".join(str(err).split())
        raise RuntimeMissingError(f"onnxruntime is installed but cannot be imported: {reason}") from None
    return onnxruntime, numpy
