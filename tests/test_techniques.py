"""The distillation and fine-tuning techniques (docs/techniques.md): their mechanics on tiny in-test models.

Progressive stages, curriculum order and pacing, self-distillation data and shape, rationale formatting and loss
masks, multi-teacher mixture and routing, the on-policy mix, the rank-sweep rule, layer-wise learning rates and the
EWC penalty.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_tiny_model

from edgeforge.cli.app import cli
from edgeforge.distill.config import DistillConfig
from edgeforge.distill.run import run_distill
from edgeforge.errors import BadInputError


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny", layers=4, seed=1)


@pytest.fixture(scope="module")
def other_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("teacher2") / "tiny", layers=4, seed=2)


@pytest.fixture(scope="module")
def tokenizer(teacher_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(teacher_dir))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeforge.data.builtin import training_prose

    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(training_prose(1500), encoding="utf-8")
    return p


def _cfg(teacher_dir: Path, data_file: Path, out: Path, **kw) -> DistillConfig:
    base = dict(out=out, teacher=str(teacher_dir), student_layers=2, data=(data_file,), steps=4, batch_size=2,
                seq_len=32, lr=3e-3, checkpoint_every=0, eval_sequences=2, calib_sequences=2,
                cache_dir=out.parent / "cache")
    return DistillConfig(**{**base, **kw})


# ------------------------------------------------------------------ progressive
def test_progressive_parsing_budget_split_and_validation():
    from edgeforge.distill.techniques.progressive import check_stages, parse_layers, split_steps

    assert parse_layers("20, 10") == (20, 10)
    assert split_steps(40, 2) == [20, 20] and split_steps(41, 3) == [13, 14, 14] and sum(split_steps(7, 3)) == 7
    check_stages((20, 10), 30)
    for bad in ((30, 10), (10, 20), (20, 20)):
        with pytest.raises(ValueError, match="strictly decreasing"):
            check_stages(bad, 30)
    with pytest.raises(ValueError, match="layer counts"):
        parse_layers("20,x")
    assert DistillConfig(progressive=(3, 2)).student_layers == 2  # --progressive alone names the final student
    with pytest.raises(BadInputError, match="--progressive: expected the final stage"):
        DistillConfig(progressive=(3, 2), student_layers=1)
    with pytest.raises(BadInputError, match="--init: expected auto or depth"):
        DistillConfig(progressive=(3, 2), init="random")


@pytest.mark.parametrize("source", ["previous", "teacher"])
def test_progressive_run_records_every_stage(teacher_dir: Path, data_file: Path, tmp_path: Path, source: str):
    rec = run_distill(_cfg(teacher_dir, data_file, tmp_path / source, progressive=(3, 2), progressive_from=source,
                           steps=4))
    stages = rec["progressive"]["stages"]
    assert [s["layers"] for s in stages] == [3, 2] and [s["training"]["steps"] for s in stages] == [2, 2]
    assert stages[0]["teacher"] == "teacher"
    assert stages[1]["teacher"] == ("stage 1 student" if source == "previous" else "teacher")
    assert stages[1]["teacher_params"] == (stages[0]["params"] if source == "previous" else rec["teacher"]["params"])
    for s in stages:  # FLOPs = (6 N_student + 2 N_teacher) per token; quality against the fp32 teacher each time
        want = (6 * s["params"] + 2 * s["teacher_params"]) * s["training"]["tokens"]
        assert s["training_flops"] == pytest.approx(want)
        assert {"kl_to_teacher", "perplexity"} <= set(s["before"]) & set(s["after"])
    assert stages[1]["after"] == rec["after"] and rec["training"]["steps"] == 4
    assert [e["stage"] for e in rec["loss_curve"]] == [1, 1, 2, 2]
    assert json.loads((tmp_path / source / "config.json").read_text())["num_hidden_layers"] == 2
    assert rec["config"]["progressive"] == [3, 2]


def test_progressive_run_resumes_inside_its_second_stage(teacher_dir: Path, data_file: Path, tmp_path: Path):
    from safetensors.torch import load_file

    kw = dict(progressive=(3, 2), steps=4, checkpoint_every=1)
    straight = run_distill(_cfg(teacher_dir, data_file, tmp_path / "a", **kw))
    calls: list[int] = []

    def stop(_entry: dict[str, float]) -> None:
        calls.append(1)
        if len(calls) == 4:  # stage 2, step 2: stage 1 is on disk, stage 2 has its step-1 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(_cfg(teacher_dir, data_file, tmp_path / "b", **kw), on_log=stop)
    resumed = run_distill(_cfg(teacher_dir, data_file, tmp_path / "b", resume=True, **kw))
    assert [e["loss"] for e in resumed["loss_curve"]] == pytest.approx([e["loss"] for e in straight["loss_curve"]])
    assert resumed["progressive"]["stages"][0]["after"] == straight["progressive"]["stages"][0]["after"]
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert not (tmp_path / "b" / ".checkpoint").exists()


def test_three_stage_run_resumed_twice_keeps_every_stage_curve(teacher_dir: Path, data_file: Path, tmp_path: Path):
    """Interrupted in stage 2 and again in stage 3, then resumed: the loss curve still has every step of every
    stage (the first resume used to drop stage 1's curve from the state file, so the second lost it)."""
    kw = dict(progressive=(3, 2, 1), student_layers=1, steps=6, checkpoint_every=1)
    straight = run_distill(_cfg(teacher_dir, data_file, tmp_path / "a", **kw))
    out = tmp_path / "b"

    def stop_after(n: int):
        calls: list[int] = []

        def stop(_entry: dict[str, float]) -> None:
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
        return stop

    with pytest.raises(KeyboardInterrupt):  # stage 2, step 1 (stage 1 on disk)
        run_distill(_cfg(teacher_dir, data_file, out, **kw), on_log=stop_after(3))
    with pytest.raises(KeyboardInterrupt):  # stage 3, step 1 (stages 1 and 2 on disk)
        run_distill(_cfg(teacher_dir, data_file, out, resume=True, **kw), on_log=stop_after(2))
    resumed = run_distill(_cfg(teacher_dir, data_file, out, resume=True, **kw))
    assert [e["stage"] for e in resumed["loss_curve"]] == [1, 1, 2, 2, 3, 3]
    assert [e["loss"] for e in resumed["loss_curve"]] == pytest.approx([e["loss"] for e in straight["loss_curve"]])


# ------------------------------------------------------------------ curriculum
def test_pacing_schedules_start_grow_and_reach_the_whole_pool():
    from edgeforge.distill.techniques.curriculum import FULL_AT, STEP_LEVELS, pacing_fraction

    total = 100
    for kind in ("linear", "root", "step"):
        g = [pacing_fraction(kind, t, total, 0.2) for t in range(total)]
        assert g[0] == pytest.approx(0.2) and all(b >= a for a, b in zip(g, g[1:], strict=False))
        assert g[int(FULL_AT * total)] == 1.0 and g[-1] == 1.0
    mid = int(FULL_AT * total / 2)  # half way to the full pool
    assert pacing_fraction("linear", mid, total, 0.2) == pytest.approx(0.6)
    assert pacing_fraction("root", mid, total, 0.2) == pytest.approx(math.sqrt(0.04 + 0.96 * 0.5))
    assert len({pacing_fraction("step", t, total, 0.2) for t in range(total)}) == STEP_LEVELS + 1


def test_curriculum_order_is_easy_first_and_batches_follow_the_pacing():
    from edgeforge.distill.techniques.curriculum import curriculum_rows, difficulty_order, pacing_fraction

    pool = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17])
    scores = torch.tensor([5.0, 1.0, 7.0, 2.0, 8.0, 3.0, 6.0, 4.0])
    order = difficulty_order(pool, scores)
    assert order.tolist() == [11, 13, 15, 17, 10, 16, 12, 14]
    total = 20
    for step in (0, 5, 10, 19):
        n = max(2, math.ceil(pacing_fraction("linear", step, total, 0.25) * len(pool)))
        for micro in range(step * 3, step * 3 + 3):
            rows = curriculum_rows(order, step, total, micro, 2, "linear", 0.25, seed=0)
            assert set(rows.tolist()) <= set(order[:n].tolist()) and len(set(rows.tolist())) == 2
    assert set(curriculum_rows(order, 0, total, 0, 2, "linear", 0.25, 0).tolist()) == {11, 13}  # the easiest two
    assert torch.equal(curriculum_rows(order, 3, total, 7, 2, "root", 0.25, 0),
                       curriculum_rows(order, 3, total, 7, 2, "root", 0.25, 0))  # reproducible (resume)
    from edgeforge.distill.data import micro_batch_stream  # the easiest rows first, the whole pool at the end

    cfg = DistillConfig(student_layers=2, steps=total, batch_size=2, curriculum="teacher-loss",
                        curriculum_pacing="linear")
    train = torch.arange(20)[:, None].repeat(1, 8)  # row r holds the token r
    batches = list(zip(range(total), micro_batch_stream(train, cfg, 0, 1, order=order)(0), strict=False))
    assert set(batches[0][1]["input_ids"][:, 0].tolist()) == {11, 13}
    assert set(batches[0][1]["rows"].tolist()) == {11, 13} and int(batches[5][1]["micro"]) == 5
    assert set().union(*(b["rows"].tolist() for _, b in batches[16:])) - set(order[:4].tolist())  # harder ones late


