"""Elastic weight consolidation (EWC, Kirkpatrick et al. 2017) against forgetting during fine-tuning.

Before training, the diagonal Fisher information of the trainable parameters is estimated on general text (the
built-in training prose, never the held-out prose the forgetting metric uses): for each of ``--ewc-batches``
sequences, the squared gradient of its language-modelling loss, averaged. Training then adds

    penalty = λ/2 · Σ_i F_i (θ_i − θ0_i)²

with θ0 the weights at the start. Parameters that matter for general text (large F) are held near their start; the
others move freely. Its gradient, λ F (θ − θ0), always points away from θ0, so a descent step pulls back towards it.

Simplifications, stated: the empirical Fisher (gradients at the data's own tokens, not at labels sampled from the
model) over one sequence per estimate; F is normalised to mean 1 over all trainable entries, so λ is on the scale of
``--l2sp`` (EWC with F = 1 everywhere is L2-SP with weight λ/2) whatever the model size; for LoRA the trainable
parameters are the adapters, whose B matrices start at 0, so the Fisher of the A matrices is 0 at the start (the
update B·A is held back through B).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from edgeforge.errors import BadInputError


def fisher_diagonal(model: nn.Module, batches: Iterable[dict[str, Tensor]],
                    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor]) -> dict[str, Tensor]:
    """Mean squared gradient of ``loss_fn`` per trainable parameter over ``batches`` (one estimate per batch).

    Returns {name: F [same shape as the parameter], float32, on the parameter's device}. Gradients are cleared
    afterwards; the weights are unchanged.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it is
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if count == 0:
        raise ValueError("the Fisher estimate needs at least one batch")
    return {n: f / count for n, f in fisher.items()}


def normalise_fisher(fisher: dict[str, Tensor]) -> tuple[dict[str, Tensor], float]:
    """F / mean(F) over every entry of every parameter (mean 1), and the raw mean (0: returned unchanged)."""
    total = sum(float(f.sum()) for f in fisher.values())
    n = sum(f.numel() for f in fisher.values())
    mean = total / max(1, n)
    if mean <= 0:
        return fisher, 0.0
    return {k: f / mean for k, f in fisher.items()}, mean


class EWCPenalty:
    """``λ/2 Σ F (θ − θ0)²`` over the named parameters, θ0 = their values when this object is made."""

    def __init__(self, model: nn.Module, fisher: dict[str, Tensor], strength: float) -> None:
        if strength < 0:
            raise ValueError(f"EWC strength: expected >= 0, found {strength}")
        self.strength = float(strength)
        self.fisher = fisher
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if n in fisher}
        missing = set(fisher) - set(self.start)
        if missing:
            raise ValueError(f"Fisher entries for parameters the model lacks: {sorted(missing)[:3]}")

    def __call__(self, model: nn.Module) -> Tensor:
        """The penalty, a scalar with gradients to the model's parameters."""
        terms = [(self.fisher[n] * (p - self.start[n]) ** 2).sum() for n, p in model.named_parameters()
                 if n in self.fisher]
        return 0.5 * self.strength * torch.stack(terms).sum()


def general_text_batches(tokenizer: Any, n: int, seq_len: int = 128) -> list[dict[str, Tensor]]:
    """``n`` single-sequence batches ``{"input_ids": [1, seq_len]}`` of the built-in *training* prose (the held-out
    prose is what the forgetting metric measures, so it is never used for the estimate)."""
    from edgeforge.data.builtin import training_prose
    from edgeforge.data.text import pack

    ids = tokenizer(training_prose(max(20_000, n * seq_len * 6)), add_special_tokens=False)["input_ids"]
    seqs = pack(ids, seq_len)
    if len(seqs) < n:
        raise BadInputError(f"--ewc-batches {n}: expected at most {len(seqs)} (the built-in general text holds "
                            f"{len(seqs)} sequences of {seq_len} tokens, one per Fisher batch), found {n}; lower "
                            "--ewc-batches")
    stride = len(seqs) // n  # spread over the text, not only its first topic
    return [{"input_ids": seqs[i * stride][None]} for i in range(n)]


def lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy of the batch's own tokens (input_ids [B, S])."""
    ids = batch["input_ids"].to(next(model.parameters()).device)
    return model(input_ids=ids, labels=ids).loss


def setup_ewc(model: nn.Module, tokenizer: Any, strength: float, n_batches: int,
              log: Callable[[str], None]) -> tuple[EWCPenalty, dict[str, Any]]:
    """The EWC penalty for ``model`` at its current (starting) weights, and what the record says about it."""
    import time

    t0 = time.perf_counter()
    fisher, raw_mean = normalise_fisher(fisher_diagonal(model, general_text_batches(tokenizer, n_batches), lm_loss))
    penalty = EWCPenalty(model, fisher, strength)
    info = {"lambda": strength, "fisher_batches": n_batches, "fisher_seconds": round(time.perf_counter() - t0, 2),
            "fisher_raw_mean": raw_mean, "fisher_normalised_to_mean": 1.0,
            "fisher_max": max(float(f.max()) for f in fisher.values()),
            "parameters_with_zero_fisher": sum(1 for f in fisher.values() if float(f.max()) == 0.0),
            "parameters": len(fisher), "source": "built-in training prose (not the held-out prose)"}
    log(f"EWC: diagonal Fisher from {n_batches} general-text sequences in {info['fisher_seconds']:.0f} s "
        f"(raw mean {raw_mean:.3g}, normalised to 1); penalty λ/2 Σ F (θ − θ0)² with λ = {strength:g}")
    return penalty, info
