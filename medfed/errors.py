"""Errors a user can fix: the CLI prints their message (which names the fix), not a traceback."""

from __future__ import annotations

from medfed.config import ConfigError
from medfed.crypto.errors import CiphertextError, KeyMaterialError  # no TenSEAL import
from medfed.crypto.packing import LayoutError
from medfed.crypto.params import UnsafeParametersError
from medfed.crypto.threshold import ThresholdParamsError, ThresholdUnavailableError
from medfed.data import DatasetError, PartitionError
from medfed.embed import BackboneError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DatasetError,
    PartitionError,
    BackboneError,
    UnsafeParametersError,
    CiphertextError,
    KeyMaterialError,
    LayoutError,
    ThresholdUnavailableError,
    ThresholdParamsError,
)


def format_user_error(e: BaseException) -> str:
    return f"medfed: error: {e}"
