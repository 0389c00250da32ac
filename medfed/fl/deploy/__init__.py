"""Run a federation as a local Flower deployment: separate processes, TLS, SuperNode auth.

:func:`run_deployment` (:mod:`.launch`) is what ``python -m medfed.deploy`` and the
``deploy`` backend run; :mod:`.apps` holds the Flower apps it deploys, :mod:`.provision` each
party's own provisioning step, :mod:`.pki` the TLS and SuperNode credentials,
:mod:`.processes` the process tree, :mod:`.audit` the separation evidence.
"""

from __future__ import annotations

__all__ = ["run_deployment"]


def __getattr__(name: str):
    if name == "run_deployment":  # imported on use: Flower, and TenSEAL through the modes
        from medfed.fl.deploy.launch import run_deployment

        return run_deployment
    raise AttributeError(name)
