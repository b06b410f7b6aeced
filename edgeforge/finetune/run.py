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
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from edgeforge.errors import BadInputError
from edgeforge.finetune.adapter import add_adapter, base_model_dir, check_memory, load_base, merge_adapter
from edgeforge.finetune.config import FinetuneConfig
from edgeforge.finetune.loss import answer_loss, general_perplexity
from edgeforge.models.files import save_tokenizer
from edgeforge.tasks.examples import collate, encode_example, load_task_examples
from edgeforge.tasks.metrics import SCORE_FIELDS, task_metrics
from edgeforge.train.loop import TrainConfig, pick_device, train

Log = Callable[[str], None]
Row = tuple[list[int], list[int]]  # (input ids, labels) of one training sequence
Metrics = dict[str, Any]


def run_finetune(model_ref: str, out: Path, cfg: FinetuneConfig, task: str | None = None, data: Path | None = None,
                 merge: bool = False, resume: bool = False, log: Any = print) -> dict[str, Any]:
    """Fine-tune, evaluate before/after, optionally merge; writes ``out`` (adapter or merged model) and
    ``out/finetune.json``. Returns the record."""
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
    tokenizer = _tokenizer(base_dir)
    techniques: dict[str, Any] = {}  # what --rank-sweep / --ewc / --layerwise-lr-decay measured, for the record
    if cfg.rank_sweep:
        from edgeforge.finetune.techniques.rank_sweep import run_rank_sweep

        techniques["rank_sweep"] = run_rank_sweep(base_dir, cfg, tokenizer, train_ex, device, log)
        cfg = cfg.model_copy(update={"rank": techniques["rank_sweep"]["chosen_rank"]})
    model = load_base(base_dir, cfg.method, device)

    log(f"base model {base_name}: evaluating on {len(held_ex)} held-out examples and general text")
    before = _evaluate(model, tokenizer, held_ex)
    log(f"before: task accuracy {before['task_accuracy']:.1%}, valid JSON {before['valid_json_rate']:.1%}, "
        f"general perplexity {before['general_perplexity']:.2f}")

    model = add_adapter(model, cfg)
    ewc, groups = _forgetting_techniques(model, tokenizer, cfg, log, techniques)
    state, curve_points = _train(model, tokenizer, cfg, train_ex, held_ex, ewc, groups, out, resume)
    # A LoRA / DoRA merge is exact up to float rounding (the merge check bounds the logit difference and fails the
    # run beyond it), so the trained model's task scores are measured once, on the merged model: generation over the
    # fixed set is the costliest evaluation on a CPU, and measuring it twice for the same weights bought nothing.
    # QLoRA's merged model differs by the base's 4-bit error, so its adapter model is scored on its own.
    scored_when_merged = merge and cfg.method in ("lora", "dora")
    after = ({"general_perplexity": general_perplexity(model, tokenizer)} if scored_when_merged
             else _evaluate(model, tokenizer, held_ex))
    if not scored_when_merged:
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
    _save(model, tokenizer, out, record, merge, base_dir, cfg, held_ex, log)
    if scored_when_merged:
        after.update({k: record["merge"][k] for k in SCORE_FIELDS})
        after["scored_on"] = "the merged model (equal to the adapter model within the merge check's tolerance)"
    curve_points.append({"step": state.step, "task_accuracy": after["task_accuracy"]})
    record["total_seconds"] = time.perf_counter() - t_start
    (out / "finetune.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    return record


def _tokenizer(base_dir: Path) -> Any:
    """The base model's tokenizer, padding with EOS when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _evaluate(model: Any, tokenizer: Any, held_ex: list[dict[str, Any]]) -> Metrics:
    """Task metrics on the held-out examples plus the general-text perplexity (the forgetting check)."""
    return {**task_metrics(model, tokenizer, held_ex), "general_perplexity": general_perplexity(model, tokenizer)}


def _forgetting_techniques(model: Any, tokenizer: Any, cfg: FinetuneConfig, log: Log,
                           techniques: dict[str, Any]) -> tuple[Any, Any]:
    """(the EWC penalty or None, the layer-wise learning-rate parameter groups or None); what each measured goes
    into ``techniques``."""
    ewc, groups = None, None
    if cfg.ewc > 0:
        from edgeforge.finetune.techniques.ewc import setup_ewc

        ewc, techniques["ewc"] = setup_ewc(model, tokenizer, cfg.ewc, cfg.ewc_batches, log)
    if cfg.layerwise_lr_decay < 1.0:
        from edgeforge.finetune.techniques.layerwise_lr import layerwise_setup

        groups, techniques["layerwise_lr"] = layerwise_setup(model, cfg.layerwise_lr_decay)
    return ewc, groups


def _general_rows(tokenizer: Any, cfg: FinetuneConfig) -> list[Row]:
    """128-token rows of the built-in general text for --mix-general (none without it); labels = inputs."""
    if cfg.mix_general <= 0:
        return []
    from edgeforge.data.builtin import training_prose

    ids = tokenizer(training_prose(200_000), add_special_tokens=False)["input_ids"]
    step = 128
    return [(ids[i:i + step], ids[i:i + step]) for i in range(0, len(ids) - step, step)]


def _batch_stream(encoded: list[Row], general_rows: list[Row], cfg: FinetuneConfig,
                  pad: int) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """The batches from optimizer step ``start_step`` on: each drawn with a generator seeded by its step (the same
    after a resume), from the task rows or, with probability --mix-general, from the general rows."""
    def batches(start_step: int) -> Iterator[dict[str, torch.Tensor]]:
        step = start_step
        while True:
            rng = random.Random(cfg.seed * 1_000_003 + step)
            if general_rows and rng.random() < cfg.mix_general:
                rows = rng.sample(general_rows, min(cfg.batch_size, len(general_rows)))
            else:
                rows = rng.sample(encoded, min(cfg.batch_size, len(encoded)))
            yield collate(rows, pad)
            step += 1

    return batches


def _step_fn(model: Any, cfg: FinetuneConfig,
             ewc: Any) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    """The loss of one batch: the answer-token CE, plus the L2-SP penalty towards the weights trainable now
    (--l2sp) and the EWC penalty (--ewc)."""
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

    return step_fn


def _train(model: Any, tokenizer: Any, cfg: FinetuneConfig, train_ex: list[dict[str, Any]],
           held_ex: list[dict[str, Any]], ewc: Any, groups: Any, out: Path,
           resume: bool) -> tuple[Any, list[dict[str, Any]]]:
    """Train the adapter; returns (the loop's TrainState, the probe's task accuracy at each checkpoint)."""
    encoded = [encode_example(tokenizer, e["messages"], cfg.max_seq_len) for e in train_ex]
    batches = _batch_stream(encoded, _general_rows(tokenizer, cfg), cfg, tokenizer.pad_token_id)
    step_fn = _step_fn(model, cfg, ewc)
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
    return state, curve_points


def _save(model: Any, tokenizer: Any, out: Path, record: dict[str, Any], merge: bool, base_dir: Path,
          cfg: FinetuneConfig, held_ex: list[dict[str, Any]], log: Log) -> None:
    """The adapter (``out``, or ``out/adapter`` next to the merged model with --merge), staged then moved in place;
    the merge's checks go into ``record["merge"]``. The checkpoint is removed: the run is done."""
    from edgeforge.data.builtin import heldout_prose

    if cfg.method == "full":
        _save_full(model, tokenizer, out, record, merge)
        return
    adapter_dir = out / "adapter" if merge else out
    staging = adapter_dir.with_name(adapter_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    save_tokenizer(tokenizer, staging)
    if merge:
        record["merge"] = merge_adapter(model, base_dir, staging, out, tokenizer, cfg.method, held_ex,
                                        heldout_prose(4000), log)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(staging, adapter_dir)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)


def _save_full(model: Any, tokenizer: Any, out: Path, record: dict[str, Any], merge: bool) -> None:
    """``method: full``: the trained model itself is the output (published atomically as ``out``); there is no
    adapter to merge, so with --merge the "merged" scores are the trained model's own ``after`` scores (the same
    weights, the same examples) and the merge check is exact by construction."""
    from edgeforge.finetune.adapter import publish_model_dir

    publish_model_dir(model, tokenizer, out)
    if merge:
        after = record["after"]
        record["merge"] = {"method": "full", "note": "full fine-tuning: no adapter, nothing to merge",
                           "logit_max_abs_diff": 0.0, "tolerance": 0.0, "equal_within_tolerance": True,
                           "failures": [],
                           **{k: after[k] for k in SCORE_FIELDS}}
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
