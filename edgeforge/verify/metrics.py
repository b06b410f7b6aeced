"""How close an artifact's next-token distributions are to its source model's. Pure numpy; no engine here.

All functions take per-position log-probabilities of shape [n_tokens, vocab] (float32 or float64) and the token ids
of shape [n_tokens] that were fed in. Position i predicts token i + 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[n, vocab] logits -> [n, vocab] log-probabilities, computed in float64 for stability."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(ref_logprobs: np.ndarray, test_logprobs: np.ndarray) -> float:
    """Mean over positions of KL(ref || test) = sum_v p_ref (log p_ref - log p_test)."""
    p = np.exp(ref_logprobs)
    return float((p * (ref_logprobs - test_logprobs)).sum(-1).mean())


def top1_agreement(ref_logprobs: np.ndarray, test_logprobs: np.ndarray) -> float:
    """Fraction of positions where both put their highest probability on the same token."""
    return float((ref_logprobs.argmax(-1) == test_logprobs.argmax(-1)).mean())


def perplexity(logprobs: np.ndarray, token_ids: np.ndarray) -> float:
    """exp(mean negative log-likelihood) of tokens 1..n under predictions 0..n-1."""
    nll = -logprobs[np.arange(len(token_ids) - 1), token_ids[1:]]
    return float(np.exp(nll.mean()))


@dataclass(frozen=True)
class Agreement:
    """An artifact against its reference over the same tokens."""

    n_tokens: int
    mean_kl: float
    top1_agreement: float
    perplexity_reference: float
    perplexity_artifact: float

    @property
    def perplexity_delta_pct(self) -> float:
        return 100.0 * (self.perplexity_artifact / self.perplexity_reference - 1.0)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "perplexity_delta_pct": self.perplexity_delta_pct}


def agreement(ref_logits: np.ndarray, test_logits: np.ndarray, token_ids: np.ndarray) -> Agreement:
    """Compare two [n_tokens, vocab] logit arrays computed on ``token_ids`` (shape [n_tokens])."""
    if ref_logits.shape != test_logits.shape:
        raise ValueError(f"logit shapes differ: reference {ref_logits.shape}, artifact {test_logits.shape}; "
                         "the artifact's vocabulary must equal its source model's")
    ref, test = log_softmax(ref_logits), log_softmax(test_logits)
    return Agreement(
        n_tokens=len(token_ids),
        mean_kl=mean_kl(ref, test),
        top1_agreement=top1_agreement(ref, test),
        perplexity_reference=perplexity(ref, token_ids),
        perplexity_artifact=perplexity(test, token_ids),
    )
