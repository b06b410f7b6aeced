"""The training loop shared by distillation and fine-tuning.

AdamW, linear warm-up then cosine decay, gradient accumulation, gradient clipping, bf16 autocast where the device
supports it, seed control, a progress bar, atomic checkpoints every N steps with exact resume, a budget in steps,
tokens or wall time, CUDA when present, and data-parallel runs under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA).
A model already sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) trains as it is: its checkpoints hold the
full (gathered) state, written by the main process and loaded back into the shards on every process.

A stage supplies a ``step_fn`` that computes the loss of one micro-batch; the loop owns everything else.
Checkpoints hold only tensors and plain numbers (safetensors for weights, ``torch.load(weights_only=True)`` for the
optimizer), never pickled objects.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from edgeforge.progress import progress

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

StepFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
"""One micro-batch -> (scalar loss to backpropagate, metrics to log such as {"kl": ...})."""


@dataclass
class TrainConfig:
    """Loop settings. Every field has a default; the stage's CLI maps its flags onto these."""

    steps: int = 100  # optimizer steps (the budget unless max_tokens / max_seconds end it sooner)
    lr: float = 3e-4  # peak learning rate, reached after warm-up
    warmup_steps: int = 10  # linear warm-up from 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables
    seed: int = 0
    checkpoint_every: int = 20  # steps between checkpoints; 0 disables
    max_tokens: int | None = None  # stop after this many training tokens
    max_seconds: float | None = None  # stop after this much wall time
    bf16: bool | None = None  # None: bf16 autocast on CUDA when supported, fp32 on CPU
    log_every: int = 1


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss_curve: list[dict[str, float]] = field(default_factory=list)


def pick_device() -> torch.device:
    """CUDA when present (and visible), else CPU. Honest: no silent fallback once CUDA is chosen."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- distributed
def dist_init() -> tuple[int, int]:
    """(rank, world_size); initialises the process group when launched by torchrun / accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# ---------------------------------------------------------------- checkpoints
def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded with FSDP2 (``fully_shard``): its parameters are DTensor shards, and saving or loading
    its state is a collective every process takes part in."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return False
    return isinstance(model, FSDPModule)


def _trainable_names(model: nn.Module) -> set[str]:
    core = model.module if hasattr(model, "module") else model
    return {n for n, p in core.named_parameters() if p.requires_grad}


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    core = model.module if hasattr(model, "module") else model
    return {n: p.detach().cpu().contiguous() for n, p in core.named_parameters() if p.requires_grad}


def _full_state_options(**kw: bool) -> StateDictOptions:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def save_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    """Write ``ckpt_dir`` atomically: a half-written checkpoint is never taken for a complete one.

    An FSDP2 model: every process must call this (gathering the full state is a collective); the main process writes
    the same files as an unsharded run (weights by name; the optimizer state keyed by parameter name).
    """
    from safetensors.torch import save_file

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = _full_state_options(cpu_offload=True)  # full tensors, on the CPU of the main process only
        full = get_model_state_dict(model, options=opts)
        optim_state: Any = get_optimizer_state_dict(model, optimizer, options=opts)
        if not is_main_process():
            return
        names = _trainable_names(model)  # tied weights appear once, as in named_parameters()
        weights = {n: t.contiguous() for n, t in full.items() if n in names}
        optim_format = "fqn"
    else:
        weights, optim_state, optim_format = _trainable_state(model), optimizer.state_dict(), "param_ids"
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optim_state, "optimizer_format": optim_format, "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state)), encoding="utf-8")
    old = ckpt_dir.with_name(ckpt_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt_dir.exists():
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore weights, optimizer state and RNG. An FSDP2 model: every process calls this and reads the full state,
    which ``set_model_state_dict`` / ``set_optimizer_state_dict`` cut into this process's shards."""
    from safetensors.torch import load_file

    from edgeforge.errors import BadInputError

    core = model.module if hasattr(model, "module") else model
    try:
        weights = load_file(str(ckpt_dir / "trainable.safetensors"))
        # weights_only=True: a planted pickle payload is refused, never run
        extra = torch.load(ckpt_dir / "optimizer.pt", weights_only=True, map_location="cpu")
        if not isinstance(extra, dict) or "optimizer" not in extra or "rng_cpu" not in extra:
            raise ValueError("optimizer.pt is not an edgeforge checkpoint")
    except Exception as e:  # noqa: BLE001
        # Whatever fails while reading a checkpoint means it is damaged or not ours: weights_only's refusal of a
        # pickle payload (UnpicklingError), SafetensorError, OSError, EOFError, a missing key...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise BadInputError(f"checkpoint {ckpt_dir} is damaged or not edgeforge's ({first}); remove it to start "
                            "over, or choose another --out") from None
    missing = set(weights) - _trainable_names(model)
    if missing:
        raise BadInputError(f"checkpoint {ckpt_dir} holds parameters this model lacks: {sorted(missing)[:3]}; "
                            "it belongs to another run (remove it or choose another --out)")
    sharded = is_sharded(model)
    optim_format = extra.get("optimizer_format", "param_ids")
    if optim_format != ("fqn" if sharded else "param_ids"):
        raise BadInputError(f"checkpoint {ckpt_dir} was written by a run {'without' if sharded else 'with'} FSDP; "
                         "resume it with the same parallel mode and number of processes")
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(model, weights, options=_full_state_options(strict=False))  # type: ignore[arg-type]
        set_optimizer_state_dict(model, optimizer, extra["optimizer"], options=_full_state_options())
    else:
        params = dict(core.named_parameters())
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t.to(params[n].device))
        optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng_cpu"])
    if extra["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng_cuda"])
    data = json.loads((ckpt_dir / "state.json").read_text(encoding="utf-8"))
    return TrainState(**data)


