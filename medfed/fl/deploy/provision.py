"""Each party's own provisioning step, run as its own process in its own directory.

``python -m medfed.fl.deploy.provision STEP DIR ...``:

* ``identity DIR NAME``: the party makes its keys in ``DIR`` (0600): ``signing_key.bin``
  (Ed25519, signs its protocol messages), ``channel_identity.bin`` (X25519 + Ed25519, opens
  what is sealed to it) and, for a hospital, ``supernode_auth.key`` (EC P-384, Flower's
  SuperNode authentication). Only the public halves go to ``DIR/public.json``, which the
  operator copies into the run's public directory: the one thing every party trusts.
* ``share-key DIR``: the lead hospital makes the run's shared CKKS key (its own
  ``secret_context.bin``) and seals it to every other hospital's channel key
  (:func:`medfed.crypto.channel.seal`: X25519 + HKDF + AES-GCM, signed, bound to the run
  id, both names and the purpose) into the public mailbox directory.
* ``receive-key DIR``: a hospital opens the key the lead sealed to it, checks the lead's
  signature under the lead's published bundle, and writes its own ``secret_context.bin``.

The aggregator runs ``identity`` only: it never holds a CKKS secret key, and what passes
through the mailbox is sealed to one hospital each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medfed.crypto.channel import Identity, channel_context, open_sealed, seal
from medfed.crypto.signing import new_key_pair
from medfed.fl.workspace import SECRET_CONTEXT, SIGNING_KEY, write_private

CHANNEL_IDENTITY = "channel_identity.bin"
NODE_AUTH_KEY = "supernode_auth.key"
PUBLIC = "public.json"
PURPOSE_SHARED_KEY = "shared-ckks-key"


def make_identity(directory: Path, name: str, *, node_auth: bool) -> dict[str, str]:
    """Make a party's keys in ``directory``; write and return its public half."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    private, public = new_key_pair()
    write_private(directory / SIGNING_KEY, private)
    identity = Identity.generate()
    write_private(directory / CHANNEL_IDENTITY, identity.private_bytes())
    out = {"name": name, "signing": public.hex(), "bundle": identity.public_bundle().hex()}
    if node_auth:
        from medfed.fl.deploy.pki import make_node_auth_key

        out["node_auth"] = make_node_auth_key(directory / NODE_AUTH_KEY).decode()
    (directory / PUBLIC).write_text(json.dumps(out))
    return out


def published(public_dir: Path, name: str) -> dict[str, str]:
    """Party ``name``'s public half from the run's public directory."""
    path = public_dir / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `identity` for {name!r} first")
    return json.loads(path.read_text())


def _sealed_path(mailbox: Path, lead: str, recipient: str) -> Path:
    return mailbox / f"{lead}--{recipient}.sealed"


def share_key(
    directory: Path,
    name: str,
    ckks: str,
    run_id: str,
    recipients: list[str],
    public_dir: Path,
    mailbox: Path,
) -> None:
    """The lead hospital: make the shared CKKS key, keep it, seal it to each recipient."""
    from medfed.crypto.context import make_secret_context, secret_context_bytes
    from medfed.crypto.params import get_preset

    identity = Identity.from_private_bytes((directory / CHANNEL_IDENTITY).read_bytes())
    secret = secret_context_bytes(make_secret_context(get_preset(ckks)))
    write_private(directory / SECRET_CONTEXT, secret)
    mailbox.mkdir(parents=True, exist_ok=True)
    for recipient in recipients:
        bundle = bytes.fromhex(published(public_dir, recipient)["bundle"])
        context = channel_context(run_id, 0, name, recipient, PURPOSE_SHARED_KEY)
        _sealed_path(mailbox, name, recipient).write_bytes(seal(identity, bundle, secret, context))


def receive_key(
    directory: Path, name: str, lead: str, run_id: str, public_dir: Path, mailbox: Path
) -> None:
    """A hospital: open the shared CKKS key ``lead`` sealed to it; keep it in ``directory``."""
    from medfed.crypto.context import load_secret_context

    identity = Identity.from_private_bytes((directory / CHANNEL_IDENTITY).read_bytes())
    bundle = bytes.fromhex(published(public_dir, lead)["bundle"])
    context = channel_context(run_id, 0, lead, name, PURPOSE_SHARED_KEY)
    secret = open_sealed(identity, bundle, _sealed_path(mailbox, lead, name).read_bytes(), context)
    load_secret_context(secret)  # a CKKS context with its secret key, or refused here
    write_private(directory / SECRET_CONTEXT, secret)


def main(argv: list[str] | None = None) -> int:
    """Command line: one provisioning step of one party (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m medfed.fl.deploy.provision")
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("identity", help="make this party's keys")
    p.add_argument("dir", type=Path)
    p.add_argument("name")
    p.add_argument("--node-auth", action="store_true", help="also a SuperNode auth key")
    for step in ("share-key", "receive-key"):
        p = steps.add_parser(step)
        p.add_argument("dir", type=Path)
        p.add_argument("name")
        p.add_argument("--run-id", required=True)
        p.add_argument("--public", type=Path, required=True, help="the run's public directory")
        p.add_argument("--mailbox", type=Path, required=True)
        if step == "share-key":
            p.add_argument("--ckks", required=True)
            p.add_argument("--to", nargs="*", default=[], help="the other hospitals' names")
        else:
            p.add_argument("--lead", required=True)
    args = parser.parse_args(argv)
    if args.step == "identity":
        make_identity(args.dir, args.name, node_auth=args.node_auth)
    elif args.step == "share-key":
        share_key(args.dir, args.name, args.ckks, args.run_id, args.to, args.public, args.mailbox)
    else:
        receive_key(args.dir, args.name, args.lead, args.run_id, args.public, args.mailbox)
    return 0


if __name__ == "__main__":
    sys.exit(main())
