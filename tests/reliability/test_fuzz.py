"""Fuzzing the readers of user files with hypothesis: whatever the bytes, a reader returns its result or raises one of
edgeforge's own errors (EdgeforgeError: one clear line at the CLI), never KeyError, ValueError, struct.error, ...

Runs are derandomized (the same examples every run, so the default path stays reproducible) and modest (about 60
examples each, a few seconds); set EDGEFORGE_FUZZ_EXAMPLES=2000 for a longer, random search.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from edgeforge.errors import EdgeforgeError
from edgeforge.models.refs import ModelArch, arch_from_config, read_arch, resolve_model

EXAMPLES = int(os.environ.get("EDGEFORGE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()

#: Values that break naive YAML readers: impossible dates (ValueError inside PyYAML), tags, anchors, huge numbers,
#: nesting, control characters.
TRICKY = ["2001-02-30", "2001-13-45 25:61:61", "1e999", "-.inf", ".nan", "~", "[", "{", "}", "]", "!!binary x",
          "!!python/name:os.system", "!!set {a}", "&a x", "*a", "<<: *a", "? [a]\n: b", "0o8", "0x_", "1_000", "'",
          '"\\x"', "\t", "\x00", "\ufeff", "- -", ": :", "|", ">", "%YAML 9.9", "---", "...", "[" * 3000,
          "-" * 3, "null", "true", "yes", "0", "-1", "9" * 400]


def outcome(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None when it raised an EdgeforgeError; any other exception fails the test. The outcome is
    recorded as a hypothesis event (pytest --hypothesis-show-statistics shows how many inputs were accepted)."""
    try:
        result = fn(*args)
    except EdgeforgeError as e:
        event(f"refused ({type(e).__name__})")
        return None
    event("accepted")
    return result


def _fresh(root: Path, suffix: str) -> Path:
    return root / f"f{next(_counter)}{suffix}"


@st.composite
def mutated_text(draw: st.DrawFn, base: str) -> str:
    """``base`` with a few line-level edits: a value replaced by a tricky token, lines dropped, duplicated,
    re-indented, or random text inserted."""
    lines = base.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        op = draw(st.sampled_from(["value", "drop", "dup", "indent", "insert", "random"]))
        line = lines[i] if lines else ""
        if op == "value" and ":" in line:
            lines[i] = line.split(":", 1)[0] + ": " + draw(st.sampled_from(TRICKY))
        elif op == "drop" and lines:
            del lines[i]
        elif op == "dup" and lines:
            lines.insert(i, line)
        elif op == "indent" and lines:
            lines[i] = " " * draw(st.integers(1, 5)) + line
        elif op == "insert":
            lines.insert(i, draw(st.sampled_from(TRICKY)))
        else:
            lines.insert(i, draw(st.text(max_size=30)))
    return "\n".join(lines) + "\n"


YAML_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


# ---------------------------------------------------------------- profiles
PROFILE_TEXT = (REPO / "profiles" / "raspberry-pi-5-8gb.yaml").read_text(encoding="utf-8")
DEEP = "a: " + "[" * 5000 + "]" * 5000 + "\n"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(text=mutated_text(PROFILE_TEXT))
@example(text=PROFILE_TEXT.replace("name: raspberry-pi-5-8gb", "name: 2001-02-30"))
@example(text=DEEP)
def test_fuzz_profile_yaml(fuzz_dir: Path, text: str) -> None:
    from edgeforge.plan.profiles import DeviceProfile, load_profile_file

    result = outcome(load_profile_file, _write(_fresh(fuzz_dir, ".yaml"), text))
    assert result is None or isinstance(result, DeviceProfile)


@FUZZ
@given(data=st.dictionaries(st.sampled_from(["name", "description", "category", "memory_total_bytes", "cpu",
                                             "runtimes", "latency_goals", "sources", "decode_efficiency"])
                            | st.text(max_size=8), YAML_VALUES, max_size=8))
def test_fuzz_profile_generated_mappings(fuzz_dir: Path, data: dict) -> None:
    from edgeforge.plan.profiles import load_profile_file

    outcome(load_profile_file, _write(_fresh(fuzz_dir, ".yaml"), yaml.safe_dump(data)))


# ---------------------------------------------------------------- targets
TARGET_TEXT = ("# edgeforge bench --target pi.yaml\nname: pi\ntype: ssh\nprofile: raspberry-pi-5-8gb\nhost: 10.0.0.5\n"
               "port: 22\nuser: pi\nkey_file: id_ed25519\nknown_hosts_file: known_hosts\npython: python3\n"
               "workdir: /tmp/edgeforge-bench\nrun_timeout_s: 600\n")


