"""The masked-sum round's key holders: which hospital decrypts an epoch's masked products.

Mode ``embeddings``: the aggregator sends each epoch's masked products to one member hospital
in turn (round-robin by epoch) and skips, for the rest of the run, one that fails.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Protocol

from medfed.crypto.diagonal import DiagonalLayout
from medfed.fl import messages as M
from medfed.fl.server_app import Ledger, log_safe

if TYPE_CHECKING:
    from flwr.serverapp import Grid


class RoundRunner(Protocol):
    """What a key holder needs of the aggregator (an ``EmbeddingsAggregator``)."""

    members: list[int]
    layout: DiagonalLayout
    names: dict[int, str]
    ledger: Ledger

    def exchange_round(self, grid: Any, stage: str, payloads: dict, kind: str) -> dict:
        """One stage's messages to ``payloads``' nodes; the checked replies by node."""
        ...

    def _name(self, node: int) -> str: ...


class FlowerKeyHolder:
    """Round-robin over the member hospitals for the masked-sum round; skips one that fails.

    A retry sends the next hospital the same masked bytes: the masks were never revealed, so a
    second key holder learns nothing the first could not (fresh masks would instead give two
    independently masked views of the same products to two hospitals).
    """

    def __init__(self, aggregator: RoundRunner, grid: Grid) -> None:
        self.aggregator = aggregator
        self.grid = grid
        self.failed: set[int] = set()

    def sum_masked(self, masked: list[bytes], step: int) -> tuple[list[bytes], str]:
        """One masked-sum round, retried with the next hospital if one fails."""
        nodes = [n for n in self.aggregator.members if n not in self.failed]
        layout_json = json.dumps(self.aggregator.layout.to_dict())
        for attempt in range(len(nodes)):
            node = nodes[(step + attempt) % len(nodes)]
            payload = {M.MASKED: masked, M.LAYOUT: layout_json, M.STEP: step}
            replies = self.aggregator.exchange_round(
                self.grid, f"sum-{step}", {node: payload}, M.MSG_SUM
            )
            if node in replies:  # the backend checks the count and every ciphertext
                return list(replies[node][M.SUMS]), self.aggregator._name(node)
            self.failed.add(node)
        raise M.FederationError(f"no hospital could answer the masked-sum round of epoch {step}")

    def reject(self, who: str, reason: str, step: int) -> None:
        """The backend found ``who``'s reply unusable: record it, never ask that hospital again."""
        self.aggregator.ledger.exclude(f"sum-{step}", who, log_safe(reason))
        self.failed.update(n for n, name in self.aggregator.names.items() if name == who)
