"""Fine-tuning with LoRA, DoRA and QLoRA on peft: task adaptation, a forgetting check, and a merge that survives
export.

- Task data: chat JSONL (``messages``) or prompt/completion JSONL, or a built-in task; the loss is on the answer
  tokens only (prompt positions carry label -100).
- Forgetting: general-text perplexity (the built-in held-out prose) before and after; ``l2sp`` adds a penalty
  towards the starting weights (for adapters that is their norm, since they start at a zero delta) and
  ``mix_general`` mixes general text into the batches, to limit forgetting.
- Task evaluation: greedy generation on held-out examples, exact match of the parsed JSON (or of the text when the
  answer is not JSON), and the valid-JSON rate.
- Merge: adapters merged into the base; for QLoRA into the full-precision base, never into 4-bit weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from edgeforge.data import read_jsonl, validate_messages
from edgeforge.errors import BadInputError, EdgeforgeError
from edgeforge.train_loop import TrainConfig, pick_device, train

Method = Literal["lora", "dora", "qlora"]
IGNORE_INDEX = -100


@dataclass
class FinetuneConfig:
    method: Method = "lora"
    rank: int = 16  # small models do well at 8-16; 32-64 suits large ones. DoRA is steadier across ranks.
    alpha: int | None = None  # default 2 x rank
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    rslora: bool = False
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 8
    max_seq_len: int = 256
    seed: int = 0
    l2sp: float = 0.0  # weight of the L2-SP penalty towards the starting weights
    mix_general: float = 0.0  # fraction of micro-batches drawn from general text instead of the task
    eval_examples: int = 100
    checkpoint_every: int = 50
    # techniques (docs/techniques.md); the defaults are plain LoRA
    rank_sweep: tuple[int, ...] = ()  # ranks tried on a short budget first; the full run uses the pick (ft_rank_sweep)
    rank_sweep_steps: int | None = None  # steps per swept rank [default: max(10, steps // 5)]
    layerwise_lr_decay: float = 1.0  # lr x decay^(distance from the top layer); 1: off (ft_layerwise_lr)
    ewc: float = 0.0  # EWC strength λ: penalty λ/2 Σ F (θ − θ0)², F the diagonal Fisher on general text (ft_ewc)
    ewc_batches: int = 8  # general-text sequences for the Fisher estimate
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rank_sweep = tuple(int(r) for r in self.rank_sweep)
        problems = [(name, expected) for name, ok, expected in (
            ("rank_sweep", all(r >= 1 for r in self.rank_sweep), "positive ranks such as 4,8,16"),
            ("rank_sweep_steps", self.rank_sweep_steps is None or self.rank_sweep_steps >= 1, "an integer >= 1"),
            ("layerwise_lr_decay", 0.0 < self.layerwise_lr_decay <= 1.0, "a number in (0, 1]"),
            ("ewc", self.ewc >= 0, "a number >= 0"),
            ("ewc_batches", self.ewc_batches >= 1, "an integer >= 1")) if not ok]
        if problems:
            name, expected = problems[0]
            raise BadInputError(f"--{name.replace('_', '-')}: expected {expected}, found {getattr(self, name)}")


# ---------------------------------------------------------------- data
def load_task_examples(task: str | None, data: Path | None, seed: int = 0) -> tuple[list[dict], list[dict], str]:
    """(train, held-out, source description). A JSONL file is split 90/10 deterministically."""
    if task is not None and data is None and not Path(task).exists():
        from edgeforge.tasks import build_task

        train_ex, held = build_task(task, seed)
        return train_ex, held, f"built-in task '{task}'"
    path = Path(data or task)  # type: ignore[arg-type]
    rows = read_jsonl(path)
    examples = []
    for i, row in enumerate(rows, start=1):
        where = f"{path}:{i}"
        if "messages" in row:
            msgs = validate_messages(row["messages"], where)
            if msgs[-1]["role"] != "assistant":
                raise BadInputError(f"{where}: the last message must be the assistant's answer, found role "
                                    f"'{msgs[-1]['role']}'")
            examples.append({"messages": msgs})
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            examples.append({"messages": [{"role": "user", "content": row["prompt"]},
                                          {"role": "assistant", "content": row["completion"]}]})
        else:
            raise BadInputError(f"{where}: expected 'messages' or string fields 'prompt' and 'completion'; found "
                                f"keys {sorted(row)}")
    if len(examples) < 2:
        raise BadInputError(f"{path}: need at least 2 examples (one is held out), found {len(examples)}")
    n_hold = max(1, len(examples) // 10)
    return examples[:-n_hold], examples[-n_hold:], str(path)


def encode_example(tokenizer: Any, messages: list[dict[str, str]], max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = -100 on every prompt token: the loss is on the answer (and its end token).

    The prompt is the chat template of all messages but the last, with the generation prompt; the answer is the
    last (assistant) message's content followed by the template's end-of-turn token.
    """
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    answer = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = (prompt + answer + end)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + answer + end)[:max_len]
    return ids, labels


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids / labels / attention_mask, each [batch, max_len]."""
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens only.

    The output projection runs only at the positions that predict an answer token: with a 49,152-token vocabulary
    the logits of every prompt position would cost more than the rest of a small model's forward pass.
    input_ids, labels, attention_mask: [batch, seq]. Position t predicts token t + 1.
    """
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = core.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX  # [batch, seq - 1]
    logits = core.lm_head(hidden[:, :-1][keep])  # [n_answer_tokens, vocab]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