@FUZZ
@given(text=mutated_text(TARGET_TEXT) | mutated_text("name: here\ntype: local\nprofile: raspberry-pi-5-8gb\n"))
@example(text="name: x\ntype: local\nsince: 2001-02-30\n")
@example(text=DEEP)
def test_fuzz_target_yaml(fuzz_dir: Path, text: str) -> None:
    from edgeforge.bench.targets import load_target_file

    outcome(load_target_file, _write(_fresh(fuzz_dir, ".yaml"), text))


# ---------------------------------------------------------------- pipeline files
PIPELINE_TEXT = (REPO / "pipelines" / "default.yaml").read_text(encoding="utf-8")
SECTIONS = ["profile", "teacher", "data", "task", "target", "order", "seed", "context_tokens", "distill", "finetune",
            "export", "verify", "bench"]
SETTING_KEYS = ["enabled", "steps", "lr", "batch_size", "seq_len", "method", "rank", "formats", "gguf_quant",
                "tokens", "repeats", "threads", "init", "loss", "temperature", "alpha", "top_k"]


@FUZZ
@given(data=st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=6),
                            YAML_VALUES | st.dictionaries(st.sampled_from(SETTING_KEYS) | st.text(max_size=6),
                                                          YAML_VALUES, max_size=4), max_size=6))
def test_fuzz_pipeline_generated_mappings(data: dict) -> None:
    from edgeforge.build.config import PipelineConfig, validate_pipeline

    result = outcome(validate_pipeline, data, "fuzz")
    assert result is None or isinstance(result, PipelineConfig)


@FUZZ
@given(text=mutated_text(PIPELINE_TEXT))
@example(text="seed: 2001-02-30\n")
def test_fuzz_pipeline_yaml(fuzz_dir: Path, text: str) -> None:
    from edgeforge.build.config import load_pipeline

    outcome(load_pipeline, _write(_fresh(fuzz_dir, ".yaml"), text))


# ---------------------------------------------------------------- GGUF metadata (models.read_arch) and bench
@pytest.fixture(scope="module")
def small_vocab_gguf(tiny_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """edgeforge's real F16 export of the tiny model, its vocabulary arrays cut to 64 entries: the same header,
    metadata and tensor layout, parsed in milliseconds instead of seconds (gguf-py walks every vocabulary string)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from edgeforge.quiet import captured_stderr

    dst = tmp_path_factory.mktemp("fuzz-gguf") / "small-vocab.gguf"
    reader = gguf.GGUFReader(str(tiny_f16), "r")
    fields, kind = reader.fields, gguf.GGUFValueType
    cut = {"tokenizer.ggml.tokens": (64, kind.STRING), "tokenizer.ggml.token_type": (64, kind.INT32),
           "tokenizer.ggml.merges": (32, kind.STRING)}
    new = {k: MetadataDetails(kind.ARRAY, fields[k].contents()[:n], sub_type=sub) for k, (n, sub) in cut.items()}
    writer = gguf.GGUFWriter(str(dst), arch=fields["general.architecture"].contents(), endianess=reader.endianess)
    with captured_stderr():
        copy_with_new_metadata(reader, writer, new, [])
    assert read_arch(resolve_model(str(dst))).n_layers == 2
    return dst


#: Where the small GGUF's header, metadata and tensor descriptions end (its tensor data starts after).
GGUF_HOT_BYTES = 4700


@st.composite
def mutated_bytes(draw: st.DrawFn, data: bytes, hot: int) -> bytes:
    """A few edits, mostly inside the first ``hot`` bytes: bit flips, overwritten 4/8-byte integers (lengths and
    counts become 0, huge or negative), inserted or deleted bytes, a truncation anywhere."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "int", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, min(len(b), hot) - 1)))
        if op == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "int":
            width = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]) | st.integers(0, 4096))
            b[pos:pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 8))]
        else:
            del b[draw(st.integers(0, len(b))):]
    return bytes(b)


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_metadata_reader(small_vocab_gguf: Path, fuzz_dir: Path, data: st.DataObject) -> None:
    """resolve_model + read_arch (plan, models show, export gguf, bench estimates) and the exportability gate."""
    from edgeforge.plan.exportability import check_exportable

    raw = data.draw(mutated_bytes(small_vocab_gguf.read_bytes(), GGUF_HOT_BYTES) | st.binary(max_size=64))
    path = _write(_fresh(fuzz_dir, ".gguf"), raw)
    def read(p: Path) -> ModelArch:
        ref = resolve_model(str(p))
        arch = read_arch(ref)
        check_exportable(ref)
        return arch

    result = outcome(read, path)
    assert result is None or isinstance(result, ModelArch)
    path.unlink()


@FUZZ
@given(data=st.data())
def test_fuzz_bench_artifact_reader(small_vocab_gguf: Path, fuzz_dir: Path, data: st.DataObject) -> None:
    """bench.local_artifact on a mutated GGUF, on an ONNX directory with mutated files, and on the same bytes with
    the wrong extension."""
    from edgeforge.bench.artifact import LocalArtifact, local_artifact

    raw = data.draw(mutated_bytes(small_vocab_gguf.read_bytes()[:GGUF_HOT_BYTES], GGUF_HOT_BYTES)
                    | st.binary(max_size=64))
    shape = data.draw(st.sampled_from(["gguf", "onnx-dir", "onnx-file", "other"]))
    if shape.startswith("onnx"):
        target = _fresh(fuzz_dir, "")
        target.mkdir()
        _write(target / "model.onnx", raw)
        if shape == "onnx-file":
            target = target / "model.onnx"
    else:
        target = _write(_fresh(fuzz_dir, ".gguf" if shape == "gguf" else ".bin"), raw)
    result = outcome(local_artifact, target)
    assert result is None or isinstance(result, LocalArtifact)


RESULT = {"schema": "edgeforge.bench/1", "decode_tokens_per_s": 12.5, "prefill_tokens_per_s": 300.0, "threads": 2,
          "artifact": "/x/m.gguf", "target": "here", "profile": "raspberry-pi-5-8gb", "model_bytes": 1000}


@FUZZ
@given(text=mutated_text(json.dumps(RESULT, indent=1)) | mutated_text(json.dumps([RESULT, RESULT], indent=1)))
@example(text='{"schema": ' + "[" * 5000 + "]" * 5000 + "}")  # found by this test: RecursionError in json
def test_fuzz_bench_result_reader(fuzz_dir: Path, text: str) -> None:
    """'bench compare' reads saved results (bench.load_results)."""
    from edgeforge.bench.results import load_results

    result = outcome(load_results, [_write(_fresh(fuzz_dir, ".json"), text)])
    assert result is None or len(result) >= 1


TASK_TEXT = "".join(json.dumps(r) + "\n" for r in [
    {"prompt": "turn on the lights", "completion": '{"device": "light"}'},
    {"messages": [{"role": "user", "content": "dim it"}, {"role": "assistant", "content": "ok"}]},
    {"prompt": "lock the door", "completion": "done"}])


@FUZZ
@given(text=mutated_text(TASK_TEXT))
@example(text='{"prompt": ' + "[" * 5000 + "]" * 5000 + "}\n")  # RecursionError in json, found by fuzzing results
def test_fuzz_task_data_reader(fuzz_dir: Path, text: str) -> None:
    """finetune --data (and distill --data JSONL): finetune.load_task_examples over data.read_jsonl."""
    from edgeforge.tasks.examples import load_task_examples

    outcome(load_task_examples, None, _write(_fresh(fuzz_dir, ".jsonl"), text))


# ---------------------------------------------------------------- model directories: safetensors and config.json
@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("fuzz-st") / "model.safetensors"
    save_file({"a.weight": torch.ones(4, 3), "b.bias": torch.zeros(5, dtype=torch.float16),
               "c": torch.arange(6, dtype=torch.int64)}, str(path), metadata={"format": "pt"})
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header_check(small_safetensors: bytes, fuzz_dir: Path, data: st.DataObject) -> None:
    """model_files.check_safetensors (run when a model is resolved) refuses with ModelError, and whatever it accepts
    the safetensors library loads: it never lets through a file that would fail later inside transformers."""
    from safetensors.torch import load_file

    from edgeforge.models.files import check_safetensors

    n = int.from_bytes(small_safetensors[:8], "little")
    raw = data.draw(mutated_bytes(small_safetensors, 8 + n) | st.binary(max_size=32))
    path = _write(_fresh(fuzz_dir, ".safetensors"), raw)
    if outcome(lambda p: check_safetensors(p) or True, path):
        load_file(str(path))


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True}


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(LLAMA_CONFIG) + ["head_dim"]), YAML_VALUES, max_size=4))
def test_fuzz_config_json_fields(changes: dict) -> None:
    result = outcome(arch_from_config, {**LLAMA_CONFIG, **changes})
    assert result is None or isinstance(result, ModelArch)
