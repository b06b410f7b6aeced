"""The published measurements the speed estimator is fitted to: model architectures and the table's reader.

The rows live in ``benchmarks/data/speed_measurements.yaml``, each with its source: a device (a built-in profile, or
an entry of the file's own sourced ``devices:`` table), the backend, a model named by its architecture below, the
quant type and the measured tokens/s. :func:`load_measurements` resolves every row into the inputs the estimator
needs (bytes, bandwidth, compute); ``edgeforge.plan.speed_fit`` fits and cross-validates the constants on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeforge.errors import BadInputError
from edgeforge.models.refs import ModelArch, arch_from_config
from edgeforge.plan.estimator import device_compute_ops_per_s
from edgeforge.plan.profiles import Backend, ProfileRegistry
from edgeforge.plan.sizing import gguf_file_bytes
from edgeforge.validation import describe_validation_error, read_yaml_file

# Architectures from the models' published config.json files.
TINYLLAMA_1_1B: dict[str, Any] = dict(
    model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)
LLAMA_3_2_1B: dict[str, Any] = dict(
    model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072)
LLAMA_3_2_3B: dict[str, Any] = dict(
    model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072)
LLAMA_2_7B: dict[str, Any] = dict(
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
CODELLAMA_7B: dict[str, Any] = {**LLAMA_2_7B, "vocab_size": 32016, "max_position_embeddings": 16384}
LLAMA_2_13B: dict[str, Any] = dict(
    model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
    num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
LLAMA_2_70B: dict[str, Any] = dict(
    model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096)
MISTRAL_7B: dict[str, Any] = dict(
    model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=32768)
LLAMA_3_8B: dict[str, Any] = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192)

#: The names the measurement table uses for its models (Llama 3.1 8B shares Llama 3 8B's shape).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": TINYLLAMA_1_1B,
    "llama-3.2-1b": LLAMA_3_2_1B,
    "llama-3.2-3b": LLAMA_3_2_3B,
    "llama-2-7b": LLAMA_2_7B,
    "codellama-7b": CODELLAMA_7B,
    "llama-2-13b": LLAMA_2_13B,
    "llama-2-70b": LLAMA_2_70B,
    "mistral-7b": MISTRAL_7B,
    "llama-3-8b": LLAMA_3_8B,
}
#: What a row assumes when its source does not say how many tokens were generated or prompted (llama-bench's
#: defaults, tg128 and pp512).
ASSUMED_DECODE_TOKENS = 128
ASSUMED_PROMPT_TOKENS = 512


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceEntry(_Strict):
    """A device of the table without a built-in profile: its sourced figures."""

    memory_bandwidth_bytes_per_s: float = Field(gt=0)
    gpu_fp16_flops_per_s: float | None = Field(default=None, gt=0)
    cpu_int8_ops_per_s: float | None = Field(default=None, gt=0)
    source: str = Field(min_length=1)


class MeasurementEntry(_Strict):
    """One published measurement, as written in the table."""

    device: str
    backend: Backend
    model: str
    quant: str
    model_size_gib: float | None = Field(default=None, gt=0)
    threads: int | None = Field(default=None, gt=0)
    prompt_tokens: int | None = Field(default=None, gt=0)
    prefill_tokens_per_s: float | None = Field(default=None, gt=0)
    decode_tokens: int | None = Field(default=None, gt=0)
    decode_depth: int = Field(default=0, ge=0)
    decode_tokens_per_s: float = Field(gt=0)
    source: str = Field(min_length=1)
    note: str = ""


class MeasurementTable(_Strict):
    devices: dict[str, DeviceEntry] = Field(default_factory=dict)
    measurements: list[MeasurementEntry] = Field(min_length=1)


@dataclass(frozen=True)
class Measurement:
    """A row resolved into the estimator's inputs: the model's shape and bytes, the device's bandwidth and compute."""

    device: str
    backend: str
    model: str
    quant: str
    arch: ModelArch
    weights_bytes: float
    decode_tokens: int
    decode_depth: int
    decode_tokens_per_s: float
    prompt_tokens: int
    prefill_tokens_per_s: float | None
    bandwidth_bytes_per_s: float
    compute_ops_per_s: float | None  # None: no source gives the device's rate for this backend
    source: str
    note: str

    @property
    def label(self) -> str:
        return f"{self.device} {self.backend} {self.model} {self.quant}"


def _device_figures(entry: MeasurementEntry, devices: dict[str, DeviceEntry], registry: ProfileRegistry,
                    where: str) -> tuple[float, float | None]:
    """(bandwidth, compute for the row's backend) from the table's devices or a built-in profile."""
    if entry.device in devices:
        d = devices[entry.device]
        compute = d.cpu_int8_ops_per_s if entry.backend == "cpu" else d.gpu_fp16_flops_per_s
        return d.memory_bandwidth_bytes_per_s, compute
    if entry.device in registry.names():
        profile = registry.get(entry.device)
        return profile.memory_bandwidth_bytes_per_s, device_compute_ops_per_s(profile, entry.backend)
    raise BadInputError(f"{where}: device '{entry.device}' is neither in the file's devices: table nor a built-in "
                        "profile; add it to devices: with its sourced figures")


def _resolve(entry: MeasurementEntry, devices: dict[str, DeviceEntry], registry: ProfileRegistry,
             where: str) -> Measurement:
    if entry.model not in ARCHITECTURES:
        raise BadInputError(f"{where}: unknown model '{entry.model}'; expected one of {', '.join(ARCHITECTURES)} "
                            "(add its config.json shape to edgeforge/plan/calibration.py)")
    arch = arch_from_config(ARCHITECTURES[entry.model], f"architecture '{entry.model}'")
    if entry.model_size_gib is not None:
        weights = entry.model_size_gib * 2**30
    else:
        try:
            weights = float(gguf_file_bytes(arch, entry.quant))
        except ValueError as e:
            raise BadInputError(f"{where}: {e}; or give the file's model_size_gib") from None
    bandwidth, compute = _device_figures(entry, devices, registry, where)
    return Measurement(
        device=entry.device, backend=entry.backend, model=entry.model, quant=entry.quant, arch=arch,
        weights_bytes=weights, decode_tokens=entry.decode_tokens or ASSUMED_DECODE_TOKENS,
        decode_depth=entry.decode_depth, decode_tokens_per_s=entry.decode_tokens_per_s,
        prompt_tokens=entry.prompt_tokens or ASSUMED_PROMPT_TOKENS, prefill_tokens_per_s=entry.prefill_tokens_per_s,
        bandwidth_bytes_per_s=bandwidth, compute_ops_per_s=compute, source=entry.source, note=entry.note)


def load_measurements(path: Path, registry: ProfileRegistry) -> list[Measurement]:
    """Read and resolve the measurement table at ``path``; BadInputError names the file, row and field."""
    data = read_yaml_file(path, "measurement table", BadInputError)
    try:
        table = MeasurementTable.model_validate(data)
    except ValidationError as e:
        raise BadInputError(describe_validation_error(path, e, "measurement table")) from None
    return [_resolve(entry, table.devices, registry, f"{path}: measurements[{i}]")
            for i, entry in enumerate(table.measurements)]