# ---------------------------------------------------------------- evaluation
def _parse(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except json.JSONDecodeError:
        return None


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, examples: list[dict], max_new_tokens: int = 48,
                   batch_size: int = 32) -> list[str]:
    """Batched greedy generation (left padding) of the answer to each example's prompt."""
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            prompts = [tokenizer.apply_chat_template(e["messages"][:-1], add_generation_prompt=True, tokenize=False)
                       for e in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            for row in gen[:, enc["input_ids"].shape[1]:]:
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return out


def task_metrics(model: Any, tokenizer: Any, examples: list[dict]) -> dict[str, Any]:
    """Exact-match accuracy (parsed JSON equality when the reference is JSON, else stripped text) and valid-JSON
    rate over ``examples``."""
    was_training = model.training
    model.eval()
    answers = greedy_answers(model, tokenizer, examples)
    if was_training:
        model.train()
    exact = valid = 0
    for ex, got in zip(examples, answers, strict=True):
        want_text = ex["messages"][-1]["content"]
        want, parsed = _parse(want_text), _parse(got)
        valid += parsed is not None
        exact += (parsed == want) if want is not None else (got.strip() == want_text.strip())
    n = max(1, len(examples))
    return {"task_accuracy": exact / n, "valid_json_rate": valid / n, "n_examples": len(examples),
            "samples": [{"command": e["messages"][-2]["content"], "want": e["messages"][-1]["content"], "got": a}
                        for e, a in list(zip(examples, answers, strict=True))[:5]]}


def artifact_task_metrics(artifact: Path, tokenizer: Any, examples: list[dict],
                          max_new_tokens: int = 48) -> dict[str, Any]:
    """Task accuracy of an exported artifact measured through its own engine (llama.cpp for .gguf, onnxruntime
    for an ONNX dir), greedy, with the prompts the chat template makes."""
    from edgeforge.verify import open_engine

    engine = open_engine(artifact, n_ctx=512)
    exact = valid = 0
    for ex in examples:
        prompt = tokenizer.apply_chat_template(ex["messages"][:-1], add_generation_prompt=True, tokenize=True)
        ids = engine.greedy(list(prompt), max_new_tokens, tokenizer.eos_token_id)
        got = tokenizer.decode(ids, skip_special_tokens=True)
        want = _parse(ex["messages"][-1]["content"])
        parsed = _parse(got)
        valid += parsed is not None
        exact += parsed == want if want is not None else got.strip() == ex["messages"][-1]["content"].strip()
    n = max(1, len(examples))
    return {"task_accuracy": exact / n, "valid_json_rate": valid / n, "n_examples": len(examples)}


@torch.no_grad()
def general_perplexity(model: Any, tokenizer: Any, seq_len: int = 256, n_seqs: int = 8) -> float:
    """Perplexity on the built-in held-out prose: the forgetting metric."""
    from edgeforge.builtin_data import heldout_prose
    from edgeforge.data import pack

    device = next(model.parameters()).device
    ids = tokenizer(heldout_prose(60_000), add_special_tokens=False)["input_ids"]
    seqs = pack(ids, seq_len)[:n_seqs].to(device)
    was_training = model.training
    model.eval()
    total_nll, count = 0.0, 0
    for row in seqs:
        out = model(input_ids=row[None], labels=row[None])
        total_nll += float(out.loss) * (seq_len - 1)
        count += seq_len - 1
    if was_training:
        model.train()
    return float(torch.exp(torch.tensor(total_nll / count)))


# ---------------------------------------------------------------- model
def base_model_dir(model_ref: str) -> tuple[Path, str]:
    """An HF directory for the base model (a GGUF base is dequantized into the cache once)."""
    from edgeforge.models import resolve_model

    ref = resolve_model(model_ref)
    if ref.format == "gguf":
        from edgeforge.gguf_teacher import hf_dir_for, materialize_hf
        from edgeforge.llama_tools import edgeforge_home

        return materialize_hf(ref.path, hf_dir_for(ref.path, edgeforge_home())), ref.name
    return ref.path, ref.name


def check_memory(model_ref: str, cfg: FinetuneConfig, device: torch.device) -> int:
    """Pre-flight, before any weights are loaded: refuse (one line) when the predicted training memory exceeds what
    this machine has available (edgeforge.preflight). Returns the prediction in bytes."""
    from edgeforge.models import read_arch, resolve_model
    from edgeforge.preflight import check_training_memory

    arch = read_arch(resolve_model(model_ref))
    return check_training_memory("finetune", "qlora" if cfg.method == "qlora" else "lora", arch, cfg.batch_size,
                                 cfg.max_seq_len, device.type)


def load_base(model_dir: Path, method: Method, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:
            return AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant,
                                                        device_map={"": device.index or 0} if device.type == "cuda"
                                                        else {"": "cpu"}, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - bitsandbytes/accelerate raise many types when unsupported
            raise EdgeforgeError(f"QLoRA needs bitsandbytes 4-bit support on {device.type}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}") from None
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)


def add_adapter(model: Any, cfg: FinetuneConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or 2 * cfg.rank, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules, use_dora=cfg.method == "dora", use_rslora=cfg.rslora,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


@torch.no_grad()
def logits_on(model: Any, tokenizer: Any, text: str, n_tokens: int = 128) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


# ---------------------------------------------------------------- the stage
def run_finetune(model_ref: str, out: Path, cfg: FinetuneConfig, task: str | None = None, data: Path | None = None,
                 merge: bool = False, resume: bool = False, log: Any = print) -> dict[str, Any]:
    """Fine-tune, evaluate before/after, optionally merge; writes ``out`` (adapter or merged model) and
    ``out/finetune.json``. Returns the record."""
    from transformers import AutoTokenizer

    from edgeforge.builtin_data import heldout_prose

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train_ex, held_ex, source = load_task_examples(task, data, cfg.seed)
    held_ex = held_ex[: cfg.eval_examples]
    if not resume and (out / "checkpoint" / "state.json").is_file():
        raise BadInputError(f"{out} holds an interrupted fine-tuning run; pass --resume to continue it, or remove the "
                            "directory / choose another --out to start over")
    device = pick_device()
    check_memory(model_ref, cfg, device)
    base_dir, base_name = base_model_dir(model_ref)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    techniques: dict[str, Any] = {}  # what --rank-sweep / --ewc / --layerwise-lr-decay measured, for the record
    if cfg.rank_sweep:
        from edgeforge.ft_rank_sweep import run_rank_sweep

        techniques["rank_sweep"] = run_rank_sweep(base_dir, cfg, tokenizer, train_ex, device, log)
        cfg = replace(cfg, rank=techniques["rank_sweep"]["chosen_rank"])
    model = load_base(base_dir, cfg.method, device)

    log(f"base model {base_name}: evaluating on {len(held_ex)} held-out examples and general text")
    before = {**task_metrics(model, tokenizer, held_ex), "general_perplexity": general_perplexity(model, tokenizer)}
    log(f"before: task accuracy {before['task_accuracy']:.1%}, valid JSON {before['valid_json_rate']:.1%}, "
        f"general perplexity {before['general_perplexity']:.2f}")

    model = add_adapter(model, cfg)
    ewc, groups = None, None
    if cfg.ewc > 0:
        from edgeforge.ft_ewc import setup_ewc

        ewc, techniques["ewc"] = setup_ewc(model, tokenizer, cfg.ewc, cfg.ewc_batches, log)
    if cfg.layerwise_lr_decay < 1.0:
        from edgeforge.ft_layerwise_lr import layerwise_setup

        groups, techniques["layerwise_lr"] = layerwise_setup(model, cfg.layerwise_lr_decay)
    encoded = [encode_example(tokenizer, e["messages"], cfg.max_seq_len) for e in train_ex]
    general_rows: list[tuple[list[int], list[int]]] = []
    if cfg.mix_general > 0:
        from edgeforge.builtin_data import training_prose

        ids = tokenizer(training_prose(200_000), add_special_tokens=False)["input_ids"]
        step = 128
        general_rows = [(ids[i:i + step], ids[i:i + step]) for i in range(0, len(ids) - step, step)]
    pad = tokenizer.pad_token_id

    def batches(start_step: int):
        import random

        step = start_step
        while True:
            rng = random.Random(cfg.seed * 1_000_003 + step)
            if general_rows and rng.random() < cfg.mix_general:
                rows = rng.sample(general_rows, min(cfg.batch_size, len(general_rows)))
            else:
                rows = rng.sample(encoded, min(cfg.batch_size, len(encoded)))
            yield collate(rows, pad)
            step += 1

    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if cfg.l2sp else {}

    def step_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = answer_loss(model, batch)
        metrics = {"ce": float(loss.detach())}
        if cfg.l2sp:
            penalty = sum(((p - start[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad)
            loss = loss + cfg.l2sp * penalty
            metrics["l2sp"] = float(penalty.detach())
        if ewc is not None:
            penalty = ewc(model)
            loss = loss + penalty
            metrics["ewc"] = float(penalty.detach())
        return loss, metrics

    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=max(1, cfg.steps // 20), seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, **cfg.train)
    out.mkdir(parents=True, exist_ok=True)
    curve_points: list[dict[str, Any]] = []
    probe = held_ex[: min(30, len(held_ex))]

    def on_log(entry: dict[str, float]) -> None:
        # Accuracy growth with steps: a small held-out probe at each checkpoint.
        if cfg.checkpoint_every and entry["step"] % cfg.checkpoint_every == 0 and entry["step"] < cfg.steps:
            m = task_metrics(model, tokenizer, probe)
            curve_points.append({"step": int(entry["step"]), "task_accuracy": m["task_accuracy"]})

    state = train(model, step_fn, batches, tcfg, ckpt_dir=out / "checkpoint", resume=resume,
                  desc=f"finetune {cfg.method}", on_log=on_log, param_groups=groups)
    after = {**task_metrics(model, tokenizer, held_ex), "general_perplexity": general_perplexity(model, tokenizer)}
    curve_points.append({"step": state.step, "task_accuracy": after["task_accuracy"]})
    log(f"after {state.step} steps: task accuracy {after['task_accuracy']:.1%}, valid JSON "
        f"{after['valid_json_rate']:.1%}, general perplexity {after['general_perplexity']:.2f}")

    record: dict[str, Any] = {
        "base_model": base_name,
        "base_model_dir": str(base_dir),
        "data": source,
        "config": asdict(cfg),
        "device": str(device),
        "loss_curve": state.loss_curve,
        "accuracy_by_step": curve_points,
        "train_tokens": state.tokens,
        "train_seconds": state.seconds,
        "before": before,
        "after": after,
        "forgetting": {"general_perplexity_delta_pct":
                       100 * (after["general_perplexity"] / before["general_perplexity"] - 1)},
        **techniques,
    }
    adapter_dir = out / "adapter" if merge else out
    staging = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if merge:
        record["merge"] = merge_adapter(model, base_dir, staging, out, tokenizer, cfg.method, held_ex,
                                        heldout_prose(4000), log)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(staging, adapter_dir)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    record["total_seconds"] = time.perf_counter() - t_start
    (out / "finetune.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    return record


def merge_adapter(model: Any, base_dir: Path, adapter_dir: Path, out: Path, tokenizer: Any, method: Method,
                  held_ex: list[dict], text: str, log: Any) -> dict[str, Any]:
    """Merge into the full-precision base and save it as ``out`` (config.json at its top); check equality."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = next(model.parameters()).device
    adapter_logits = logits_on(model, tokenizer, text)
    if method == "qlora":
        log("QLoRA: merging into the full-precision base, not into the 4-bit weights (merging into NF4 would "
            "round the merged weights to 4 bits and lose the fine-tune); the adapter was trained against the "
            "4-bit base, so the merged model differs from the adapter model by the base's quantization error")
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
        peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
        adapter_logits_fp = logits_on(peft_model, tokenizer, text)
        merged = peft_model.merge_and_unload()
    else:
        adapter_logits_fp = adapter_logits
        merged = model.merge_and_unload()
    merged_logits = logits_on(merged, tokenizer, text)
    diff = float((merged_logits - adapter_logits_fp).abs().max())
    tolerance = 1e-3
    tmp = out.with_name(out.name + ".merged-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    metrics = task_metrics(merged, tokenizer, held_ex)
    log(f"merged: max |logit difference| vs the adapter model {diff:.2e} (tolerance {tolerance:g}); task accuracy "
        f"{metrics['task_accuracy']:.1%}")
    return {"logit_max_abs_diff": diff, "tolerance": tolerance, "equal_within_tolerance": diff <= tolerance,
            "qlora_vs_4bit_adapter_logit_max_abs_diff": float((merged_logits - adapter_logits).abs().max()),
            "task_accuracy": metrics["task_accuracy"], "valid_json_rate": metrics["valid_json_rate"]}
