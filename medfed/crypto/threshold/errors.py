"""The exceptions of the threshold key setup."""

from __future__ import annotations


class ThresholdUnavailableError(RuntimeError):
    """OpenFHE cannot be imported in this Python."""


class ThresholdParamsError(ValueError):
    """Threshold parameters that are insecure, inconsistent, or refused by OpenFHE."""


class ThresholdError(ValueError):
    """A protocol step that cannot proceed: malformed bytes, missing shares or partials."""
