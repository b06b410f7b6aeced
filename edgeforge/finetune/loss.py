"""The fine-tuning losses and the forgetting metric: answer-only cross-entropy, general-text perplexity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from edgeforge.errors import BadInputError
from edgeforge.tasks.examples import IGNORE_INDEX


@dataclass
class AnswerLossStats:
    """What ``answer_loss`` saw: batches scored, and batches skipped because no label was an answer token (every
    answer cut off by --max-seq-len, say). The fine-tuning record carries ``skipped_batches``."""

    batches: int = 0
    skipped_batches: int = 0


def answer_loss(model: Any, batch: dict[str, torch.Tensor], stats: AnswerLossStats | None = None) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens only.

    The output projection runs only at the positions that predict an answer token: with a 49,152-token vocabulary
    the logits of every prompt position would cost more than the rest of a small model's forward pass.
    input_ids, labels, attention_mask: [batch, seq]. Position t predicts token t + 1.

    A batch without any answer token gives a zero loss that is still part of the graph (so backward and gradient
    accumulation run as usual and the step changes nothing), not the NaN a mean over no tokens would give; it is
    counted in ``stats.skipped_batches``.
    """
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = core.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX  # [batch, seq - 1]
    logits = core.lm_head(hidden[:, :-1][keep])  # [n_answer_tokens, vocab]
    if stats is not None:
        stats.batches += 1
    if not bool(keep.any()):
        if stats is not None:
            stats.skipped_batches += 1
        return logits.float().sum() * 0.0  # a sum over [0, vocab]: 0, with the graph kept
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


@torch.no_grad()
def general_perplexity(model: Any, tokenizer: Any, seq_len: int = 256, n_seqs: int = 8) -> float:
    """Perplexity on the built-in held-out prose: the forgetting metric."""
    from edgeforge.data.builtin import heldout_prose
    from edgeforge.data.text import pack

    device = next(model.parameters()).device
    ids = tokenizer(heldout_prose(), add_special_tokens=False)["input_ids"]
    seqs = pack(ids, seq_len)[:n_seqs].to(device)
    if len(seqs) < n_seqs:
        raise BadInputError(f"the built-in held-out prose has {len(ids)} tokens: {len(seqs)} sequences of {seq_len}, "
                            f"{n_seqs} asked; ask for fewer or shorter sequences")
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
