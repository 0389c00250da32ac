"""The one place that imports ``openfhe``, and the check every OpenFHE entry point makes.

OpenFHE publishes wheels only for CPython 3.10 and 3.12, so the import may fail: the package
still imports, and :func:`_require_openfhe` raises :class:`ThresholdUnavailableError`, saying how
to get an OpenFHE environment, when an entry point needs it.
"""

from __future__ import annotations

import sys

from medfed.crypto.threshold.errors import ThresholdUnavailableError

try:  # OpenFHE wheels exist for CPython 3.10 and 3.12 only
    import openfhe as _ofhe
except (ImportError, OSError) as _e:  # pragma: no cover - depends on the interpreter
    _ofhe = None
    _IMPORT_ERROR: str | None = f"{type(_e).__name__}: {_e}"
else:
    _IMPORT_ERROR = None


def openfhe_available() -> bool:
    """Whether ``openfhe`` imports in this Python."""
    return _ofhe is not None


def _require_openfhe():
    """The ``openfhe`` module; :class:`ThresholdUnavailableError` if it cannot be imported."""
    if _ofhe is None:
        raise ThresholdUnavailableError(
            f"the threshold key setup needs OpenFHE, which this Python "
            f"({sys.version.split()[0]}) cannot import ({_IMPORT_ERROR}). OpenFHE publishes "
            "wheels only for CPython 3.10 and 3.12; create a Python 3.10 environment and `pip "
            'install -e ".[threshold]"` (or use --keys shared). In a checkout, '
            "`bash .ci/threshold_env.sh` builds such an environment (.venv-threshold)."
        )
    return _ofhe


def _openfhe_version() -> str | None:
    """The installed ``openfhe`` distribution's version, or None (informative only)."""
    try:
        from importlib.metadata import version

        return version("openfhe")
    except Exception:  # noqa: BLE001 - metadata is informative only
        return None
