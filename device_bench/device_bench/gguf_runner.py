"""GGUF through llama.cpp (``llama_cpp`` low-level bindings), measured the way ``llama-bench`` measures.

llama-bench's method, reproduced here so tokens/s agree with it on the same file and thread count:

* prefill (``pp``): clear the KV cache, then ``llama_decode`` N random token ids (BOS first when the vocabulary
  adds one) in chunks of ``n_batch``, then synchronize; only the last position produces logits.
* decode (``tg``): from an empty cache (or after an untimed ``depth``-token prompt: ``tg @ dN``), ``llama_decode``
  one token at a time and wait for it; no sampling, the next token is a random id chosen before the clock starts.
* context: flash attention left on "auto", ``swa_full`` off, ``n_batch`` 2048 (or the longest prompt),
  ``n_ubatch`` 512, exactly like llama-bench's defaults, unless the artifact's runtime.json ships others.

The high-level ``llama_cpp.Llama`` object is avoided on purpose: its ``eval`` keeps a numpy copy of the
logits and its sampler walks the whole vocabulary in Python, which would be measured as model time.
"""

from __future__ import annotations

import ctypes
import sys
import time
from typing import Any

from device_bench.config import KV_CACHE_TYPE_IDS
from device_bench.errors import BenchError, RuntimeMissingError
from device_bench.runner import Runner

_LLAMA_BENCH_N_BATCH = 2048
_LLAMA_BENCH_N_UBATCH = 512
_MISSING = "llama-cpp-python is not installed on this device; install it or pass --setup from edgeforge"


