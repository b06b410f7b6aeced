"""Errors that the CLI turns into one clear line and a non-zero exit.

Library code raises these; only ``edgeforge.cli.app`` converts them into messages and exit codes.
Each message says what was expected, what was found, and how to fix it.
"""

from __future__ import annotations


class EdgeforgeError(Exception):
    """Base class: a problem the user can fix. The CLI prints ``str(err)`` and exits with ``exit_code``."""

    exit_code = 2


class BadInputError(EdgeforgeError):
    """A path, name, file or value given by the user is wrong."""


class ProfileError(BadInputError):
    """A device profile is unknown or malformed."""


class ModelError(BadInputError):
    """A model path, alias or file cannot be read."""


class ResourceError(BadInputError):
    """Not enough disk or memory for a stage; found before the stage starts writing or training."""


class QualityGateError(EdgeforgeError):
    """An artifact was made but fails its quality threshold; the artifact is kept for inspection."""

    exit_code = 1