def test_difficulty_scores_are_the_models_losses(teacher_dir: Path):
    from transformers import AutoModelForCausalLM

    from edgeforge.distill.techniques.curriculum import score_sequences

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    seqs = torch.randint(0, 49152, (3, 16), generator=torch.Generator().manual_seed(0))
    nll = score_sequences("teacher-loss", seqs, model, None, batch_size=2)
    with torch.no_grad():
        want = [float(model(input_ids=s[None], labels=s[None]).loss) for s in seqs]
    assert nll.tolist() == pytest.approx(want, rel=1e-5)
    assert score_sequences("student-loss", seqs, model, model).abs().max() < 1e-5  # the teacher itself: KL 0


def test_curriculum_run_draws_from_the_ordered_pool(teacher_dir: Path, data_file: Path, tmp_path: Path):
    rec = run_distill(_cfg(teacher_dir, data_file, tmp_path / "c", curriculum="student-loss",
                           curriculum_pacing="step"))
    c = rec["curriculum"]
    assert c["difficulty"] == "student-loss" and c["pool_sequences"] >= 2
    assert c["difficulty_easiest"] <= c["difficulty_median"] <= c["difficulty_hardest"]
    assert c["available_share"]["0%"] == 0.25 and c["available_share"]["100%"] == 1.0
    assert rec["training_flops"]["total"] > 0 and len(rec["loss_curve"]) == 4


