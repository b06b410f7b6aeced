"""Knowledge distillation: a smaller student learns the teacher's next-token distributions.

``run_distill(DistillConfig)`` does the whole stage and returns the record written as ``OUT/distill.json``:

1. the teacher (HF dir, GGUF or alias; a GGUF is dequantized once into an HF directory) and the data (``--data``
   files, or the built-in prose plus the teacher's own answers to built-in prompts), packed into sequences with a
   held-out split;
2. the student: pruned from the teacher (edgeforge.distill.prune), a random one, or the user's, checked to share the
   teacher's vocabulary before anything expensive runs;
3. the teacher's held-out metrics and the initial student's (``before``);
4. training with edgeforge.train.loop: the teacher runs inside the loop (online) or its top-k log-probabilities come
   from a cache computed once (offline, edgeforge.distill.teacher_cache);
5. the distilled student's metrics (``after``), the student saved as an HF directory with the teacher's tokenizer.

Under ``torchrun`` every process runs this; ``parallel`` chooses how the student is spread over them: ``ddp`` (a full
replica per process, gradients all-reduced) or ``fsdp`` (FSDP2: parameters, gradients and optimizer state sharded
over the processes, each decoder layer gathered only while it computes). One process: no wrapping either way.

Metrics, on held-out text, all against the teacher in fp32: ``kl_to_teacher`` = mean over positions of
KL(teacher || model); ``perplexity`` = exp(mean next-token NLL); ``top1_agreement`` = share of positions whose most
likely token is the teacher's. ``retention`` = teacher perplexity / model perplexity (1.0: predicts the held-out
text as well as the teacher); ``kl_gap_closed`` = 1 - KL_after / KL_before.

Techniques on top of plain KD (docs/techniques.md), each off by default: progressive stages (the stage loop in
``run_distill``, techniques.progressive), a curriculum (techniques.curriculum, in ``_batches``), self-distillation
(``prepare_data``), a task with answer / rationale terms (edgeforge.distill.techniques.rationale), several teachers
(techniques.multi_teacher) and on-policy micro-batches (techniques.on_policy); the per-micro-batch loss is
edgeforge.distill.step.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgeforge.distill.config import CHECKPOINT_DIR, STATE_FILE, TECHNIQUE_FIELDS, TOKENIZER_FILES, DistillConfig
from edgeforge.distill.student import StudentForKD
from edgeforge.errors import BadInputError, EdgeforgeError

RETENTION_DEFINITION = "teacher_perplexity / student_perplexity on the held-out text (1.0 = as good as the teacher)"
KL_GAP_DEFINITION = "1 - kl_to_teacher(after) / kl_to_teacher(before)"
Log = Callable[[str], None]


# ---------------------------------------------------------------- teacher and student
@dataclass
class Teacher:
    name: str
    format: str
    path: Path  # what the user named (GGUF file or HF dir)
    hf_dir: Path  # the HF form, loaded by transformers
    gguf: Path | None  # the GGUF file, when the teacher is one (llama.cpp generates answers from it)
    identity: dict[str, Any] = field(default_factory=dict)

    def load(self, dtype: torch.dtype, device: torch.device) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.hf_dir), dtype=dtype).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model


def resolve_teacher(name: str | None, main: bool) -> Teacher:
    """The teacher in HF form (a GGUF is dequantized once, by the main process, into the edgeforge cache)."""
    from edgeforge.distill.teacher_cache import model_identity
    from edgeforge.models.gguf_hf import hf_dir_for, materialize_hf
    from edgeforge.models.refs import resolve_model
    from edgeforge.paths import edgeforge_home

    ref = resolve_model(name)
    if ref.format == "gguf":
        hf_dir = hf_dir_for(ref.path, edgeforge_home())
        if main:
            materialize_hf(ref.path, hf_dir)
        _barrier()
        return Teacher(ref.name, "gguf", ref.path, hf_dir, ref.path, model_identity(ref.path))
    return Teacher(ref.name, "hf", ref.path, ref.path, None, model_identity(ref.path))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: expected an HF model directory with a readable config.json ({e})") from None


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def check_vocabulary(teacher_dir: Path, student_dir: Path, teacher_tokenizer: Any | None = None,
                     role: str = "student") -> None:
    """Raise BadInputError unless the ``role`` model's vocabulary (the student's, or an extra teacher's) is the
    teacher's: same size and, when it carries a tokenizer, the same tokens. Runs before any model is loaded."""
    t_cfg, s_cfg = _read_config(teacher_dir), _read_config(student_dir)
    tv, sv = t_cfg.get("vocab_size"), s_cfg.get("vocab_size")
    fix = f"distillation compares next-token distributions, so give a{'n' if role[0] in 'aeiou' else ''} {role} " \
          "that uses the teacher's tokenizer"
    if tv != sv:
        raise BadInputError(f"vocabulary mismatch: the teacher ({teacher_dir}) has {tv} tokens, the {role} "
                            f"({student_dir}) has {sv}; {fix}")
    if _has_tokenizer(student_dir):
        from transformers import AutoTokenizer

        t_tok = teacher_tokenizer or AutoTokenizer.from_pretrained(str(teacher_dir))
        s_vocab, t_vocab = AutoTokenizer.from_pretrained(str(student_dir)).get_vocab(), t_tok.get_vocab()
        if s_vocab != t_vocab:
            diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda x: x[1])[:1]
            raise BadInputError(f"tokenizer mismatch: the {role}'s tokenizer ({student_dir}, {len(s_vocab)} "
                                f"entries) differs from the teacher's ({len(t_vocab)}), e.g. at {diff}; {fix}")


