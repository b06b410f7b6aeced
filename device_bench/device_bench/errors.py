"""Errors that the CLI prints as one ``device_bench: error: ...`` line with a specific exit code."""

from __future__ import annotations


class BenchError(Exception):
    """A problem the user can fix: bad input, missing or corrupt artifact, or a failed run."""

    exit_code = 2


class ChecksumMismatchError(BenchError):
    """The artifact's SHA-256 differs from the one given with ``--verify-sha256``."""

    exit_code = 3


class RuntimeMissingError(BenchError):
    """The runtime needed for the artifact's format is not installed on this device."""

    exit_code = 4
