"""Protocol constants: message types and record keys (named once, used everywhere).

Payload values are ciphertext bytes, JSON layouts, small integers and names. Nothing else
ever travels from a hospital to the aggregator; ``tests/test_threat_model.py`` checks it.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

# Message types ("<category>.<action>", routed by Flower's ClientApp)
MSG_STATS = "query.stats"  # hospitals -> encrypted feature sums (for the shared normalization)
MSG_UPLOAD = "train.upload"  # hospitals -> encrypted feature/label blocks
MSG_SUM = "query.sum"  # aggregator -> masked products; a hospital -> encrypted sums
MSG_PUBLIC_CONTEXT = "query.publiccontext"  # fallback when the lead hospital is gone
MSG_FINAL = "evaluate.final"  # aggregator -> the encrypted head; hospitals decrypt, evaluate

RECORD = "medfed"  # the one ConfigRecord in every message

# Keys inside the record
HOSPITAL = "hospital"
BUCKETS = "buckets"
STATS = "stats"
PUBLIC_CONTEXT = "public_context"
GALOIS_KEYS = "galois_keys"
MASKS = "masks"
KEY_FINGERPRINT = "key_fingerprint"
STATS_TOTAL = "stats_total"
LAYOUT = "layout"
POSITION = "position"  # the hospital's allocation index in the layout
BLOCKS = "blocks"
FEATURES = "x"
LABELS = "y"
MASKED = "masked"
SUMS = "sums"
STEP = "step"
WEIGHTS = "weights"
OK = "ok"


def make_content(**values) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord(values)})


def payload_bytes(content: RecordDict) -> int:
    """Bytes of ciphertexts, strings and scalars in a message (what a wire would carry)."""
    total = 0
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, bytes | str):
                    total += len(item)
                else:
                    total += 8
    return total


def describe(content: RecordDict) -> str:
    """Log-safe summary: key names and sizes, never key or ciphertext bytes."""
    parts = []
    for record in content.config_records.values():
        for key, value in record.items():
            if isinstance(value, bytes):
                parts.append(f"{key}=<{len(value)} bytes>")
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                parts.append(f"{key}=<{len(value)} ciphertexts>")
            else:
                parts.append(f"{key}={value!r}"[:80])
    return ", ".join(parts)