def student_shape(cfg: DistillConfig, teacher: Teacher) -> Any:
    """The target shape: from the planner (--profile) or from the --student-* flags."""
    from edgeforge.distill.prune import StudentShape

    if cfg.profile is None:
        if cfg.student_layers is None:
            layers = int(_read_config(teacher.hf_dir)["num_hidden_layers"])
        else:
            layers = cfg.student_layers
        return StudentShape(layers, cfg.student_hidden, cfg.student_intermediate, cfg.student_kv_heads)
    from edgeforge.models.refs import ModelRef, read_arch
    from edgeforge.plan import planner
    from edgeforge.plan.profiles import resolve_profile

    arch = read_arch(ModelRef(teacher.name, teacher.path, teacher.format))  # type: ignore[arg-type]
    plan = planner.plan(arch, resolve_profile(cfg.profile, cfg.profiles_dirs), teacher.name)
    if plan.student is None:
        raise BadInputError(f"--profile {cfg.profile}: the plan is '{plan.decision}' ({plan.reason}) and names no "
                            "student shape; give --student-layers N to distill anyway")
    s = plan.student
    return StudentShape(int(s["layers"]), int(s["hidden_size"]), int(s["intermediate_size"]), None)


# ---------------------------------------------------------------- data
@dataclass
class DistillData:
    train: Tensor  # [n_train, seq_len] int64
    heldout: Tensor  # [n_eval, eval_seq_len] int64
    info: dict[str, Any]


def prepare_data(cfg: DistillConfig, tokenizer: Any, teacher: Teacher, cache_root: Path, main: bool,
                 log: Log, task_docs: tuple[str, ...] = ()) -> DistillData:
    """Training sequences and held-out sequences; the teacher's answers are generated once (main process).

    ``--self-distill``: the built-in prose is left out, the teacher's own answers are the data. ``task_docs`` (the
    task's examples, --task) are packed into sequences of their own after the split, so none is held out and a
    sequence holds task text only (lowest-loss routing then sees whole task samples)."""
    from edgeforge.data.builtin import heldout_prose, training_prose
    from edgeforge.data.text import documents_from_file, pack, split_documents, tokenize_documents

    info: dict[str, Any] = {}
    if cfg.data:
        docs: list[str] = []
        for p in cfg.data:
            docs += documents_from_file(p, tokenizer)
        split = split_documents(docs, tokenizer, cfg.seq_len)
        train, heldout = split.train, split.heldout[: cfg.eval_sequences]
        info.update(sources=[str(p) for p in cfg.data], documents=len(docs), **split.info)
    else:
        if cfg.self_distill == "none":
            docs = [d for d in training_prose().split("\n\n") if d.strip()]
            info.update(sources=["builtin: CPython documentation topics (pydoc_data)"], documents=len(docs))
        else:  # self-distillation: the teacher's own outputs only
            docs = []
            info.update(sources=[], documents=0)
        if cfg.generate_answers:
            from edgeforge.distill.teacher_cache import BUILTIN_PROMPTS, answer_documents, teacher_answers

            if main:
                rows, gen = teacher_answers(tokenizer, cache_root, teacher.identity, teacher.gguf,
                                            lambda: teacher.load(torch.float32, torch.device("cpu")))
                log(f"teacher answers to {len(BUILTIN_PROMPTS)} built-in prompts: "
                    + ("cache hit" if gen["cache_hit"] else f"generated with {gen['engine']} in {gen['seconds']} s"))
            _barrier()
            if not main:
                rows, gen = teacher_answers(tokenizer, cache_root, teacher.identity, teacher.gguf, lambda: None)
            answers = answer_documents(rows, tokenizer)
            docs += answers
            info.update(sources=info["sources"] + ["builtin: the teacher's greedy answers to built-in prompts"],
                        generated_answers=len(answers), answers_cache=gen["path"])
        train = pack(tokenize_documents(docs, tokenizer), cfg.seq_len)
        held_stream = tokenize_documents([heldout_prose(max_chars=10**9)], tokenizer)
        heldout = pack(held_stream, min(cfg.eval_seq_len, len(held_stream)))[: cfg.eval_sequences]
        info["heldout_source"] = "builtin held-out CPython documentation topics (never trained on)"
    if task_docs:
        task_seqs = pack(tokenize_documents(task_docs, tokenizer), cfg.seq_len)
        train = torch.cat([train, task_seqs])
        info.update(task_documents=len(task_docs), task_sequences=len(task_seqs))
    info.update(train_sequences=len(train), train_tokens=int(train.numel()), seq_len=cfg.seq_len,
                heldout_sequences=len(heldout), heldout_tokens=int(heldout.numel()))
    return DistillData(train, heldout, info)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor) -> np.ndarray:
    device = next(model.parameters()).device
    return model(input_ids=ids[None].to(device), use_cache=False).logits[0].float().cpu().numpy()


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], teacher: nn.Module, heldout: Tensor) -> dict[str, dict[str, float]]:
    """Held-out metrics of each model against ``teacher`` (and the teacher's own under the key ``teacher``).

    heldout: [n_seq, seq_len]. Per sequence the teacher runs once; metrics are means over sequences of equal length,
    so they equal the means over all positions. Uses edgeforge.verify.metrics (float64).
    """
    from edgeforge.verify.metrics import log_softmax, mean_kl, perplexity, top1_agreement

    acc: dict[str, dict[str, float]] = {n: {"kl": 0.0, "top1": 0.0, "log_ppl": 0.0} for n in ["teacher", *models]}
    for ids in heldout:
        ref = log_softmax(_logits(teacher, ids))
        tokens = ids.numpy()
        acc["teacher"]["log_ppl"] += math.log(perplexity(ref, tokens))
        for name, m in models.items():
            lp = log_softmax(_logits(m, ids))
            acc[name]["kl"] += mean_kl(ref, lp)
            acc[name]["top1"] += top1_agreement(ref, lp)
            acc[name]["log_ppl"] += math.log(perplexity(lp, tokens))
            del lp
    n = len(heldout)
    out = {}
    teacher_ppl = math.exp(acc["teacher"]["log_ppl"] / n)
    for name, a in acc.items():
        ppl = math.exp(a["log_ppl"] / n)
        out[name] = {"kl_to_teacher": 0.0 if name == "teacher" else a["kl"] / n,
                     "perplexity": ppl,
                     "top1_agreement": 1.0 if name == "teacher" else a["top1"] / n,
                     "retention": teacher_ppl / ppl,
                     "n_tokens": int(heldout.numel())}
    return out