# ------------------------------------------------------------------ self-distillation
def test_self_distillation_trains_on_the_teachers_outputs_only(teacher_dir: Path, tokenizer, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    import edgeforge.distill.teacher_cache as tc
    from edgeforge.distill.data import prepare_data
    from edgeforge.distill.student import student_shape
    from edgeforge.distill.teacher import Teacher

    rows = [{"prompt": f"question {i}", "answer": f"the teacher's own answer number {i} " * 4} for i in range(8)]
    monkeypatch.setattr(tc, "teacher_answers", lambda *a, **k: (rows, {"cache_hit": True, "path": "x",
                                                                       "seconds": 0.0, "engine": None}))
    teacher = Teacher("tiny", "hf", teacher_dir, teacher_dir, None)
    cfg = DistillConfig(out=tmp_path / "s", teacher=str(teacher_dir), self_distill="born-again", seq_len=16)
    data = prepare_data(cfg, tokenizer, teacher, tmp_path, True, lambda m: None)
    text = tokenizer.decode(data.train.flatten())
    assert "own answer number 7" in text and "Python" not in text  # the built-in prose is left out
    assert data.info["sources"] == ["builtin: the teacher's greedy answers to built-in prompts"]
    assert student_shape(cfg, teacher).layers == 4  # born-again: the teacher's own shape
    with pytest.raises(BadInputError, match="--self-distill"):
        DistillConfig(self_distill="born-again", student_layers=2)
    with pytest.raises(BadInputError, match="--self-distill"):
        DistillConfig(self_distill="pruned", student_layers=2, data=(Path("x.txt"),))


# ------------------------------------------------------------------ rationales
def test_rationale_formatting_prefixes_and_loss_masks(tokenizer):
    from edgeforge.distill.techniques.rationale import (
        ANSWER_PREFIX,
        IGNORE_INDEX,
        RATIONALE_PREFIX,
        encode_multitask,
        supervised_loss,
        task_batch,
    )

    ex = {"messages": [{"role": "user", "content": "turn on the kitchen lights"},
                       {"role": "assistant", "content": '{"device": "light"}'}]}
    rationale = "The device is the light and the room is the kitchen."
    enc = encode_multitask(tokenizer, ex, rationale, 256)
    for key, prefix, target in (("answer", ANSWER_PREFIX, '{"device": "light"}'),
                                ("rationale", RATIONALE_PREFIX, rationale)):
        ids, labels = enc[key]
        n_prompt = sum(1 for y in labels if y == IGNORE_INDEX)
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # the prompt (with its prefix) carries no loss
        prompt = tokenizer.decode(ids[:n_prompt])
        assert f"user\n{prefix}turn on the kitchen lights" in prompt and prompt.endswith("assistant\n")
        assert tokenizer.decode(labels[n_prompt:]) == target + tokenizer.eos_token
    no_rat = encode_multitask(tokenizer, ex, None, 256)["rationale"]
    assert all(y == IGNORE_INDEX for y in no_rat[1])  # no rationale: nothing supervised
    batch = task_batch([enc, encode_multitask(tokenizer, ex, "", 256)], 2, seed=0, micro_index=3,
                       pad_id=tokenizer.eos_token_id)
    assert batch["task_input_ids"].shape[0] == 2 and batch["rat_labels"].shape == batch["rat_input_ids"].shape
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=1, num_attention_heads=2))
    loss, n = supervised_loss(tiny, torch.tensor([no_rat[0]]), torch.tensor([no_rat[1]]),
                              torch.ones(1, len(no_rat[0]), dtype=torch.long))
    assert n == 0 and float(loss.detach()) == 0.0


