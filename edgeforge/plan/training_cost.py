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


#: Training devices edgeforge runs on: "cpu" (fp32 throughout) or "cuda" (bf16 autocast, edgeforge.train.loop).
TrainDevice = Literal["cpu", "cuda"]
#: Bytes of one activation element: fp32 on a CPU, bf16 under CUDA autocast.
ACTIVATION_BYTES: dict[str, int] = {"cpu": 4, "cuda": 2}
#: Bytes per frozen base weight: edgeforge loads every base model in fp32 (finetune.adapter.load_base), on every
#: device; peft's prepare_model_for_kbit_training also keeps QLoRA's embedding, head and norms in fp32.
FROZEN_WEIGHT_BYTES = 4
#: Logits copies alive at the peak of a step, fp32 ([batch, seq_len, vocab] each): the logits the model returns and
#: the loss's log-softmax that autograd keeps (the gradient takes the place of one of them in the backward pass).
LOGITS_COPIES = 2
#: DoRA's weight-sized tensors kept for the backward pass, per adapted layer (peft computes the norm of W + BA in
#: fp32): measured with autograd's saved-tensor hooks on tiny Llamas, about 1.5 weights' worth of fp32.
DORA_WEIGHT_COPIES = 1.5


def layer_activation_elements(arch: ModelArch, adapters: bool) -> int:
    """Activation elements autograd keeps per token for one Llama-style decoder layer (SDPA attention, no
    attention-probability matrix), counted tensor by tensor: the attention block keeps its input, the RMSNorm's
    normalised and scaled outputs (3h), the rotated query and the attention output (2q), key and value (2kv); the
    MLP its input and both norm outputs (3h), gate, SiLU(gate), up and their product (4I). With LoRA adapters on
    every linear layer each adapter also keeps its dropped-out input (in_features of q, k, v, o, gate, up, down:
    5h + q + I) and its rank-r intermediate (7r). tests/test_planner.py checks the count against the tensors
    autograd actually saves."""
    h, q, kv, inter = arch.hidden_size, arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim, \
        arch.intermediate_size
    base = 6 * h + 2 * q + 2 * kv + 4 * inter
    return base + (5 * h + q + inter) + 7 * DEFAULT_LORA_RANK if adapters else base


def activation_bytes(arch: ModelArch, batch: int, seq_len: int, checkpointing: bool, device: TrainDevice = "cuda",
                     adapters: bool = False, dropout: bool = True) -> int:
    """Activation memory of one training step at ``batch`` x ``seq_len`` tokens on ``device``.

    Per layer ``layer_activation_elements`` at ACTIVATION_BYTES (an adapter's dropout mask adds a byte per input
    element when ``dropout``); with checkpointing only each layer's input is kept, plus one layer in full. The
    logits (LOGITS_COPIES x [batch, seq_len, vocab] fp32) are counted apart: they dominate for small models with
    large vocabularies.
    """
    width = ACTIVATION_BYTES[device]
    h, q, inter = arch.hidden_size, arch.n_heads * arch.head_dim, arch.intermediate_size
    per_token = layer_activation_elements(arch, adapters) * width
    if adapters and dropout:
        per_token += 5 * h + q + inter  # the bool mask of each adapter's dropout
    tokens = batch * seq_len
    if checkpointing:
        layers = tokens * (arch.n_layers * h * width + per_token)
    else:
        layers = tokens * arch.n_layers * per_token
    logits = LOGITS_COPIES * tokens * arch.vocab_size * 4
    return int(layers + logits)


def adapted_output_features(arch: ModelArch) -> int:
    """Output features of one decoder layer's adapted linear layers: q, k, v, o, gate, up, down."""
    h, q, kv, inter = arch.hidden_size, arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim, \
        arch.intermediate_size
    return q + 2 * kv + h + 2 * inter + h


def heap_retained_bytes(method: Method, arch: ModelArch, batch: int, seq_len: int,
                        device: TrainDevice = "cuda", checkpointing: bool = False) -> int:
    """Freed transients that stay resident at a CPU step's peak: what the adapter methods add beyond the tensors
    autograd keeps. glibc serves allocations under its dynamic mmap threshold (which rises to the largest chunk freed,
    up to 32 MiB) from the heap and does not hand back a freed chunk that lies between live ones, so a temporary
    made between two kept activations stays in the resident set until the step ends. peft's adapter forward makes
    two output-sized temporaries per adapted layer (lora_B's output and its scaled copy, then added to the base
    output); bitsandbytes dequantizes every NF4 weight to a full fp32 copy for its matmul. Full fine-tuning and
    distillation make no such per-layer temporaries. With ``MALLOC_MMAP_THRESHOLD_=131072`` (every such tensor
    mmapped and returned on free; runs 31-48% longer here) the bundled teacher's LoRA step at batch 8 peaks within
    6% of the count without this term, and at 4.5 GB with the default allocator (benchmarks/train_memory.py
    --malloc-mmap-threshold). On CUDA the caching allocator hands a freed block to the next request of its size, so
    nothing is added there; with gradient checkpointing (not measured) the forward keeps only each layer's input, and
    nothing is counted either."""
    if device != "cpu" or checkpointing or method not in ("lora", "dora", "qlora"):
        return 0
    outputs_per_layer = adapted_output_features(arch)
    retained = 2 * batch * seq_len * outputs_per_layer * ACTIVATION_BYTES[device] * arch.n_layers
    if method == "qlora":
        retained += FROZEN_WEIGHT_BYTES * arch.layer_params * arch.n_layers
    return int(retained)


