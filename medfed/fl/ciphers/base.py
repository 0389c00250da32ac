"""The two interfaces every key setup implements: :class:`HospitalCipher` (inside a
hospital) and :class:`AggregatorCipher` (the untrusted aggregator), and :data:`Exchange`,
the protocol-round callback the aggregator side is given."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: ``exchange(stage, {node: values}, message_type) -> {node: reply record}``: one protocol
#: round through the aggregator (bytes and exclusions are recorded there).
Exchange = Callable[[str, dict[int, dict], str], dict[int, Mapping]]


class HospitalCipher(ABC):
    """A hospital's side of a key setup. Holds whatever secret the setup gives a hospital."""

    #: True when decryption needs the other hospitals (a partial-decryption round).
    collective = False
    #: The statistics are encrypted times this public factor (and divided after decrypting),
    #: where the decryption's error is absolute and large (threshold keys' flooding noise).
    stats_scale = 1.0

    @classmethod
    def for_hospital(cls, workspace: str, index: int) -> HospitalCipher:
        """The cipher of hospital ``index`` of ``workspace`` (by default a new one per call)."""
        return cls(workspace, index)

    def setup(self, step: str, record: Mapping) -> dict:
        """Answer one key-setup message (``messages.SETUP_STEP`` names the step)."""
        raise ValueError(f"this key setup has no setup step {step!r}")

    @abstractmethod
    def encrypt(self, vector: np.ndarray) -> bytes:
        """One contribution: the vector, encrypted (split over ciphertexts as needed)."""

    def partials(self, aggregate: bytes, recipients: Sequence[int], seal_round: int) -> dict:
        """Collective setups: this hospital's share of decrypting ``aggregate``, per peer."""
        raise ValueError("this key setup decrypts locally; there is no partial round")

    @abstractmethod
    def decrypt(self, aggregate: bytes | None, record: Mapping, length: int) -> np.ndarray:
        """The aggregate's first ``length`` values (``record``: the rest of the request)."""


class AggregatorCipher(ABC):
    """The aggregator's side of a key setup: public material only, never a secret key."""

    name = "abstract"
    collective = False

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def setup(self, exchange: Exchange, nodes: list[int], names: dict[int, str]) -> list[int]:
        """Key-setup rounds; returns the nodes that completed them."""
        return list(nodes)

    @abstractmethod
    def check(self, blob: bytes, *, sender: str, length: int) -> None:
        """Raise :class:`CiphertextError` unless ``blob`` is a usable contribution."""

    @abstractmethod
    def add(self, blobs: Sequence[bytes]) -> bytes:
        """The sum of checked contributions, as a blob of the same kind."""

    def decrypt_material(
        self, exchange: Exchange, aggregate: bytes, live: list[int], fl_round: int
    ) -> tuple[dict[int, dict], list[int]]:
        """What each live hospital needs, besides the aggregate, to decrypt it; and the nodes
        still live afterwards. Local decryption (none, shared) needs nothing."""
        return {n: {} for n in live}, list(live)

    def public_parameters(self) -> dict:
        """Which public parameters the run's ciphertexts are under, with the key each party
        encrypts under (``key_by_party``); empty for a setup without keys."""
        return {}

    def describe(self) -> dict:
        """Public parameters for the run's metrics."""
        return {"keys": self.name}
