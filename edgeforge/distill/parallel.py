"""A distillation run over several processes (torchrun): which techniques may run there, how the student is spread
over the processes (``ddp`` replicas or ``fsdp`` shards), gathering a sharded student back, and the barrier."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeforge.distill.config import DistillConfig
from edgeforge.errors import BadInputError


def barrier() -> None:
    """Wait for every process of the run (nothing to wait for on one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_world(cfg: DistillConfig, world: int) -> None:
    """The techniques that run on one process only (not yet under torchrun)."""
    if world <= 1:
        return
    if cfg.progressive:
        raise BadInputError("--progressive: runs on one process; run it without torchrun")
    if cfg.task_loss != "none":
        raise BadInputError("--task-loss: the supervised task term runs on one process; run it without torchrun "
                            "or use --task-loss none")
    if cfg.on_policy_ratio > 0 and cfg.parallel == "fsdp":
        raise BadInputError("--on-policy-ratio: sampling from an FSDP-sharded student is not supported; use "
                            "--parallel ddp")


def wrap_parallel(kd_module: nn.Module, parallel: str, world: int, device: torch.device) -> nn.Module:
    """The module the loop trains (an edgeforge.distill.student.StudentForKD), spread over ``world`` processes:
    ``ddp`` wraps it in DistributedDataParallel; ``fsdp`` shards it in place with FSDP2 (``fully_shard`` on each
    decoder layer, then on the root, which groups the embedding, final norm, LM head and the projector). One process:
    returned as it is."""
    if world <= 1:
        return kd_module
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(kd_module, device_ids=[device.index]
                                                   if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP communicates on the current CUDA device
    mesh = init_device_mesh(device.type, (world,))
    for layer in kd_module.student.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(kd_module, mesh=mesh)
    return kd_module


def gathered_student(kd_module: nn.Module, config: Any, main: bool) -> nn.Module | None:
    """An FSDP-sharded student gathered whole into a plain (unwrapped) HF model on the CPU of the main process; None
    on the others. A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(kd_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    prefix = "student."
    weights = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    del full
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n in missing if n.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"gathering the FSDP student: missing {sorted(set(missing) - tied)[:3]}, unexpected "
                           f"{sorted(unexpected)[:3]}")
    return model


def trained_student(cfg: DistillConfig, kd_module: nn.Module, student: nn.Module, world: int,
                    main: bool) -> nn.Module | None:
    """The trained student as a plain HF model for the evaluation and the save (None on the other FSDP processes)."""
    if world > 1 and cfg.parallel == "fsdp":
        # FSDP: every process holds only shards of the student, and the evaluation and the save need all of it.
        # Chosen: gather the full weights (a collective, every process) into a plain unwrapped copy on the main
        # process, then run the same single-process evaluate() and save_pretrained() as DDP. Simplest correct
        # option: no FSDP forwards to keep in lock-step on every process while only the main one records metrics,
        # and a plain HF model to save. It fits: every process built the whole student on its device before
        # sharding it; FSDP is there for the training state (gradients, AdamW moments), not the weights alone.
        return gathered_student(kd_module, student.config, main)
    return student
