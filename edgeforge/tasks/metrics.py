"""Task scoring: greedy answers from a torch model or an exported artifact, exact match and valid-JSON rate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from edgeforge.progress import progress


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
    with progress("task evaluation", total=len(examples), unit="example") as shown:
        try:
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                prompts = [tokenizer.apply_chat_template(e["messages"][:-1], add_generation_prompt=True,
                                                         tokenize=False) for e in chunk]
                enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                for row in gen[:, enc["input_ids"].shape[1]:]:
                    out.append(tokenizer.decode(row, skip_special_tokens=True))
                shown.advance(len(chunk))
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
    from edgeforge.verify.artifact import open_engine

    engine = open_engine(artifact, n_ctx=512)
    exact = valid = 0
    with progress(f"task evaluation of {artifact.name}", total=len(examples), unit="example") as shown:
        for ex in examples:
            prompt = tokenizer.apply_chat_template(ex["messages"][:-1], add_generation_prompt=True, tokenize=True)
            ids = engine.greedy(list(prompt), max_new_tokens, tokenizer.eos_token_id)
            got = tokenizer.decode(ids, skip_special_tokens=True)
            want = _parse(ex["messages"][-1]["content"])
            parsed = _parse(got)
            valid += parsed is not None
            exact += parsed == want if want is not None else got.strip() == ex["messages"][-1]["content"].strip()
            shown.advance()
    n = max(1, len(examples))
    return {"task_accuracy": exact / n, "valid_json_rate": valid / n, "n_examples": len(examples)}
