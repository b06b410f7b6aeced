"""Distillation: losses against their reference formulas, pruning, resume, caches, DDP, FSDP, CLI (tiny in-test
models)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import make_tiny_model

from edgeforge.cli.app import cli
from edgeforge.distill import losses as kd
from edgeforge.distill.config import DistillConfig
from edgeforge.distill.prune import StudentShape, collect_stats, init_student
from edgeforge.distill.run import run_distill
from edgeforge.errors import BadInputError

V = 11


def _pair(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, V, generator=g) * 2, torch.randn(2, n, V, generator=g) * 2


def _grad(fn, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.clone().requires_grad_(True)
    loss = fn(s)
    loss.backward()
    return loss.detach(), s.grad


# ------------------------------------------------------------------ losses vs reference formulas
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_matches_torch_kl_div(temperature: float):
    s, t = _pair()
    n = s.shape[0] * s.shape[1]

    def ref(x):
        return temperature ** 2 * F.kl_div(F.log_softmax(x.view(n, V) / temperature, -1),
                                           F.log_softmax(t.view(n, V) / temperature, -1), log_target=True,
                                           reduction="sum") / n

    want, want_g = _grad(ref, s)
    for chunk in (None, 1, 4):
        got, got_g = _grad(lambda x, c=chunk: kd.forward_kl(x, t, temperature, c), s)
        assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got_g, want_g, atol=1e-6)


def test_reverse_kl_matches_definition():
    s, t = _pair(seed=1)

    def ref(x):
        ls, lt = F.log_softmax(x, -1), F.log_softmax(t, -1)
        return (ls.exp() * (ls - lt)).sum(-1).mean()

    want, want_g = _grad(ref, s)
    got, got_g = _grad(lambda x: kd.reverse_kl(x, t, chunk_size=5), s)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(got_g, want_g, atol=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_definition(beta: float):
    s, t = _pair(seed=2)
    p, q = F.softmax(t.double(), -1), F.softmax(s.double(), -1)
    m = beta * p + (1 - beta) * q
    want = (beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)).mean()
    for chunk in (None, 3):
        assert kd.generalized_jsd(s, t, beta, chunk_size=chunk).item() == pytest.approx(want.item(), abs=1e-6)
    assert kd.generalized_jsd(t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert kd.generalized_jsd(s * 50, -s * 50).item() <= math.log(2) + 1e-6  # symmetric JSD is bounded by ln 2
    with pytest.raises(ValueError, match="beta"):
        kd.generalized_jsd(s, t, beta=0.0)


def test_topk_forward_kl_formula_and_full_vocabulary_limit():
    s, t = _pair(seed=3)
    k, temp = 4, 1.5
    vals, ids = kd.teacher_topk(t, k)
    lp = F.log_softmax(vals / temp, -1)  # teacher renormalised over its top-k
    ls = F.log_softmax(s / temp, -1).gather(-1, ids)
    want = temp ** 2 * (lp.exp() * (lp - ls)).sum(-1).mean()
    got = kd.topk_divergence("forward_kl", s, vals.half(), ids.int(), temperature=temp, chunk_size=2)
    assert got.item() == pytest.approx(want.item(), rel=2e-3)  # fp16 values, as in the cache
    # with k = V the renormalised top-k is the whole distribution: the full forward KL, gradient included
    full_v, full_i = kd.teacher_topk(t, V)
    a, ga = _grad(lambda x: kd.topk_divergence("forward_kl", x, full_v, full_i, temperature=temp), s)
    b, gb = _grad(lambda x: kd.forward_kl(x, t, temp), s)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-6)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_topk_reverse_and_jsd_renormalise_both_over_the_support(kind: str):
    s, t = _pair(seed=4)
    vals, ids = kd.teacher_topk(t, 5)
    lt = F.log_softmax(vals, -1)
    ls = F.log_softmax(s.gather(-1, ids), -1)
    if kind == "reverse_kl":
        want = (ls.exp() * (ls - lt)).sum(-1).mean()
    else:
        p, q = lt.exp(), ls.exp()
        m = 0.5 * (p + q)
        want = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean()
    got = kd.topk_divergence(kind, s, vals, ids, chunk_size=3)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_equals_unchunked_values_and_gradients(kind: str):
    s, t = _pair(n=37, seed=5)
    a, ga = _grad(lambda x: kd.divergence(kind, x, t, 1.3, chunk_size=None), s)  # type: ignore[arg-type]
    b, gb = _grad(lambda x: kd.divergence(kind, x, t, 1.3, chunk_size=8), s)  # type: ignore[arg-type]
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-7)


def test_ce_mixing_and_hidden_alignment():
    s, _ = _pair(seed=6)
    ids = torch.randint(0, V, (2, 6))
    want = F.cross_entropy(s[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert kd.next_token_ce(s, ids, chunk_size=3).item() == pytest.approx(want.item(), abs=1e-6)
    kd_term, ce = torch.tensor(2.0), torch.tensor(4.0)
    assert kd.mix_with_ce(kd_term, ce, 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 4)
    hs, ht = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    assert kd.hidden_alignment(hs, ht, "mse").item() == pytest.approx(F.mse_loss(hs, ht).item())
    assert kd.hidden_alignment(ht, ht, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="projector"):
        kd.hidden_alignment(hs[..., :4], ht)
    proj = kd.HiddenProjector(4, 8, init_channels=[1, 3, 5, 7])  # a width-pruned student starts as the embedding
    assert kd.hidden_alignment(ht[..., [1, 3, 5, 7]], ht * torch.tensor([0, 1, 0, 1, 0, 1, 0, 1.0]), "mse",
                               proj).item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------ pruning
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny", layers=4, seed=1)


@pytest.fixture(scope="module")
def teacher(teacher_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()


CALIB = torch.randint(0, 49152, (4, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_nothing_pruned_equals_the_teacher_exactly(teacher):
    student, report = init_student(teacher, StudentShape(4, 64, 128, 2), "auto", CALIB)
    assert report.kept_layers == [0, 1, 2, 3]
    assert torch.equal(student(CALIB).logits, teacher(CALIB).logits)


@torch.no_grad()
def test_depth_pruning_keeps_the_most_influential_layers(teacher):
    stats = collect_stats(teacher, CALIB)
    student, report = init_student(teacher, StudentShape(2), "depth", None, stats=stats)
    bi = [s.block_influence for s in stats]
    assert report.kept_layers == sorted(sorted(range(4), key=lambda i: -bi[i])[:2])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert student(CALIB).logits.shape == (4, 24, 49152)
    assert student.generate(CALIB[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=2).shape == (1, 7)


@torch.no_grad()
def test_width_pruning_shapes_and_gqa_groups(teacher, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    stats = collect_stats(teacher, CALIB)
    student, report = init_student(teacher, StudentShape(4, hidden_size=48, intermediate_size=96, kv_heads=1),
                                   "width", None, stats=stats)
    cfg = student.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (48, 96, 2, 1, 16)
    layer, t_layer = student.model.layers[0], teacher.model.layers[0]
    assert layer.mlp.gate_proj.weight.shape == (96, 48) and layer.self_attn.q_proj.weight.shape == (32, 48)
    # the kept KV group g brings exactly its own query heads 2g, 2g+1 (4 query heads share 2 KV heads)
    g = int(stats[0].head_importance.view(2, 2).sum(-1).argmax())
    cols = torch.tensor(report.kept_hidden_channels)
    assert torch.equal(layer.self_attn.k_proj.weight, t_layer.self_attn.k_proj.weight[g * 16:(g + 1) * 16][:, cols])
    assert torch.equal(layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight[g * 32:(g + 1) * 32][:, cols])
    out = student(CALIB).logits
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s")).eval()
    assert torch.allclose(again(CALIB).logits, out, atol=1e-5)  # the saved config describes the pruned shape


def test_init_method_and_shape_errors(teacher):
    with pytest.raises(BadInputError, match="--init depth"):
        init_student(teacher, StudentShape(2, intermediate_size=64), "depth", CALIB)
    with pytest.raises(BadInputError, match="student layers"):
        init_student(teacher, StudentShape(9), "auto", CALIB)
    student, report = init_student(teacher, StudentShape(2, hidden_size=32), "random", None)
    assert student.config.hidden_size == 32 and report.params == sum(p.numel() for p in student.parameters())


def test_profile_gives_the_planners_student_shape(teacher_dir: Path):
    from edgeforge.distill.student import student_shape
    from edgeforge.distill.teacher import Teacher
    from edgeforge.models.refs import resolve_model

    gguf = resolve_model(None).path  # the bundled teacher: metadata only, nothing is loaded
    cfg = DistillConfig(profile="raspberry-pi-zero-2w")
    shape = student_shape(cfg, Teacher("smollm2-135m-instruct", "gguf", gguf, gguf.parent, gguf))
    assert shape.layers < 30 and shape.hidden_size == 576
    tiny = Teacher("tiny", "hf", teacher_dir, teacher_dir, None)
    with pytest.raises(BadInputError, match="--student-layers"):  # the tiny teacher fits: no student to plan
        student_shape(cfg, tiny)
    with pytest.raises(BadInputError, match="exactly one of"):
        DistillConfig(profile="raspberry-pi-zero-2w", student_layers=2)


# ------------------------------------------------------------------ runs on the tiny teacher
@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeforge.data.builtin import training_prose

    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(training_prose(1500), encoding="utf-8")  # ~10 sequences of 32: epochs repeat, so loss falls
    return p


def _cfg(teacher_dir: Path, data_file: Path, out: Path, **kw) -> DistillConfig:
    base = dict(out=out, teacher=str(teacher_dir), student_layers=2, data=(data_file,), steps=6, batch_size=2,
                seq_len=32, lr=3e-3, checkpoint_every=3, eval_sequences=2, calib_sequences=2,
                cache_dir=out.parent / "cache")
    return DistillConfig(**{**base, **kw})


def test_resume_after_interruption_gives_the_same_weights(teacher_dir: Path, data_file: Path, tmp_path: Path):
    straight = run_distill(_cfg(teacher_dir, data_file, tmp_path / "a"))

    def stop(entry: dict[str, float]) -> None:
        if entry["step"] == 4:  # after the step-3 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_distill(_cfg(teacher_dir, data_file, tmp_path / "b"), on_log=stop)
    with pytest.raises(BadInputError, match="--resume"):  # never silently overwrite an interrupted run
        run_distill(_cfg(teacher_dir, data_file, tmp_path / "b"))
    record = run_distill(_cfg(teacher_dir, data_file, tmp_path / "b", resume=True))
    assert [e["step"] for e in record["loss_curve"]] == [1, 2, 3, 4, 5, 6]  # the curve survives the interruption
    assert [e["loss"] for e in record["loss_curve"]] == pytest.approx([e["loss"] for e in straight["loss_curve"]])
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert not (tmp_path / "b" / ".checkpoint").exists()


def test_offline_cache_is_reused_with_zero_teacher_forwards(teacher_dir: Path, data_file: Path, tmp_path: Path):
    logs: list[str] = []
    first = run_distill(_cfg(teacher_dir, data_file, tmp_path / "o1", offline_teacher=True, top_k=8,
                             checkpoint_every=0), log=logs.append)
    sig = first["teacher_signal"]
    assert first["teacher_forward_passes"] > 0 and not sig["cache_hit"] and sig["bytes_per_token"] == 8 * 6
    second = run_distill(_cfg(teacher_dir, data_file, tmp_path / "o2", offline_teacher=True, top_k=8,
                              checkpoint_every=0), log=logs.append)
    assert second["teacher_forward_passes"] == 0 and second["teacher_signal"]["cache_hit"]
    assert "offline teacher: cache hit, 0 teacher forward passes" in logs
    kl = [e["kl"] for e in second["loss_curve"]]  # the top-k loss itself falls (a random teacher is too flat for
    assert sum(kl[-2:]) < sum(kl[:2])  # its top-8 to say much about the full distribution)


def test_vocabulary_mismatch_is_one_clear_error(teacher_dir: Path, data_file: Path, tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "other")
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher_dir), "--student", str(tmp_path / "other"),
                                 "--data", str(data_file), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "vocabulary mismatch" in r.stderr and "1000" in r.stderr and "49152" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_cli_distill_json_and_eval_table(teacher_dir: Path, data_file: Path, tmp_path: Path):
    out = tmp_path / "student"
    r = CliRunner().invoke(cli, ["distill", "--teacher", str(teacher_dir), "--student-layers", "2", "--data",
                                 str(data_file), "--steps", "4", "--batch-size", "2", "--seq-len", "32",
                                 "--eval-sequences", "2", "--lr", "3e-3", "--alpha", "0.2", "--loss", "jsd",
                                 "--student-hidden", "48", "--hidden-loss", "mse",
                                 "--cache-dir", str(tmp_path / "c"), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    for key in ("kl_to_teacher", "perplexity", "top1_agreement", "retention"):
        assert key in summary["before"] and key in summary["after"] and key in summary["teacher"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, 48)
    training = json.loads((out / "distill.json").read_text())["training"]
    assert 0 < training["training_peak_rss_bytes"] <= training["process_peak_rss_bytes"]
    r = CliRunner().invoke(cli, ["eval", str(out), "--reference", str(teacher_dir), "--data", str(data_file),
                                 "--tokens", "64"])
    assert r.exit_code == 0, r.stderr
    assert "teacher" in r.stdout and "initial student" in r.stdout and "distilled student" in r.stdout


def test_teacher_answers_are_generated_once_and_cached(teacher_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeforge.distill.teacher_cache import answer_documents, teacher_answers

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    loads: list[int] = []

    def load():
        loads.append(1)
        return AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()

    kw = dict(prompts=("What is 2 + 2?", "Name a colour."), max_new_tokens=4)
    rows, info = teacher_answers(tok, tmp_path, {"teacher": "tiny"}, None, load, **kw)
    assert [r["prompt"] for r in rows] == list(kw["prompts"]) and not info["cache_hit"] and loads == [1]
    again, info = teacher_answers(tok, tmp_path, {"teacher": "tiny"}, None, load, **kw)
    assert again == rows and info["cache_hit"] and loads == [1]
    assert all("<|im_start|>assistant" in d for d in answer_documents(rows, tok))


def test_two_process_ddp_run_on_gloo(teacher_dir: Path, data_file: Path, tmp_path: Path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "EDGEFORGE_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "edgeforge", "distill",
           "--teacher", str(teacher_dir), "--student-layers", "2", "--data", str(data_file), "--steps", "8",
           "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--eval-sequences", "2",
           "--checkpoint-every", "0", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "distill.json").read_text())
    assert record["training"]["world_size"] == 2 and record["training"]["tokens"] == 8 * 2 * 2 * 32
    kl = [e["kl"] for e in record["loss_curve"]]
    assert sum(kl[-2:]) / 2 < sum(kl[:2]) / 2


def test_parallel_setting_is_validated_and_one_process_wraps_nothing():
    from torch import nn

    from edgeforge.distill.parallel import wrap_parallel

    with pytest.raises(BadInputError, match="--parallel: expected ddp | fsdp"):
        DistillConfig(student_layers=2, parallel="zero3")
    assert DistillConfig(student_layers=2).parallel == "ddp"
    module = nn.Linear(2, 2)
    assert all(wrap_parallel(module, mode, 1, torch.device("cpu")) is module for mode in ("ddp", "fsdp"))


_INTERRUPTING_RUNNER = """
import json, sys
from pathlib import Path