def test_rationale_prompt_shows_the_answer_and_cleans_the_reply():
    from edgeforge.distill.techniques.rationale import clean_rationale, rationale_prompt

    p = rationale_prompt("dim the hallway lights to 20%", '{"device": "light"}')
    assert p.endswith('Command: dim the hallway lights to 20%\nJSON: {"device": "light"}\nExplanation:')
    assert clean_rationale(" Explanation: The light.\n\nCommand: next one") == "The light."


def test_rationale_task_run_generates_caches_and_measures(teacher_dir: Path, data_file: Path, tmp_path: Path):
    kw = dict(task="home-commands", task_loss="rationale", task_examples=4, task_eval_examples=2,
              rationale_tokens=4, steps=2)
    rec = run_distill(_cfg(teacher_dir, data_file, tmp_path / "r1", **kw))
    task = rec["task"]
    assert task["rationales"]["generated"] == 4 and not task["rationales"]["cache_hit"]
    assert task["rationales"]["engine"] == "transformers"  # an HF teacher: transformers generates
    assert "task_answer" in rec["loss_curve"][0] and "task_rationale" in rec["loss_curve"][0]
    assert {"task_accuracy", "valid_json_rate"} <= set(task["before"]) and task["after"]["n_examples"] == 2
    assert rec["data"]["task_documents"] == 4
    again = run_distill(_cfg(teacher_dir, data_file, tmp_path / "r2", **kw))
    assert again["task"]["rationales"]["cache_hit"]
    assert again["task"]["rationales"]["samples"] == task["rationales"]["samples"]


# ------------------------------------------------------------------ multi-teacher
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mixture_of_two_teachers_is_the_weighted_distribution(temperature: float):
    from edgeforge.distill.techniques.multi_teacher import mixture_logits

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    z = mixture_logits([a, b], (0.3, 0.7), temperature)
    want = 0.3 * torch.softmax(a / temperature, -1) + 0.7 * torch.softmax(b / temperature, -1)
    assert torch.allclose(torch.softmax(z / temperature, -1), want, atol=1e-6)
    assert torch.allclose(torch.softmax(mixture_logits([a, b], (1.0, 0.0)), -1), torch.softmax(a, -1), atol=1e-6)


def test_lowest_loss_routing_picks_the_teacher_that_knows_each_sample():
    from edgeforge.distill.techniques.multi_teacher import route_lowest_loss, routed_logits

    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    a, b = torch.zeros(2, 4, 10), torch.zeros(2, 4, 10)
    a[0, torch.arange(3), ids[0, 1:]] = 9.0  # teacher a predicts sample 0's next tokens
    b[1, torch.arange(3), ids[1, 1:]] = 9.0  # teacher b predicts sample 1's
    choice = route_lowest_loss([a, b], ids)
    assert choice.tolist() == [0, 1]
    routed = routed_logits([a, b], choice)
    assert torch.equal(routed[0], a[0]) and torch.equal(routed[1], b[1])