# ---------------------------------------------------------------- the student wrapper trained by the loop


# ---------------------------------------------------------------- helpers
def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if os.uname().sysname == "Darwin" else r * 1024)


def release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps freed heap pages otherwise), so the peak RSS
    of training is not inflated by the evaluation and the fp32 teacher that came before it."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def teacher_train_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The teacher's precision for the training signal. ``auto``: bfloat16 where the hardware computes it natively
    (CUDA with bf16, CPUs with AMX-BF16 or AVX512-BF16: several times faster than fp32 here), else float32.
    Evaluation always uses the fp32 teacher."""
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def rows_for_run(n_rows: int, cfg: DistillConfig, world: int) -> set[int]:
    """Every training sequence index the run's batches will touch (all processes), for the offline cache."""
    from edgeforge.data.text import batch_iterator

    idx = torch.arange(n_rows)[:, None]
    rows: set[int] = set()
    for rank in range(world):
        it = batch_iterator(idx, cfg.batch_size, cfg.seed, 0, cfg.grad_accum, rank, world)
        for _ in range(cfg.steps * cfg.grad_accum):
            rows.update(next(it)["input_ids"][:, 0].tolist())
    return rows


def _batches(train: Tensor, cfg: DistillConfig, rank: int, world: int, steps: int | None = None,
             order: Tensor | None = None, task: Any = None,
             pad_id: int = 0) -> Callable[[int], Iterator[dict[str, Tensor]]]:
    """The micro-batches of a run from optimizer step ``start_step`` on: ``input_ids`` [B, S], their sequence
    indices ``rows`` [B] and the global micro-batch index ``micro`` (a 0-d tensor: seeds on-policy sampling and
    the draws below, identically after a resume).

    Plain: edgeforge.data.text.batch_iterator's exact order. With a curriculum ``order`` [N] (easy -> hard): the paced
    draws of techniques.curriculum over ``steps``. With a ``task`` (techniques.rationale.DistillTask) that has a
    supervised term: also a task micro-batch (``task_*``, ``rat_*``).
    """
    from edgeforge.data.text import batch_iterator
    from edgeforge.distill.techniques.curriculum import curriculum_rows
    from edgeforge.distill.techniques.rationale import task_batch

    idx = torch.arange(len(train))[:, None]
    per_step = cfg.grad_accum * world
    total = steps if steps is not None else cfg.steps

    def make(start_step: int) -> Iterator[dict[str, Tensor]]:
        micro = start_step * per_step + rank  # this process's micro-batches are every world-th one
        plain = None if order is not None else batch_iterator(idx, cfg.batch_size, cfg.seed, start_step,
                                                               cfg.grad_accum, rank, world)
        while True:
            if plain is not None:
                rows = next(plain)["input_ids"][:, 0]
            else:
                rows = curriculum_rows(order, micro // per_step, total, micro, cfg.batch_size,  # type: ignore[arg-type]
                                       cfg.curriculum_pacing, cfg.curriculum_start, cfg.seed)
            batch = {"input_ids": train[rows], "rows": rows, "micro": torch.tensor(micro)}
            if task is not None and task.encoded:
                batch.update(task_batch(task.encoded, cfg.batch_size, cfg.seed, micro, pad_id))
            yield batch
            micro += world

    return make


