"""User mistakes are bad input (exit 2, one line naming the flag), never "internal error ... please report it"
(issue #19). The failed quality gate of ``--quant auto`` (exit 1) is in test_outputs.py beside its --out case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import assert_one_error_line, invoke


@pytest.mark.parametrize(("modules", "unmatched"), [("nope_proj", "nope_proj"), ("q_proj,v_prj", "v_prj"),
                                                    ("mlp", "mlp")])
def test_wrong_target_modules_are_bad_input_listing_the_candidates(tiny: Path, task_jsonl: Path, tmp_path: Path,
                                                                   modules: str, unmatched: str) -> None:
    """A name matching nothing, a typo beside a good name (peft alone would train fewer layers without a word), a
    module that exists but is no linear layer (``mlp``): refused before training, with the model's layer names."""
    line = assert_one_error_line(
        invoke("finetune", tiny, "--data", task_jsonl, "--steps", "1", "--target-modules", modules,
               "--out", tmp_path / "ft"),
        [f"--target-modules {modules}", f"found none named {unmatched};", "candidates:", "q_proj", "down_proj",
         "all-linear"], progress_ok=True)
    assert "internal error" not in line
    assert not (tmp_path / "ft" / "finetune.json").exists()


def test_good_target_modules_pass_the_check(tiny: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgeforge.finetune.adapter import check_target_modules

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    for modules in (["q_proj", "v_proj"], ["self_attn.o_proj"], ["model.layers.0.mlp.down_proj"], "all-linear",
                    ".*\\.(q|k)_proj"):
        check_target_modules(model, modules)


def test_rank_sweep_with_too_few_examples_names_the_flag(tiny: Path, tmp_path: Path) -> None:
    data = tmp_path / "two.jsonl"  # one held out for the final evaluation, one left: nothing to train after validation
    data.write_text("".join(json.dumps({"prompt": f"turn on light {i}", "completion": "ok"}) + "\n" for i in range(2)))
    line = assert_one_error_line(invoke("finetune", tiny, "--data", data, "--steps", "1", "--rank-sweep", "4,8",
                                        "--out", tmp_path / "ft"),
                                 ["--rank-sweep", "expected at least 2 training examples", "found 1"],
                                 progress_ok=True)
    assert "internal error" not in line


def test_too_many_ewc_batches_names_the_flag(tiny: Path, task_jsonl: Path, tmp_path: Path) -> None:
    line = assert_one_error_line(invoke("finetune", tiny, "--data", task_jsonl, "--steps", "1", "--ewc", "1",
                                        "--ewc-batches", "100000", "--out", tmp_path / "ft"),
                                 ["--ewc-batches 100000: expected at most", "lower --ewc-batches"], progress_ok=True)
    assert "internal error" not in line