def test_teacher_weights_are_normalised_and_checked():
    from edgeforge.distill.techniques.multi_teacher import normalised_weights

    assert normalised_weights((1, 3), 2) == (0.25, 0.75) and normalised_weights((), 3) == pytest.approx((1 / 3,) * 3)
    with pytest.raises(BadInputError, match="--teacher-weights: expected one weight per teacher"):
        DistillConfig(student_layers=2, extra_teachers=("x",), teacher_weights=(1.0,))
    with pytest.raises(BadInputError, match="--extra-teacher"):
        DistillConfig(student_layers=2, extra_teachers=("x",), offline_teacher=True)


def test_extra_teacher_vocabulary_is_checked(teacher_dir: Path, data_file: Path, tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "other")
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher_dir), "--extra-teacher", str(tmp_path / "other"),
                                 "--student-layers", "2", "--data", str(data_file), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "vocabulary mismatch" in r.stderr and "the extra teacher" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_two_teacher_run_routes_every_sample(teacher_dir: Path, other_teacher_dir: Path, data_file: Path,
                                             tmp_path: Path):
    rec = run_distill(_cfg(teacher_dir, data_file, tmp_path / "m", extra_teachers=(str(other_teacher_dir),),
                           teacher_routing="lowest-loss"))
    mt = rec["multi_teacher"]
    assert mt["routing"] == "lowest-loss" and sum(mt["samples_routed_to"]) == 4 * 2  # 4 steps x 2 sequences
    assert rec["teacher_forward_passes"] == 2 * 4  # both teachers on every micro-batch


# ------------------------------------------------------------------ on-policy
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.3, 0.5, 1.0])
def test_on_policy_mix_ratio_is_exact(ratio: float):
    from edgeforge.distill.techniques.on_policy import is_on_policy

    flags = [is_on_policy(i, ratio) for i in range(200)]
    for n in (10, 40, 200):
        assert sum(flags[:n]) == math.floor(n * ratio + 1e-9)


def test_on_policy_batches_come_from_the_students_samples(teacher_dir: Path, data_file: Path, tmp_path: Path):
    """The teacher scores exactly what the student sampled after the data prompt, and only those positions count."""
    from transformers import AutoModelForCausalLM

    from edgeforge.distill.step import StepCounters, make_step
    from edgeforge.distill.student import StudentForKD
    from edgeforge.distill.techniques.on_policy import on_policy_batch

    student = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    seen: list[torch.Tensor] = []
    teacher.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    cfg = DistillConfig(student_layers=2, on_policy_ratio=0.5, on_policy_tokens=5, seq_len=16)
    counters = StepCounters()
    step = make_step(cfg, StudentForKD(student, [], None), student, [teacher], (1.0,), None, [], counters)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    step({"input_ids": ids, "micro": torch.tensor(0)})  # off-policy: the data itself
    assert torch.equal(seen[0], ids)
    _, metrics = step({"input_ids": ids, "micro": torch.tensor(1)})  # on-policy (ratio 0.5: every second one)
    want, start = on_policy_batch(student, ids, 5, cfg.seed, 1)
    assert torch.equal(seen[1], want) and start == 16 - 5 - 1
    assert torch.equal(want[:, :11], ids[:, :11]) and not torch.equal(want[:, 11:], ids[:, 11:])
    assert metrics["on_policy"] == 1.0 and metrics["kl"] == pytest.approx(0.0, abs=1e-5)  # student == teacher
    assert counters.on_policy_micro_batches == 1 and counters.generated_tokens == 2 * 5


def test_on_policy_run_records_the_mix(teacher_dir: Path, data_file: Path, tmp_path: Path):
    rec = run_distill(_cfg(teacher_dir, data_file, tmp_path / "op", on_policy_ratio=0.5, on_policy_tokens=8))
    op = rec["on_policy"]
    assert op["micro_batches"] == 4 and op["on_policy_micro_batches"] == 2 and op["generated_tokens"] == 2 * 2 * 8
    assert [e["on_policy"] for e in rec["loss_curve"]] == [0.0, 1.0, 0.0, 1.0]


