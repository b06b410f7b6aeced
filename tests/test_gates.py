"""Quality gates that act: answer_loss without answer tokens, the merge check (exit 1, adapter kept, atomic
publish), and `edgeforge eval` judging an artifact by its real type."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_tiny_model

from edgeforge.cli.app import cli
from edgeforge.errors import BadInputError
from edgeforge.models.refs import ModelRef
from edgeforge.tasks.examples import IGNORE_INDEX


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("gates") / "tiny")


# ---------------------------------------------------------------- answer_loss
def test_answer_loss_on_a_batch_without_answer_tokens_is_zero_not_nan(tiny: Path):
    from transformers import AutoModelForCausalLM

    from edgeforge.finetune.loss import answer_loss

    model = AutoModelForCausalLM.from_pretrained(str(tiny))
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX), "attention_mask": torch.ones_like(ids)}
    loss = answer_loss(model, batch)
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) == 0.0
    loss.backward()  # the graph is kept: backward and gradient accumulation run as for any batch
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)

    from edgeforge.finetune.loss import AnswerLossStats

    stats = AnswerLossStats()
    answer_loss(model, batch, stats)
    batch["labels"][:, -3:] = ids[:, -3:]
    assert float(answer_loss(model, batch, stats)) > 0
    assert (stats.batches, stats.skipped_batches) == (2, 1)


# ---------------------------------------------------------------- the merge check
FINETUNE_ARGS = ["--task", "home-commands", "--merge", "--steps", "2", "--batch-size", "2", "--rank", "4",
                 "--eval-examples", "2"]


def _perturb_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the real peft merge, then the final norm scaled by 1.5, a merged model that is wrong."""
    import edgeforge.finetune.adapter as adapter

    real = adapter.merged_weights

    def wrong_merge(peft_model):
        merged = real(peft_model)
        with torch.no_grad():
            merged.model.norm.weight.mul_(1.5)
        return merged

    monkeypatch.setattr(adapter, "merged_weights", wrong_merge)


def test_a_merge_that_fails_its_check_exits_1_and_keeps_the_adapter(tiny: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    _perturb_merges(monkeypatch)
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(tiny), *FINETUNE_ARGS, "--out", str(out)])
    assert r.exit_code == 1, r.output
    assert "merge check failed" in r.stderr and "adapter is kept" in r.stderr
    assert (out / "adapter.partial" / "adapter_config.json").is_file()
    assert not (out / "config.json").exists(), "a merged model that failed its check was published"


def test_a_good_merge_is_published_whole(tiny: Path, tmp_path: Path):
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(tiny), *FINETUNE_ARGS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    record = json.loads((out / "finetune.json").read_text())
    assert record["merge"]["failures"] == [] and record["merge"]["logit_max_abs_diff"] <= 1e-3
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"], "staging directories left behind"


def test_publish_replaces_stale_weights_and_keeps_the_rest(tiny: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeforge.finetune.adapter import publish_model_dir

    out = tmp_path / "merged"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "adapter_config.json").write_text("{}")  # an earlier unmerged run's adapter at the top
    (out / "notes.txt").write_text("mine")
    publish_model_dir(AutoModelForCausalLM.from_pretrained(str(tiny)), AutoTokenizer.from_pretrained(str(tiny)), out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "adapter", "notes.txt"} <= names
    assert "model-00001-of-00002.safetensors" not in names and "adapter_config.json" not in names
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.hidden_size == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# ---------------------------------------------------------------- eval judges the artifact's real type
def _eval_json(artifact: Path, reference: Path) -> dict:
    r = CliRunner().invoke(cli, ["eval", str(artifact), "--reference", str(reference), "--tokens", "64", "--json"])
    assert r.exit_code in (0, 1), r.output  # 1: the verdict; either way the thresholds used are in the output
    return json.loads(r.stdout)


def test_eval_reads_a_gguf_files_own_type(tiny: Path, tmp_path: Path):
    from edgeforge.export.gguf import export_gguf, record_path

    out = tmp_path / "tiny-f16.gguf"
    export_gguf(ModelRef(str(tiny), tiny, "hf"), "F16", out)
    record_path(out).unlink()  # no record: the type is read from general.file_type
    assert _eval_json(out, tiny)["threshold"]["quant"] == "F16"


def test_gguf_file_type_wins_over_the_record_and_header_only_files(tmp_path: Path):
    import gguf

    from edgeforge.verify.artifact import artifact_quant, gguf_file_type

    def header_only(name: str, file_type: gguf.LlamaFileType | None) -> Path:
        path = tmp_path / name
        w = gguf.GGUFWriter(str(path), "llama")
        if file_type is not None:
            w.add_file_type(file_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    q6 = header_only("q6.gguf", gguf.LlamaFileType.MOSTLY_Q6_K)
    assert gguf_file_type(q6) == "Q6_K" and artifact_quant(q6, {"quant": "Q4_K_M"}) == "Q6_K"
    assert gguf_file_type(header_only("f32.gguf", gguf.LlamaFileType.ALL_F32)) == "F32"
    bare = header_only("bare.gguf", None)
    assert artifact_quant(bare, {"quant": "Q5_K_M"}) == "Q5_K_M"
    with pytest.raises(BadInputError, match="pass --quant"):
        artifact_quant(bare, {})


def test_eval_reads_an_onnx_models_quantization(tiny: Path, tmp_path: Path):
    from edgeforge.export.onnx.export import RECORD_FILE, export_onnx

    out = tmp_path / "onnx"
    record = export_onnx(tiny, out, quantize="int8")
    assert "quant" not in record  # the library's record names it "quantize"
    assert _eval_json(out, tiny)["threshold"]["quant"] == "int8"
    (out / RECORD_FILE).unlink()
    from edgeforge.verify.artifact import artifact_quant

    assert artifact_quant(out, {}) == "int8"  # without a record: read from the graph's MatMulNBits nodes
