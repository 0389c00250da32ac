"""The exceptions of the threshold key setup."""

from __future__ import annotations

from medfed.errors import MedfedError


class ThresholdUnavailableError(MedfedError, RuntimeError):
    """OpenFHE cannot be imported in this Python; the message names the environment to use."""


class ThresholdParamsError(MedfedError, ValueError):
    """Threshold parameters that are insecure, inconsistent, or refused by OpenFHE."""


class ThresholdError(MedfedError, ValueError):
    """A protocol step that cannot proceed: malformed bytes, missing shares or partials."""
