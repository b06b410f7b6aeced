"""The errors of benchmarking on a target: a target file that is wrong, a device that cannot be reached or used,
and a run on it that failed or was interrupted."""

from __future__ import annotations

from edgeforge.errors import BadInputError, EdgeforgeError


class TargetError(EdgeforgeError):
    """A target cannot be reached or used, or the run on it failed."""


class TargetConfigError(BadInputError):
    """A target is unknown or its YAML file is malformed."""


class TargetUnreachableError(TargetError):
    """The device does not answer (closed port, no route, unknown host name, timeout)."""


class TargetAuthError(TargetError):
    """The device answered but refused the key."""


class HostKeyError(TargetError):
    """The device's host key is unknown or differs from the one in known_hosts_file."""


class TransferCorruptedError(TargetError):
    """The artifact on the device does not have the SHA-256 of the local one."""


class RuntimeMissingError(TargetError):
    """The device's Python lacks the runtime the artifact needs (llama-cpp-python or onnxruntime)."""


class RemoteRunError(TargetError):
    """The benchmark started on the device but did not produce a report."""


class AdbError(TargetError):
    """adb is missing, or no (or the wrong) Android device is attached."""


class Interrupted(KeyboardInterrupt):
    """The run was cancelled (Ctrl-C, SIGTERM, or another target's interrupt); cleanup has run."""
