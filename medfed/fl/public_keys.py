"""The aggregator's public keys in mode ``embeddings``: from the lead hospital, else the next.

The lead hospital sends the public context and the Galois keys with its statistics. Every
hospital holds the same shared key, so any member can provide them instead: when the lead's
reply failed, or its keys are unusable, the next hospital (in name order) is asked in a
``public-context`` round, and so on, until one sends usable keys or none is left.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import tenseal as ts

from medfed.crypto.context import CiphertextError, context_fingerprint, load_public_context
from medfed.crypto.seal import SealEngine
from medfed.fl import messages as M
from medfed.fl.server_app import Ledger

if TYPE_CHECKING:
    from flwr.serverapp import Grid


class PublicKeys(NamedTuple):
    """What the aggregator computes with: the public context and Galois keys, loaded."""

    ctx: ts.Context
    engine: SealEngine
    public_bytes: bytes
    galois_bytes: bytes
    fingerprint: str  # of the public key: every member must announce this one
    sender: str  # the hospital that provided them


class RoundRunner(Protocol):
    """What this needs of the aggregator (an ``EmbeddingsAggregator``)."""

    names: dict[int, str]
    ledger: Ledger

    def exchange_round(self, grid: Any, stage: str, payloads: dict, kind: str) -> dict:
        """One stage's messages to ``payloads``' nodes; the checked replies by node."""
        ...


def load_public_keys(runner: RoundRunner, grid: Grid, replies: Mapping[int, Mapping]) -> PublicKeys:
    """The public keys from the accepted ``stats`` replies' senders, lead hospital first.

    A provider's context must match the key fingerprint it announced with its statistics
    (as every member's must match the one loaded). A hospital whose ``public-context`` reply
    fails, or whose keys are malformed or not the key set it announced, is excluded from
    ``public-context`` with the reason, and the next one is asked. Raises
    :class:`~medfed.fl.messages.FederationError` when none can provide usable keys, and
    ``KeyMaterialError`` for a context that carries a secret key: the run stops then, since
    the aggregator would hold the shared secret key.
    """
    order = sorted(
        replies, key=lambda n: (M.PUBLIC_CONTEXT not in replies[n], natural(runner.names[n]))
    )
    for node in order:
        name, rec = runner.names[node], replies[node]
        if M.PUBLIC_CONTEXT not in rec:  # the lead failed: this hospital takes over
            extra = runner.exchange_round(grid, "public-context", {node: {}}, M.MSG_PUBLIC_CONTEXT)
            if node not in extra:
                continue  # excluded from public-context, with the reason
            rec = extra[node]
        try:
            ctx = load_public_context(rec[M.PUBLIC_CONTEXT], sender=name)
            fingerprint = context_fingerprint(ctx)
            if fingerprint != replies[node][M.KEY_FINGERPRINT]:
                raise CiphertextError(f"the public context from {name} is not the key it announced")
            engine = SealEngine(ctx, galois_keys=rec[M.GALOIS_KEYS])
        except (CiphertextError, KeyError) as e:
            runner.ledger.exclude("public-context", name, f"unusable public keys: {e}")
            continue
        return PublicKeys(ctx, engine, rec[M.PUBLIC_CONTEXT], rec[M.GALOIS_KEYS], fingerprint, name)
    reasons = "; ".join(
        f"{e['hospital']}: {e['reason']}"
        for e in runner.ledger.excluded
        if e["stage"] in ("stats", "public-context")
    )
    raise M.FederationError(
        f"no hospital could send the public context, so the run stops ({len(order)} asked; "
        f"excluded: {reasons})"
    )


def natural(name: str) -> list:
    """Sort key that puts ``hospital-2`` before ``hospital-10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
