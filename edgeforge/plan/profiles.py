"""Device profiles: what a class of device can hold and how fast it moves bytes.

A profile is a YAML file validated by :class:`DeviceProfile` (pydantic, unknown keys rejected). Built-in
profiles live in the repository's ``profiles/`` folder; users add their own with ``--profiles-dir`` or the
``EDGEFORGE_PROFILES`` environment variable (a ``:``-separated list of folders or files).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgeforge.errors import ProfileError
from edgeforge.paths import builtin_dir, yaml_files
from edgeforge.validation import FileRegistry, describe_validation_error, read_yaml_file

Backend = Literal["cpu", "cuda", "vulkan", "metal", "opencl", "npu"]
ArtifactFormat = Literal["gguf", "onnx"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuSpec(_Strict):
    """The CPU: what llama.cpp and onnxruntime run on when no accelerator is used."""

    model: str = Field(description="CPU model or core types, e.g. '4x Cortex-A76 2.4 GHz'")
    cores: int = Field(gt=0, description="number of cores usable for inference")
    isa_flags: list[str] = Field(default_factory=list, description="SIMD flags, e.g. asimddp, i8mm, avx2")
    int8_ops_per_s: float = Field(
        gt=0,
        description="peak int8 multiply-add throughput of all cores (ops/s, a MAC counts 2), the precision "
        "llama.cpp's quantized matmuls run at",
    )


class AcceleratorSpec(_Strict):
    """A GPU or NPU the runtimes can offload to."""

    name: str
    kind: Literal["gpu", "npu"]
    fp16_flops_per_s: float = Field(gt=0, description="dense FP16 throughput (FLOP/s)")
    memory_shared: bool = Field(description="true when it shares the system memory (Jetson, Apple, phones)")


class RuntimeSpec(_Strict):
    """One way the device runs an artifact: a format, a runtime and its backend."""

    format: ArtifactFormat
    runtime: Literal["llama.cpp", "onnxruntime"]
    backend: Backend = Field(description="where the matmuls run; picks the decode-efficiency factor")
    execution_provider: str | None = Field(default=None, description="onnxruntime execution provider")

    @model_validator(mode="after")
    def _runtime_matches_format(self) -> RuntimeSpec:
        expected = {"gguf": "llama.cpp", "onnx": "onnxruntime"}[self.format]
        if self.runtime != expected:
            raise ValueError(f"format {self.format!r} runs on {expected!r}, found runtime {self.runtime!r}")
        return self


class LatencyGoals(_Strict):
    """What the user of this device class expects: first token soon, then a readable stream."""

    ttft_ms: float = Field(gt=0, description="time to first token for a 128-token prompt (ms)")
    decode_tokens_per_s: float = Field(gt=0, description="minimum decode speed (tokens/s)")


class PreferredQuants(_Strict):
    """Quant types to try, best quality first."""

    gguf: list[str] = Field(default_factory=list)
    onnx: list[Literal["fp32", "fp16", "int8", "int4"]] = Field(default_factory=list)


class DeviceProfile(_Strict):
    """A device class: memory, bandwidth, compute, runtimes, goals. Every figure cites a source."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="unique name, lower-case with dashes")
    description: str
    category: Literal["sbc", "jetson", "phone", "gpu", "laptop", "desktop", "server"]
    memory_total_bytes: int = Field(gt=0, description="installed memory (VRAM for a discrete GPU)")
    memory_budget_bytes: int = Field(gt=0, description="what a model may use after the OS and other apps")
    memory_bandwidth_bytes_per_s: float = Field(gt=0, description="memory bandwidth the weights stream from")
    cpu: CpuSpec
    accelerators: list[AcceleratorSpec] = Field(default_factory=list)
    runtimes: list[RuntimeSpec] = Field(min_length=1, description="first entry is the primary runtime")
    preferred_quants: PreferredQuants
    decode_efficiency: dict[Backend, float] = Field(
        default_factory=dict,
        description="optional per-backend overrides of the estimator's bandwidth efficiency (0-1], e.g. "
        "from 'profiles detect'; built-in profiles leave it empty and use the general defaults",
    )
    layer_overhead_s: dict[Backend, float] = Field(
        default_factory=dict,
        description="optional per-backend overrides of the estimator's fixed decode time per layer and token "
        "(seconds, [0, 0.01)), measured by 'profiles detect --calibrate'; built-in profiles leave it empty",
    )
    decode_rate_bytes_per_s: dict[Backend, dict[str, float]] = Field(
        default_factory=dict,
        description="optional per-backend, per-GGML-type rates (bytes/s) at which llama.cpp's decode reads "
        "weights of that type, measured by 'profiles detect --calibrate' (on few CPU cores decode is bound by each "
        "type's dequantizing kernel, not by the bandwidth); types it lacks stream at decode_efficiency x bandwidth",
    )
    latency_goals: LatencyGoals
    power_watts: float = Field(gt=0, description="power draw while generating (W)")
    sources: list[str] = Field(min_length=1, description="where each figure comes from")

    @model_validator(mode="after")
    def _check_consistency(self) -> DeviceProfile:
        if self.memory_budget_bytes > self.memory_total_bytes:
            raise ValueError(
                f"memory_budget_bytes ({self.memory_budget_bytes}) exceeds memory_total_bytes "
                f"({self.memory_total_bytes}); the budget is what is left after the OS"
            )
        for backend, eff in self.decode_efficiency.items():
            if not 0 < eff <= 1:
                raise ValueError(f"decode_efficiency[{backend}] must be in (0, 1], found {eff}")
        for backend, seconds in self.layer_overhead_s.items():
            if not 0 <= seconds < 0.01:
                raise ValueError(f"layer_overhead_s[{backend}] must be in [0, 0.01) seconds, found {seconds}")
        for backend, rates in self.decode_rate_bytes_per_s.items():
            for qtype, rate in rates.items():
                if not rate > 0:
                    raise ValueError(f"decode_rate_bytes_per_s[{backend}][{qtype}] must be > 0, found {rate}")
        return self

    @property
    def primary_runtime(self) -> RuntimeSpec:
        return self.runtimes[0]

    def runtime_for(self, fmt: ArtifactFormat) -> RuntimeSpec | None:
        """The first runtime of this device that runs ``fmt``, or None."""
        return next((r for r in self.runtimes if r.format == fmt), None)