class GgufRunner(Runner):
    """llama.cpp runner for a single-file GGUF model."""

    format = "gguf"
    runtime = "llama.cpp"

    def __init__(self, *args: Any, repack: bool = True, verbose: bool = False, n_batch: int | None = None,
                 n_ubatch: int | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 **kwargs: Any) -> None:
        """See :class:`Runner`.

        ``repack`` keeps llama.cpp's extra CPU buffer types (weights repacked for ARM/x86 kernels, AMX), on by
        default in llama.cpp and llama-bench alike; ``verbose`` forwards llama.cpp's own log lines to stderr.
        ``n_batch`` / ``n_ubatch`` / ``cache_type_k`` / ``cache_type_v``: the shipped runtime settings (None:
        llama-bench's defaults); a prompt longer than ``n_batch`` is decoded in ``n_batch`` chunks, as llama-bench
        does.
        """
        super().__init__(*args, **kwargs)
        self.repack = repack
        self.verbose = verbose
        self.n_ubatch = n_ubatch or _LLAMA_BENCH_N_UBATCH
        self.cache_type_k = cache_type_k
        self.cache_type_v = cache_type_v
        self._llama: Any = None
        self._model: Any = None
        self._ctx: Any = None
        self._memory: Any = None
        self._vocab: Any = None
        self._sampler: Any = None
        self._log_callback: Any = None
        self._n_vocab = 0
        self._n_batch = n_batch or max(_LLAMA_BENCH_N_BATCH, self.max_prompt_tokens)

    @property
    def runtime_version(self) -> str:
        """``llama_cpp.__version__`` (the llama.cpp build is pinned by that release)."""
        return str(getattr(self._llama, "__version__", "unknown")) if self._llama else "unknown"

    def import_runtime(self) -> None:
        """Import llama_cpp, route its logs and initialise the ggml backend (once per process)."""
        self._llama = _import_llama_cpp()
        self._silence_logs()
        self._llama.llama_backend_init()

    def load(self) -> None:
        """Load the model and create a context; raise BenchError if llama.cpp rejects the file."""
        llama = self._llama
        model_params = llama.llama_model_default_params()
        model_params.use_extra_bufts = self.repack
        self._model = llama.llama_model_load_from_file(self.artifact.model_file.encode("utf-8"), model_params)
        if not self._model:
            raise BenchError(
                f"llama.cpp could not load {self.artifact.model_file}: the GGUF is corrupt, truncated or of an "
                f"architecture this llama-cpp-python {self.runtime_version} does not support"
            )
        params = llama.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self._n_batch
        params.n_ubatch = min(self.n_ubatch, self._n_batch)
        params.type_k = KV_CACHE_TYPE_IDS[self.cache_type_k]
        params.type_v = KV_CACHE_TYPE_IDS[self.cache_type_v]
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.swa_full = False  # llama-bench's setting; the library default (True) inflates SWA models' caches
        self._ctx = llama.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise BenchError(
                f"llama.cpp could not create a context (n_ctx={self.n_ctx}, n_batch={self._n_batch}, KV cache "
                f"{self.cache_type_k}/{self.cache_type_v}) for {self.artifact.model_file}: not enough memory (try a "
                "smaller --n-ctx), or a quantized V cache without flash attention (run with --verbose)"
            )
        self._memory = llama.llama_get_memory(self._ctx)
        self._vocab = llama.llama_model_get_vocab(self._model)
        self._n_vocab = int(llama.llama_vocab_n_tokens(self._vocab))
        self._sampler = llama.llama_sampler_init_greedy()

    def prefill(self, n_tokens: int) -> float:
        """``n_tokens`` prompt tokens after a cache clear, ``n_batch`` per ``llama_decode`` (llama-bench ``pp``)."""
        chunks = self._prompt_chunks(n_tokens)
        self._clear_cache()
        start_ns = time.perf_counter_ns()
        self._decode_chunks(chunks, f"prefill of {n_tokens} tokens")
        self._llama.llama_synchronize(self._ctx)
        return (time.perf_counter_ns() - start_ns) / 1e9

    def ttft(self, n_tokens: int) -> float:
        """Prefill plus greedy selection of the first token (in C, as an app's sampler chain would)."""
        chunks = self._prompt_chunks(n_tokens)
        self._clear_cache()
        start_ns = time.perf_counter_ns()
        self._decode_chunks(chunks, f"prompt of {n_tokens} tokens")
        self._llama.llama_sampler_sample(self._sampler, self._ctx, -1)
        return (time.perf_counter_ns() - start_ns) / 1e9

    def _prompt_chunks(self, n_tokens: int) -> list[tuple[Any, int]]:
        """The prompt's token arrays, ``n_batch`` tokens each (prepared before any clock starts)."""
        tokens = self._prompt_tokens(n_tokens)
        step = self._n_batch
        return [(self._token_array(tokens[i:i + step]), len(tokens[i:i + step])) for i in range(0, n_tokens, step)]

    def _decode_chunks(self, chunks: list[tuple[Any, int]], what: str) -> None:
        llama = self._llama
        for array, count in chunks:
            self._check(llama.llama_decode(self._ctx, llama.llama_batch_get_one(array, count)), what)

    def decode(self, n_tokens: int, depth: int = 0) -> tuple[float, list[float]]:
        """``n_tokens`` single-token decodes, each timed.

        From an empty cache (llama-bench ``tg``), or after a ``depth``-token prompt decoded first, untimed
        (llama-bench ``tg @ d<depth>``).
        """
        llama = self._llama
        ctx = self._ctx
        self._clear_cache()
        if depth:
            self._decode_chunks(self._prompt_chunks(depth), f"depth prompt of {depth} tokens")
            llama.llama_synchronize(ctx)
        # the first token is BOS (when the vocabulary adds one) at any depth, as in llama-bench's test_gen
        feed = self._prompt_tokens(1) + self._random_tokens(n_tokens - 1)
        # One batch struct points at a one-slot array; each step only rewrites the slot, so the loop makes no
        # allocations and no extra ctypes calls beyond decode + synchronize.
        slot = self._token_array([feed[0]])
        batch = llama.llama_batch_get_one(slot, 1)
        decode, synchronize, clock = llama.llama_decode, llama.llama_synchronize, time.perf_counter_ns
        per_token_ns: list[int] = []
        start_ns = previous_ns = clock()
        for token in feed:
            slot[0] = token
            rc = decode(ctx, batch)
            synchronize(ctx)
            now_ns = clock()
            if rc != 0:
                self._check(rc, f"decode step {len(per_token_ns) + 1}")
            per_token_ns.append(now_ns - previous_ns)
            previous_ns = now_ns
        total_ns = previous_ns - start_ns
        return total_ns / 1e9, [ns / 1e9 for ns in per_token_ns]

    def details(self) -> dict[str, Any]:
        """Context parameters and the llama.cpp build's CPU features, for comparing runs."""
        llama = self._llama
        if not self._model:
            return {}
        description = ctypes.create_string_buffer(256)
        llama.llama_model_desc(self._model, description, len(description))
        return {
            "model_description": description.value.decode("utf-8", "replace"),
            "model_params": int(llama.llama_model_n_params(self._model)),
            "n_vocab": self._n_vocab,
            "n_batch": int(llama.llama_n_batch(self._ctx)),
            "n_ubatch": int(llama.llama_n_ubatch(self._ctx)),
            "n_ctx_effective": int(llama.llama_n_ctx(self._ctx)),
            "cache_type_k": self.cache_type_k,
            "cache_type_v": self.cache_type_v,
            "flash_attn": "auto",
            "repack": self.repack,
            "prompt_source": "random",
            "system_info": llama.llama_print_system_info().decode("utf-8", "replace").strip(" |"),
        }

    def close(self) -> None:
        """Free sampler, context and model (in that order: the context references the model)."""
        llama = self._llama
        if llama is None:
            return
        if self._sampler:
            llama.llama_sampler_free(self._sampler)
            self._sampler = None
        if self._ctx:
            llama.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama.llama_model_free(self._model)
            self._model = None

    def _silence_logs(self) -> None:
        """Route llama.cpp/ggml logs to stderr only with --verbose; by default they would bury the report."""
        llama = self._llama
        verbose = self.verbose

        def forward(_level: int, text: bytes, _user_data: Any) -> None:
            if verbose and text:
                sys.stderr.write(text.decode("utf-8", "replace"))

        # Keep a reference: ctypes would otherwise free the callback while llama.cpp still calls it.
        self._log_callback = llama.llama_log_callback(forward)
        llama.llama_log_set(self._log_callback, ctypes.c_void_p(0))

    def _clear_cache(self) -> None:
        """Empty the KV cache; metadata only, as llama-bench does (the data is overwritten anyway)."""
        self._llama.llama_memory_clear(self._memory, False)

    def _prompt_tokens(self, n_tokens: int) -> list[int]:
        """BOS (when the vocab adds one, like llama-bench) followed by random non-control token ids."""
        llama = self._llama
        first: list[int] = []
        if n_tokens > 0 and llama.llama_vocab_get_add_bos(self._vocab):
            first = [int(llama.llama_vocab_bos(self._vocab))]
        return first + self._random_tokens(n_tokens - len(first))

    def _random_tokens(self, n_tokens: int) -> list[int]:
        """Random token ids, skipping control tokens (EOS, chat markers) that real text never contains."""
        llama = self._llama
        tokens: list[int] = []
        while len(tokens) < n_tokens:
            token = self.rng.randrange(self._n_vocab)
            if not llama.llama_vocab_is_control(self._vocab, token):
                tokens.append(token)
        return tokens

    def _token_array(self, tokens: list[int]) -> Any:
        """A C array of llama_token that llama_batch_get_one can point at."""
        return (self._llama.llama_token * len(tokens))(*tokens)

    def _check(self, rc: int, what: str) -> None:
        """Turn a non-zero llama_decode status into a BenchError."""
        if rc != 0:
            reason = "no KV slot (context too small?)" if rc == 1 else f"status {rc}"
            raise BenchError(f"llama.cpp failed during {what}: {reason}")


def _import_llama_cpp() -> Any:
    """Import llama_cpp, telling "not installed" apart from "installed but its native library is broken"."""
    try:
        import llama_cpp
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "llama_cpp":
            raise RuntimeMissingError(_MISSING) from None
        raise RuntimeMissingError(f"llama-cpp-python cannot be imported: missing module {err.name!r}") from None
    except ImportError:
        raise RuntimeMissingError(_MISSING) from None
    except (OSError, RuntimeError) as err:  # the shared library failed to load (wrong arch, missing libgomp, ...)
        message = " ".join(str(err).split())
        raise RuntimeMissingError(
            f"llama-cpp-python is installed but its native library fails to load: {message}"
        ) from None
    return llama_cpp
