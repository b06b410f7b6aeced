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


def test_qlora_of_an_8b_model_as_edgeforge_runs_it(reg):
    """As edgeforge runs QLoRA on CUDA (no checkpointing unless asked; the embedding and the untied head in fp32,
    as the base is loaded and as peft's prepare_model_for_kbit_training keeps them: 4.2 GB for Llama-3-8B), an 8B
    model at 512 tokens needs about 14 GB, 9.3 GB with --gradient-checkpointing: it does not fit an 8 GB card (the
    planner said it did, counting a bf16 embedding and checkpointing edgeforge never enabled); it fits a 24 GB one."""
    from edgeforge.plan.training_cost import training_memory_bytes

    arch = arch_from_config(LLAMA_3_8B)
    plain = training_memory_bytes("qlora", arch, 1, 512)
    assert 13e9 < plain < 15e9 and 8.5e9 < training_memory_bytes("qlora", arch, 1, 512, checkpointing=True) < 10e9
    assert not training_fit("qlora", arch, reg.get("rtx-4060-8gb")).fits
    big = training_fit("qlora", arch, reg.get("rtx-4090-24gb"))
    assert big.fits and not big.gradient_checkpointing
    assert not training_fit("lora", arch, reg.get("rtx-4090-24gb")).fits  # fp32 frozen weights alone are 32 GB
    assert not training_fit("full", arch, reg.get("rtx-4060-8gb")).fits


def test_the_cpu_preflight_is_the_planners_cpu_figure(monkeypatch: pytest.MonkeyPatch):
    """The pre-flight on a CPU is training_memory_bytes for a CPU (fp32 activations), one formula for both."""
    from edgeforge.plan.training_cost import training_memory_bytes
    from edgeforge.train.preflight import check_training_memory

    monkeypatch.setenv("EDGEFORGE_AVAILABLE_MEMORY_BYTES", str(10**15))
    arch = arch_from_config(LLAMA_3_2_3B)
    for method in ("full", "lora", "dora", "qlora"):
        assert check_training_memory("t", method, arch, 1, 128) == \
            training_memory_bytes(method, arch, 1, 128, device="cpu")
    assert training_memory_bytes("lora", arch, 1, 128, device="cpu") > training_memory_bytes("lora", arch, 1, 128)
    assert training_memory_bytes("dora", arch, 1, 128) > training_memory_bytes("lora", arch, 1, 128)


