"""Quantize to a byte budget (edgeforge.export.fit): the allocator is exact, and a fitted file written by
llama-quantize fits its budget with each tensor at the type its record claims (read back with gguf-py)."""

from __future__ import annotations

import itertools
import random
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeforge.errors import BadInputError
from edgeforge.export.fit.allocate import Option, allocate
from edgeforge.export.fit.groups import FIT_TYPES, TensorGroup, read_tensors, tensor_groups
from edgeforge.models.refs import ModelRef
from edgeforge.plan.sizing import row_type


def _brute_force(options: dict[str, list[Option]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*options.values()):
        if sum(o.file_bytes for o in combo) <= budget:
            best = min(best, sum(o.cost for o in combo))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_least_cost_mix_within_the_budget(seed: int):
    rng = random.Random(seed)
    options = {}
    for g in range(5):
        sizes = sorted(rng.randint(1, 40) * 1000 for _ in range(4))
        costs = sorted((rng.random() for _ in range(4)), reverse=True)  # bigger types lose less
        options[f"g{g}"] = [Option(f"t{k}", s, c) for k, (s, c) in enumerate(zip(sizes, costs, strict=True))]
    smallest = sum(o[0].file_bytes for o in options.values())
    largest = sum(o[-1].file_bytes for o in options.values())
    budget = rng.randint(smallest, largest)
    picked = allocate(options, budget, granule_bytes=1000)
    assert sum(o.file_bytes for o in picked.values()) <= budget
    assert sum(o.cost for o in picked.values()) == pytest.approx(_brute_force(options, budget))


def test_allocation_rounds_sizes_up_so_the_mix_never_exceeds_the_budget():
    options = {f"g{i}": [Option("small", 1000, 1.0), Option("big", 1500, 0.0)] for i in range(4)}
    # 5,000 bytes hold two "big"; with sizes rounded down (or 4 KiB granules) all four "big" would seem to fit
    picked = allocate(options, 5000)
    assert sum(o.file_bytes for o in picked.values()) <= 5000
    assert sorted(o.type_name for o in picked.values()) == ["big", "big", "small", "small"]


def test_a_budget_below_the_smallest_mix_is_one_clear_error():
    with pytest.raises(BadInputError, match="smallest mix"):
        allocate({"g": [Option("a", 10_000, 1.0)]}, 9_999)


def test_row_type_follows_llama_cpps_fallbacks():
    from gguf import GGMLQuantizationType as Q

    assert row_type(Q.Q4_K, 576) == Q.Q5_0 and row_type(Q.Q4_K, 1536) == Q.Q4_K
    assert row_type(Q.IQ4_XS, 576) == Q.IQ4_NL and row_type(Q.Q3_K, 64) == Q.Q4_0
    assert row_type(Q.Q6_K, 64) == Q.Q8_0 and row_type(Q.Q8_0, 40) == Q.F16


@pytest.fixture(scope="module")
def fit_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untied llama whose MLP down rows (256) take K-quants and whose other rows (64) fall back, as an F16
    GGUF (converted once: the fits re-quantize it directly, as they would the bundled GGUF teacher). Its small
    SentencePiece vocabulary keeps gguf-py's metadata parsing and the KL over the vocabulary fast."""
    import torch
    from tiny_models import tiny_config, write_sentencepiece_tokenizer
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("fit") / "llama"
    config = tiny_config("llama", layers=3)
    config.intermediate_size, config.tie_word_embeddings = 256, False
    config.vocab_size, ids = write_sentencepiece_tokenizer(out, "llama")
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["bos_id"], ids["eos_id"], ids["pad_id"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
        # a model of its own each run: the sensitivity cache ($EDGEFORGE_HOME, shared with the user) cannot serve it
        model.model.norm.weight[0] += uuid.uuid4().int % 1000 / 1e4
    model.save_pretrained(out, safe_serialization=True)
    from edgeforge.export.gguf import export_gguf

    f16 = out.parent / "tiny-f16.gguf"
    export_gguf(ModelRef("tiny", out, "hf"), "F16", f16)
    return f16


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeforge.data.builtin import write_calibration_text

    return write_calibration_text(tmp_path_factory.mktemp("calib") / "calibration.txt", max_chars=60_000)


def test_groups_split_each_layer_into_attention_and_the_rest(fit_model: Path):
    groups = {g.name: g for g in tensor_groups(read_tensors(fit_model))}
    assert set(groups) == {"token_embd", "output", *(f"blk.{i}.{r}" for i in range(3) for r in ("attn", "ffn"))}
    assert {t.name for t in groups["blk.1.attn"].tensors} == {f"blk.1.attn_{x}.weight" for x in "qkv"} | {
        "blk.1.attn_output.weight"}
    assert all("norm" not in t.name for g in groups.values() for t in g.tensors)
    down = TensorGroup("d", tuple(t for t in groups["blk.0.ffn"].tensors if "down" in t.name))
    assert down.written_types("Q4_K") == ("Q4_K",) and groups["blk.0.attn"].written_types("Q4_K")[0] == "Q5_0"


def test_a_fitted_file_fits_its_budget_with_the_types_its_record_claims(fit_model: Path, calibration: Path,
                                                                        tmp_path: Path):
    import gguf

    from edgeforge.export.gguf import export_gguf, load_record

    ref = ModelRef("tiny", fit_model, "gguf")
    sizes = {t: export_gguf(ref, t, tmp_path / f"{t}.gguf")["file_bytes"] for t in ("Q4_0", "Q8_0")}
    budget = (sizes["Q4_0"] + sizes["Q8_0"]) // 2
    out = tmp_path / "fit.gguf"
    rec = export_gguf(ref, "fit", out, imatrix_data=calibration, max_bytes=budget)
    assert out.stat().st_size <= budget and load_record(out)["fit"]["budget_bytes"] == budget
    fit = rec["fit"]
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert {n: written[n] for n in fit["tensor_types"]} == fit["tensor_types"]
    assert set(fit["group_types"].values()) <= set(FIT_TYPES)
    # the budget between Q4_0 and Q8_0 forces a real mix: some groups below the top type, some at it
    assert len(set(fit["group_types"].values())) > 1
    assert fit["predicted_mean_kl"] >= fit["sensitivity"]["top_mean_kl"] >= 0
    assert fit["measured_mean_kl"] > 0  # the written file, measured on the same calibration tokens
    curves = fit["sensitivity"]["role_curves"]
    assert set(curves) == {"attn", "ffn"} and curves["ffn"]["Q3_K"] == pytest.approx(1.0)
    assert gguf.GGUFReader(str(out)).fields["general.file_type"] is not None

    # the same model and calibration again: the sensitivity comes from the cache, nothing is re-measured
    assert not fit["sensitivity"]["from_cache"]
    again = export_gguf(ref, "fit", tmp_path / "fit2.gguf", imatrix_data=calibration, max_bytes=budget)
    assert again["fit"]["sensitivity"]["from_cache"] and again["fit"]["group_types"] == fit["group_types"]
    # what `plan` shows: the same mix from the measured sensitivities, measuring nothing; none for unmeasured text
    from edgeforge.export.fit.mix import cached_fit
    from edgeforge.export.gguf import installed_version
    from edgeforge.paths import edgeforge_home

    lookup = (edgeforge_home() / "fit-sensitivity", installed_version("llama-cpp-python"))
    shown = cached_fit(fit_model, budget, calibration.read_text(encoding="utf-8"), *lookup)
    assert shown is not None and shown.types == fit["group_types"]
    assert shown.predicted_mean_kl == pytest.approx(fit["predicted_mean_kl"])
    assert cached_fit(fit_model, budget, calibration.read_text(encoding="utf-8") + " unmeasured", *lookup) is None


def test_fit_on_the_command_line_needs_a_budget(fit_model: Path, tmp_path: Path):
    from edgeforge.cli.app import cli

    r = CliRunner().invoke(cli, ["export", "gguf", str(fit_model), "--quant", "fit", "--out",
                                 str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "--max-bytes" in r.stderr and "Traceback" not in r.stderr
    r = CliRunner().invoke(cli, ["export", "gguf", str(fit_model), "--quant", "fit", "--max-bytes", "1000",
                                 "--out", str(tmp_path / "y.gguf"), "--no-verify"])
    assert r.exit_code == 2 and "smallest mix" in r.stderr and not (tmp_path / "y.gguf").exists()