# ---------------------------------------------------------------- the loop
def train(
    model: nn.Module,
    step_fn: StepFn,
    batches: Callable[[int], Iterator[dict[str, torch.Tensor]]],
    cfg: TrainConfig,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    desc: str = "train",
    on_log: Callable[[dict[str, float]], None] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
) -> TrainState:
    """Train the parameters of ``model`` that require grad.

    ``batches(start_step)`` yields micro-batches (dicts of tensors with ``input_ids`` [batch, seq]) in a fixed order
    from optimizer step ``start_step`` on, so a resumed run sees exactly the data the interrupted one would have.
    ``param_groups`` (optional) splits the trainable parameters into groups ``{"params": [...], "lr_scale": s}``;
    each group's learning rate is the schedule's times its ``lr_scale`` (layer-wise learning rates). Returns the
    final state; the loss curve holds one entry per logged step.
    """
    device = next(model.parameters()).device
    sharded = is_sharded(model)  # FSDP2: checkpoints are collectives, every process takes part
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    optimizer, params = _optimizer(model, cfg, param_groups)
    state = TrainState()
    if resume and ckpt_dir is not None and (ckpt_dir / "state.json").is_file():
        state = load_checkpoint(ckpt_dir, model, optimizer)
    else:
        seed_everything(cfg.seed)
    model.train()
    it = batches(state.step)
    t_start = time.perf_counter() - state.seconds
    micro_batches = _MicroBatches(step_fn, it, cfg.grad_accum, device, use_bf16)
    with progress(desc, total=cfg.steps, unit="step", completed=state.step, enabled=is_main_process()) as bar:
        while state.step < cfg.steps and not _budget_spent(state, cfg, t_start):
            sums = _optimizer_step(optimizer, params, micro_batches, cfg, state, t_start)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                state.loss_curve.append({"step": state.step, "tokens": state.tokens, **sums})
                if on_log:
                    on_log(state.loss_curve[-1])
            bar.advance(note=", ".join(f"{k} {v:.3g}" for k, v in sums.items() if k in ("loss", "kl", "tokens_per_s")))
            if ckpt_dir is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 \
                    and (sharded or is_main_process()):
                save_checkpoint(ckpt_dir, model, optimizer, state)
    if ckpt_dir is not None and (sharded or is_main_process()) and cfg.checkpoint_every:
        save_checkpoint(ckpt_dir, model, optimizer, state)
    model.eval()
    return state


def _optimizer(model: nn.Module, cfg: TrainConfig,
               param_groups: list[dict[str, Any]] | None) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """(AdamW over the trainable parameters, those parameters); ``param_groups`` must hold exactly them."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups: list[dict[str, Any]] = [{"params": params, "lr_scale": 1.0}]
    if param_groups is not None:
        groups = [{"params": list(g["params"]), "lr_scale": float(g.get("lr_scale", 1.0))} for g in param_groups]
        grouped = {id(p) for g in groups for p in g["params"]}
        if grouped != {id(p) for p in params}:
            raise ValueError("param_groups must hold exactly the model's trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay), params


def _budget_spent(state: TrainState, cfg: TrainConfig, t_start: float) -> bool:
    """Whether the token or wall-time budget ends the run before the next step."""
    if cfg.max_tokens is not None and state.tokens >= cfg.max_tokens:
        return True
    return cfg.max_seconds is not None and time.perf_counter() - t_start >= cfg.max_seconds


@dataclass
class _MicroBatches:
    """The micro-batches of one optimizer step: forward (under autocast) and backward of each, gradients summed."""

    step_fn: StepFn
    it: Iterator[dict[str, torch.Tensor]]
    grad_accum: int
    device: torch.device
    use_bf16: bool

    def accumulate(self) -> tuple[dict[str, float], int]:
        """(the metrics averaged over the step's micro-batches, the step's tokens)."""
        sums: dict[str, float] = {}
        step_tokens = 0
        for _ in range(self.grad_accum):
            batch = {k: v.to(self.device) for k, v in next(self.it).items()}
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
                loss, metrics = self.step_fn(batch)
            (loss / self.grad_accum).backward()
            step_tokens += batch_tokens(batch)
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v / self.grad_accum
        return sums, step_tokens


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens a batch trains on: its attention mask's ones (padding excluded), else every id (packed rows).

    batch: input_ids [b, S] int64, optionally attention_mask [b, S] (1 = a real token, 0 = padding). tokens/s, the
    ``max_tokens`` budget and FLOPs per token are counted from this, so padding never inflates them.
    """
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _optimizer_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], micro: _MicroBatches,
                    cfg: TrainConfig, state: TrainState, t_start: float) -> dict[str, float]:
    """One optimizer step at the schedule's learning rate; advances ``state`` and returns the step's metrics."""
    t0 = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg) * group.get("lr_scale", 1.0)
    optimizer.zero_grad(set_to_none=True)
    sums, step_tokens = micro.accumulate()
    if cfg.max_grad_norm > 0:  # FSDP2: DTensor grads; the norm is reduced over all shards (a DTensor)
        sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    optimizer.step()
    state.step += 1
    state.tokens += step_tokens
    state.seconds = time.perf_counter() - t_start
    sums["tokens_per_s"] = step_tokens / max(1e-9, time.perf_counter() - t0)
    sums["lr"] = lr_at(state.step - 1, cfg)
    return sums
