"""What a Hugging Face model directory must be before anything loads it: readable config, safetensors weights that
are whole, no pickles, no code shipped with the model.

Checked when a model is resolved (``edgeforge.models.refs.resolve_model``), so every command that takes a model (plan,
export, fine-tune, distill, eval) refuses a bad directory in one line before a library reads it:

- **Pickles.** ``pytorch_model.bin`` / ``*.pt`` / ``*.pth`` / ``*.ckpt`` / ``*.pkl`` are pickles, and unpickling
  runs code. A directory whose weights are only pickles is refused; beside safetensors they are never read
  (transformers and llama.cpp's converter both prefer safetensors).
- **Remote code.** ``auto_map`` in ``config.json`` or ``tokenizer_config.json`` names Python files shipped with the
  model. edgeforge never sets ``trust_remote_code``, but llama.cpp's converter does for some tokenizers (a
  ``tokenizer_class`` of ``HybridDNATokenizer`` makes it call ``AutoTokenizer.from_pretrained(...,
  trust_remote_code=True)``, which imports the model's own ``.py``), so such a directory is refused outright.
- **Safetensors.** The header (8-byte length, JSON) is read, not the tensors: a file that is truncated, or whose
  header does not describe exactly the bytes that follow it, is refused with the file named, instead of failing
  deep inside safetensors or the converter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgeforge.errors import ModelError

PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
CODE_CONFIGS = ("config.json", "tokenizer_config.json")
#: Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                           "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
#: safetensors itself refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ModelError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelError(f"{path}: cannot read it as JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def check_no_remote_code(model_dir: Path) -> None:
    """Refuse a directory whose config or tokenizer config names code shipped with the model (``auto_map``)."""
    for name in CODE_CONFIGS:
        path = model_dir / name
        if not path.is_file():
            continue
        auto_map = read_json_object(path).get("auto_map")
        if auto_map:
            raise ModelError(f"{path}: names custom code shipped with the model (auto_map: {json.dumps(auto_map)[:120]}"
                             "); edgeforge never runs a model's own code: remove 'auto_map' if the architecture is a "
                             "standard transformers one (llama, mistral, qwen2)")


def check_safetensors(path: Path) -> None:
    """Refuse a safetensors file that is truncated or whose header does not describe the bytes that follow it."""
    size = path.stat().st_size
    fix = "re-save or re-download the weights"
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path}: truncated safetensors file ({size} bytes, expected an 8-byte header length "
                             f"first); {fix}")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ModelError(f"{path}: corrupt or truncated safetensors file (a header of {n} bytes announced, "
                             f"{size - 8} bytes follow); {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ModelError(f"{path}: corrupt safetensors file (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: corrupt safetensors file (its header is not a JSON object); {fix}")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        width = SAFETENSORS_DTYPE_BYTES.get(info.get("dtype")) if isinstance(info, dict) else None
        ok = (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
              and offsets[0] <= offsets[1] and isinstance(shape, list)
              and all(type(d) is int and d >= 0 for d in shape) and width is not None)
        if not ok or math.prod(shape) * width != offsets[1] - offsets[0]:  # type: ignore[arg-type,index,operator]
            raise ModelError(f"{path}: corrupt safetensors file (tensor '{str(name)[:80]}' is described wrongly); "
                             f"{fix}")
        spans.append(tuple(offsets))  # type: ignore[arg-type]
    end = 0
    for start, stop in sorted(spans):  # as safetensors requires: back to back, from 0, no gaps or overlaps
        if start != end:
            raise ModelError(f"{path}: corrupt safetensors file (the tensors' byte ranges overlap or leave gaps); "
                             f"{fix}")
        end = stop
    data = size - 8 - n
    if end != data:
        raise ModelError(f"{path}: truncated or corrupt safetensors file (its tensors need {end} bytes of data, the "
                         f"file holds {data}); {fix}")


def check_hf_dir(model_dir: Path) -> None:
    """Everything above, for an HF model directory holding a config.json. Reads headers only."""
    read_json_object(model_dir / "config.json")
    check_no_remote_code(model_dir)
    weights = sorted(model_dir.glob("*.safetensors"))
    pickles = sorted({p for pattern in PICKLE_PATTERNS for p in model_dir.glob(pattern)})
    if pickles and not weights:
        raise ModelError(f"{model_dir}: the weights are pickles ({', '.join(p.name for p in pickles[:3])}), which "
                         "edgeforge never loads (unpickling runs code); convert them to safetensors with "
                         "model.save_pretrained(dir, safe_serialization=True) in a Python you trust")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        shards = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        missing = sorted(str(s) for s in shards if not (model_dir / str(s)).is_file())
        if not shards or missing:
            raise ModelError(f"{index}: the weight map names {len(shards)} shard(s)"
                             + (f"; missing: {', '.join(missing[:3])}" if missing else "")
                             + "; re-save or re-download the weights")
    for w in weights:
        check_safetensors(w)
