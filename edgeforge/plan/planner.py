"""The planner: does the model fit the device, how fast will it run, and should it be fine-tuned, distilled, or both.

The decision follows the comparison edgeforge is built on: *compression* (distillation into a smaller student)
when a model is too big or too slow for the device, *specialisation* (fine-tuning) when it fits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgeforge.models.refs import ModelArch, count_params
from edgeforge.plan.estimator import SpeedEstimate, estimate_speed
from edgeforge.plan.profiles import DeviceProfile
from edgeforge.plan.sizing import (
    GGUF_QUANT_TYPES,
    ONNX_BITS_PER_WEIGHT,
    gguf_bytes_by_type,
    kv_cache_bytes,
    memory_estimate,
    runtime_overhead_bytes,
)
from edgeforge.plan.task_cost import TaskCost
from edgeforge.plan.training_cost import (
    serving_energy_wh_per_million_tokens,
    training_cost,
    training_fit,
    training_flops,
)

DEFAULT_CONTEXT = 2048
DEFAULT_PROMPT_TOKENS = 128
# Token budgets the cost estimate assumes (override with --distill-tokens / --finetune-tokens). Minitron-style
# distillation of a pruned student reuses a small fraction of pretraining data; task fine-tunes are small.
DEFAULT_DISTILL_TOKENS = 100_000_000
DEFAULT_FINETUNE_TOKENS = 2_000_000
# At a fixed size, a larger model at ~4-5 bits beats a smaller one at 8 bits (Dettmers & Zettlemoyer 2023,
# "The case for 4-bit precision"), so students are sized at a type of at least 4 bits: the one with the best quality
# per byte (student_quant).
MIN_STUDENT_BITS = 4.0
#: Mean KL (nats per token) of each type against the fp32 torch model, measured on the bundled teacher
#: (SmolLM2-135M-Instruct) over 1,000 tokens of held-out prose by ``benchmarks/export_table.py`` (README, "Size,
#: quality and speed of every export"), each type made as edgeforge's export makes it (an importance matrix for
#: IQ4_XS only, edgeforge.export.gguf.NEEDS_IMATRIX). An ordering, not a promise for other models: SmolLM2's
#: 576-wide rows make llama.cpp store Q5_K_M's K-quant rows as Q5_1, which is why Q5_K_M measures worse than Q4_K_M
#: here. Unquantized types are 0.
EXPECTED_MEAN_KL: dict[str, float] = {
    "F32": 0.0, "F16": 0.0, "BF16": 0.0, "Q8_0": 0.0039, "Q6_K": 0.0089, "Q5_K_M": 0.0662, "Q4_K_M": 0.0522,
    "Q4_0": 0.2468, "IQ4_XS": 0.0762, "fp32": 0.0, "fp16": 0.0, "int8": 0.0041, "int4": 0.0791,
    # with the importance matrix, 1,000 tokens of held-out prose: benchmarks/budget_quant.py's table in the README
    "Q3_K_M": 0.0778,
}
#: A type without a measurement is taken at the worst measured KL: it must not win the choice by being unknown.
_UNKNOWN_TYPE_KL = max(EXPECTED_MEAN_KL.values())
_APPROX_BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.7, "Q4_K_M": 4.9,
                "Q4_0": 4.5, "IQ4_XS": 4.25, "Q3_K_M": 3.9, **ONNX_BITS_PER_WEIGHT}
#: Lower-bit GGUF types of the teacher that the plan weighs against distillation when none of the profile's
#: preferred types meets the goal (with an importance matrix; edgeforge.export.gguf.NEEDS_IMATRIX). No IQ3 type:
#: its expected KL would have to be measured on the bundled teacher, whose 576-wide rows llama.cpp cannot store at
#: IQ3_XXS / IQ3_S (tensor_type_fallback in llama-quant.cpp writes them as IQ4_NL, 4.5 bits), so a measurement there
#: would be IQ4_NL's, not IQ3's; the only model offline cannot give the ordering.
LOW_BIT_TEACHER_QUANTS = ("Q3_K_M",)
#: A lower-bit teacher is taken instead of distillation only up to this expected mean KL (``--quant auto``'s
#: default budget): distillation kept 71-87% of the fine-tuned teacher's task accuracy (benchmarks/pipelines.py),
#: where an export within this KL lost at most 2.3 points against its source in the same runs.
LOW_BIT_MAX_KL = 0.1


@dataclass(frozen=True)
class Candidate:
    """One (model shape, quant) evaluated on the profile."""

    quant: str
    weights_bytes: int
    kv_cache_bytes: int
    runtime_overhead_bytes: int
    total_bytes: int
    fits: bool
    estimated_decode_tokens_per_s: float
    estimated_prefill_tokens_per_s: float
    estimated_ttft_ms: float
    meets_latency_goal: bool

    @property
    def ok(self) -> bool:
        return self.fits and self.meets_latency_goal


@dataclass
class Plan:
    profile: str
    teacher: str
    teacher_arch: dict[str, Any]
    format: str
    backend: str
    context_tokens: int
    prompt_tokens: int
    budget_bytes: int
    quant: str
    fits: bool
    weights_bytes: int
    kv_cache_bytes: int
    runtime_overhead_bytes: int
    total_bytes: int
    estimated_decode_tokens_per_s: float
    estimated_prefill_tokens_per_s: float
    estimated_ttft_ms: float
    latency_goals: dict[str, float]
    meets_latency_goal: bool
    decision: str
    reason: str
    student: dict[str, Any] | None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    serving_energy_wh_per_million_tokens: float = 0.0
    training: dict[str, Any] = field(default_factory=dict)
    exportability: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] | None = None  # TaskCost.to_dict() of ``plan --task``: what the fine-tuning figures read
    gguf_fit: dict[str, Any] | None = None  # fit_room(): the budget a fitted mix fills, between which presets
    onnx_fit: dict[str, Any] | None = None  # the same for an ONNX 4/8-bit mix (a plan for --format onnx)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(
    arch: ModelArch, profile: DeviceProfile, fmt: str, quant: str, context: int, prompt_tokens: int
) -> Candidate:
    mem = memory_estimate(arch, fmt, quant, context)
    runtime = profile.runtime_for(fmt)  # type: ignore[arg-type]
    by_type = gguf_bytes_by_type(arch, quant, streamed_only=True) if fmt == "gguf" else None
    speed: SpeedEstimate = estimate_speed(
        profile, arch, mem.weights_bytes, prompt_tokens, runtime.backend if runtime else None,
        streamed_bytes_by_type=by_type,
    )
    goals = profile.latency_goals
    return Candidate(
        quant=quant,
        weights_bytes=mem.weights_bytes,
        kv_cache_bytes=mem.kv_cache_bytes,
        runtime_overhead_bytes=mem.runtime_overhead_bytes,
        total_bytes=mem.total_bytes,
        fits=mem.total_bytes <= profile.memory_budget_bytes,
        estimated_decode_tokens_per_s=speed.decode_tokens_per_s,
        estimated_prefill_tokens_per_s=speed.prefill_tokens_per_s,
        estimated_ttft_ms=speed.ttft_ms,
        meets_latency_goal=speed.decode_tokens_per_s >= goals.decode_tokens_per_s and speed.ttft_ms <= goals.ttft_ms,
    )


def weights_budget_bytes(arch: ModelArch, profile: DeviceProfile, context: int) -> int:
    """The most weight bytes of ``arch`` (a GGUF file, an ONNX graph with its data) that fit ``profile`` at
    ``context`` tokens: the profile's memory budget minus the KV cache and the runtime's own memory, as
    ``evaluate`` counts them for either format."""
    return (profile.memory_budget_bytes - kv_cache_bytes(arch, context)
            - runtime_overhead_bytes(arch, context))


def fit_room(arch: ModelArch, profile: DeviceProfile, context: int, fmt: str = "gguf") -> dict[str, Any]:
    """Where the ``fmt`` budget of ``arch`` on ``profile`` sits among the profile's preferred preset types: the
    largest preset that fits it, the smallest that does not, and the bytes a fitted mix (``export gguf|onnx --quant
    fit``, ``build``'s last fallback) can use beyond the largest fitting preset. The mix itself is chosen from
    sensitivities measured on the real model's file (edgeforge.export.fit, edgeforge.export.onnx.fit), which a plan
    does not have."""
    budget = weights_budget_bytes(arch, profile, context)
    # an ONNX mix is of 4- and 8-bit MatMulNBits only: its room is between int4 and int8, whatever the profile prefers
    quants = _quants_for(profile, fmt) if fmt == "gguf" else ["int4", "int8"]
    sizes = {q: memory_estimate(arch, fmt, q, context).weights_bytes for q in quants}
    under = [q for q in sizes if sizes[q] <= budget]
    over = [q for q in sizes if sizes[q] > budget]
    below = max(under, key=lambda q: sizes[q]) if under else None
    above = min(over, key=lambda q: sizes[q]) if over else None
    return {"budget_bytes": budget, "largest_preset_that_fits": below,
            "largest_preset_bytes": sizes[below] if below else None, "smallest_preset_over": above,
            "smallest_over_bytes": sizes[above] if above else None, "between_presets": above is not None,
            "room_bytes": budget - sizes[below] if below else budget}


def _quants_for(profile: DeviceProfile, fmt: str) -> list[str]:
    prefs = profile.preferred_quants.gguf if fmt == "gguf" else list(profile.preferred_quants.onnx)
    known = GGUF_QUANT_TYPES if fmt == "gguf" else ONNX_BITS_PER_WEIGHT
    return [q for q in prefs if q in known] or (["Q4_K_M"] if fmt == "gguf" else ["int8"])


def quant_cost(quant: str) -> float:
    """What a type costs in the student choice: its bits per weight x (1 + its expected mean KL), so that 0.1 nats
    of KL weigh as much as 10% more bytes. Q4_0 (4.5 bits, KL 0.247 on the bundled teacher) then costs more than
    Q4_K_M (4.9 bits, KL 0.052): 13% fewer bytes do not pay for 5x the KL; IQ4_XS (4.25, 0.076) costs least."""
    return _APPROX_BITS.get(quant, 16) * (1 + EXPECTED_MEAN_KL.get(quant, _UNKNOWN_TYPE_KL))


def student_quant(profile: DeviceProfile, fmt: str) -> str:
    """The preferred type of at least MIN_STUDENT_BITS bits per weight with the best quality per byte
    (the lowest ``quant_cost``); the most compact types are taken only when their KL is worth the bytes saved."""
    quants = _quants_for(profile, fmt)
    ok = [q for q in quants if _APPROX_BITS.get(q, 16) >= MIN_STUDENT_BITS]
    return min(ok or quants, key=quant_cost)


def shrink(arch: ModelArch, n_layers: int, width_fraction: float = 1.0) -> ModelArch:
    """The student shape: ``n_layers`` decoder layers, MLP width scaled by ``width_fraction`` (multiple of 64).

    Hidden size, heads and vocabulary are kept, so the student shares the teacher's tokenizer and embeddings.
    """
    inter = max(64, int(arch.intermediate_size * width_fraction) // 64 * 64)
    params = count_params(n_layers, arch.hidden_size, arch.n_heads, arch.n_kv_heads, arch.head_dim, inter,
                          arch.vocab_size, arch.tied_embeddings, arch.qkv_bias)
    return replace(arch, n_layers=n_layers, intermediate_size=inter, n_params=params)


def find_student(
    arch: ModelArch, profile: DeviceProfile, fmt: str, quant: str, context: int, prompt_tokens: int
) -> tuple[ModelArch, Candidate] | None:
    """The largest student (depth first, then MLP width) that fits and meets the latency goal, or None."""
    best: tuple[ModelArch, Candidate] | None = None
    for width in (1.0, 0.75, 0.5):
        for layers in range(arch.n_layers - 1, 0, -1):
            s = shrink(arch, layers, width)
            c = evaluate(s, profile, fmt, quant, context, prompt_tokens)
            if c.ok:
                if best is None or s.n_params > best[0].n_params:
                    best = (s, c)
                break
    return best


@dataclass(frozen=True)
class _Decision:
    """What the plan recommends, why, and the candidate whose figures headline it (the teacher's or the student's)."""

    decision: str  # fine-tune | distill | distill+fine-tune
    reason: str
    headline: Candidate
    student: dict[str, Any] | None = None  # the plan's student entry, when a student meets the goal
    student_arch: ModelArch | None = None


def plan(
    arch: ModelArch,
    profile: DeviceProfile,
    teacher_name: str,
    context: int = DEFAULT_CONTEXT,
    quant: str | None = None,
    fmt: str | None = None,
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
    has_task: bool = False,
    train_profile: DeviceProfile | None = None,
    price_per_hour: float | None = None,
    distill_tokens: int = DEFAULT_DISTILL_TOKENS,
    finetune_tokens: int | None = None,
    task: TaskCost | None = None,
) -> Plan:
    """Plan ``arch`` on ``profile``: memory, speed, the decision with its reason, the student, the cost.

    ``task`` (``plan --task``): the fine-tuning tokens and the training rows' length come from the task's own
    examples (``edgeforge.plan.task_cost``), and it implies ``has_task``. ``finetune_tokens`` given explicitly wins
    over the task's; with neither, DEFAULT_FINETUNE_TOKENS.
    """
    has_task = has_task or task is not None
    fmt = fmt or profile.primary_runtime.format
    runtime = profile.runtime_for(fmt)  # type: ignore[arg-type]
    if runtime is None:
        raise ValueError(f"profile '{profile.name}' runs no {fmt} artifacts; it runs "
                         f"{', '.join(sorted({r.format for r in profile.runtimes}))}")
    quants = [quant] if quant else _quants_for(profile, fmt)
    candidates = [evaluate(arch, profile, fmt, q, context, prompt_tokens) for q in quants]
    chosen = next((c for c in candidates if c.ok), None)
    goals = profile.latency_goals
    if chosen is not None:
        d = _Decision("fine-tune", _fits_reason(chosen, profile), chosen)
    else:
        d = _compress(arch, profile, fmt, quant, candidates, context, prompt_tokens, has_task)
        low_bit = None if quant is not None or fmt != "gguf" else _low_bit_teacher(arch, profile, quants, context,
                                                                                   prompt_tokens)
        if low_bit is not None and not low_bit.ok:  # weighed, and short too: say so beside the distillation
            d = replace(d, reason=d.reason + f" (the teacher at {low_bit.quant}, expected mean KL "
                        f"{EXPECTED_MEAN_KL[low_bit.quant]:.3f}, would need {low_bit.total_bytes / 1e6:.0f} MB and run "
                        f"at {low_bit.estimated_decode_tokens_per_s:.1f} tokens/s: "
                        + ("short of the goal too)" if low_bit.fits else "it does not fit either)"))
            low_bit = None
        if low_bit is not None:  # a lower-bit quant of the teacher meets the goal: no distillation needed
            candidates.append(low_bit)
            chosen = low_bit
            reason = _low_bit_reason(low_bit, candidates[:-1], profile, d)
            if train_profile is not None and d.student_arch is not None:
                flops = training_flops("distill", distill_tokens, d.student_arch.n_params, arch.n_params)
                hours = training_cost("distill", flops, distill_tokens, train_profile, price_per_hour).hours
                reason += f"; it avoids about {hours:.1f} h of distillation on {train_profile.name}"
            d = _Decision("fine-tune", reason, low_bit)
    headline, decision = d.headline, d.decision
    # The teacher's own figures: at the chosen quant, or at the most compact one when nothing is good enough.
    teacher_c = chosen or min(candidates, key=lambda c: c.total_bytes)
    energy = serving_energy_wh_per_million_tokens(profile.power_watts, headline.estimated_decode_tokens_per_s)
    training = _training_section(arch, d.student_arch, decision, train_profile, price_per_hour, distill_tokens,
                                 finetune_tokens, task)
    return Plan(
        profile=profile.name,
        teacher=teacher_name,
        teacher_arch=arch.to_dict(),
        format=fmt,
        backend=runtime.backend,
        context_tokens=context,
        prompt_tokens=prompt_tokens,
        budget_bytes=profile.memory_budget_bytes,
        quant=headline.quant,  # what ships: the teacher's quant, or the student's
        fits=teacher_c.fits,
        weights_bytes=teacher_c.weights_bytes,
        kv_cache_bytes=teacher_c.kv_cache_bytes,
        runtime_overhead_bytes=teacher_c.runtime_overhead_bytes,
        total_bytes=teacher_c.total_bytes,
        estimated_decode_tokens_per_s=teacher_c.estimated_decode_tokens_per_s,
        estimated_prefill_tokens_per_s=teacher_c.estimated_prefill_tokens_per_s,
        estimated_ttft_ms=teacher_c.estimated_ttft_ms,
        latency_goals=goals.model_dump(),
        meets_latency_goal=chosen is not None,
        decision=decision,
        reason=d.reason,
        student=d.student,
        candidates=[asdict(c) for c in candidates],
        serving_energy_wh_per_million_tokens=energy,
        training=training,
        task=task.to_dict() if task is not None else None,
        gguf_fit=fit_room(d.student_arch or arch, profile, context) if fmt == "gguf" else None,
        onnx_fit=fit_room(d.student_arch or arch, profile, context, "onnx") if fmt == "onnx" else None,
    )


def _low_bit_teacher(arch: ModelArch, profile: DeviceProfile, tried: list[str], context: int,
                     prompt_tokens: int) -> Candidate | None:
    """The first of LOW_BIT_TEACHER_QUANTS (not among the preferred types tried, expected mean KL within
    LOW_BIT_MAX_KL) at which the teacher fits and meets the goal; else the last one weighed (``ok`` False, for the
    plan to say why it does not do); None when none was weighed."""
    weighed = None
    for q in LOW_BIT_TEACHER_QUANTS:
        if q in tried or EXPECTED_MEAN_KL.get(q, _UNKNOWN_TYPE_KL) > LOW_BIT_MAX_KL:
            continue
        weighed = evaluate(arch, profile, "gguf", q, context, prompt_tokens)
        if weighed.ok:
            return weighed
    return weighed


def _low_bit_reason(c: Candidate, preferred: list[Candidate], profile: DeviceProfile, avoided: _Decision) -> str:
    best = max(preferred, key=lambda x: (x.fits, x.estimated_decode_tokens_per_s))
    student = avoided.student_arch
    instead = (f"instead of distilling a {student.n_layers}-layer student" if student is not None
               else "instead of distilling")
    return ("at the profile's preferred types it " + "; ".join(_shortfalls(best, profile)) + f", but at {c.quant} "
            f"(with an importance matrix; expected mean KL {EXPECTED_MEAN_KL[c.quant]:.3f}, measured on the bundled "
            f"teacher) it fits ({c.total_bytes / 1e6:.0f} MB of {profile.memory_budget_bytes / 1e6:.0f} MB) and "
            f"meets the goal ({c.estimated_decode_tokens_per_s:.1f} tokens/s decode, TTFT "
            f"{c.estimated_ttft_ms:.0f} ms): quantize the teacher {instead} (distillation kept 71-87% of the "
            "fine-tuned teacher's task accuracy in benchmarks/pipelines.py) and fine-tune it on the task data")


def _fits_reason(chosen: Candidate, profile: DeviceProfile) -> str:
    goals = profile.latency_goals
    return (
        f"fits: {chosen.total_bytes / 1e6:.0f} MB of {profile.memory_budget_bytes / 1e6:.0f} MB at {chosen.quant}, "
        f"and meets the goal ({chosen.estimated_decode_tokens_per_s:.1f} >= {goals.decode_tokens_per_s:g} "
        f"tokens/s decode, TTFT {chosen.estimated_ttft_ms:.0f} <= {goals.ttft_ms:g} ms); no compression needed, "
        "so specialise it: fine-tune on the task data"
    )


def _shortfalls(best: Candidate, profile: DeviceProfile) -> list[str]:
    """Why the best of the teacher's candidates is not good enough: memory, speed, or both."""
    goals = profile.latency_goals
    why = []
    if not best.fits:
        why.append(f"needs {best.total_bytes / 1e6:.0f} MB at {best.quant} but the budget is "
                   f"{profile.memory_budget_bytes / 1e6:.0f} MB")
    if not best.meets_latency_goal:
        why.append(f"runs at {best.estimated_decode_tokens_per_s:.1f} tokens/s decode and TTFT "
                   f"{best.estimated_ttft_ms:.0f} ms against a goal of {goals.decode_tokens_per_s:g} tokens/s "
                   f"and {goals.ttft_ms:g} ms")
    return why


def _compress(arch: ModelArch, profile: DeviceProfile, fmt: str, quant: str | None, candidates: list[Candidate],
              context: int, prompt_tokens: int, has_task: bool) -> _Decision:
    """No quant of the teacher both fits and meets the goal: distill into the largest pruned student that does."""
    best = max(candidates, key=lambda c: (c.fits, c.estimated_decode_tokens_per_s))
    why = _shortfalls(best, profile)
    sq = quant or student_quant(profile, fmt)
    found = find_student(arch, profile, fmt, sq, context, prompt_tokens)
    decision = "distill+fine-tune" if has_task else "distill"
    if found is None:
        headline = evaluate(shrink(arch, 1, 0.5), profile, fmt, sq, context, prompt_tokens)
        reason = ("too big or too slow even at " + best.quant + " (" + "; ".join(why) + "), and no depth/width "
                  "pruned student of it meets the goal either: choose a smaller teacher or another device")
        return _Decision(decision, reason, headline)
    student_arch, headline = found
    student = {
        "layers": student_arch.n_layers,
        "hidden_size": student_arch.hidden_size,
        "intermediate_size": student_arch.intermediate_size,
        "params": student_arch.n_params,
        "quant": sq,
        "expected_mean_kl": EXPECTED_MEAN_KL.get(sq),
        "weights_bytes": headline.weights_bytes,
        "estimated_decode_tokens_per_s": headline.estimated_decode_tokens_per_s,
    }
    reason = (
        f"the teacher is too big or too slow for {profile.name} (" + "; ".join(why) + "): compress it. "
        + ("Fine-tune the teacher on the task data, then distill it" if has_task else "Distill it")
        + f" into a {student_arch.n_layers}-layer student ({student_arch.n_params / 1e6:.0f}M params, "
        f"pruned from {arch.n_layers} layers) that runs at {headline.estimated_decode_tokens_per_s:.1f} "
        f"tokens/s at {sq}"
    )
    return _Decision(decision, reason, headline, student, student_arch)


def _training_section(
    teacher: ModelArch,
    student: ModelArch | None,
    decision: str,
    train_profile: DeviceProfile | None,
    price_per_hour: float | None,
    distill_tokens: int,
    finetune_tokens: int | None,
    task: TaskCost | None,
) -> dict[str, Any]:
    if train_profile is None:
        return {}
    if finetune_tokens is None:
        finetune_tokens = task.finetune_tokens if task is not None else DEFAULT_FINETUNE_TOKENS
    # a task's rows are as long as its longest example (capped at max_seq_len); without one, 512-token rows
    seq_len = {"seq_len": task.seq_len} if task is not None else {}
    tuned = student or teacher
    stages = []
    if student is not None:
        flops = training_flops("distill", distill_tokens, student.n_params, teacher.n_params)
        stages.append(training_cost("distill", flops, distill_tokens, train_profile, price_per_hour).to_dict())
    flops = training_flops("lora", finetune_tokens, tuned.n_params)
    stages.append(training_cost("fine-tune (LoRA)", flops, finetune_tokens, train_profile, price_per_hour).to_dict())
    memory = {m: training_fit(m, tuned, train_profile, **seq_len).to_dict() for m in ("full", "lora", "qlora")}
    if student is not None:
        memory["distill"] = training_fit("distill", student, train_profile, teacher=teacher, **seq_len).to_dict()
    return {
        "training_profile": train_profile.name,
        "price_per_hour": price_per_hour,
        "stages": stages,
        "total_hours": sum(s["hours"] for s in stages),
        "total_cost": None if price_per_hour is None else sum(s["cost"] for s in stages),
        "memory": memory,
    }