def dora_extra_bytes(arch: ModelArch, batch: int, seq_len: int, device: TrainDevice = "cuda") -> int:
    """What DoRA adds to LoRA (peft's implementation): a trained magnitude vector per adapted linear layer (its
    output features, with optimizer state); per adapted layer the base layer's output kept for the backward pass of
    the magnitude rescaling ([batch, seq_len, out] each); and the weight-sized fp32 tensors of the norm of W + BA
    (DORA_WEIGHT_COPIES per layer, independent of the batch)."""
    outputs_per_layer = adapted_output_features(arch)
    magnitudes = FULL_TRAINING_BYTES_PER_PARAM * outputs_per_layer * arch.n_layers
    kept_outputs = batch * seq_len * outputs_per_layer * ACTIVATION_BYTES[device] * arch.n_layers
    weight_norms = DORA_WEIGHT_COPIES * arch.layer_params * 4 * arch.n_layers
    return int(magnitudes + kept_outputs + weight_norms)


def training_memory_bytes(
    method: Method, arch: ModelArch, batch: int, seq_len: int, teacher: ModelArch | None = None,
    checkpointing: bool = False, device: TrainDevice = "cuda",
) -> int:
    """Peak memory of one training step for ``method`` at ``batch`` x ``seq_len`` tokens on ``device``, as
    edgeforge runs it: frozen weights in fp32 (FROZEN_WEIGHT_BYTES), activations at the device's compute precision.
    ``checkpointing``: the adapter methods with gradient checkpointing (``finetune --gradient-checkpointing``); full
    fine-tuning and distillation in edgeforge never checkpoint."""
    n = arch.n_params
    if method == "full":
        state = FULL_TRAINING_BYTES_PER_PARAM * n
        act = activation_bytes(arch, batch, seq_len, checkpointing=False, device=device)
    elif method in ("lora", "dora"):
        state = FROZEN_WEIGHT_BYTES * n + FULL_TRAINING_BYTES_PER_PARAM * lora_adapter_params(arch)
        act = activation_bytes(arch, batch, seq_len, checkpointing, device, adapters=True)
        if method == "dora":
            act += dora_extra_bytes(arch, batch, seq_len, device)
        act += heap_retained_bytes(method, arch, batch, seq_len, device, checkpointing)
    elif method == "qlora":
        # bitsandbytes stores the decoder layers in NF4; the embedding (and an untied output) stay at full size
        embed = arch.embedding_params * (1 if arch.tied_embeddings else 2)
        state = (FROZEN_WEIGHT_BYTES * embed + NF4_BYTES_PER_PARAM * (n - embed)
                 + FULL_TRAINING_BYTES_PER_PARAM * lora_adapter_params(arch))
        act = (activation_bytes(arch, batch, seq_len, checkpointing, device, adapters=True)
               + heap_retained_bytes(method, arch, batch, seq_len, device, checkpointing))
    else:
        if teacher is None:
            raise ValueError("distillation memory needs the teacher's architecture")
        # The teacher for inference (bf16 on CUDA; fp32 on a CPU, counted so even where AMX lets it run in bf16);
        # its logits kept for the KD loss ([batch, seq_len, vocab] fp32).
        state = ACTIVATION_BYTES[device] * teacher.n_params + FULL_TRAINING_BYTES_PER_PARAM * n
        act = (activation_bytes(arch, batch, seq_len, checkpointing=False, device=device)
               + batch * seq_len * teacher.vocab_size * 4)
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
    _, kind = training_throughput_flops_per_s(profile)
    device: TrainDevice = "cuda" if kind == "gpu" else "cpu"
    # As edgeforge runs it: no gradient checkpointing; an adapter method that does not fit so is tried with it.
    for checkpointing in (False, True) if method in ADAPTER_METHODS else (False,):
        def need(b: int, ckpt: bool = checkpointing) -> int:
            return training_memory_bytes(method, arch, b, seq_len, teacher, checkpointing=ckpt, device=device)

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