BUILTIN_PROFILES_DIR = builtin_dir("profiles")


def load_profile_file(path: str | os.PathLike[str]) -> DeviceProfile:
    """Read and validate one profile YAML file. Raises ProfileError naming the file and the field."""
    p = Path(path)
    data = read_yaml_file(p, "profile", ProfileError)
    if not isinstance(data, dict):
        raise ProfileError(f"{p}: expected a YAML mapping of profile fields, found {type(data).__name__}")
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as e:
        raise ProfileError(describe_validation_error(p, e, "profile")) from None


def profile_search_path(extra: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Where profiles are looked up: the built-ins, then EDGEFORGE_PROFILES, then ``extra``."""
    env = [Path(p) for p in os.environ.get("EDGEFORGE_PROFILES", "").split(os.pathsep) if p]
    return [BUILTIN_PROFILES_DIR, *env, *(Path(p) for p in extra)]


class ProfileRegistry(FileRegistry[DeviceProfile]):
    """Profiles by name. Registering a second profile of the same name is an error, not a silent override."""

    what = "profile"
    error = ProfileError

    def unknown_hint(self) -> str:
        return f"'edgeforge profiles list' shows all {len(self)}"


def load_registry(extra: Iterable[str | os.PathLike[str]] = ()) -> ProfileRegistry:
    """All profiles on the search path, validated."""
    registry = ProfileRegistry()
    for location in profile_search_path(extra):
        if not location.exists():
            raise ProfileError(f"{location}: profile folder or file does not exist")
        for f in yaml_files(location):
            registry.register(load_profile_file(f), f)
    return registry


def resolve_profile(name_or_path: str, extra: Iterable[str | os.PathLike[str]] = ()) -> DeviceProfile:
    """A profile by name, or from a YAML file path."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        return load_profile_file(name_or_path)
    return load_registry(extra).get(name_or_path)
