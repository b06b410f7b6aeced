"""On-policy distillation (GKD, Agarwal et al. 2024): the student generates, the teacher scores the student's samples.

With ``--on-policy-ratio`` λ, a share λ of the micro-batches is on-policy: each sequence keeps its first
``seq_len - n`` data tokens as the prompt, the current student samples ``n = --on-policy-tokens`` continuation tokens
(temperature 1, no gradient), and the KD loss is taken on exactly the positions that predict those sampled tokens,
with the teacher's distributions on the student's own continuation. The other micro-batches are the usual off-policy
data. On-policy sequences keep the data's length, so the token budget (and the teacher's cost per micro-batch) is
that of plain KD; the generation is extra (``n`` incremental student forwards per on-policy micro-batch).

Which micro-batches: GKD draws Bernoulli(λ) per batch; here micro-batch i is on-policy when
``floor((i + 1) λ) > floor(i λ)``, so exactly ``floor(n λ)`` of the first n micro-batches are on-policy (the ratio
holds in every run and window, with no sampling noise). Sampling uses a generator seeded by the micro-batch index:
a resumed run regenerates the same continuations.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor, nn


def _ratio(ratio: float) -> Fraction:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"on-policy ratio: expected a share in [0, 1], found {ratio}")
    return Fraction(ratio).limit_denominator(10_000)  # exact arithmetic: 0.3 * 10 must give 3, not 2.9999


def is_on_policy(micro_index: int, ratio: float) -> bool:
    """Whether global micro-batch ``micro_index`` (0-based) is on-policy at mix ratio ``ratio``."""
    r = _ratio(ratio)
    return math.floor((micro_index + 1) * r) > math.floor(micro_index * r)


@torch.no_grad()
def sample_continuation(model: nn.Module, prompt: Tensor, n_tokens: int, temperature: float = 1.0,
                        generator: torch.Generator | None = None) -> Tensor:
    """Sample ``n_tokens`` from ``model`` after ``prompt`` [B, P] (KV cache, ancestral sampling): [B, n_tokens]."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens: expected >= 1, found {n_tokens}")
    out = model(input_ids=prompt, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    tokens = []
    for i in range(n_tokens):
        probs = torch.softmax(logits.float() / temperature, -1)
        tok = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
        tokens.append(tok)
        if i + 1 < n_tokens:
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
    return torch.cat(tokens, 1)


def on_policy_batch(model: nn.Module, input_ids: Tensor, n_tokens: int, seed: int,
                    micro_index: int) -> tuple[Tensor, int]:
    """An on-policy version of a data micro-batch: (ids [B, S], start).

    input_ids: [B, S]. The first ``S - n_tokens`` tokens are kept as the prompt and the student ``model`` samples the
    rest; ``start = S - n_tokens - 1`` is the first position whose prediction (of a sampled token) enters the loss:
    positions ``start .. S - 2`` predict the n sampled tokens.
    """
    seq_len = input_ids.shape[1]
    if not 1 <= n_tokens < seq_len:
        raise ValueError(f"on-policy tokens: expected 1 .. {seq_len - 1} (below --seq-len), found {n_tokens}")
    prompt = input_ids[:, : seq_len - n_tokens]
    g = torch.Generator(device=input_ids.device).manual_seed(seed * 1_000_003 + 104_729 * micro_index + 3)
    was_training = model.training
    model.eval()
    try:
        gen = sample_continuation(model, prompt, n_tokens, 1.0, g)
    finally:
        model.train(was_training)
    return torch.cat([prompt, gen], 1), seq_len - n_tokens - 1