def wrap_parallel(kd_module: StudentForKD, parallel: str, world: int, device: torch.device) -> nn.Module:
    """The module the loop trains, spread over ``world`` processes: ``ddp`` wraps it in DistributedDataParallel;
    ``fsdp`` shards it in place with FSDP2 (``fully_shard`` on each decoder layer, then on the root, which groups the
    embedding, final norm, LM head and the projector). One process: returned as it is."""
    if world <= 1:
        return kd_module
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(kd_module, device_ids=[device.index]
                                                   if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP communicates on the current CUDA device
    mesh = init_device_mesh(device.type, (world,))
    for layer in kd_module.student.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(kd_module, mesh=mesh)
    return kd_module


def gathered_student(kd_module: nn.Module, config: Any, main: bool) -> nn.Module | None:
    """An FSDP-sharded student gathered whole into a plain (unwrapped) HF model on the CPU of the main process; None
    on the others. A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(kd_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    prefix = "student."
    weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    del full
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"gathering the FSDP student: missing {sorted(set(missing) - tied)[:3]}, unexpected "
                           f"{sorted(unexpected)[:3]}")
    return model


def save_student(student: nn.Module, out: Path, tokenizer_dir: Path) -> None:
    """The student as an HF directory: fp32 safetensors, config, and the teacher's tokenizer files as they are."""
    out.mkdir(parents=True, exist_ok=True)
    student.config.use_cache = True
    student.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if src.is_file():
            shutil.copyfile(src, out / name)


# ---------------------------------------------------------------- the run
def run_distill(cfg: DistillConfig, log: Log | None = None,
                on_log: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Distill and write ``cfg.out`` (student + distill.json); returns the record. Under torchrun every process
    calls this; the main process alone writes, evaluates and builds caches.

    The techniques of docs/techniques.md plug in here: --progressive runs several stages one after the other, each
    pruned from the previous stage's student; the curriculum orders the batches; extra teachers, on-policy batches
    and the task term live in the step (edgeforge.distill.step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeforge.distill.losses import HiddenProjector
    from edgeforge.distill.prune import count_params, init_student, teacher_layer_for
    from edgeforge.distill.step import StepCounters
    from edgeforge.distill.techniques.curriculum import curriculum_order
    from edgeforge.distill.techniques.multi_teacher import normalised_weights
    from edgeforge.distill.techniques.progressive import stage_plan
    from edgeforge.paths import edgeforge_home
    from edgeforge.train.loop import dist_init, is_main_process, pick_device

    t_run = time.perf_counter()
    rank, world = dist_init()
    main = is_main_process()
    say: Log = (log or (lambda _m: None)) if main else (lambda _m: None)
    device = pick_device()
    torch.manual_seed(cfg.seed)
    out = cfg.out
    ckpt = out / CHECKPOINT_DIR
    state_path = out / STATE_FILE
    _check_world(cfg, world)
    if main:
        _check_out_dir(cfg, ckpt, state_path)
    cache_root = cfg.cache_dir or (edgeforge_home() / "kd-cache")

    teacher = resolve_teacher(cfg.teacher, main)
    extras = [resolve_teacher(name, main) for name in cfg.extra_teachers]
    for x in extras:  # a mixture or a routing compares distributions over the same tokens
        check_vocabulary(teacher.hf_dir, x.hf_dir, role="extra teacher")
    if cfg.student_dir is not None:
        check_vocabulary(teacher.hf_dir, cfg.student_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.hf_dir))
    shape = student_shape(cfg, teacher) if cfg.student_dir is None else None
    if main:  # before any weights load: a run that cannot fit in memory fails now, in one line
        from edgeforge.train.preflight import check_distill_memory

        check_distill_memory(teacher.hf_dir, cfg.student_dir, shape, cfg.batch_size, cfg.seq_len, device.type)
    task = None
    if cfg.task is not None:
        from edgeforge.distill.techniques.rationale import prepare_task

        task = prepare_task(cfg, tokenizer, teacher, cache_root, say)
    data = prepare_data(cfg, tokenizer, teacher, cache_root, main, say, task.kd_docs if task else ())
    say(f"data: {data.info['train_sequences']} training sequences x {cfg.seq_len} tokens, "
        f"{data.info['heldout_sequences']} held-out x {data.heldout.shape[1]}")

    passes = {"training": 0, "calibration": 0, "evaluation": 0}
    t_model = teacher.load(torch.float32, device)
    teacher_params = count_params(t_model)
    stages = stage_plan(cfg, shape, int(t_model.config.num_hidden_layers))
    if cfg.student_dir is not None:
        student = AutoModelForCausalLM.from_pretrained(str(cfg.student_dir), dtype=torch.float32)
        init = {"method": "given", "path": str(cfg.student_dir), "params": count_params(student)}
        align_from: list[int] | None = None
        kept_hidden = None
    else:
        calib = data.train[: cfg.calib_sequences]
        student, report = init_student(t_model, stages[0][0], cfg.init, calib, seed=cfg.seed)  # type: ignore[arg-type]
        if cfg.init != "random":
            passes["calibration"] += math.ceil(len(calib) / 4)
        init = report.to_dict()
        align_from, kept_hidden = report.kept_layers or None, report.kept_hidden_channels
        say(f"student: {report.layers} layers (kept {report.kept_layers or 'random init'}), hidden "
            f"{report.hidden_size}, MLP {report.intermediate_size}, {report.n_heads}/{report.n_kv_heads} heads, "
            f"{report.params / 1e6:.1f}M params")
    student = student.to(device).requires_grad_(True)  # a pruned copy inherits the frozen teacher's flags
    if student.config.vocab_size != t_model.config.vocab_size:
        raise BadInputError(f"vocabulary mismatch: teacher {t_model.config.vocab_size} tokens, student "
                            f"{student.config.vocab_size}")

    # before: the teacher's and the initial student's held-out metrics (kept across a resume)
    state = json.loads(state_path.read_text(encoding="utf-8")) if cfg.resume and state_path.is_file() else None
    if main and state is None:
        t0 = time.perf_counter()
        student.eval()
        m = evaluate({"student": student}, t_model, data.heldout)
        passes["evaluation"] += len(data.heldout)
        state = {"fingerprint": cfg.fingerprint(), "teacher": m["teacher"], "before": m["student"]}
        if task is not None:
            state["task_before"] = _task_eval(student, tokenizer, task)
        out.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=1), encoding="utf-8")
        say(f"before: teacher perplexity {m['teacher']['perplexity']:.2f}; student KL "
            f"{m['student']['kl_to_teacher']:.3f}, perplexity {m['student']['perplexity']:.2f}, top-1 "
            f"{m['student']['top1_agreement']:.1%}"
            + (f", task accuracy {state['task_before']['task_accuracy']:.1%}" if task is not None else "")
            + f" ({time.perf_counter() - t0:.0f} s)")

    order, curriculum = None, None
    if cfg.curriculum != "none":  # the pool: exactly the sequences a plain run with this budget would visit
        pool = torch.tensor(sorted(rows_for_run(len(data.train), cfg, world)), dtype=torch.long)
        order, curriculum = curriculum_order(cfg, t_model, student, data.train, pool)
        say(f"curriculum: {len(pool)} sequences ordered by {cfg.curriculum} ({curriculum['scoring_seconds']:.0f} s)"
            f", {cfg.curriculum_pacing} pacing from {cfg.curriculum_start:.0%}")

    # the training signal
    tdtype = teacher_train_dtype(cfg.teacher_dtype, device)
    signal: dict[str, Any] = {"mode": "offline" if cfg.offline_teacher else "online", "top_k": cfg.top_k,
                              "teacher_dtype": str(tdtype).replace("torch.", "")}
    cache = None
    if cfg.offline_teacher:
        from edgeforge.distill.teacher_cache import TopKCache

        cache = TopKCache(cache_root, teacher.identity, data.train, int(cfg.top_k or 64), signal["teacher_dtype"])
        needed = rows_for_run(len(data.train), cfg, world)
        missing = cache.missing(needed)
        if main and missing:
            t0 = time.perf_counter()
            say(f"offline teacher: computing the top-{cache.k} of {len(missing)} sequences this run will visit")
            t_model = t_model.to(tdtype)  # in place; the fp32 teacher is reloaded for the final evaluation
            sig_model = t_model
            passes["training"] += cache.fill(
                missing, lambda ids: sig_model(input_ids=ids.to(device), use_cache=False).logits, cfg.batch_size)
            del sig_model
            signal["cache_fill_seconds"] = round(time.perf_counter() - t0, 2)
        _barrier()
        if not main:
            cache.refresh()  # the main process wrote the shards
        signal.update(cache_dir=str(cache.dir), cache_hit=not missing, bytes_per_token=cache.bytes_per_token,
                      cache_bytes=cache.disk_bytes(), sequences_computed=len(missing))
        if not missing:
            say("offline teacher: cache hit, 0 teacher forward passes")
        else:
            say(f"offline teacher: cache built ({cache.bytes_per_token} bytes per token, {cache.disk_bytes() / 1e6:.1f}"
                f" MB), {passes['training']} teacher forward passes")
        del t_model
        t_train = None
    else:
        t_train = t_model.to(tdtype) if tdtype != torch.float32 else t_model
        del t_model
    extra_train = [x.load(tdtype, device) for x in extras]
    weights = normalised_weights(cfg.teacher_weights, 1 + len(extras))
    release_freed_memory()

    # the hidden-state alignment pairs and projector (one-stage runs only: validated in DistillConfig)
    align_pairs: list[tuple[int, int]] = []
    projector = None
    if cfg.hidden_loss != "none":
        n_s = student.config.num_hidden_layers
        n_t = int(_read_config(teacher.hf_dir)["num_hidden_layers"])
        align_pairs = [(i, teacher_layer_for(i, n_s, n_t, align_from)) for i in range(n_s)]
        t_width = int(_read_config(teacher.hf_dir)["hidden_size"])
        if student.config.hidden_size != t_width:
            projector = HiddenProjector(student.config.hidden_size, t_width, kept_hidden).to(device)

    counters = StepCounters()
    progressive = len(stages) > 1
    stage_records: list[dict[str, Any]] = list((state or {}).get("stages", []))
    curve: list[dict[str, Any]] = [e for r in stage_records for e in r.pop("loss_curve", [])]
    totals = {"steps": 0, "tokens": 0, "seconds": 0.0, "flops": 0.0}
    for r in stage_records:
        for k in ("steps", "tokens", "seconds"):
            totals[k] += r["training"][k]
        totals["flops"] += r["training_flops"]
    kd_module: nn.Module = student
    st = tcfg = None
    for i, (sshape, ssteps) in enumerate(stages):
        stage_ckpt = ckpt / f"stage-{i}" if progressive else ckpt
        if i < len(stage_records):  # finished before an interruption: its distilled student is on disk
            student = AutoModelForCausalLM.from_pretrained(str(ckpt / f"stage-{i}-student"), dtype=torch.float32)
            student = student.to(device).requires_grad_(True)
            continue
        stage_teacher, stage_teacher_params = t_train, teacher_params
        stage_init: dict[str, Any] = init
        if i > 0:  # prune the previous stage's student; distil from it or from the teacher
            previous = student
            student, rep = init_student(previous, sshape, "auto", data.train[: cfg.calib_sequences], seed=cfg.seed)
            student = student.to(device).requires_grad_(True)
            stage_init = rep.to_dict()
            if cfg.progressive_from == "previous":
                stage_teacher = previous.to(tdtype).eval().requires_grad_(False)
                stage_teacher_params = count_params(previous)
            else:
                del previous
            t0 = time.perf_counter()
            t_eval = teacher.load(torch.float32, device)
            student.eval()
            stage_before = evaluate({"student": student}, t_eval, data.heldout)["student"]
            passes["evaluation"] += len(data.heldout)
            del t_eval
            say(f"stage {i + 1}/{len(stages)}: {sshape.layers} layers pruned from the previous student (kept "
                f"{rep.kept_layers}), KL {stage_before['kl_to_teacher']:.3f} ({time.perf_counter() - t0:.0f} s)")
        else:
            stage_before = state["before"] if state else None
        signal_teachers = [stage_teacher, *extra_train] if stage_teacher is not None else []
        before_forwards, before_gen = counters.teacher_forwards, counters.generated_tokens
        st, tcfg, kd_module = _train_stage(cfg, student, signal_teachers, weights, cache, data, order, task,
                                           tokenizer, device, rank, world, ssteps, stage_ckpt, align_pairs,
                                           projector, counters, on_log, say, f"stage {i + 1}/{len(stages)}: "
                                           if progressive else "")
        passes["training"] += counters.teacher_forwards - before_forwards
        s_params = count_params(student)
        flops = _stage_flops(st.tokens * world, s_params, [stage_teacher_params] * (stage_teacher is not None)
                             + [count_params(x) for x in extra_train],
                             counters.generated_tokens - before_gen, counters.task_tokens)
        for k, v in (("steps", st.step), ("tokens", st.tokens * world), ("seconds", st.seconds), ("flops", flops)):
            totals[k] += v
        curve += [{**e, "stage": i + 1} if progressive else e for e in st.loss_curve]
        if progressive:
            rec = {"stage": i + 1, "layers": sshape.layers, "params": s_params,
                   "teacher": "teacher" if i == 0 or cfg.progressive_from == "teacher" else f"stage {i} student",
                   "teacher_params": stage_teacher_params, "kept_layers": stage_init.get("kept_layers"),
                   "training": {"steps": st.step, "tokens": st.tokens, "seconds": round(st.seconds, 2)},
                   "training_flops": flops, "before": stage_before}
            if i + 1 < len(stages):  # the last stage's "after" is the run's (measured below)
                t_eval = teacher.load(torch.float32, device)
                student.eval()
                rec["after"] = evaluate({"student": student}, t_eval, data.heldout)["student"]
                passes["evaluation"] += len(data.heldout)
                del t_eval
                save_student(student, ckpt / f"stage-{i}-student", teacher.hf_dir)
                assert state is not None
                state["stages"] = [*stage_records, {**rec, "loss_curve": st.loss_curve}]
                state_path.write_text(json.dumps(state, indent=1), encoding="utf-8")
                say(f"stage {i + 1}/{len(stages)} ({sshape.layers} layers) after: KL "
                    f"{rec['after']['kl_to_teacher']:.3f}, perplexity {rec['after']['perplexity']:.2f}")
            stage_records.append(rec)
            if stage_teacher is not t_train:
                del stage_teacher
    assert st is not None and tcfg is not None
    del t_train, extra_train
    if world > 1 and cfg.parallel == "fsdp":
        # FSDP: every process holds only shards of the student, and the evaluation and the save below need all of
        # it. Chosen: gather the full weights (a collective, every process) into a plain unwrapped copy on the main
        # process, then run the same single-process evaluate() and save_pretrained() as DDP. Simplest correct
        # option: no FSDP forwards to keep in lock-step on every process while only the main one records metrics,
        # and a plain HF model to save. It fits: every process built the whole student on its device before
        # sharding it; FSDP is there for the training state (gradients, AdamW moments), not the weights alone.
        student = gathered_student(kd_module, student.config, main)  # type: ignore[assignment]
    if not main:
        _barrier()
        return {"rank": rank, "loss_curve": curve, "teacher_forward_passes": passes["training"]}

    # after: the distilled student, against the fp32 teacher
    student = student.to(device)
    t_eval = teacher.load(torch.float32, device)
    student.eval()
    after = evaluate({"student": student}, t_eval, data.heldout)["student"]
    passes["evaluation"] += len(data.heldout)
    del t_eval
    save_student(student, out, teacher.hf_dir if cfg.student_dir is None or not _has_tokenizer(cfg.student_dir)
                 else cfg.student_dir)
    assert state is not None
    before = state["before"]
    tokens_all = int(totals["tokens"])
    record = {
        "edgeforge_distill_version": 1,
        "config": cfg.to_dict(),
        "teacher": {"name": teacher.name, "path": str(teacher.path), "format": teacher.format,
                    "hf_dir": str(teacher.hf_dir), "params": None, **state["teacher"]},
        "student": {**init, "dir": str(out)},
        "data": data.info,
        "teacher_signal": signal,
        "teacher_forward_passes": passes["training"],
        "teacher_forward_passes_other": {"calibration": passes["calibration"], "evaluation": passes["evaluation"]},
        "training": {"steps": int(totals["steps"]), "tokens": tokens_all, "seconds": round(totals["seconds"], 2),
                     "tokens_per_s": round(tokens_all / max(totals["seconds"], 1e-9), 1), "world_size": world,
                     "parallel": cfg.parallel if world > 1 else "none",
                     "device": device.type, "peak_rss_bytes": peak_rss_bytes(),
                     "stopped_by": _stopped_by(st, tcfg)},
        "loss_curve": curve,
        "before": before,
        "after": after,
        "retention": {"definition": RETENTION_DEFINITION, "teacher": 1.0, "before": before["retention"],
                      "after": after["retention"]},
        "kl_gap_closed": {"definition": KL_GAP_DEFINITION,
                          "value": 1.0 - after["kl_to_teacher"] / before["kl_to_teacher"]
                          if before["kl_to_teacher"] > 0 else 0.0},
        "training_flops": {"total": totals["flops"] + (curriculum or {}).get("scoring_flops", 0.0),
                           "accounting": FLOPS_ACCOUNTING},
    }
    record.update(_technique_records(cfg, stage_records, curriculum, counters, extras, teacher, weights,
                                     init, after))
    if task is not None:
        record["task"] = {**task.info, "before": state["task_before"], "after": _task_eval(student, tokenizer, task)}
        say(f"task accuracy {record['task']['before']['task_accuracy']:.1%} -> "
            f"{record['task']['after']['task_accuracy']:.1%}")
    record["teacher"]["params"] = _param_count(teacher.hf_dir)
    record["student"]["params"] = count_params(student)
    record["seconds_total"] = round(time.perf_counter() - t_run, 1)
    (out / "distill.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    shutil.rmtree(ckpt, ignore_errors=True)  # done: the student is saved; the checkpoint was only for resuming
    state_path.unlink(missing_ok=True)
    say(f"after: student KL {after['kl_to_teacher']:.3f}, perplexity {after['perplexity']:.2f}, top-1 "
        f"{after['top1_agreement']:.1%}; {record['training']['tokens_per_s']:.0f} tokens/s")
    _barrier()
    return record


FLOPS_ACCOUNTING = ("6 N_student per training token + 2 N per teacher forward token (each teacher) + 2 N_student per "
                    "token the student samples (on-policy) + 6 N_student per supervised task token + 2 N per token "
                    "scored for the curriculum; N = all parameters")


def _check_world(cfg: DistillConfig, world: int) -> None:
    """The techniques that run on one process only (not yet under torchrun)."""
    if world <= 1:
        return
    if cfg.progressive:
        raise BadInputError("--progressive: runs on one process; run it without torchrun")
    if cfg.task_loss != "none":
        raise BadInputError("--task-loss: the supervised task term runs on one process; run it without torchrun "
                            "or use --task-loss none")
    if cfg.on_policy_ratio > 0 and cfg.parallel == "fsdp":
        raise BadInputError("--on-policy-ratio: sampling from an FSDP-sharded student is not supported; use "
                            "--parallel ddp")


def _train_stage(cfg: DistillConfig, student: nn.Module, teachers: list[nn.Module], weights: tuple[float, ...],
                 cache: Any, data: DistillData, order: Tensor | None, task: Any, tokenizer: Any,
                 device: torch.device, rank: int, world: int, steps: int, ckpt_dir: Path,
                 align_pairs: list[tuple[int, int]], projector: nn.Module | None, counters: Any,
                 on_log: Callable[[dict[str, float]], None] | None, say: Log,
                 label: str) -> tuple[Any, Any, nn.Module]:
    """Train ``student`` for ``steps`` optimizer steps; returns (TrainState, TrainConfig, the trained module)."""
    from edgeforge.distill.step import make_step
    from edgeforge.train.loop import TrainConfig, train

    kd_module = wrap_parallel(StudentForKD(student, [s for s, _ in align_pairs], projector), cfg.parallel, world,
                              device)
    step_fn = make_step(cfg, kd_module, student, teachers, weights, cache, align_pairs, counters)
    share = steps / cfg.steps  # progressive stages split the token and time budgets like the steps
    tcfg = TrainConfig(steps=steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None
                       else min(10, max(1, steps // 10)), grad_accum=cfg.grad_accum, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every,
                       max_tokens=None if cfg.max_tokens is None else math.ceil(cfg.max_tokens * share / world),
                       max_seconds=None if cfg.max_seconds is None else cfg.max_seconds * share)
    mode = "online" if cache is None else "offline"
    say(f"{label}distilling: {cfg.loss}{f' over the top-{cfg.top_k}' if cfg.top_k else ''}, {mode} teacher"
        f"{f's x {len(teachers)} ({cfg.teacher_routing})' if len(teachers) > 1 else ''}, {steps} steps x "
        f"{cfg.batch_size * cfg.grad_accum * world} sequences x {cfg.seq_len} tokens on {device.type}"
        + (f" x {world} processes ({cfg.parallel})" if world > 1 else ""))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    st = train(kd_module, step_fn, _batches(data.train, cfg, rank, world, steps, order, task, pad), tcfg,
               ckpt_dir if cfg.checkpoint_every else None, resume=cfg.resume, desc="distill", on_log=on_log)
    return st, tcfg, kd_module


def _stage_flops(tokens: int, student_params: int, teacher_params: list[int], generated_tokens: int,
                 task_tokens: int) -> float:
    """Training FLOPs of a stage (FLOPS_ACCOUNTING): training_cost.training_flops for the distillation tokens, plus
    the student's sampling and the supervised task tokens."""
    from edgeforge.plan.training_cost import training_flops

    return (training_flops("distill", tokens, student_params, sum(teacher_params))
            + 2.0 * student_params * generated_tokens + 6.0 * student_params * task_tokens)


def _task_eval(student: nn.Module, tokenizer: Any, task: Any) -> dict[str, Any]:
    """Exact-match task accuracy of ``student`` on the task's held-out examples (greedy), as edgeforge finetune
    measures it."""
    from edgeforge.tasks.metrics import task_metrics

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return task_metrics(student, tokenizer, task.heldout)


def _technique_records(cfg: DistillConfig, stage_records: list[dict[str, Any]], curriculum: dict[str, Any] | None,
                       counters: Any, extras: list[Teacher], teacher: Teacher, weights: tuple[float, ...],
                       init: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What each technique measured, under its own key of distill.json (absent when the technique is off)."""
    rec: dict[str, Any] = {}
    if stage_records:
        stage_records[-1]["after"] = after
        rec["progressive"] = {"from": cfg.progressive_from, "stages": stage_records}
    if curriculum is not None:
        rec["curriculum"] = curriculum
    if cfg.self_distill != "none":
        rec["self_distill"] = {"mode": cfg.self_distill,
                               "student_init": "random" if cfg.init == "random" else "from the teacher",
                               "student_layers": init.get("layers"), "teacher_layers": init.get("teacher_layers"),
                               "data": "the teacher's own greedy answers to the built-in prompts only"}
    if extras:
        rec["multi_teacher"] = {"teachers": [teacher.name, *(x.name for x in extras)], "routing": cfg.teacher_routing,
                                **({"weights": list(weights)} if cfg.teacher_routing == "weights" else
                                   {"samples_routed_to": counters.routed})}
    if cfg.on_policy_ratio > 0:
        rec["on_policy"] = {"ratio": cfg.on_policy_ratio, "tokens_sampled_per_sequence": cfg.on_policy_tokens,
                            "micro_batches": counters.micro_batches,
                            "on_policy_micro_batches": counters.on_policy_micro_batches,
                            "generated_tokens": counters.generated_tokens,
                            "generation_seconds": round(counters.generation_seconds, 2)}
    return rec


def _stopped_by(st: Any, tcfg: Any) -> str:
    if st.step >= tcfg.steps:
        return "steps"
    if tcfg.max_tokens is not None and st.tokens >= tcfg.max_tokens:
        return "max_tokens"
    return "max_seconds"


def _param_count(hf_dir: Path) -> int | None:
    try:
        from edgeforge.models.refs import arch_from_config

        return arch_from_config(_read_config(hf_dir)).n_params
    except EdgeforgeError:
        return None


def _check_out_dir(cfg: DistillConfig, ckpt: Path, state_path: Path) -> None:
    """A new run never silently overwrites an interrupted one; a resumed run must be the same run."""
    if cfg.resume:
        if state_path.is_file():
            saved = json.loads(state_path.read_text(encoding="utf-8")).get("fingerprint")
            if saved is not None:  # a run started before a setting existed ran with its default
                defaults = DistillConfig(out=cfg.out, student_layers=1).to_dict()
                saved = {**{k: defaults[k] for k in TECHNIQUE_FIELDS}, "parallel": "ddp", **saved}
            now = cfg.fingerprint()
            diff = sorted(k for k in set(saved or {}) | set(now) if (saved or {}).get(k) != now.get(k))
            if diff:
                raise BadInputError(f"--resume: {cfg.out} holds a run with other settings ({', '.join(diff)}); "
                                    "resume with the same settings or choose another --out")
        return
    if ckpt.exists() or state_path.exists():
        raise BadInputError(f"{cfg.out} holds an interrupted run; pass --resume to continue it, or remove the "
                            "directory / choose another --out to start over")


# ---------------------------------------------------------------- side-by-side comparison (edgeforge eval)
def compare(student_dir: Path, reference: str | None, text: str | None = None, n_seq: int = 8,
            seq_len: int = 256) -> dict[str, Any]:
    """Teacher and distilled student on held-out text (default: the built-in held-out prose), plus the initial
    student's row from the student's distill.json when present (measured by the run on its own held-out set)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeforge.data.builtin import heldout_prose
    from edgeforge.data.text import pack, tokenize_documents

    record_path = student_dir / "distill.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    teacher = resolve_teacher(reference if reference is not None else record.get("config", {}).get("teacher"), True)
    check_vocabulary(teacher.hf_dir, student_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher.hf_dir))
    stream = tokenize_documents([text if text is not None else heldout_prose(max_chars=10**9)], tokenizer)
    heldout = pack(stream, min(seq_len, len(stream)))[:n_seq]
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    m = evaluate({"student": student}, teacher.load(torch.float32, torch.device("cpu")), heldout)
    rows = [{"model": f"teacher ({teacher.name})", **m["teacher"]}]
    if "before" in record:
        rows.append({"model": f"initial student ({record.get('student', {}).get('method', '?')}, from distill.json)",
                     **record["before"]})
    rows.append({"model": f"distilled student ({student_dir})", **m["student"]})
    return {"teacher": teacher.name, "student": str(student_dir), "n_tokens": int(heldout.numel()),
            "retention_definition": RETENTION_DEFINITION, "rows": rows}


def record_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The headline of a distill.json: what a script compares."""
    return {k: record[k] for k in ("teacher", "before", "after", "retention", "kl_gap_closed",
                                   "teacher_forward_passes", "training") if k in record}
