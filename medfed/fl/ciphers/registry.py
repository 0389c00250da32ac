"""The registry of key setups: each setup's module registers its (hospital, aggregator)
cipher pair under its name, and the factories look the name up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medfed.fl.ciphers.base import AggregatorCipher, HospitalCipher

#: key setup -> (hospital side, aggregator side)
UPDATE_CIPHERS: dict[str, tuple[type[HospitalCipher], type[AggregatorCipher]]] = {}


def register_key_setup(
    name: str, hospital: type[HospitalCipher], aggregator: type[AggregatorCipher]
) -> None:
    """Make key setup ``name`` available to :func:`hospital_cipher` / :func:`aggregator_cipher`."""
    if UPDATE_CIPHERS.get(name, (hospital, aggregator)) != (hospital, aggregator):
        raise ValueError(f"key setup {name!r} is already registered")
    UPDATE_CIPHERS[name] = (hospital, aggregator)


def key_setup(keys: str) -> tuple[type[HospitalCipher], type[AggregatorCipher]]:
    """The registered (hospital, aggregator) pair of ``keys``; ValueError naming the valid ones."""
    try:
        return UPDATE_CIPHERS[keys]
    except KeyError:
        raise ValueError(
            f"unknown key setup {keys!r}; valid: {', '.join(sorted(UPDATE_CIPHERS))}"
        ) from None


def hospital_cipher(keys: str, workspace: str | Path, index: int) -> HospitalCipher:
    """This hospital's cipher (threshold: the same object across rounds, in this process)."""
    return key_setup(keys)[0].for_hospital(str(workspace), int(index))


def aggregator_cipher(keys: str, settings: Any) -> AggregatorCipher:
    """The aggregator's cipher for key setup ``keys``, built from its public ``settings``."""
    return key_setup(keys)[1](settings)
