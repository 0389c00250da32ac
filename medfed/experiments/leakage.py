"""A run's leakage ledger: what each party learned beyond its own data (metrics.json ``leakage``).

Built from the run's own record (the aggregator's ledger, the layout, the refresh bound, the
attack on the released head), so it states what this run revealed, not what the protocol
might reveal in general. docs/security.md explains each item.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _aggregator(m: Mapping[str, Any]) -> dict[str, Any]:
    audit = (m.get("received_by_party") or {}).get("aggregator") or {}
    out: dict[str, Any] = {
        "messages_received": sum(k["messages"] for k in audit.values()),
        "bytes_received": (m.get("bytes_per_party") or {}).get("aggregator", {}).get("received"),
        "message_bytes_by_kind": {
            kind: round(k["bytes"] / k["messages"]) for kind, k in audit.items() if k["messages"]
        },
        "timing": "per-round reply times of every hospital (rounds.jsonl)",
        "participation": "which hospitals answered each round, and the exclusions' stages",
        "plaintext_values": "only protocol envelope fields (stage, round id, names, counts of "
        "ciphertexts); every data-bearing field arrives as ciphertext (received_by_party)",
    }
    if m.get("keys") == "none":
        out["plaintext_values"] = "every update and sample count (keys none: no encryption)"
    if "buckets_by_hospital" in m:
        out["bucket_counts"] = m["buckets_by_hospital"]
        out["bucket"] = m.get("bucket")
    if m.get("refresh_security_bits") is not None:
        out["refresh_security_bits"] = m["refresh_security_bits"]
    if m.get("threshold"):
        out["key_shares"] = "which hospital holds which key share, and recoveries"
    return out


def _hospitals(m: Mapping[str, Any]) -> list[str]:
    if m.get("mode") == "embeddings":
        d = m.get("embed_dim")
        return [
            f"the global first and second moments of the {d}-wide embeddings (sums of x and "
            "x x^T over every hospital's train samples) and the padded sample count",
            "the slot layout, hence every hospital's bucket count",
            "as an epoch's key holder: the aggregator's products, masked with uniform integers "
            f"({m.get('refresh_security_bits', 'n/a')} bits of statistical hiding over the run)",
            "the final head",
        ]
    if m.get("keys") == "none":
        return ["every round's FedAvg head (plain FedAvg: nothing is encrypted)"]
    return [
        "the global moments of the embeddings and the total sample count (the stats sum)",
        "every round's sum of sample-weighted heads and the total count, i.e. the FedAvg head",
        "the final head",
    ]


def leakage_ledger(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """What the aggregator, the hospitals and whoever receives the released head learned."""
    dp = metrics.get("dp") or {}
    return {
        "aggregator": _aggregator(metrics),
        "hospitals": _hospitals(metrics),
        "released_head": {
            "epsilon": dp.get("epsilon"),  # None: no differential privacy
            "delta": dp.get("delta"),
            "mia_auc": metrics.get("mia_auc"),
            "mia_tpr_at_1fpr": metrics.get("mia_tpr_at_1fpr"),
            "mia_blackbox_auc": metrics.get("mia_blackbox_auc"),
        },
    }
