"""The base model and its adapter: load (4-bit for QLoRA), attach LoRA/DoRA with peft, merge and check the merge."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from edgeforge.errors import BadInputError, EdgeforgeError, QualityGateError
from edgeforge.finetune.config import FinetuneConfig, Method
from edgeforge.models.files import save_tokenizer
from edgeforge.tasks.metrics import SCORE_FIELDS, task_metrics
from edgeforge.verify.metrics import log_softmax, mean_kl, top1_agreement


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
    return check_training_memory("finetune", cfg.method, arch, cfg.batch_size, cfg.max_seq_len, device.type,
                                 checkpointing=cfg.gradient_checkpointing)


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
    """Attach the LoRA/DoRA adapter of ``cfg`` to ``model``; ``--target-modules`` is checked against the model first.
    ``method: full`` attaches nothing: every weight of ``model`` is trained."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    checkpointing = cfg.gradient_checkpointing
    if checkpointing:
        # Non-reentrant checkpointing: gradients reach the adapters of a frozen base without
        # enable_input_require_grads; activations are recomputed layer by layer in the backward pass.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    check_target_modules(model, cfg.target_modules)
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
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


#: Merged vs the full-precision adapter model it came from: the same function, so only float rounding differs.
MERGE_TOLERANCE = 1e-3
#: QLoRA: merged (full-precision base + adapter) vs the 4-bit adapter model that was trained and evaluated. They
#: differ by the base's NF4 quantization error: the gap a user takes on by shipping the merged model. Max |logit
#: difference| grows with the logits' scale (1.2 on the tiny test model, 10-13 on the 135M teacher), so the gate is
#: on the distributions: mean KL(4-bit adapter || merged) per token. Measured on CPU after 2-3 training steps, over
#: 128 / 512 held-out tokens: tiny random model 0.012 / 0.013; SmolLM2-135M (itself dequantized from Q4_1, so NF4
#: is a second rounding) 0.23 / 0.28, top-1 agreement 66% / 70%, perplexity 16.7 -> 19.4 / 19.5 -> 25.0 (merged
#: -> 4-bit). 0.5 is about twice the largest measured, so NF4's own error passes and a merged model far from the
#: trained one does not. The merge itself is gated separately, at MERGE_TOLERANCE against the full-precision
#: adapter model.
QLORA_MAX_MEAN_KL = 0.5
#: Weight files of an earlier run that must not sit beside the newly merged weights (a stale shard or a top-level
#: adapter_config.json would make transformers load something else).
STALE_MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "adapter_config.json")


def merged_weights(peft_model: Any) -> Any:
    """peft's merge: the adapter folded into the base weights, a plain transformers model."""
    return peft_model.merge_and_unload()


def publish_model_dir(model: Any, tokenizer: Any, out: Path) -> None:
    """Save ``model`` and ``tokenizer`` as the directory ``out``, published by rename: written into ``OUT.partial``,
    then swapped in, so ``out`` never holds half a model.

    Entries already in ``out`` that the save does not write (the adapter, the checkpoint, the run's record) are
    carried over by rename; weight files of an earlier run are not (STALE_MODEL_FILES)."""
    staging = out.with_name(out.name + ".partial")
    replaced = out.with_name(out.name + ".replaced")
    for d in (staging, replaced):
        shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    save_tokenizer(tokenizer, staging)
    if out.is_dir():
        for entry in sorted(out.iterdir()):
            stale = entry.is_file() and any(entry.match(pattern) for pattern in STALE_MODEL_FILES)
            if not stale and not (staging / entry.name).exists():
                os.replace(entry, staging / entry.name)
        os.replace(out, replaced)
    os.replace(staging, out)
    shutil.rmtree(replaced, ignore_errors=True)


def merge_check(merged_logits: torch.Tensor, fp_adapter_logits: torch.Tensor, adapter_logits: torch.Tensor,
                method: Method) -> dict[str, Any]:
    """The merge's quality gate. Logits: [n_tokens, vocab] of the merged model, of the full-precision adapter
    model it was merged from, and of the adapter model as trained (the 4-bit one for QLoRA). ``failures`` lists
    what broke the gate (empty: passed)."""
    diff = float((merged_logits - fp_adapter_logits).abs().max())
    check: dict[str, Any] = {"logit_max_abs_diff": diff, "tolerance": MERGE_TOLERANCE}
    failures = [] if diff <= MERGE_TOLERANCE else [
        f"max |logit difference| {diff:.3g} vs the adapter model it was merged from > {MERGE_TOLERANCE:g}"]
    if method == "qlora":
        ref, test = log_softmax(adapter_logits.numpy()), log_softmax(merged_logits.numpy())
        kl = mean_kl(ref, test)
        check.update(qlora_vs_4bit_adapter_logit_max_abs_diff=float((merged_logits - adapter_logits).abs().max()),
                     qlora_vs_4bit_adapter_mean_kl=kl, qlora_vs_4bit_adapter_top1=top1_agreement(ref, test),
                     qlora_max_mean_kl=QLORA_MAX_MEAN_KL)
        if not kl <= QLORA_MAX_MEAN_KL:  # NaN fails too
            failures.append(f"mean KL {kl:.3g} vs the 4-bit adapter model > {QLORA_MAX_MEAN_KL:g}")
    check["equal_within_tolerance"] = not failures
    check["failures"] = failures
    return check


def merge_adapter(model: Any, base_dir: Path, adapter_dir: Path, out: Path, tokenizer: Any, method: Method,
                  held_ex: list[dict], text: str, log: Any) -> dict[str, Any]:
    """Merge into the full-precision base, check the merged model against the adapter model, and publish it as
    ``out`` (config.json at its top). Raises QualityGateError (nothing published, the adapter kept in
    ``adapter_dir``) when the merged logits differ beyond tolerance (``merge_check``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = next(model.parameters()).device
    adapter_logits = logits_on(model, tokenizer, text)
    if method == "qlora":
        log("QLoRA: merging into the full-precision base, not into the 4-bit weights (merging into NF4 would "
            "round the merged weights to 4 bits and lose the fine-tune); the adapter was trained against the "
            "4-bit base, so the merged model differs from the adapter model by the base's quantization error")
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
        fp_adapter = PeftModel.from_pretrained(base, str(adapter_dir))
        fp_adapter_logits = logits_on(fp_adapter, tokenizer, text)
    else:
        fp_adapter, fp_adapter_logits = model, adapter_logits
    merged = merged_weights(fp_adapter)
    check = merge_check(logits_on(merged, tokenizer, text), fp_adapter_logits, adapter_logits, method)
    if check["failures"]:
        raise QualityGateError(f"merge check failed: {'; '.join(check['failures'])}; the merged model is not "
                               f"written, the adapter is kept in {adapter_dir}")
    publish_model_dir(merged, tokenizer, out)
    metrics = task_metrics(merged, tokenizer, held_ex)
    log(f"merged: max |logit difference| vs the adapter model {check['logit_max_abs_diff']:.2e} (tolerance "
        f"{MERGE_TOLERANCE:g}); task accuracy {metrics['task_accuracy']:.1%}")
    return {**check, **{k: metrics[k] for k in SCORE_FIELDS}}
