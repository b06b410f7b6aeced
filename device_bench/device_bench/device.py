"""Device fingerprint and process memory, read from what the OS exposes (every probe is best-effort)."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import socket
import sys
from typing import Any

from device_bench.conditions import read_text, run_probe, temperatures_c

#: ARM "CPU implementer" -> (vendor, {"CPU part": core}) for the cores found on edge boards.
_ARM_PARTS: dict[str, tuple[str, dict[str, str]]] = {
    "0x41": (
        "ARM",
        {
            "0xd03": "Cortex-A53",
            "0xd04": "Cortex-A35",
            "0xd05": "Cortex-A55",
            "0xd07": "Cortex-A57",
            "0xd08": "Cortex-A72",
            "0xd09": "Cortex-A73",
            "0xd0a": "Cortex-A75",
            "0xd0b": "Cortex-A76",
            "0xd0c": "Neoverse-N1",
            "0xd0d": "Cortex-A77",
            "0xd40": "Neoverse-V1",
            "0xd41": "Cortex-A78",
            "0xd42": "Cortex-A78AE",
            "0xd44": "Cortex-X1",
            "0xd46": "Cortex-A510",
            "0xd47": "Cortex-A710",
            "0xd48": "Cortex-X2",
            "0xd49": "Neoverse-N2",
            "0xd4b": "Cortex-A78C",
            "0xd4f": "Neoverse-V2",
            "0xd80": "Cortex-A520",
            "0xd81": "Cortex-A720",
            "0xd82": "Cortex-X4",
        },
    ),
    "0x4e": ("NVIDIA", {"0x004": "Carmel"}),
    "0x51": ("Qualcomm", {"0x800": "Kryo-2xx/4xx gold", "0x801": "Kryo-2xx/4xx silver", "0x804": "Kryo-4xx gold"}),
    "0x61": ("Apple", {}),
}


def fingerprint() -> dict[str, Any]:
    """Describe the device: CPU, cores, ISA flags, RAM, OS, and temperatures/throttling where readable.

    The hostname is only kept as a short hash, so reports can be told apart without naming the machine.
    """
    cpuinfo = read_text("/proc/cpuinfo") or ""
    temperatures_c, throttled = read_thermals()
    return {
        "cpu_model": cpu_model_from_cpuinfo(cpuinfo),
        "cores": os.cpu_count() or 0,
        "cores_available": _cores_available(),
        "isa_flags": isa_flags_from_cpuinfo(cpuinfo),
        "ram_bytes": _ram_bytes(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "board": _board_model(),
        "python_version": platform.python_version(),
        "hostname_hash": hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:12],
        "temperatures_c": temperatures_c,
        "throttled": throttled,
    }


def read_thermals() -> tuple[dict[str, float], str | None]:
    """Temperatures in °C by sensor name and a throttle word (None when the device has none).

    See :func:`device_bench.conditions.temperatures_c` for the sources.
    """
    return temperatures_c()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process from getrusage (ru_maxrss: kB on Linux, bytes on macOS)."""
    try:
        import resource  # not on Windows; imported here so the module still loads there
    except ImportError:
        return 0
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(max_rss if sys.platform == "darwin" else max_rss * 1024)


def proc_status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status (VmHWM = peak RSS, VmRSS = current RSS) in bytes, None if unreadable."""
    text = read_text("/proc/self/status")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def cpu_model_from_cpuinfo(cpuinfo: str) -> str:
    """CPU name: ARM core names from implementer/part ids, x86 "model name", macOS brand string.

    ARM Linux reports only generic names ("ARMv8 Processor rev 1") or the board, so the core type is looked up
    from the ids; big.LITTLE parts are listed together, e.g. "ARM Cortex-A55 + ARM Cortex-A76" (RK3588).
    """
    arm_cores = _arm_core_names(cpuinfo)
    if arm_cores:
        return " + ".join(arm_cores)
    fields = _cpuinfo_fields(cpuinfo)
    for key in ("model name", "Hardware", "Processor", "cpu model", "Model"):
        if fields.get(key):
            return fields[key]
    if sys.platform == "darwin":
        brand = run_probe(["sysctl", "-n", "machdep.cpu.brand_string"])
        if brand:
            return brand.strip()
    return platform.processor() or platform.machine() or "unknown"


def _arm_core_names(cpuinfo: str) -> list[str]:
    """Distinct ARM core names from the "CPU implementer"/"CPU part" lines, in first-seen order."""
    names: list[str] = []
    implementer = None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip().lower()
        if key == "CPU implementer":
            implementer = value
        elif key == "CPU part" and implementer is not None:
            vendor, parts = _ARM_PARTS.get(implementer, (f"implementer {implementer}", {}))
            name = f"{vendor} {parts.get(value, 'part ' + value)}"
            if name not in names:
                names.append(name)
    return names


def isa_flags_from_cpuinfo(cpuinfo: str) -> list[str]:
    """Sorted ISA feature flags: /proc/cpuinfo "flags" (x86) or "Features" (ARM); sysctl on macOS."""
    fields = _cpuinfo_fields(cpuinfo)
    for key in ("flags", "Features"):
        if fields.get(key):
            return sorted(set(fields[key].split()))
    if sys.platform == "darwin":
        flags = set()
        for line in (run_probe(["sysctl", "hw.optional"]) or "").splitlines():
            name, _, value = line.partition(":")
            if value.strip() == "1":  # e.g. "hw.optional.arm.FEAT_DotProd: 1", "hw.optional.avx2_0: 1"
                flags.add(name.strip().rsplit(".", 1)[-1])
        for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            flags.update((run_probe(["sysctl", "-n", key]) or "").lower().split())
        return sorted(flags)
    return []


def _ram_bytes() -> int:
    """Total RAM: /proc/meminfo MemTotal, sysctl hw.memsize on macOS, or sysconf pages."""
    meminfo = read_text("/proc/meminfo") or ""
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    if match:
        return int(match.group(1)) * 1024
    if sys.platform == "darwin":
        value = (run_probe(["sysctl", "-n", "hw.memsize"]) or "").strip()
        if value.isdigit():
            return int(value)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def _board_model() -> str | None:
    """Board name from the device tree (Raspberry Pi, Jetson, most ARM SBCs), None elsewhere."""
    raw = read_text("/proc/device-tree/model")
    return raw.strip("\x00\n ") if raw else None


def _cores_available() -> int:
    """CPUs this process may run on (cgroup/affinity limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def _cpuinfo_fields(cpuinfo: str) -> dict[str, str]:
    """First value of each key in /proc/cpuinfo (per-CPU blocks repeat the same keys)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields
