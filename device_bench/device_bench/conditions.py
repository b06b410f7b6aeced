"""The device's thermal and power state, read from what the OS exposes.

CPU frequency and governor, temperatures, throttling, energy counters and power sensors.

Every probe is best-effort. A reading this device does not expose is the string :data:`NOT_AVAILABLE`, never an
error and never a guess, so a report says plainly what could not be seen (a VM has no RAPL or thermal zones).

Sources, by device:

* CPU frequency / governor: ``/sys/devices/system/cpu/cpu*/cpufreq/`` (``scaling_cur_freq`` in kHz).
* Temperatures: ``/sys/class/thermal/thermal_zone*`` (x86 packages, Raspberry Pi, Jetson), ``vcgencmd measure_temp``
  (Raspberry Pi firmware), ``dumpsys thermalservice`` (Android, when run from ``adb shell``).
* Throttling: ``vcgencmd get_throttled`` (Raspberry Pi); Android's thermal status from ``dumpsys thermalservice``.
* Energy counters: Intel/AMD RAPL under ``/sys/class/powercap/*/energy_uj`` (microjoules, wrapping at
  ``max_energy_range_uj``); the difference of two readings is the energy the package used between them.
* Power sensors: Jetson's INA3221 rails (``in_power*_input`` in mW under ``/sys/bus/i2c/drivers/ina3221*``), the
  battery's ``current_now`` x ``voltage_now`` (Android, laptops); sampled, so energy is power x time.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from typing import Any

NOT_AVAILABLE = "not available on this device"
_PROBE_TIMEOUT_S = 3.0
_VCGENCMD_TEMP = re.compile(r"temp=([-0-9.]+)")
_VCGENCMD_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+)")
# dumpsys thermalservice: "Temperature{mValue=37.5, mType=0, mName=cpu0, mStatus=0}"
_ANDROID_TEMPERATURE = re.compile(r"Temperature\{mValue=([-0-9.]+), mType=-?\d+, mName=([^,]+), mStatus=(\d+)\}")
_ANDROID_STATUS = re.compile(r"Thermal Status:\s*(\d+)")


def read_conditions(android: bool | None = None, root: str = "/") -> dict[str, Any]:
    """One snapshot of the device's state (see the module docstring for the sources).

    Keys: ``cpu_frequency_mhz`` ({cpu: MHz}), ``cpu_frequency_mhz_mean``, ``cpu_governor``, ``temperatures_c``
    ({sensor: °C}), ``throttled``, ``energy_counters_uj`` ({counter: µJ}), ``power_w`` ({sensor: W}); each is
    :data:`NOT_AVAILABLE` when the device exposes none. ``android``: query ``dumpsys`` (default: when it is on PATH).
    ``root``: where /sys and /proc are (a test's copy of a device's tree).
    """
    frequencies = cpu_frequencies_mhz(root)
    temperatures, throttled = temperatures_c(android, root)
    counters = energy_counters_uj(root)
    power = power_w(root)
    return {
        "cpu_frequency_mhz": frequencies or NOT_AVAILABLE,
        "cpu_frequency_mhz_mean": round(sum(frequencies.values()) / len(frequencies), 1) if frequencies
        else NOT_AVAILABLE,
        "cpu_governor": cpu_governor(root) or NOT_AVAILABLE,
        "temperatures_c": temperatures or NOT_AVAILABLE,
        "throttled": throttled if throttled is not None else NOT_AVAILABLE,
        "energy_counters_uj": counters or NOT_AVAILABLE,
        "power_w": power or NOT_AVAILABLE,
    }


def cpu_frequencies_mhz(root: str = "/") -> dict[str, float]:
    """Current frequency of each CPU in MHz; {} when neither source is exposed.

    cpufreq's ``scaling_cur_freq``, else x86's ``cpu MHz`` lines of /proc/cpuinfo (in a VM often the nominal clock,
    not the current one).
    """
    out: dict[str, float] = {}
    pattern = _at(root, "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")
    for path in sorted(glob.glob(pattern), key=_cpu_index):
        khz = _read_int(path)
        if khz is not None and khz > 0:
            out[f"cpu{_cpu_index(path)}"] = round(khz / 1000.0, 1)
    if out:
        return out
    cpu = None
    for line in (read_text(_at(root, "/proc/cpuinfo")) or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "processor":
            cpu = f"cpu{value.strip()}"
        elif key.strip() == "cpu MHz" and cpu is not None:
            try:
                out[f"{cpu} (/proc/cpuinfo)"] = round(float(value), 1)
            except ValueError:
                pass
    return out


def cpu_governor(root: str = "/") -> str | None:
    """The cpufreq governor(s), e.g. ``schedutil`` or ``performance,powersave`` when CPUs differ; None if absent."""
    names = []
    pattern = _at(root, "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor")
    for path in sorted(glob.glob(pattern), key=_cpu_index):
        text = read_text(path)
        if text and text.strip() not in names:
            names.append(text.strip())
    return ",".join(names) or None


def temperatures_c(android: bool | None = None, root: str = "/") -> tuple[dict[str, float], str | None]:
    """Temperatures by sensor and a throttle word (Pi ``get_throttled`` hex, Android ``status N``), or None."""
    temperatures: dict[str, float] = {}
    for zone in sorted(glob.glob(_at(root, "/sys/class/thermal/thermal_zone*")), key=_zone_index):
        millidegrees = _read_int(os.path.join(zone, "temp"))
        if millidegrees is None:
            continue
        name = (read_text(os.path.join(zone, "type")) or os.path.basename(zone)).strip()
        if name in temperatures:  # several zones may share a type (e.g. "acpitz"): keep them apart
            name = f"{name}.{os.path.basename(zone)}"
        temperatures[name] = round(millidegrees / 1000.0, 1)
    throttled = None
    if shutil.which("vcgencmd"):
        match = _VCGENCMD_TEMP.search(run_probe(["vcgencmd", "measure_temp"]) or "")
        if match:
            temperatures["vcgencmd"] = float(match.group(1))
        match = _VCGENCMD_THROTTLED.search(run_probe(["vcgencmd", "get_throttled"]) or "")
        if match:
            throttled = match.group(1)
    if android if android is not None else bool(shutil.which("dumpsys")):
        android_temperatures, status = parse_thermalservice(run_probe(["dumpsys", "thermalservice"]) or "")
        for name, value in android_temperatures.items():
            temperatures.setdefault(name, value)
        if status is not None and throttled is None:
            throttled = f"android thermal status {status}"
    return temperatures, throttled


def parse_thermalservice(text: str) -> tuple[dict[str, float], int | None]:
    """Temperatures ({name: °C}) and the thermal status (0 none .. 6 shutdown) from ``dumpsys thermalservice``.

    Only the "Current temperatures from HAL" block is read when present (the cached block repeats older values).
    """
    current = text.split("Current temperatures from HAL:", 1)[-1].split("Current cooling devices", 1)[0]
    temperatures = {m.group(2).strip(): float(m.group(1)) for m in _ANDROID_TEMPERATURE.finditer(current)}
    status = _ANDROID_STATUS.search(text)
    return temperatures, int(status.group(1)) if status else None


def energy_counters_uj(root: str = "/") -> dict[str, int]:
    """RAPL energy counters in µJ by zone name (``package-0``, ``package-0/core``, ...); {} without powercap.

    Reading ``energy_uj`` needs root on recent kernels (it leaks power side channels); unreadable means absent.
    """
    out: dict[str, int] = {}
    for zone in sorted(glob.glob(_at(root, "/sys/class/powercap/*/energy_uj"))):
        zone_dir = os.path.dirname(zone)
        value = _read_int(zone)
        if value is None:
            continue
        name = (read_text(os.path.join(zone_dir, "name")) or os.path.basename(zone_dir)).strip()
        if os.path.basename(zone_dir).count(":") == 2:  # intel-rapl:0:1 is a sub-zone of intel-rapl:0
            parent_dir = zone_dir.rsplit(":", 1)[0]
            name = f"{(read_text(os.path.join(parent_dir, 'name')) or os.path.basename(parent_dir)).strip()}/{name}"
        out[name if name not in out else f"{name}.{os.path.basename(zone_dir)}"] = value
    return out


def energy_ranges_uj(root: str = "/") -> dict[str, int]:
    """Each RAPL counter's wrap-around range (``max_energy_range_uj``), by the names of :func:`energy_counters_uj`."""
    ranges: dict[str, int] = {}
    names = list(energy_counters_uj(root))
    zones = [z for z in sorted(glob.glob(_at(root, "/sys/class/powercap/*/energy_uj"))) if _read_int(z) is not None]
    for name, zone in zip(names, zones):
        value = _read_int(os.path.join(os.path.dirname(zone), "max_energy_range_uj"))
        if value:
            ranges[name] = value
    return ranges


def energy_used_j(before: dict[str, int], after: dict[str, int], ranges: dict[str, int]) -> dict[str, float]:
    """Joules each counter advanced from ``before`` to ``after``, a wrap-around counted once."""
    used: dict[str, float] = {}
    for name, start in before.items():
        if name not in after:
            continue
        delta = after[name] - start
        if delta < 0 and ranges.get(name):
            delta += ranges[name]
        if delta >= 0:
            used[name] = round(delta / 1e6, 3)
    return used


def power_w(root: str = "/") -> dict[str, float]:
    """Instantaneous power in watts by sensor: Jetson INA3221 rails and the battery (current x voltage)."""
    out: dict[str, float] = {}
    # L4T 32 (Nano, TX2, Xavier): iio, one in_powerN_input (mW) and rail_name_N per rail.
    for path in sorted(glob.glob(_at(root, "/sys/bus/i2c/drivers/ina3221*/*/iio:device*/in_power[0-9]_input"))):
        milliwatts = _read_int(path)
        if milliwatts is not None:
            index = path[-7]
            label = read_text(os.path.join(os.path.dirname(path), f"rail_name_{index}")) or f"rail{index}"
            out[f"ina3221/{label.strip()}"] = round(milliwatts / 1000.0, 3)
    # L4T 34+ (Orin): hwmon, inN_input (mV) x currN_input (mA) with inN_label.
    for label_path in sorted(glob.glob(_at(root, "/sys/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*/in[0-9]_label"))):
        base, index = os.path.dirname(label_path), os.path.basename(label_path)[2]
        millivolts = _read_int(os.path.join(base, f"in{index}_input"))
        milliamps = _read_int(os.path.join(base, f"curr{index}_input"))
        label = (read_text(label_path) or f"rail{index}").strip()
        if millivolts is not None and milliamps is not None and "sum" not in label.lower():
            out[f"ina3221/{label}"] = round(millivolts * milliamps / 1e6, 3)
    for supply in sorted(glob.glob(_at(root, "/sys/class/power_supply/*"))):
        kind = (read_text(os.path.join(supply, "type")) or "").strip()
        if kind != "Battery":
            continue
        microamps = _read_int(os.path.join(supply, "current_now"))
        microvolts = _read_int(os.path.join(supply, "voltage_now"))
        if microamps is not None and microvolts is not None and microvolts > 0:
            # Android reports discharge current as negative on some kernels, positive on others: the magnitude.
            out[f"battery/{os.path.basename(supply)}"] = round(abs(microamps) * microvolts / 1e12, 3)
    return out


def _at(root: str, path: str) -> str:
    """``path`` under ``root`` (``/`` on a device)."""
    return path if root == "/" else os.path.join(root, path.lstrip("/"))


def read_text(path: str) -> str | None:
    """File content, or None when it is missing or unreadable (sysfs files may raise on read)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = read_text(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def run_probe(argv: list[str]) -> str | None:
    """Stdout of a short probe command, or None on any failure (missing tool, timeout, non-zero exit)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_index(path: str) -> int:
    match = re.search(r"/cpu(\d+)/", path)
    return int(match.group(1)) if match else 0


def _zone_index(path: str) -> int:
    """Numeric order of thermal zones (thermal_zone10 after thermal_zone9)."""
    digits = re.sub(r"\D", "", os.path.basename(path))
    return int(digits) if digits else 0
