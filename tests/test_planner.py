"""The planner's decisions, on config-only model directories and on the bundled teacher's metadata."""

from __future__ import annotations

import pytest
from conftest import LLAMA_3_2_3B, LLAMA_3_8B

from edgeforge.models.refs import ModelRef, arch_from_config, read_arch, resolve_model
from edgeforge.plan.planner import plan, shrink
from edgeforge.plan.profiles import load_registry
from edgeforge.plan.training_cost import training_fit


@pytest.fixture(scope="module")
def reg():
    return load_registry()


@pytest.fixture(scope="module")
def teacher():
    return read_arch(resolve_model(None))


def test_bundled_teacher_metadata(teacher):
    assert (teacher.n_layers, teacher.hidden_size, teacher.n_heads, teacher.n_kv_heads) == (30, 576, 9, 3)
    assert teacher.vocab_size == 49152 and teacher.tied_embeddings
    assert teacher.n_params == pytest.approx(134.5e6, rel=0.01)


def test_teacher_fits_a_4090_and_is_fine_tuned(reg, teacher):
    p = plan(teacher, reg.get("rtx-4090-24gb"), "t")
    assert p.fits and p.decision == "fine-tune" and p.student is None
    assert p.total_bytes == p.weights_bytes + p.kv_cache_bytes + p.runtime_overhead_bytes


def test_small_profile_distills_into_a_smaller_student(reg, teacher):
    p = plan(teacher, reg.get("raspberry-pi-zero-2w"), "t", has_task=True)
    assert p.decision == "distill+fine-tune"
    assert p.student["layers"] < teacher.n_layers and p.student["params"] < teacher.n_params
    goal = reg.get("raspberry-pi-zero-2w").latency_goals.decode_tokens_per_s
    assert p.student["estimated_decode_tokens_per_s"] >= goal
    assert "too big or too slow" in p.reason


def test_too_big_model_does_not_fit(reg, config_dir):
    arch = read_arch(ModelRef("8b", config_dir(LLAMA_3_8B), "hf"))
    p = plan(arch, reg.get("raspberry-pi-5-4gb"), "8b", context=8192)
    assert not p.fits and "distill" in p.decision and "budget" in p.reason


def test_plan_on_a_config_only_directory(reg, config_dir):
    ref = resolve_model(str(config_dir(LLAMA_3_2_3B)))
    assert ref.format == "hf"
    p = plan(read_arch(ref), reg.get("raspberry-pi-5-8gb"), ref.name)
    assert p.weights_bytes > 1.5e9 and p.kv_cache_bytes == 2 * 28 * 8 * 128 * 2048 * 2


def test_shrink_keeps_width_and_counts_params(teacher):
    s = shrink(teacher, 10)
    assert s.n_layers == 10 and s.hidden_size == teacher.hidden_size
    assert s.n_params == teacher.n_params - 20 * teacher.layer_params


def test_cost_and_training_memory(reg, teacher):
    p = plan(teacher, reg.get("raspberry-pi-zero-2w"), "t", has_task=True,
             train_profile=reg.get("rtx-4090-24gb"), price_per_hour=0.5)
    stages = {s["stage"]: s for s in p.training["stages"]}
    distill = stages["distill"]
    assert distill["hours"] > 0 and distill["cost"] == pytest.approx(distill["hours"] * 0.5)
    assert p.training["memory"]["distill"]["fits"]
    assert p.serving_energy_wh_per_million_tokens > 0


def test_qlora_fits_an_8b_model_in_8_gb_only_with_gradient_checkpointing(reg):
    """As edgeforge runs QLoRA (no checkpointing unless asked), Llama-3-8B at 512 tokens needs about 10.5 GB: it
    fits an 8 GB card only with --gradient-checkpointing, and the fit says so (it assumed checkpointing before)."""
    from edgeforge.plan.training_cost import training_memory_bytes

    arch = arch_from_config(LLAMA_3_8B)
    gpu = reg.get("rtx-4060-8gb")
    plain = training_memory_bytes("qlora", arch, 1, 512)
    assert 9.5e9 < plain < 11.5e9 and training_memory_bytes("qlora", arch, 1, 512, checkpointing=True) < 8e9
    fit = training_fit("qlora", arch, gpu)
    assert fit.fits and fit.gradient_checkpointing
    assert not training_fit("lora", arch, gpu).fits  # bf16 weights alone are 16 GB
    assert not training_fit("full", arch, gpu).fits


