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
- **Safetensors.** The header (8-byte length, JSON) is read and validated by the safetensors library, not the
  tensors: a file that is truncated, or whose header does not describe exactly the bytes that follow it, is refused
  with the file named, instead of failing deep inside transformers or the converter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeforge.errors import ModelError

#: The files of a tokenizer saved by transformers. ``tokenizer.json`` holds the whole tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
#: The older formats, used only where ``tokenizer.json`` is missing: a GGUF-derived ``tokenizer.model`` is the whole
#: GGUF (94 MB for SmolLM2) and would double the size of a shipped folder for nothing.
LEGACY_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
CODE_CONFIGS = ("config.json", "tokenizer_config.json")
#: safetensors' reasons for refusing a header, said plainly (others are passed on as safetensors words them).
SAFETENSORS_PROBLEMS = {
    "header too small": "shorter than the 8-byte header length it must start with",
    "header too large": "the header length it announces is impossible",
    "invalid header length": "the header length it announces runs past the end of the file",
    "invalid JSON in header": "its header is not JSON describing tensors",
    "invalid shape, data type, or offset for tensor": "a tensor is described wrongly",
    "incomplete metadata, file not fully covered": "the tensors its header describes and the bytes that follow it "
                                                   "differ in length",
    "metadata incomplete buffer": "its tensors need more bytes than the file holds",
}


def is_sentencepiece_model(path: Path) -> bool:
    """Whether ``path`` is a SentencePiece model (a protobuf), not the copy of a whole GGUF that transformers writes
    under the same name."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and head != b"GGUF"


def tokenizer_files(model_dir: Path) -> list[Path]:
    """The tokenizer files of ``model_dir`` that exist: :data:`TOKENIZER_FILES`, a SentencePiece ``tokenizer.model``
    (llama.cpp's converter reads the vocabulary of Llama, Gemma and Phi-3 from it, not from ``tokenizer.json``), and
    the legacy ones when there is no ``tokenizer.json``. What every stage copies when it writes a model or ships one."""
    names = TOKENIZER_FILES + (() if (model_dir / "tokenizer.json").is_file() else LEGACY_TOKENIZER_FILES)
    found = [model_dir / n for n in names if (model_dir / n).is_file()]
    spm = model_dir / "tokenizer.model"
    if spm not in found and is_sentencepiece_model(spm):
        found.append(spm)
    return found


def save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """``tokenizer.save_pretrained(out_dir)``, and the SentencePiece ``tokenizer.model`` of the directory it was
    loaded from when the save wrote none (a ``PreTrainedTokenizerFast`` has no slow form to save it from)."""
    import shutil

    tokenizer.save_pretrained(out_dir)
    source = Path(getattr(tokenizer, "name_or_path", "") or "") / "tokenizer.model"
    if not (out_dir / "tokenizer.model").exists() and is_sentencepiece_model(source):
        shutil.copyfile(source, out_dir / "tokenizer.model")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ModelError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ModelError(f"{path}: cannot read it as JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of the Hugging Face model directory ``model_dir``: the one reader every stage uses.

    ModelError (bad input) naming what was expected and found: not a directory, no config.json, not a JSON object.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        what = "a file" if model_dir.exists() else "nothing"
        raise ModelError(f"{model_dir}: expected a Hugging Face model directory (config.json, *.safetensors, "
                         f"tokenizer files), found {what}; pass the directory the model was saved to")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: a model directory needs a config.json, found none; save the model with "
                         "save_pretrained() or point at the directory that holds config.json")
    return read_json_object(path)


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
    """Refuse a safetensors file that is truncated or whose header does not describe the bytes that follow it.

    ``safetensors.safe_open`` reads and validates the header (dtypes, shapes, byte ranges back to back, the file's
    length) without reading the tensors; its reason is turned into one line naming the file.
    """
    from safetensors import SafetensorError, safe_open

    fix = "re-save or re-download the weights"
    try:
        # numpy: opening reads the header only, and unlike "pt" does not import torch (plan resolves models too)
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as e:
        reason, _, detail = str(e).removeprefix("Error while deserializing header: ").partition(":")
        problem = SAFETENSORS_PROBLEMS.get(reason.strip(), reason.strip()) + (f": {detail.strip()}" if detail else "")
        raise ModelError(f"{path}: corrupt or truncated safetensors file ({' '.join(problem.split())[:160]}, "
                         f"{path.stat().st_size} bytes); {fix}") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read the safetensors file ({e.strerror or e}); {fix}") from None


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
