"""The base model and its adapter: load (4-bit for QLoRA), attach LoRA/DoRA with peft, merge and check the merge."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from edgeforge.errors import BadInputError, EdgeforgeError
from edgeforge.finetune.config import FinetuneConfig, Method
from edgeforge.tasks.metrics import task_metrics


def base_model_dir(model_ref: str) -> tuple[Path, str]:
    """An HF directory for the base model (a GGUF base is dequantized into the cache once)."""
    from edgeforge.models.refs import resolve_model

    ref = resolve_model(model_ref)
    if ref.format == "gguf":
        from edgeforge.models.gguf_hf import hf_dir_for, materialize_hf
        from edgeforge.paths import edgeforge_home

        return materialize_hf(ref.path, hf_dir_for(ref.path, edgeforge_home())), ref.name
    return ref.path, ref.name


def check_memory(model_ref: str, cfg: FinetuneConfig, device: torch.device) -> int:
    """Pre-flight, before any weights are loaded: refuse (one line) when the predicted training memory exceeds what
    this machine has available (edgeforge.train.preflight). Returns the prediction in bytes."""
    from edgeforge.models.refs import read_arch, resolve_model
    from edgeforge.train.preflight import check_training_memory

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
    """Attach the LoRA/DoRA adapter of ``cfg`` to ``model``; ``--target-modules`` is checked against the model first."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, cfg.target_modules)
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or 2 * cfg.rank, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules, use_dora=cfg.method == "dora", use_rslora=cfg.rslora,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def check_target_modules(model: Any, target_modules: str | list[str]) -> None:
    """Every ``--target-modules`` entry must name at least one layer LoRA can adapt (a linear layer or an
    embedding), matched as peft matches it (the full module name, or its last dotted parts); otherwise one
    BadInputError listing the model's candidates. A typo among good names would otherwise train fewer layers
    silently, and a list matching nothing came out of peft as an internal error."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    if target_modules == "all-linear":
        return
    adaptable = [name for name, module in model.named_modules()
                 if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))]
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unmatched = [entry for entry in entries if not any(
        check_target_module_exists(LoraConfig(target_modules=[entry] if isinstance(target_modules, list) else entry),
                                   name) for name in adaptable)]
    if unmatched:
        candidates = sorted({name.rsplit(".", 1)[-1] for name in adaptable})
        raise BadInputError(f"--target-modules {','.join(entries)}: expected names of the model's linear or "
                            f"embedding layers, found none named {', '.join(unmatched)}; candidates: "
                            f"{', '.join(candidates)} (or all-linear)")


@torch.no_grad()
def logits_on(model: Any, tokenizer: Any, text: str, n_tokens: int = 128) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()


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
