"""Threshold CKKS for the threshold key setup: OpenFHE multiparty keys, flooded partial
decryptions, Shamir t-of-n recovery of dropped hospitals' key shares.

The protocol, who learns what, and how the flooding noise is sized are specified in
docs/threshold-protocol.md.

Imports only numpy, ``openfhe`` and :mod:`medfed.crypto.channel` (no torch, timm, tenseal or
flwr), and imports without OpenFHE: :class:`ThresholdParams` and :data:`THRESHOLD_PRESETS` work
anyway, and every entry point that needs OpenFHE raises :class:`ThresholdUnavailableError`.

Modules: ``params`` (parameters, presets), ``context`` (the shared OpenFHE context, noise
measurement), ``party`` (a hospital), ``aggregator`` (the aggregator), ``evaluator`` (computing
on the joint keys), ``refresh`` (the collective refresh in one process), ``wire`` (byte
formats), ``backend`` (the OpenFHE import), ``errors``.
"""

from __future__ import annotations

from medfed.crypto.threshold.aggregator import ThresholdAggregator
from medfed.crypto.threshold.backend import _require_openfhe as _require_openfhe
from medfed.crypto.threshold.backend import openfhe_available
from medfed.crypto.threshold.context import (
    OPENFHE_STATISTICAL_SECURITY as OPENFHE_STATISTICAL_SECURITY,
)
from medfed.crypto.threshold.context import ThresholdContext
from medfed.crypto.threshold.errors import (
    ThresholdBudgetError,
    ThresholdError,
    ThresholdParamsError,
    ThresholdUnavailableError,
)
from medfed.crypto.threshold.params import THRESHOLD_PRESETS, ThresholdParams
from medfed.crypto.threshold.party import ThresholdParty
from medfed.crypto.threshold.wire import PURPOSE_KEY_SHARE as PURPOSE_KEY_SHARE
from medfed.crypto.threshold.wire import PURPOSE_PARTIAL as PURPOSE_PARTIAL
from medfed.crypto.threshold.wire import PURPOSE_RECOVERY_SHARE as PURPOSE_RECOVERY_SHARE
from medfed.crypto.threshold.wire import _unpack_partials as _unpack_partials

__all__ = [
    "THRESHOLD_PRESETS",
    "ThresholdAggregator",
    "ThresholdBudgetError",
    "ThresholdContext",
    "ThresholdError",
    "ThresholdParams",
    "ThresholdParamsError",
    "ThresholdParty",
    "ThresholdUnavailableError",
    "openfhe_available",
]

# Also importable from here (the ``X as X`` imports above), outside __all__: the protocol
# constants, _require_openfhe (the run drivers check for OpenFHE before any data work) and
# _unpack_partials (tests read the partial-decryption format).