# ------------------------------------------------------------------ fine-tuning: rank sweep, layer-wise lr, EWC
def test_rank_sweep_picks_by_accuracy_per_parameter():
    from edgeforge.finetune.techniques.rank_sweep import parse_ranks, pick_rank

    res = [{"rank": 4, "trainable_params": 100, "accuracy": 0.30, "loss": 1.0},
           {"rank": 8, "trainable_params": 200, "accuracy": 0.50, "loss": 0.8},
           {"rank": 16, "trainable_params": 400, "accuracy": 0.70, "loss": 0.6}]
    assert pick_rank(res)["rank"] == 4  # 0.30/100 beats 0.50/200 and 0.70/400
    res[1]["accuracy"] = 0.70  # 0.70/200 = 0.0035 > 0.003
    assert pick_rank(res)["rank"] == 8
    res[0]["accuracy"] = 0.35  # tie 0.35/100 == 0.70/200: the smaller rank
    assert pick_rank(res)["rank"] == 4
    zeros = [{**r, "accuracy": 0.0} for r in res]
    assert pick_rank(zeros)["rank"] == 16  # nothing right anywhere: the lowest validation loss
    assert parse_ranks("16,4,8,4") == (4, 8, 16)
    with pytest.raises(ValueError):
        parse_ranks("4,x")


def test_layerwise_learning_rates_per_parameter_group(teacher_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgeforge.finetune.techniques.layerwise_lr import layerwise_param_groups, lr_scale

    assert lr_scale("model.layers.3.self_attn.q_proj.weight", 4, 0.5) == 1.0
    assert lr_scale("base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight", 4, 0.5) == 0.125
    assert lr_scale("model.embed_tokens.weight", 4, 0.5) == 0.0625 and lr_scale("model.norm.weight", 4, 0.5) == 1.0
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(teacher_dir)),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    groups = layerwise_param_groups(model, 4, 0.5)
    assert [g["lr_scale"] for g in groups] == [1.0, 0.5, 0.25, 0.125]
    for g in groups:
        layer = 3 - round(math.log(g["lr_scale"], 0.5))
        assert all(f"layers.{layer}." in n for n in g["names"]) and len(g["names"]) == 4  # A, B of q and v


def test_train_loop_scales_each_groups_learning_rate():
    from edgeforge.train.loop import TrainConfig, train

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    frozen_start = model[0].weight.detach().clone()
    top_start = model[1].weight.detach().clone()
    x = torch.randn(8, 4)

    def step_fn(batch):
        return (model(batch["input_ids"].float()) ** 2).mean(), {}

    def batches(_start):
        while True:
            yield {"input_ids": x}

    groups = [{"params": list(model[0].parameters()), "lr_scale": 0.0},
              {"params": list(model[1].parameters()), "lr_scale": 1.0}]
    train(model, step_fn, batches, TrainConfig(steps=3, lr=0.1, warmup_steps=1, checkpoint_every=0),
          param_groups=groups)
    assert torch.equal(model[0].weight, frozen_start) and not torch.equal(model[1].weight, top_start)
    with pytest.raises(ValueError, match="exactly the model's trainable parameters"):
        train(model, step_fn, batches, TrainConfig(steps=1), param_groups=groups[:1])


def test_ewc_penalty_is_nonzero_after_a_step_and_pulls_towards_the_start(teacher_dir: Path, tokenizer):
    from transformers import AutoModelForCausalLM

    from edgeforge.finetune.techniques.ewc import (
        EWCPenalty,
        fisher_diagonal,
        general_text_batches,
        lm_loss,
        normalise_fisher,
    )

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    for n, p in model.named_parameters():  # a small trainable set keeps the test fast
        p.requires_grad_("layers.3." in n)
    fisher, raw_mean = normalise_fisher(fisher_diagonal(model, general_text_batches(tokenizer, 2, 16), lm_loss))
    assert raw_mean > 0 and sum(float(f.sum()) for f in fisher.values()) == pytest.approx(
        sum(f.numel() for f in fisher.values()), rel=1e-4)  # normalised to mean 1
    ewc = EWCPenalty(model, fisher, strength=10.0)
    assert float(ewc(model).detach()) == 0.0  # at the start weights
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    lm_loss(model, {"input_ids": torch.randint(0, 49152, (1, 12))}).backward()
    opt.step()
    opt.zero_grad()
    penalty = ewc(model)
    assert float(penalty.detach()) > 0
    penalty.backward()
    moved = {n: p for n, p in model.named_parameters() if n in fisher}
    for n, p in moved.items():  # gradient = λ F (θ − θ0): a descent step goes back towards θ0
        delta = p.detach() - ewc.start[n]
        assert torch.allclose(p.grad, 10.0 * fisher[n] * delta, atol=1e-6)
        assert float((p.grad * delta).sum()) >= 0
    dist = sum(float((fisher[n] * (p.detach() - ewc.start[n]) ** 2).sum()) for n, p in moved.items())
    lr = 0.5 / (10.0 * max(float(f.max()) for f in fisher.values()))  # small enough not to overshoot θ0
    with torch.no_grad():
        for p in moved.values():
            p -= lr * p.grad
    assert sum(float((fisher[n] * (p.detach() - ewc.start[n]) ** 2).sum()) for n, p in moved.items()) < dist