def test_cpu_adapter_runs_count_the_transients_the_heap_keeps(monkeypatch: pytest.MonkeyPatch):
    """On a CPU the adapter methods also hold the freed per-layer temporaries glibc keeps resident (peft's two
    output-sized tensors per adapted layer; QLoRA's fp32 dequantized weights); not on CUDA, not for full training or
    distillation, not with checkpointing; and the total includes them."""
    from edgeforge.plan import training_cost
    from edgeforge.plan.training_cost import heap_retained_bytes, training_memory_bytes

    arch = arch_from_config(LLAMA_3_2_3B)
    outputs = (arch.n_heads * arch.head_dim + 2 * arch.n_kv_heads * arch.head_dim + 2 * arch.hidden_size
               + 2 * arch.intermediate_size)
    lora = heap_retained_bytes("lora", arch, 2, 128, device="cpu")
    assert lora == 2 * 2 * 128 * outputs * 4 * arch.n_layers
    assert heap_retained_bytes("qlora", arch, 2, 128, device="cpu") == lora + 4 * arch.layer_params * arch.n_layers
    assert heap_retained_bytes("lora", arch, 2, 128) == 0  # CUDA's caching allocator reuses the block
    assert heap_retained_bytes("lora", arch, 2, 128, device="cpu", checkpointing=True) == 0
    assert heap_retained_bytes("full", arch, 2, 128, device="cpu") == 0
    assert heap_retained_bytes("distill", arch, 2, 128, device="cpu") == 0
    with_heap = {m: training_memory_bytes(m, arch, 2, 128, device="cpu") for m in ("lora", "qlora")}
    monkeypatch.setattr(training_cost, "heap_retained_bytes", lambda *a, **k: 0)
    for method, total in with_heap.items():
        assert total - training_memory_bytes(method, arch, 2, 128, device="cpu") == \
            heap_retained_bytes(method, arch, 2, 128, device="cpu")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_layer_activations_are_what_autograd_keeps(method: str):
    """The per-layer activation count (layer_activation_elements) against the tensors autograd really saves in a
    training forward pass of tiny Llamas (saved-tensor hooks, parameters excluded; 3 layers minus 1 layer = two
    layers' worth), in fp32 as on a CPU. The adapter terms are the dropped-out input of every LoRA layer, its mask
    and its rank-16 intermediate."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from edgeforge.models.refs import arch_from_config
    from edgeforge.plan.training_cost import layer_activation_elements

    seq = 64
    for hidden, inter, heads, kv in ((256, 1024, 4, 2), (192, 512, 6, 2)):
        saved = []
        for layers in (1, 3):
            config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                 num_attention_heads=heads, num_key_value_heads=kv, vocab_size=64,
                                 max_position_embeddings=256, tie_word_embeddings=True)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).train()
            if method == "lora":
                model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                         target_modules="all-linear"))
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            kept: dict[int, int] = {}

            def pack(t: torch.Tensor, kept: dict[int, int] = kept, params: set[int] = params) -> torch.Tensor:
                if t.untyped_storage().data_ptr() not in params:
                    kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(input_ids=torch.randint(0, 64, (1, seq)), labels=torch.randint(0, 64, (1, seq)))
            saved.append(sum(kept.values()))
        measured_per_token = (saved[1] - saved[0]) / 2 / seq  # bytes, one layer
        arch = arch_from_config({**config.to_dict(), "architectures": ["LlamaForCausalLM"]})
        predicted = layer_activation_elements(arch, adapters=method == "lora") * 4
        if method == "lora":
            predicted += 5 * hidden + hidden + inter  # the dropout masks, a byte an element
        assert predicted == pytest.approx(measured_per_token, rel=0.05), (hidden, measured_per_token, predicted)


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


def test_plan_shows_where_the_gguf_budget_sits_among_the_presets(reg):
    """Llama-3-8B on an 8 GB card: Q4_K_M fits, Q6_K / Q8_0 do not, so a fitted mix has room between them; on a
    24 GB card every preferred preset fits and there is nothing between to fill."""
    from edgeforge.plan.planner import fit_room, weights_budget_bytes

    arch = arch_from_config(LLAMA_3_8B)
    small = reg.get("rtx-4060-8gb")
    room = fit_room(arch, small, 2048)
    assert room["budget_bytes"] == weights_budget_bytes(arch, small, 2048)
    assert room["between_presets"] and room["largest_preset_that_fits"] is not None
    assert room["largest_preset_bytes"] <= room["budget_bytes"] < room["smallest_over_bytes"]
    assert room["room_bytes"] == room["budget_bytes"] - room["largest_preset_bytes"] >= 0
    big = fit_room(arch, reg.get("rtx-4090-24gb"), 2048)
    assert not big["between_presets"] and big["smallest_preset_over"] is None
    p = plan(arch, small, "llama-3-8b")
    assert p.gguf_fit == room or p.student is not None  # the room of what ships: the teacher here, or its student


def test_a_lower_bit_teacher_is_weighed_against_distillation(reg):
    """Llama-3-8B on an 8 GB card: at the stock goal (50 tokens/s) Q3_K_M is short too, and the plan says so beside
    its distillation; with a goal between the best preferred type's speed and Q3_K_M's, the plan quantizes the
    teacher to Q3_K_M instead of distilling, with its expected KL in the reason and the distillation hours avoided."""
    from edgeforge.plan.planner import EXPECTED_MEAN_KL, LOW_BIT_MAX_KL, evaluate

    arch = arch_from_config(LLAMA_3_8B)
    stock = reg.get("rtx-4060-8gb")
    p = plan(arch, stock, "llama-3-8b")
    assert p.decision == "distill" and "the teacher at Q3_K_M" in p.reason and "short of the goal too" in p.reason
    low = evaluate(arch, stock, "gguf", "Q3_K_M", 2048, 128)
    best = max(c["estimated_decode_tokens_per_s"] for c in p.candidates if c["fits"])
    assert low.fits and best < low.estimated_decode_tokens_per_s < stock.latency_goals.decode_tokens_per_s
    goal = (best + low.estimated_decode_tokens_per_s) / 2
    eased = stock.model_copy(update={"latency_goals": stock.latency_goals.model_copy(
        update={"decode_tokens_per_s": goal})})
    q = plan(arch, eased, "llama-3-8b", train_profile=reg.get("rtx-4090-24gb"))
    assert (q.decision, q.quant, q.student) == ("fine-tune", "Q3_K_M", None)
    assert EXPECTED_MEAN_KL["Q3_K_M"] <= LOW_BIT_MAX_KL and f"{EXPECTED_MEAN_KL['Q3_K_M']:.3f}" in q.reason
    assert "instead of distilling" in q.reason and "h of distillation on rtx-4090-24gb" in q.reason
    assert [s["stage"] for s in q.training["stages"]] == ["fine-tune (LoRA)"]  # no distillation stage any more
    # a quant forced by the user is not second-guessed
    assert plan(arch, eased, "llama-3-8b", quant="Q4_K_M").decision == "distill"
