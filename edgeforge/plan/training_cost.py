"""What training costs: FLOPs, time and money on a training profile, and whether it fits that device's memory.

FLOPs follow the usual transformer accounting: a forward pass is 2 FLOPs per parameter per token, a full
backward pass 4 (gradients of inputs and of weights), a LoRA backward about 2 (input gradients only; the
adapters are tiny). Achieved throughput is ``MODEL_FLOPS_UTILIZATION`` of peak.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from edgeforge.models.refs import ModelArch
from edgeforge.plan.profiles import DeviceProfile

Method = Literal["full", "lora", "dora", "qlora", "distill"]
#: The methods that train adapters on a frozen base (edgeforge.finetune): gradient checkpointing is theirs to choose.
ADAPTER_METHODS = ("lora", "dora", "qlora")

# A well-tuned training loop reaches about a third of peak on a GPU (MFU); CPUs reach less in fp32.
MODEL_FLOPS_UTILIZATION = {"gpu": 0.35, "cpu": 0.25}
# CPUs train in fp32; an fp32 FMA lane does 1/4 of the int8 dot-product work per cycle (128-bit: 4 vs 16 lanes).
CPU_FP32_PER_INT8_OP = 0.25
# Optimizer state: fp32 master weights 4 + gradients 4 + AdamW moments 8 bytes per trained parameter.
FULL_TRAINING_BYTES_PER_PARAM = 16
# NF4 with double quantization: 4 bits plus ~0.127 bits of scales per weight (QLoRA paper, section 3).
NF4_BYTES_PER_PARAM = 4.127 / 8
DEFAULT_LORA_RANK = 16
CUDA_CONTEXT_BYTES = 512 * 1024**2
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def training_throughput_flops_per_s(profile: DeviceProfile) -> tuple[float, str]:
    """Sustained training FLOP/s on the profile, and whether it trains on 'gpu' or 'cpu'."""
    gpus = [a for a in profile.accelerators if a.kind == "gpu"]
    if gpus and any(r.backend in ("cuda", "metal", "vulkan") for r in profile.runtimes):
        return gpus[0].fp16_flops_per_s * MODEL_FLOPS_UTILIZATION["gpu"], "gpu"
    return profile.cpu.int8_ops_per_s * CPU_FP32_PER_INT8_OP * MODEL_FLOPS_UTILIZATION["cpu"], "cpu"


def training_flops(method: Method, tokens: int, params: int, teacher_params: int = 0) -> float:
    """FLOPs to train on ``tokens`` tokens. For distillation ``params`` is the student, plus a teacher forward."""
    if method == "full":
        return 6.0 * params * tokens
    if method in ADAPTER_METHODS:
        return 4.0 * params * tokens
    return (2.0 * teacher_params + 6.0 * params) * tokens


def lora_adapter_params(arch: ModelArch, rank: int = DEFAULT_LORA_RANK) -> int:
    """Parameters of LoRA adapters on every linear layer: rank x (in + out) for each of q, k, v, o, gate, up, down."""
    h, q, kv, inter = arch.hidden_size, arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim, \
        arch.intermediate_size
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 3 * (h + inter)
    return rank * per_layer * arch.n_layers


def activation_bytes(arch: ModelArch, batch: int, seq_len: int, checkpointing: bool) -> int:
    """Activation memory of one training step (bf16), after Korthikanti et al. 2022 (34 + 5*a*s/h bytes per
    hidden unit per token per layer). With checkpointing only each layer's input is kept, plus one layer in full.
    Logits and their gradient ([batch, seq_len, vocab] fp32, twice) are counted separately: they dominate for small
    models with large vocabularies.
    """
    per_layer = batch * seq_len * arch.hidden_size * (34 + 5 * arch.n_heads * seq_len / arch.hidden_size)
    layers = arch.n_layers * batch * seq_len * arch.hidden_size * 2 + per_layer if checkpointing else (
        arch.n_layers * per_layer)
    logits = 2 * batch * seq_len * arch.vocab_size * 4
    return int(layers + logits)


def dora_extra_bytes(arch: ModelArch, batch: int, seq_len: int) -> int:
    """What DoRA adds to LoRA (peft's implementation): a trained magnitude vector per adapted linear layer (its
    output features, with optimizer state), and for each adapted layer the base layer's output kept for the
    backward pass of the magnitude rescaling ([batch, seq_len, out] fp32 each); the per-layer weight norm is
    detached (DoRA paper, section 4.3), so the merged weight matrix it is computed from is transient."""
    h, q, kv, inter = arch.hidden_size, arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim, \
        arch.intermediate_size
    outputs_per_layer = q + 2 * kv + h + 2 * inter + h  # q, k, v, o, gate, up, down
    magnitudes = FULL_TRAINING_BYTES_PER_PARAM * outputs_per_layer * arch.n_layers
    return int(magnitudes + batch * seq_len * outputs_per_layer * 4 * arch.n_layers)


def training_memory_bytes(
    method: Method, arch: ModelArch, batch: int, seq_len: int, teacher: ModelArch | None = None,
    checkpointing: bool = False,
) -> int:
    """Peak memory of one training step for ``method`` at ``batch`` x ``seq_len`` tokens. ``checkpointing``: the
    adapter methods with gradient checkpointing (``finetune --gradient-checkpointing``); full fine-tuning and
    distillation in edgeforge never checkpoint."""
    n = arch.n_params
    if method == "full":
        state = FULL_TRAINING_BYTES_PER_PARAM * n
        act = activation_bytes(arch, batch, seq_len, checkpointing=False)
    elif method in ("lora", "dora"):
        state = 2 * n + FULL_TRAINING_BYTES_PER_PARAM * lora_adapter_params(arch)
        act = activation_bytes(arch, batch, seq_len, checkpointing=checkpointing)
        if method == "dora":
            act += dora_extra_bytes(arch, batch, seq_len)
    elif method == "qlora":
        # bitsandbytes keeps the embedding (and an untied output) in bf16; the decoder layers in NF4.
        embed = arch.embedding_params * (1 if arch.tied_embeddings else 2)
        state = (2 * embed + NF4_BYTES_PER_PARAM * (n - embed)
                 + FULL_TRAINING_BYTES_PER_PARAM * lora_adapter_params(arch))
        act = activation_bytes(arch, batch, seq_len, checkpointing=checkpointing)
    else:
        if teacher is None:
            raise ValueError("distillation memory needs the teacher's architecture")
        # Teacher in bf16 for inference; its logits kept for the KD loss ([batch, seq_len, vocab] fp32).
        state = 2 * teacher.n_params + FULL_TRAINING_BYTES_PER_PARAM * n
        act = activation_bytes(arch, batch, seq_len, checkpointing=False) + batch * seq_len * teacher.vocab_size * 4
    return int(state + act)


@dataclass(frozen=True)
class TrainingFit:
    method: str
    fits: bool
    max_batch_size: int
    bytes_at_batch_1: int
    bytes_at_max_batch: int
    budget_bytes: int
    seq_len: int
    #: an adapter method that fits only with gradient checkpointing (finetune --gradient-checkpointing)
    gradient_checkpointing: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def training_fit(
    method: Method, arch: ModelArch, profile: DeviceProfile, seq_len: int = 512, teacher: ModelArch | None = None
) -> TrainingFit:
    """Whether ``method`` fits the training profile's memory, and the largest batch size that does."""
    # A discrete GPU that trains is usually headless: all of its memory but the CUDA context is available. On
    # shared-memory devices the profile's budget (after the OS) applies.
    if profile.category == "gpu":
        budget = profile.memory_total_bytes - CUDA_CONTEXT_BYTES
    else:
        budget = profile.memory_budget_bytes
    # As edgeforge runs it: no gradient checkpointing; an adapter method that does not fit so is tried with it.
    for checkpointing in (False, True) if method in ADAPTER_METHODS else (False,):
        def need(b: int, ckpt: bool = checkpointing) -> int:
            return training_memory_bytes(method, arch, b, seq_len, teacher, checkpointing=ckpt)

        best = max((b for b in BATCH_SIZES if need(b) <= budget), default=0)
        if best:
            break
    at1 = need(1)
    return TrainingFit(
        method=method,
        fits=best > 0,
        max_batch_size=best,
        bytes_at_batch_1=at1,
        bytes_at_max_batch=need(best) if best else at1,
        budget_bytes=budget,
        seq_len=seq_len,
        gradient_checkpointing=bool(best) and checkpointing,
    )


@dataclass(frozen=True)
class TrainingCost:
    stage: str
    tokens: int
    flops: float
    hours: float
    cost: float | None
    training_profile: str

    def to_dict(self) -> dict:
        return asdict(self)


def training_cost(
    stage: str, flops: float, tokens: int, profile: DeviceProfile, price_per_hour: float | None
) -> TrainingCost:
    throughput, _ = training_throughput_flops_per_s(profile)
    hours = flops / throughput / 3600.0
    return TrainingCost(
        stage=stage,
        tokens=tokens,
        flops=flops,
        hours=hours,
        cost=None if price_per_hour is None else hours * price_per_hour,
        training_profile=profile.name,
    )


def serving_energy_wh_per_million_tokens(power_watts: float, decode_tokens_per_s: float) -> float:
    """Energy to decode a million tokens at ``power_watts``: W x seconds / 3600 = Wh."""
    return power_watts * (1e6 / decode_tokens_per_s) / 3600.0