def test_the_cpu_preflight_counts_fp32_weights_once(monkeypatch: pytest.MonkeyPatch):
    """On a CPU the frozen bf16 weights of the prediction are fp32 (+2 bytes each); trained weights are fp32 in the
    16 bytes a parameter already, so full fine-tuning adds nothing (it was counted twice before)."""
    from edgeforge.plan.training_cost import training_memory_bytes
    from edgeforge.train.preflight import check_training_memory

    monkeypatch.setenv("EDGEFORGE_AVAILABLE_MEMORY_BYTES", str(10**15))
    arch = arch_from_config(LLAMA_3_2_3B)
    assert check_training_memory("t", "full", arch, 1, 128) == training_memory_bytes("full", arch, 1, 128)
    assert check_training_memory("t", "lora", arch, 1, 128) == \
        training_memory_bytes("lora", arch, 1, 128) + 2 * arch.n_params
    assert training_memory_bytes("dora", arch, 1, 128) > training_memory_bytes("lora", arch, 1, 128)


def test_exportability_gate(config_dir):
    from edgeforge.plan.exportability import check_exportable

    teacher = check_exportable(resolve_model(None))
    assert teacher["gguf"]["ok"] and teacher["onnx"]["ok"]
    foo = config_dir({"architectures": ["FooForCausalLM"], "model_type": "foo"}, name="foo")
    verdict = check_exportable(ModelRef("foo", foo, "hf"))
    assert not verdict["gguf"]["ok"] and "are not among the" in verdict["gguf"]["reason"]
    assert "qwen3" in verdict["gguf"]["reason"]  # the families tested end to end are named
    assert not verdict["onnx"]["ok"] and "tokenizer.json" in verdict["onnx"]["reason"]
    # GPT-2 is an architecture both tools take: without a tokenizer, that is the only reason given.
    gpt2 = config_dir({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, name="gpt2")
    verdict = check_exportable(ModelRef("gpt2", gpt2, "hf"))
    assert verdict["gguf"]["reason"].startswith("architectures ['GPT2LMHeadModel'] are registered")
    assert not verdict["gguf"]["ok"] and "No tokenizer.json" in verdict["gguf"]["reason"]


def test_the_student_quant_weighs_quality_per_byte(reg, teacher):
    """Q4_0 saves 13% of Q4_K_M's bytes for 5x its KL on the bundled teacher: a profile offering both sizes its
    student at Q4_K_M (it took Q4_0, the most compact type of at least 4 bits, before); where IQ4_XS is offered it
    is both smaller and better than Q4_0, and stays the choice."""
    from edgeforge.plan.planner import quant_cost, student_quant

    assert student_quant(reg.get("rtx-4060-8gb"), "gguf") == "Q4_K_M"
    assert student_quant(reg.get("raspberry-pi-zero-2w"), "gguf") == "IQ4_XS"
    assert quant_cost("Q4_0") > quant_cost("Q4_K_M") > quant_cost("IQ4_XS")
    p = plan(teacher, reg.get("raspberry-pi-zero-2w"), "t")
    assert p.student["quant"] == "IQ4_XS" and p.student["expected_mean_kl"] == pytest.approx(0.0762)


def test_expected_kl_is_the_readme_export_table():
    """The planner's per-type KL is the measured table it cites (README, from benchmarks/export_table.py), the type
    made as the export makes it (IQ4_XS with an importance matrix, the others without)."""
    import re
    from pathlib import Path

    from edgeforge.plan.planner import EXPECTED_MEAN_KL

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    rows = {m.group(2): float(m.group(3)) for m in re.finditer(
        r"^\| (gguf|onnx) \| ([A-Za-z0-9_+]+) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", readme, re.M)}
    made_as = {"IQ4_XS": "IQ4_XS+imatrix"}
    for quant, kl in EXPECTED_MEAN_KL.items():
        name = made_as.get(quant, quant)
        if name in rows:
            assert kl == pytest.approx(rows[name], abs=1e-4), quant
    assert len([q for q in EXPECTED_MEAN_KL if made_as.get(q, q) in rows]) >= 10
