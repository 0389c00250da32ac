"""medfed: privacy-preserving federated fine-tuning on medical images, measured.

The public API (imported lazily, so ``import medfed`` needs neither torch nor TenSEAL):

* :class:`SimulationConfig`, :class:`ConfigError`: every knob of a run, validated.
* :func:`run`: one run from a config; :func:`federate`: a run on hospitals you prepared;
  both return a :class:`RunResult` (typed core metrics, ``result["key"]`` for any metric,
  ``to_dict()``: the ``metrics.json`` content).
* :func:`list_modes`, :func:`get_mode`, :func:`register_mode`, :class:`Mode`: the federation
  modes ("embeddings", "updates", and any you register).
* :class:`HospitalData`: one hospital's train and test embeddings and labels.
* :class:`CKKSParams`, :data:`PRESETS`, :func:`get_preset`: the CKKS parameter sets.
* :func:`print_summary`: the summary table of a run (its mode's table).
* :class:`MedfedError`: the base of every error medfed raises on purpose (each names the fix;
  each also keeps its builtin base, e.g. :class:`ConfigError` is a ``ValueError``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "SimulationConfig": "medfed.config",
    "ConfigError": "medfed.config",
    "MedfedError": "medfed.errors",
    "run": "medfed.api",
    "federate": "medfed.api",
    "HospitalData": "medfed.fl.workspace",
    "CKKSParams": "medfed.crypto.params",
    "PRESETS": "medfed.crypto.params",
    "get_preset": "medfed.crypto.params",
    "print_summary": "medfed.runner",
    "RunResult": "medfed.result",
    "Mode": "medfed.modes",
    "get_mode": "medfed.modes",
    "list_modes": "medfed.modes",
    "register_mode": "medfed.modes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name (:data:`_EXPORTS`) from its module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'medfed' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily imported public API included."""
    return sorted(list(globals()) + __all__)