import edgeforge.distill.run as distill
from edgeforge.cli.app import cli
from edgeforge.train.loop import is_main_process

log_path, stop_at, seen, run = Path(sys.argv[1]), int(sys.argv[2]), [], distill.run_distill


def stop(entry):
    seen.append(entry)
    if entry["step"] == stop_at:  # every process stops here, as an interruption would
        if is_main_process():
            log_path.write_text(json.dumps(seen))
        raise KeyboardInterrupt


distill.run_distill = lambda cfg, log=None, **_: run(cfg, log=log, on_log=stop)
cli.main(args=sys.argv[3:], prog_name="edgeforge")
"""


def test_two_process_fsdp_run_on_gloo_resumes_and_saves_a_full_student(teacher_dir: Path, data_file: Path,
                                                                      tmp_path: Path):
    """FSDP2 over 2 gloo processes, with the hidden-state projector (widths differ): interrupted after the step-3
    checkpoint, resumed with --resume. Steps 4 and 5 recomputed after the resume give the interrupted run's losses
    (sharded weights and AdamW state restored exactly); the student is saved whole."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "EDGEFORGE_HOME": str(tmp_path / "home")}
    args = ["distill", "--teacher", str(teacher_dir), "--student-layers", "2", "--student-hidden", "48",
            "--hidden-loss", "mse", "--data", str(data_file), "--steps", "8", "--batch-size", "2", "--seq-len", "32",
            "--lr", "3e-3", "--eval-sequences", "2", "--checkpoint-every", "3", "--parallel", "fsdp",
            "--out", str(out)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    runner, first = tmp_path / "runner.py", tmp_path / "first.json"
    runner.write_text(_INTERRUPTING_RUNNER, encoding="utf-8")
    r = subprocess.run([*launch, str(runner), str(first), "5", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode != 0 and first.is_file(), r.stderr[-2000:]
    assert (out / ".checkpoint" / "trainable.safetensors").is_file() and not (out / "model.safetensors").exists()
    r = subprocess.run([*launch, "-m", "edgeforge", *args, "--resume"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads((out / "distill.json").read_text())
    assert (record["training"]["world_size"], record["training"]["parallel"]) == (2, "fsdp")
    curve = record["loss_curve"]
    assert [e["step"] for e in curve] == list(range(1, 9)) and record["training"]["tokens"] == 8 * 2 * 2 * 32
    interrupted = json.loads(first.read_text())
    assert [e["loss"] for e in curve[3:5]] == pytest.approx([e["loss"] for e in interrupted[3:5]], rel=1e-5)
    kl = [e["kl"] for e in curve]
    assert sum(kl[-2:]) < sum(kl[:2]) and "hidden" in curve[0]
    assert not (out / ".checkpoint").exists()
    # the saved student: one full (unsharded) safetensors file that transformers loads with nothing missing
    student, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    saved = load_file(str(out / "model.safetensors"))
    assert saved["model.embed_tokens.weight"].shape == (49152, 48)
    assert all(saved[n].shape == p.shape for n, p in student.named_parameters() if n in saved)


# ------------------------------------------------------------------ the bundled teacher
@pytest.mark.integration
def test_distill_bundled_teacher_lowers_kl_and_perplexity(tmp_path: Path):
    out = tmp_path / "student"
    r = CliRunner().invoke(cli, ["distill", "--teacher", "smollm2-135m-instruct", "--student-layers", "10",
                                 "--steps", "12", "--no-generate", "--eval-sequences", "4", "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    rec = json.loads((out / "distill.json").read_text())
    assert rec["after"]["kl_to_teacher"] < rec["before"]["kl_to_teacher"]
    assert rec["after"]["perplexity"] < rec["before"]["perplexity"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 10


def test_zero_steps_saves_the_pruned_student_untrained(teacher_dir: Path, data_file: Path, tmp_path: Path):
    """``--steps 0`` prunes only: the record says nothing was trained and no teacher signal was computed, and the
    saved student is the pruning a training run starts from (the same kept layers, the same initial metrics)."""
    from transformers import AutoModelForCausalLM

    record = run_distill(_cfg(teacher_dir, data_file, tmp_path / "p", steps=0))
    assert record["training"]["steps"] == 0 and record["teacher_forward_passes"] == 0
    assert record["after"] == record["before"] and record["loss_curve"] == []
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p"), dtype=torch.float32)
    assert saved.config.num_hidden_layers == 2
    trained = run_distill(_cfg(teacher_dir, data_file, tmp_path / "t", steps=1))
    assert trained["student"]["kept_layers"] == record["student"]["kept_layers"]
    assert trained["before"] == record["before"]
