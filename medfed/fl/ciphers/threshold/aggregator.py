"""Key setup ``threshold``, the aggregator's side: :class:`ThresholdAggregatorCipher` runs
the key-setup chain (joint public key, sealed Shamir shares relayed unopened), adds
contributions with public keys only, and runs the partial-decryption rounds, recovering the
key shares of hospitals that dropped out (t-of-n). It relays each hospital's channel bundle and
key-chain link with that hospital's endorsement (:mod:`.endorse`), which it cannot forge."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from typing import Any

from medfed.crypto.errors import CiphertextError
from medfed.fl import messages as M
from medfed.fl.ciphers.base import AggregatorCipher, Exchange
from medfed.fl.ciphers.framing import chunk_sizes, frame, unframe


class ThresholdAggregatorCipher(AggregatorCipher):
    """Runs the key-setup chain and the partial-decryption rounds; adds with public keys only.

    Node ``k``-th in sorted node-id order becomes party ``k + 1`` (its position in the key
    chain and its Shamir x-coordinate). ``holders[s]`` is the party whose process holds key
    share ``s`` (``s`` itself, or the survivor that recovered it).
    """

    name = "threshold"
    collective = True

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        from medfed.crypto.threshold import (
            THRESHOLD_PRESETS,
            ThresholdParamsError,
            _require_openfhe,
        )

        _require_openfhe()
        n = settings.expected_hospitals
        preset = THRESHOLD_PRESETS[settings.threshold_preset]
        self.params = preset.with_parties(n, settings.threshold)
        # each round decrypts one aggregate (more when a partial round is redone); OpenFHE's
        # flooding noise is sized for max_decryptions under one joint key
        decryptions = getattr(settings, "decryptions", None) or settings.rounds + 2
        if decryptions > self.params.max_decryptions // 2:
            raise ThresholdParamsError(
                f"{decryptions} decryptions: the threshold preset's flooding covers "
                f"{self.params.max_decryptions} decryptions per key; use fewer rounds"
            )
        self.session_prefix = f"medfed-{getattr(settings, 'mode', 'updates')}"
        self.agg = None
        self.party: dict[int, int] = {}  # node -> party index
        self.holders: dict[int, int] = {}
        self.seal_round = 0
        self.recoveries: list[dict] = []
        self.decryptions: dict[int, int] = {}  # key share -> partial decryptions made with it
        self.refresh_round = 0  # sealed-digest rounds of the collective refresh so far
        self.refreshes: list[dict] = []  # per refresh round: step, ciphertexts, lead, parties

    @property
    def t(self) -> int:
        """The threshold: how many hospitals it takes to decrypt or recover a key share."""
        return self.params.threshold

    def _node(self, party: int) -> int:
        return next(n for n, p in self.party.items() if p == party)

    def _all(self, exchange: Exchange, stage: str, payloads: dict[int, dict]) -> dict:
        replies = exchange(stage, payloads, M.MSG_KEY_SETUP)
        missing = sorted(set(payloads) - set(replies))
        if missing:
            raise M.FederationError(
                f"threshold key setup ({stage}) needs every hospital, but "
                f"{len(missing)} did not complete it; rerun when all {self.params.parties} "
                "hospitals are available"
            )
        return replies

    def setup(self, exchange: Exchange, nodes: list[int], names: dict[int, str]) -> list[int]:
        """The key-setup chain over every hospital; refuses to run with any of them missing."""
        from medfed.crypto.threshold import ThresholdAggregator

        nodes = sorted(nodes)
        if len(nodes) != self.params.parties:
            raise M.FederationError(
                f"threshold keys for {self.params.parties} hospitals, but {len(nodes)} connected"
            )
        self.party = {n: k + 1 for k, n in enumerate(nodes)}
        self.holders = {p: p for p in self.party.values()}
        lead = nodes[0]
        params_json = json.dumps(self.params.to_dict())
        ctx = self._all(
            exchange,
            "key-context",
            {lead: {M.SETUP_STEP: "context", M.THRESHOLD_CONTEXT: params_json}},
        )[lead][M.THRESHOLD_CONTEXT]
        session = f"{self.session_prefix}-{secrets.token_hex(8)}"  # bound into every sealed message
        joined = self._all(
            exchange,
            "key-join",
            {
                n: {
                    M.SETUP_STEP: "join",
                    M.THRESHOLD_CONTEXT: ctx,
                    M.PARTY: self.party[n],
                    M.SESSION: session,
                }
                for n in nodes
            },
        )
        bundles = [bytes(joined[n][M.BUNDLE]) for n in nodes]
        endorsements = [bytes(joined[n][M.ENDORSEMENT]) for n in nodes]
        signers = [names[n] for n in nodes]  # each party's hospital, as its replies are signed
        running, endorsed, previous = None, None, None
        for n in nodes:  # the key chain: party k extends party k-1's public key
            payload = {M.SETUP_STEP: "keygen"}
            if running is not None:
                payload.update({M.PUBLIC_KEY: running, M.ENDORSEMENT: endorsed, M.SIGNER: previous})
            link = self._all(exchange, f"key-chain-{self.party[n]}", {n: payload})[n]
            running, endorsed, previous = link[M.PUBLIC_KEY], link[M.ENDORSEMENT], names[n]
        share = {
            M.SETUP_STEP: "share",
            M.PEERS: bundles,
            M.ENDORSEMENTS: endorsements,
            M.SIGNERS: signers,
            M.PUBLIC_KEY: running,
            M.ENDORSEMENT: endorsed,  # the last link's: the joint public key
        }
        joint = hashlib.sha256(bytes(running)).hexdigest()[:16]  # every party's, once it accepts
        self.key_ids = {"aggregator": joint} | {names[n]: joint for n in nodes}
        self.context_id = hashlib.sha256(bytes(ctx)).hexdigest()[:16]
        shared = self._all(exchange, "key-share", {n: dict(share) for n in nodes})
        inbox: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in nodes}
        for n in nodes:  # relay each sealed Shamir share to its recipient, unopened
            for r, blob in zip(shared[n][M.RECIPIENTS], shared[n][M.SEALED], strict=True):
                senders, blobs = inbox[self._node(int(r))]
                senders.append(self.party[n])
                blobs.append(blob)
        self._all(
            exchange,
            "key-accept",
            {
                n: {M.SETUP_STEP: "accept", M.SENDERS: inbox[n][0], M.SEALED: inbox[n][1]}
                for n in nodes
            },
        )
        self.agg = ThresholdAggregator(ctx, running)
        return nodes

    # -- joint evaluation keys (mode "embeddings") -----------------------------------------
    def eval_keys(self, exchange: Exchange, steps: Sequence[int], chunk: int = 6) -> None:
        """The joint relinearization and rotation keys (``steps``), from every hospital.

        Round A in chunks of ``chunk`` steps (a hospital's share is ~18 MB per step at the
        training preset; chunks keep each message far below gRPC's 512 MB): party 1 first,
        then the others on its public parts. Round B: each key share's relinearization share
        from the hospital holding it. Every hospital must answer, as in the key chain.
        """
        nodes = sorted(self.party)
        lead = self._node(1)
        others = [n for n in nodes if n != lead]
        switch = None
        steps = sorted({int(k) for k in steps})
        for c, start in enumerate(range(0, len(steps), chunk)):
            part = steps[start : start + chunk]
            ask = {M.SETUP_STEP: "eval_keys", M.STEPS: part}
            first = self._all(exchange, f"eval-keys-{c}-lead", {lead: dict(ask)})[lead][M.SHARE]
            rest = self._all(
                exchange,
                f"eval-keys-{c}",
                {n: {**ask, M.LEAD_SHARE: first} for n in others},
            )
            shares = [bytes(first)] + [bytes(rest[n][M.SHARE]) for n in others]
            joined = self.agg.join_eval_key_shares(shares)
            switch = switch or joined
        held = {n: sorted(s for s, h in self.holders.items() if h == self.party[n]) for n in nodes}
        got = self._all(
            exchange,
            "mult-keys",
            {
                n: {M.SETUP_STEP: "mult_key", M.SWITCH_KEY: switch, M.KEY_SHARES: held[n]}
                for n in nodes
                if held[n]
            },
        )
        by_share: dict[int, bytes] = {}
        for n, rec in got.items():
            blobs = list(rec[M.SHARES])
            if len(blobs) != len(held[n]):
                raise M.FederationError(f"{len(blobs)} relinearization shares for {held[n]}")
            by_share.update({s: bytes(b) for s, b in zip(held[n], blobs, strict=True)})
        self.agg.join_mult_key_shares([by_share[s] for s in sorted(by_share)])

    # -- collective refresh (mode "embeddings") ---------------------------------------------
    def refresh(
        self, exchange: Exchange, live: list[int], blobs: Sequence[bytes], step: int
    ) -> tuple[list[bytes], list[int]]:
        """Fresh top-level encryptions of ``blobs`` by every key share (a live hospital answers
        for the key shares it recovered), and the nodes still live afterwards.

        Two rounds: ``element-<step>`` (the lowest live party makes the common random
        elements and seals their digests to the others) and ``sum-<step>`` (every live
        hospital's shares). A hospital gone in either is dropped, its key share recovered,
        and the refresh redone with fresh elements.
        """
        while True:
            live = self._recover(exchange, list(live), step)
            lead_party = min(self.party[n] for n in live)
            lead = self._node(lead_party)
            inputs = [self.agg.refresh_input(bytes(b)) for b in blobs]
            first = self.refresh_round + 1
            self.refresh_round += len(blobs)
            got = exchange(
                f"element-{step}",
                {lead: {M.COUNT: len(blobs), M.STEP: first}},
                M.MSG_REFRESH_ELEMENT,
            )
            if lead not in got:
                live = [n for n in live if n != lead]
                continue
            elements = [bytes(a) for a in got[lead][M.ELEMENTS]]
            digests = dict(zip(got[lead][M.RECIPIENTS], got[lead][M.SEALED], strict=True))
            if len(elements) != len(blobs) or set(digests) != set(
                range(1, self.params.parties + 1)
            ) - {lead_party}:
                raise M.FederationError(
                    f"the refresh's lead sent {len(elements)} elements for {len(blobs)} ciphertexts"
                )
            c1s = [c1 for _, c1 in inputs]
            payloads = {
                n: {
                    M.C1: c1s,
                    M.ELEMENTS: elements,
                    M.STEP: first,
                    M.LEAD: lead_party,
                    **({} if n == lead else {M.SEALED: digests[self.party[n]]}),
                }
                for n in live
            }
            replies = exchange(f"sum-{step}", payloads, M.MSG_REFRESH)
            usable = {
                n: list(rec[M.SHARES])
                for n, rec in replies.items()
                if len(rec[M.SHARES]) == len(blobs)
            }
            if set(usable) != set(live):
                live = [n for n in live if n in usable]
                continue
            fresh = [
                self.agg.refresh_output(adjusted, elements[k], [bytes(usable[n][k]) for n in live])
                for k, (adjusted, _) in enumerate(inputs)
            ]
            self.refreshes.append(
                {
                    "step": step,
                    "ciphertexts": len(blobs),
                    "lead": lead_party,
                    "hospitals": len(live),
                }
            )
            return fresh, live

    def check(self, blob: bytes, *, sender: str, length: int) -> None:
        """Parses every ciphertext, checking its context and joint-key tag."""
        from medfed.crypto.threshold import ThresholdError

        parts = unframe(blob, sender=sender)
        sizes = chunk_sizes(length, self.agg.context.slots)
        if len(parts) != len(sizes):
            raise CiphertextError(f"update from {sender}: {len(parts)} ciphertexts, not {sizes}")
        try:
            for p in parts:
                self.agg.add([p])  # parses, checks the context and the joint key tag
        except ThresholdError as e:
            raise CiphertextError(f"update from {sender}: {e}") from None

    def add(self, blobs: Sequence[bytes]) -> bytes:
        """The ciphertext-wise sum of the contributions, framed like one."""
        split = [unframe(b) for b in blobs]
        return frame([self.agg.add([s[k] for s in split]) for k in range(len(split[0]))])

    # -- decryption: partial round, with Shamir recovery of missing key shares --------------
    def _recover(self, exchange: Exchange, live: list[int], fl_round: int) -> list[int]:
        """Make a live hospital hold every key share whose holder is gone."""
        while True:
            alive = {self.party[n] for n in live}
            missing = sorted(s for s, h in self.holders.items() if h not in alive)
            if not missing:
                return live
            if len(alive) < self.t:
                raise M.FederationError(
                    f"only {len(alive)} hospitals remain; the {self.t}-of-{self.params.parties} "
                    f"threshold setup cannot recover key shares {missing}, so nobody can decrypt"
                )
            share = missing[0]
            recoverer, *helpers = sorted(alive)
            helpers = helpers[: self.t - 1]
            self.seal_round += 1
            got = exchange(
                f"recover-share-{share}",
                {
                    self._node(h): {
                        M.SETUP_STEP: "recovery_share",
                        M.DROPPED: share,
                        M.RECOVERER: recoverer,
                        M.STEP: self.seal_round,
                        M.FL_ROUND: fl_round,
                    }
                    for h in helpers
                },
                M.MSG_KEY_SETUP,
            )
            gone = [self._node(h) for h in helpers if self._node(h) not in got]
            if gone:  # a helper is gone too: drop it and try again
                live = [n for n in live if n not in gone]
                continue
            node = self._node(recoverer)
            done = exchange(
                f"recover-{share}",
                {
                    node: {
                        M.SETUP_STEP: "recover",
                        M.DROPPED: share,
                        M.SENDERS: helpers,
                        M.SEALED: [got[self._node(h)][M.SEALED][0] for h in helpers],
                        M.STEP: self.seal_round,
                        M.FL_ROUND: fl_round,
                    }
                },
                M.MSG_KEY_SETUP,
            )
            if node not in done:
                live = [n for n in live if n != node]
                continue
            self.holders[share] = recoverer
            self.recoveries.append({"share": share, "recovered_by": recoverer, "round": fl_round})

    def decrypt_material(
        self, exchange: Exchange, aggregate: bytes, live: list[int], fl_round: int
    ) -> tuple[dict[int, dict], list[int]]:
        """A partial-decryption round (redone after recovering leavers' key shares); each live
        hospital's material is the sealed partials addressed to it, relayed unopened."""
        per_share = len(unframe(aggregate))  # one partial decryption per ciphertext and share
        while True:
            live = self._recover(exchange, list(live), fl_round)
            self.seal_round += 1
            recipients = sorted(self.party[n] for n in live)
            replies = exchange(
                f"partial-{fl_round}",
                {
                    n: {
                        M.AGGREGATE: aggregate,
                        M.RECIPIENTS: recipients,
                        M.STEP: self.seal_round,
                        M.FL_ROUND: fl_round,
                    }
                    for n in live
                },
                M.MSG_PARTIAL,
            )
            for n in replies:  # a hospital that answered decrypted with every share it holds
                for share in (s for s, h in self.holders.items() if h == self.party[n]):
                    self.decryptions[share] = self.decryptions.get(share, 0) + per_share
            if set(replies) == set(live):
                break
            live = [n for n in live if n in replies]  # recover the leavers' shares, redo
        material: dict[int, dict] = {
            n: {M.SENDERS: [], M.SEALED: [], M.STEP: self.seal_round} for n in live
        }
        for n in live:  # relay every sealed partial decryption to its recipient, unopened
            for r, blob in zip(replies[n][M.RECIPIENTS], replies[n][M.SEALED], strict=True):
                target = material[self._node(int(r))]
                target[M.SENDERS].append(self.party[n])
                target[M.SEALED].append(blob)
        return material, live

    def public_parameters(self) -> dict:
        """The threshold context's digest and the joint public key's, for every party."""
        return {
            "threshold_context": getattr(self, "context_id", None),
            "key_by_party": dict(getattr(self, "key_ids", {})),
        }

    def describe(self) -> dict:
        """t, n, the threshold parameters and the key-share recoveries so far."""
        return {
            "keys": "threshold",
            "t": self.t,
            "n": self.params.parties,
            "params": self.params.to_dict(),
            "recoveries": self.recoveries,
            # the decryption budget: partial decryptions made per key share (each hospital
            # counts its own and refuses beyond max_decryptions); "decryptions": the most-used
            "decryptions": max(self.decryptions.values(), default=0),
            "decryptions_by_share": {str(s): k for s, k in sorted(self.decryptions.items())},
            "max_decryptions": self.params.max_decryptions,
        }
