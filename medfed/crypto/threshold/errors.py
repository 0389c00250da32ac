"""The exceptions of the threshold key setup."""

from __future__ import annotations

from medfed.errors import MedfedError


class ThresholdUnavailableError(MedfedError, RuntimeError):
    """OpenFHE cannot be imported in this Python; the message names the environment to use."""


class ThresholdParamsError(MedfedError, ValueError):
    """Threshold parameters that are insecure, inconsistent, or refused by OpenFHE."""


class ThresholdError(MedfedError, ValueError):
    """A protocol step that cannot proceed: malformed bytes, missing shares or partials."""


class ThresholdBudgetError(ThresholdError):
    """A partial decryption beyond ``max_decryptions`` under one key share: the noise flooding
    was sized for that many, so the party refuses the next one."""
