"""Fine-tuning: answer-only loss mask, merge equality, the forgetting metric, bad task files, LoRA/DoRA/QLoRA runs."""

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
from edgeforge.finetune.config import FinetuneConfig
from edgeforge.finetune.loss import general_perplexity
from edgeforge.finetune.run import run_finetune
from edgeforge.tasks import build_task
from edgeforge.tasks.examples import IGNORE_INDEX, encode_example, load_task_examples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ft") / "tiny")


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny))


def test_loss_is_on_the_answer_only(tokenizer):
    msgs = [{"role": "user", "content": "turn on the kitchen lights"},
            {"role": "assistant", "content": '{"device": "light"}'}]
    ids, labels = encode_example(tokenizer, msgs, 512)
    answer = tokenizer('{"device": "light"}', add_special_tokens=False)["input_ids"]
    n_prompt = len(ids) - len(answer) - 1
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == answer + [tokenizer.eos_token_id] == ids[n_prompt:]
    prompt_text = tokenizer.decode(ids[:n_prompt])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "kitchen" in prompt_text


def test_home_commands_is_deterministic_and_heldout_differs():
    a_train, a_held = build_task("home-commands", 0)
    b_train, _ = build_task("home-commands", 0)
    assert a_train == b_train and len(a_train) >= 2000
    train_cmds = {e["messages"][0]["content"].lower() for e in a_train}
    held_cmds = [e["messages"][0]["content"].lower() for e in a_held]
    assert not any(c in train_cmds for c in held_cmds), "a held-out command also occurs in training"
    for e in a_held[:50]:
        json.loads(e["messages"][1]["content"])  # every answer is JSON


