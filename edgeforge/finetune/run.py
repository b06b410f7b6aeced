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
from pathlib import Path
from typing import Any

import torch

from edgeforge.errors import BadInputError
from edgeforge.finetune.adapter import add_adapter, base_model_dir, check_memory, load_base, merge_adapter
from edgeforge.finetune.config import FinetuneConfig
from edgeforge.finetune.loss import answer_loss, general_perplexity
from edgeforge.tasks.examples import collate, encode_example, load_task_examples
from edgeforge.tasks.metrics import task_metrics
from edgeforge.train.loop import TrainConfig, pick_device, train

# ---------------------------------------------------------------- data


# ---------------------------------------------------------------- evaluation


# ---------------------------------------------------------------- model


# ---------------------------------------------------------------- the stage
def run_finetune(model_ref: str, out: Path, cfg: FinetuneConfig, task: str | None = None, data: Path | None = None,
                 merge: bool = False, resume: bool = False, log: Any = print) -> dict[str, Any]:
    """Fine-tune, evaluate before/after, optionally merge; writes ``out`` (adapter or merged model) and
    ``out/finetune.json``. Returns the record."""
    from transformers import AutoTokenizer

    from edgeforge.data.builtin import heldout_prose

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
        from edgeforge.finetune.techniques.rank_sweep import run_rank_sweep

        techniques["rank_sweep"] = run_rank_sweep(base_dir, cfg, tokenizer, train_ex, device, log)
        cfg = cfg.model_copy(update={"rank": techniques["rank_sweep"]["chosen_rank"]})
    model = load_base(base_dir, cfg.method, device)

    log(f"base model {base_name}: evaluating on {len(held_ex)} held-out examples and general text")
    before = {**task_metrics(model, tokenizer, held_ex), "general_perplexity": general_perplexity(model, tokenizer)}
    log(f"before: task accuracy {before['task_accuracy']:.1%}, valid JSON {before['valid_json_rate']:.1%}, "
        f"general perplexity {before['general_perplexity']:.2f}")

    model = add_adapter(model, cfg)
    ewc, groups = None, None
    if cfg.ewc > 0:
        from edgeforge.finetune.techniques.ewc import setup_ewc

        ewc, techniques["ewc"] = setup_ewc(model, tokenizer, cfg.ewc, cfg.ewc_batches, log)
    if cfg.layerwise_lr_decay < 1.0:
        from edgeforge.finetune.techniques.layerwise_lr import layerwise_setup

        groups, techniques["layerwise_lr"] = layerwise_setup(model, cfg.layerwise_lr_decay)
    encoded = [encode_example(tokenizer, e["messages"], cfg.max_seq_len) for e in train_ex]
    general_rows: list[tuple[list[int], list[int]]] = []
    if cfg.mix_general > 0:
        from edgeforge.data.builtin import training_prose

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
        "config": cfg.model_dump(mode="json"),
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


