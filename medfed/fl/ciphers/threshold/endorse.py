"""Threshold key setup, signed end to end: what one hospital makes for the other hospitals (its
channel bundle, its link of the key chain) carries that hospital's Ed25519 signature under the
key pinned at provisioning (:mod:`medfed.crypto.signing`), so the aggregator that relays it
cannot swap it.

An endorsement covers the run id, the item (``bundle`` or ``key-chain``), the key-setup
session, the endorsing hospital's name, the party index it holds and the digest of the item's
bytes. The receiving hospital checks it against the key pinned for the hospital the aggregator
names as that party's holder: an aggregator that swaps in its own channel bundle (to open the
sealed Shamir shares and partial decryptions) or its own public key (to decrypt the updates)
has no hospital's signature for it. Every sealed hospital-to-hospital message is then signed
with a channel key from an endorsed bundle (:mod:`medfed.crypto.channel`).
"""

from __future__ import annotations

from collections.abc import Sequence

from medfed.crypto.signing import PinnedKeys, SignatureError, SigningKey, statement
from medfed.fl import messages as M

BUNDLE = "bundle"  # a hospital's channel public keys (X25519 + Ed25519)
KEY_CHAIN = "key-chain"  # a hospital's output of the key chain (the running public key)
_TO = "hospitals"


def _statement(run_id: str, item: str, session: str, signer: str, party: int, data: bytes):
    return statement(
        "endorsement",
        run_id=run_id,
        message_type="threshold",
        stage=item,
        round_id=session,
        sender=signer,
        recipient=_TO,
        digest=M.reply_digest({M.PARTY: int(party), item: bytes(data)}),
    )


def endorse(key: SigningKey, item: str, session: str, party: int, data: bytes) -> bytes:
    """This hospital's signature of ``data``, the ``item`` it made as ``party`` in ``session``."""
    return key.sign(_statement(key.pinned.run_id, item, session, key.name, party, data))


def check_endorsement(
    pinned: PinnedKeys,
    signer: str,
    signature: bytes,
    item: str,
    session: str,
    party: int,
    data: bytes,
) -> None:
    """Raise :class:`~medfed.crypto.signing.SignatureError` unless hospital ``signer`` (by its
    pinned key) endorsed ``data`` as ``item`` of ``party`` in ``session`` of this run."""
    if str(signer) not in pinned.hospitals:
        raise SignatureError(
            f"the {item} of party {party} is endorsed by {str(signer)[:40]!r}, not a hospital "
            "pinned for this run; refused"
        )
    message = _statement(pinned.run_id, item, session, str(signer), party, data)
    try:
        pinned.verify(str(signer), signature, message)
    except SignatureError as e:
        raise SignatureError(
            f"the {item} of party {party} relayed by the aggregator is not the one "
            f"{str(signer)[:40]!r} endorsed: {e}"
        ) from None


def check_peers(
    pinned: PinnedKeys,
    *,
    own: str,
    party: int,
    session: str,
    bundles: Sequence[bytes],
    endorsements: Sequence[bytes],
    signers: Sequence[str],
) -> dict[int, bytes]:
    """Every party's channel bundle, by index 1..n, each checked against its holder's pinned
    key; the holders must be distinct hospitals and this hospital (``own``) must hold
    ``party``. Raises :class:`~medfed.crypto.signing.SignatureError`."""
    names = [str(s) for s in signers]
    if not len(bundles) == len(endorsements) == len(names):
        raise SignatureError(
            f"{len(bundles)} bundles, {len(endorsements)} endorsements and {len(names)} "
            "holders: every bundle must come with its holder's endorsement; refused"
        )
    if len(set(names)) != len(names):
        raise SignatureError("one hospital is named as the holder of two parties; refused")
    if not 1 <= party <= len(names) or names[party - 1] != own:
        raise SignatureError(f"party {party} is not this hospital ({own!r}) in the list; refused")
    for k, (bundle, signature, name) in enumerate(zip(bundles, endorsements, names, strict=True)):
        check_endorsement(pinned, name, bytes(signature), BUNDLE, session, k + 1, bytes(bundle))
    return {k + 1: bytes(b) for k, b in enumerate(bundles)}