@pytest.mark.parametrize("content, fragment", [
    ("", "data file is empty"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n{bad json\n',
     ":2: malformed JSON"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', ":2: expected 'messages' or string fields"),
    ('{"messages": [{"role": "user"}]}\n', ":1: messages[0] needs string fields"),
    ('[1, 2]\n', ":1: expected a JSON object"),
])
def test_bad_task_files_name_the_problem(tmp_path: Path, content: str, fragment: str):
    f = tmp_path / "task.jsonl"
    f.write_text(content)
    with pytest.raises(BadInputError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_task_examples(None, f)


def test_bad_task_file_through_the_cli_is_one_line(tmp_path: Path, tiny: Path):
    f = tmp_path / "task.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    r = CliRunner().invoke(cli, ["finetune", str(tiny), "--data", str(f), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and ":2: malformed JSON" in r.stderr and "Traceback" not in r.stderr


def test_forgetting_metric_is_the_heldout_perplexity(tiny: Path, tokenizer):
    from transformers import AutoModelForCausalLM

    from edgeforge.data.builtin import heldout_prose
    from edgeforge.data.text import pack

    model = AutoModelForCausalLM.from_pretrained(str(tiny)).eval()
    ppl = general_perplexity(model, tokenizer, seq_len=64, n_seqs=2)
    seqs = pack(tokenizer(heldout_prose(60_000), add_special_tokens=False)["input_ids"], 64)[:2]
    with torch.no_grad():
        nll = [float(model(input_ids=s[None], labels=s[None]).loss) for s in seqs]
    assert ppl == pytest.approx(math.exp(sum(nll) / 2), rel=1e-5)


def _small_cfg(method: str, steps: int = 6) -> FinetuneConfig:
    return FinetuneConfig(method=method, rank=4, steps=steps, batch_size=4, eval_examples=4, checkpoint_every=3,
                          lr=5e-3)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_equals_the_adapter_model(tiny: Path, tmp_path: Path, method: str):
    out = tmp_path / method
    rec = run_finetune(str(tiny), out, _small_cfg(method), task="home-commands", merge=True, log=lambda m: None)
    assert rec["merge"]["equal_within_tolerance"] and rec["merge"]["logit_max_abs_diff"] < 1e-3
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert rec["loss_curve"][-1]["loss"] < rec["loss_curve"][0]["loss"]
    for key in ("task_accuracy", "general_perplexity"):
        assert key in rec["before"] and key in rec["after"]
    assert not (out / "checkpoint").exists()


def test_a_merged_lora_is_scored_once_on_the_fixed_set(tiny: Path, tmp_path: Path, monkeypatch):
    """With --merge, the held-out set is generated over twice (the base, the merged model), not three times: the
    adapter model's "after" task scores are the merged model's, whose logits the merge check bounds."""
    import edgeforge.finetune.adapter as adapter
    import edgeforge.finetune.run as run

    scored: list[int] = []
    for module in (run, adapter):
        real = module.task_metrics

        def counting(model, tokenizer, examples, _real=real):
            scored.append(len(examples))
            return _real(model, tokenizer, examples)

        monkeypatch.setattr(module, "task_metrics", counting)
    cfg = _small_cfg("lora").model_copy(update={"checkpoint_every": 0})
    rec = run_finetune(str(tiny), tmp_path / "m", cfg, task="home-commands", merge=True, log=lambda m: None)
    assert scored == [cfg.eval_examples, cfg.eval_examples]
    assert rec["after"]["correct"] == rec["merge"]["correct"] and "merged" in rec["after"]["scored_on"]
    assert rec["accuracy_by_step"][-1]["task_accuracy"] == rec["merge"]["task_accuracy"]


@pytest.mark.integration
def test_qlora_runs_and_merges_into_full_precision(tiny: Path, tmp_path: Path):
    out = tmp_path / "qlora"
    rec = run_finetune(str(tiny), out, _small_cfg("qlora", steps=3), task="home-commands", merge=True,
                       log=lambda m: None)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert rec["merge"]["equal_within_tolerance"]


def test_answer_loss_equals_the_masked_full_loss(tiny: Path, tokenizer):
    from transformers import AutoModelForCausalLM

    from edgeforge.finetune.loss import answer_loss
    from edgeforge.tasks.examples import collate

    model = AutoModelForCausalLM.from_pretrained(str(tiny)).eval()
    _, held = build_task("home-commands", 0)
    batch = collate([encode_example(tokenizer, e["messages"], 256) for e in held[:3]], tokenizer.eos_token_id)
    with torch.no_grad():
        full = model(**batch).loss  # transformers' own shifted, masked cross-entropy over all positions
        ours = answer_loss(model, batch)
    assert float(ours) == pytest.approx(float(full), rel=1e-5)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_each_method_runs_end_to_end_on_the_bundled_teacher(tmp_path: Path, method: str):
    """LoRA and QLoRA (4-bit base weights) on the real 135M teacher (a few steps): train, evaluate, merge, and the
    merged model is a plain full-precision HF directory equal to the adapter model within the stated tolerance.
    DoRA's merge is checked on tiny models (test_merge_equals_the_adapter_model[dora]); on the teacher it took four
    minutes of the integration suite's time and exercised no other code path."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    cfg = FinetuneConfig(method=method, steps=2, batch_size=2, eval_examples=2, checkpoint_every=0)
    rec = run_finetune("smollm2-135m-instruct", out, cfg, task="home-commands", merge=True, log=lambda m: None)
    assert rec["merge"]["equal_within_tolerance"], rec["merge"]
    assert len(rec["loss_curve"]) == 2
    assert rec["before"]["general_perplexity"] > 1 and rec["after"]["general_perplexity"] > 1
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.config.num_hidden_layers == 30
    assert all(p.dtype == torch.float32 for p in merged.parameters())


def test_full_fine_tuning_trains_every_weight_and_ships_the_model_itself(tiny: Path, tmp_path: Path):
    """``method: full``: no adapter, every weight moves, the output is the trained model (published whole), and the
    "merged" scores are the trained model's own on the same examples (there is nothing to merge)."""
    from safetensors.torch import load_file

    out = tmp_path / "full"
    rec = run_finetune(str(tiny), out, _small_cfg("full", steps=2).model_copy(update={"lr": 1e-3}),
                       task="home-commands", merge=True, log=lambda m: None)
    assert (out / "config.json").is_file() and not (out / "adapter").exists()
    assert not (out / "adapter_config.json").exists() and not (out / "checkpoint").exists()
    before = load_file(str(next(tiny.glob("*.safetensors"))))
    after = load_file(str(next(out.glob("*.safetensors"))))
    moved = [n for n in before if n in after and not torch.equal(before[n], after[n])]
    assert len(moved) >= len(before) - 1, f"only {len(moved)} of {len(before)} tensors changed"
    m = rec["merge"]
    assert m["method"] == "full" and m["equal_within_tolerance"]
    assert m["correct"] == rec["after"]["correct"] and m["n_examples"] == rec["after"]["n_examples"]


def test_a_rank_sweep_with_full_fine_tuning_is_refused():
    with pytest.raises(BadInputError, match="--rank-sweep"):
        FinetuneConfig(method="full", rank_sweep=(4, 8))


def test_gradient_checkpointing_trains_the_same_adapter(tiny: Path, tmp_path: Path):
    """--gradient-checkpointing recomputes activations in the backward pass: the same losses step by step (it saves
    memory, not changes the run), which is why the build's stage key leaves it out."""
    plain = run_finetune(str(tiny), tmp_path / "plain", _small_cfg("lora", steps=3), task="home-commands",
                         log=lambda m: None)
    ckpt = run_finetune(str(tiny), tmp_path / "ckpt", _small_cfg("lora", steps=3).model_copy(
        update={"gradient_checkpointing": True}), task="home-commands", log=lambda m: None)
    assert [e["loss"] for e in ckpt["loss_curve"]] == pytest.approx([e["loss"] for e in plain["loss_curve"]],
                                                                     rel=1e-5)
    assert ckpt["config"]["gradient_checkpointing"] is True