def test_finetune_config_validates_the_technique_settings():
    from edgeforge.finetune.config import FinetuneConfig

    for kw, flag in (({"ewc": -1.0}, "--ewc"), ({"layerwise_lr_decay": 0.0}, "--layerwise-lr-decay"),
                     ({"rank_sweep": (0, 4)}, "--rank-sweep"), ({"ewc_batches": 0}, "--ewc-batches")):
        with pytest.raises(BadInputError, match=flag):
            FinetuneConfig(**kw)


def test_finetune_with_rank_sweep_ewc_and_layerwise_lr(teacher_dir: Path, tmp_path: Path):
    from edgeforge.finetune.config import FinetuneConfig
    from edgeforge.finetune.run import run_finetune

    cfg = FinetuneConfig(rank=16, steps=2, batch_size=2, eval_examples=2, checkpoint_every=0, max_seq_len=64,
                         rank_sweep=(2, 4), rank_sweep_steps=1, layerwise_lr_decay=0.5, ewc=1.0, ewc_batches=2)
    rec = run_finetune(str(teacher_dir), tmp_path / "ft", cfg, task="home-commands", log=lambda m: None)
    sweep = rec["rank_sweep"]
    assert [r["rank"] for r in sweep["results"]] == [2, 4] and rec["config"]["rank"] == sweep["chosen_rank"]
    assert sweep["results"][0]["trainable_params"] * 2 == sweep["results"][1]["trainable_params"]
    assert rec["ewc"]["lambda"] == 1.0 and "ewc" in rec["loss_curve"][-1] and rec["loss_curve"][-1]["ewc"] > 0
    assert [g["lr_scale"] for g in rec["layerwise_lr"]["groups"]] == [1.0, 0.5, 0.25, 0.125]


# ------------------------------------------------------------------ CLI
def test_help_names_every_technique():
    d = CliRunner().invoke(cli, ["distill", "--help"]).output.lower().replace("_", "-")
    for word in ("progressive", "curriculum", "rationale", "teacher", "on-policy", "self"):
        assert word in d
    f = CliRunner().invoke(cli, ["finetune", "--help"]).output.lower().replace("_", "-")
    for word in ("dora", "qlora", "ewc", "rank"):
        assert word in f


def test_cli_progressive_and_weights_errors_are_one_line(teacher_dir: Path, data_file: Path, tmp_path: Path):
    base = ["distill", "--teacher", str(teacher_dir), "--data", str(data_file), "--out", str(tmp_path / "x")]
    r = CliRunner().invoke(cli, [*base, "--progressive", "2,3"])
    assert r.exit_code == 2 and "--progressive" in r.stderr and "strictly decreasing" in r.stderr
    r = CliRunner().invoke(cli, [*base, "--student-layers", "2", "--teacher-weights", "a,b"])
    assert r.exit_code == 2 and "--teacher-weights" in r.stderr and "Traceback" not in r.stderr


def test_progressive_stages_continue_the_data_stream():
    """Stage 2 of a progressive run (offset by stage 1's steps) takes the batches an unsplit run takes at those
    steps: it continues the stream. Before, every stage restarted at step 0 and replayed stage 1's batches."""
    from edgeforge.distill.data import micro_batch_stream

    cfg = DistillConfig(student_layers=2, steps=8, batch_size=2)
    train = torch.arange(40)[:, None].repeat(1, 4)
    whole = [b["rows"].tolist() for _, b in zip(range(8), micro_batch_stream(train, cfg, 0, 1)(0), strict=False)]
    second = [b["rows"].tolist() for _, b in zip(range(4), micro_batch_stream(train, cfg, 0, 1, steps=4,
                                                                              step_offset=4)(0), strict=False)]
    assert second == whole[4:] and second != whole[:4]
    resumed = next(micro_batch_stream(train, cfg, 0, 1, steps=4, step_offset=4)(2))  # a resume inside stage 2
    assert resumed["rows"].tolist() == whole[6] and int(resumed["micro"]) == 6
