"""LoRA rank selection: ``--rank-sweep 4,8,16`` trains each rank briefly, picks one, then the full run uses it.

Each candidate rank gets a fresh adapter on the base and ``--rank-sweep-steps`` optimizer steps on the task's
training examples minus a validation slice (the last tenth, at most ``--eval-examples``; never the held-out set the
final accuracy is reported on). On the validation slice it is scored by exact-match accuracy (greedy generation)
and by the mean answer loss.

The rule (``pick_rank``): the highest validation accuracy *per trainable parameter*; ties go to the smaller rank.
When every rank scores 0 (a budget too short to produce any exact match) accuracy says nothing, and the lowest
validation loss picks instead. Stated plainly: per-parameter scoring favours small ranks, so a rank 4x larger
must be 4x more accurate to win.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from edgeforge.errors import BadInputError

RULE = ("highest validation exact-match accuracy per trainable parameter (ties: smaller rank); if every rank "
        "scores 0, the lowest validation answer loss")


def parse_ranks(text: str) -> tuple[int, ...]:
    """``"4,8,16"`` -> (4, 8, 16): distinct positive integers, sorted."""
    try:
        ranks = {int(p) for p in text.split(",") if p.strip()}
    except ValueError:
        raise ValueError(f"expected comma-separated ranks such as 4,8,16, found {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise ValueError(f"expected comma-separated positive ranks such as 4,8,16, found {text!r}")
    return tuple(sorted(ranks))


def pick_rank(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The chosen entry of ``results`` ([{"rank", "trainable_params", "accuracy", "loss"}, ...]) by ``RULE``."""
    if not results:
        raise ValueError("no rank-sweep results to pick from")
    by_rank = sorted(results, key=lambda r: r["rank"])
    if all(r["accuracy"] <= 0 for r in by_rank):
        return min(by_rank, key=lambda r: r["loss"])  # min keeps the first (smallest rank) among equals
    return max(by_rank, key=lambda r: (r["accuracy"] / r["trainable_params"], -r["rank"]))


@torch.no_grad()
def _mean_answer_loss(model: Any, encoded: list[tuple[list[int], list[int]]], pad_id: int,
                      batch_size: int) -> float:
    from edgeforge.finetune.loss import answer_loss
    from edgeforge.tasks.examples import collate

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[i:i + batch_size], pad_id).items()}
        losses.append(float(answer_loss(model, batch)))
    model.train(was_training)
    return sum(losses) / max(1, len(losses))


def run_rank_sweep(base_dir: Path, cfg: Any, tokenizer: Any, train_ex: list[dict[str, Any]], device: torch.device,
                   log: Any) -> dict[str, Any]:
    """Train and score every rank of ``cfg.rank_sweep`` (cfg: edgeforge.finetune.run.FinetuneConfig); returns the
    record, with ``chosen_rank``."""
    from edgeforge.finetune.adapter import add_adapter, load_base
    from edgeforge.finetune.loss import answer_loss
    from edgeforge.tasks.examples import collate, encode_example
    from edgeforge.tasks.metrics import task_metrics
    from edgeforge.train.loop import TrainConfig, train

    steps = cfg.rank_sweep_steps or max(10, cfg.steps // 5)
    n_val = max(1, min(cfg.eval_examples, len(train_ex) // 10))
    if len(train_ex) <= n_val:
        raise BadInputError(f"--rank-sweep: expected at least {n_val + 1} training examples ({n_val} validate each "
                            f"rank, the rest train it), found {len(train_ex)}; give more task examples or drop "
                            "--rank-sweep and choose --rank yourself")
    fit_ex, val_ex = train_ex[:-n_val], train_ex[-n_val:]
    encoded = [encode_example(tokenizer, e["messages"], cfg.max_seq_len) for e in fit_ex]
    val_encoded = [encode_example(tokenizer, e["messages"], cfg.max_seq_len) for e in val_ex]
    pad = tokenizer.pad_token_id
    t0 = time.perf_counter()
    results = []
    tokens = 0
    for rank in cfg.rank_sweep:
        t_rank = time.perf_counter()
        rcfg = cfg.model_copy(update={"rank": rank, "rank_sweep": ()})
        model = add_adapter(load_base(base_dir, cfg.method, device), rcfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        def batches(start_step: int, model_rows: list[Any] = encoded) -> Any:
            step = start_step
            while True:  # the same seeded draws for every rank: the ranks see the same examples
                rng = random.Random(cfg.seed * 1_000_003 + step)
                yield collate(rng.sample(model_rows, min(cfg.batch_size, len(model_rows))), pad)
                step += 1

        def step_fn(batch: dict[str, torch.Tensor], m: Any = model) -> tuple[torch.Tensor, dict[str, float]]:
            loss = answer_loss(m, batch)
            return loss, {"ce": float(loss.detach())}

        tcfg = TrainConfig(steps=steps, lr=cfg.lr, warmup_steps=max(1, steps // 20), seed=cfg.seed,
                           checkpoint_every=0)
        state = train(model, step_fn, batches, tcfg, ckpt_dir=None, desc=f"rank sweep r={rank}")
        tokens += state.tokens
        t_eval = time.perf_counter()
        acc = task_metrics(model, tokenizer, val_ex)["task_accuracy"]
        loss = _mean_answer_loss(model, val_encoded, pad, cfg.batch_size)
        results.append({"rank": rank, "trainable_params": trainable, "accuracy": acc, "loss": loss,
                        "accuracy_per_million_params": acc / trainable * 1e6, "train_seconds": round(state.seconds, 1),
                        "eval_seconds": round(time.perf_counter() - t_eval, 1),
                        "seconds": round(time.perf_counter() - t_rank, 1)})
        log(f"rank sweep: rank {rank}: {trainable:,} trainable parameters, validation accuracy {acc:.1%}, "
            f"answer loss {loss:.3f} ({results[-1]['seconds']:.0f} s)")
        del model, step_fn, batches
    chosen = pick_rank(results)
    log(f"rank sweep: chose rank {chosen['rank']} ({RULE.split(';')[0]})")
    return {"ranks": list(cfg.rank_sweep), "steps_per_rank": steps, "validation_examples": n_val, "rule": RULE,
            "results": results, "chosen_rank": chosen["rank"], "tokens": tokens,
            "seconds": round(time.perf_counter() - t0, 1)}
