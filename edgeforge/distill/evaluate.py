"""Held-out metrics of a distillation run, all against the teacher in fp32: ``kl_to_teacher`` = mean over positions of
KL(teacher || model); ``perplexity`` = exp(mean next-token NLL); ``top1_agreement`` = share of positions whose most
likely token is the teacher's; ``retention`` (RETENTION_DEFINITION). Also the task accuracy of a run with --task and
the side-by-side comparison of ``edgeforge eval``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from edgeforge.distill.teacher import Teacher, check_vocabulary, resolve_teacher

RETENTION_DEFINITION = "teacher_perplexity / student_perplexity on the held-out text (1.0 = as good as the teacher)"
KL_GAP_DEFINITION = "1 - kl_to_teacher(after) / kl_to_teacher(before)"


@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor) -> np.ndarray:
    """[S, V] float32 logits of one sequence ``ids`` [S]."""
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


def student_against_teacher(student: nn.Module, teacher: Teacher, heldout: Tensor,
                            device: torch.device) -> dict[str, float]:
    """The student's held-out metrics (``evaluate``) against the fp32 teacher, loaded for this and freed after; one
    teacher forward pass per held-out sequence."""
    t_eval = teacher.load(torch.float32, device)
    student.eval()
    return evaluate({"student": student}, t_eval, heldout)["student"]


def task_accuracy(student: nn.Module, tokenizer: Any, task: Any) -> dict[str, Any]:
    """Exact-match task accuracy of ``student`` on the task's held-out examples (greedy), as edgeforge finetune
    measures it (task: edgeforge.distill.techniques.rationale.DistillTask)."""
    from edgeforge.tasks.metrics import task_metrics

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return task_metrics(student, tokenizer, task.heldout)


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
