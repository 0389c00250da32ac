"""Server-side pieces shared by both modes (crypto-free: the 3.10 threshold path uses them)."""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from medfed.crypto.signing import SigningKey
from medfed.fl import messages as M

log = logging.getLogger(__name__)


def make_aggregator_server_app(make_aggregator: Callable[[], object], results: dict) -> ServerApp:
    """A ServerApp that runs ``make_aggregator().run(grid)`` and fills ``results`` when done.

    Both modes' aggregators expose ``run(grid) -> dict`` and a ``ledger`` of exclusions.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        aggregator = make_aggregator()
        try:
            results.update(aggregator.run(grid))
        except Exception as e:  # noqa: BLE001 - reported to the caller, not swallowed
            results["error"] = f"{type(e).__name__}: {e}"
            results["excluded"] = aggregator.ledger.excluded
            raise

    return app


def log_safe(text: str, limit: int = 300) -> str:
    """A reason fit for logs and metrics.json: printable, one line, bounded length."""
    text = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Ray's exceptions for a hospital process that died, which Flower's simulation engine relays
#: as the reply's error reason (``<class 'ray.exceptions.X'>:<'...'>``).
_PROCESS_DIED = ("ActorDiedError", "ActorUnavailableError", "OutOfMemoryError", "RayActorError")


def error_reason(reason: str) -> str:
    """An error reply's reason for the ledger: a dead hospital process in one sentence."""
    died = [e for e in _PROCESS_DIED if f"ray.exceptions.{e}" in str(reason)]
    if not died:
        return log_safe(reason)
    memory = ", killed for lack of memory" if "OutOfMemoryError" in died else ""
    return f"the hospital's process died mid-round{memory} (Ray: {died[0]}; see Ray's logs)"


@dataclass
class Ledger:
    """Bytes and seconds per party and per round, as the aggregator observes them."""

    up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    rounds: list[dict] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    received: dict[int | str, dict[str, dict]] = field(default_factory=dict)

    def note(self, party: int | str, stage: str, content) -> int:
        """Add one message that ``party`` (a node id, or ``"aggregator"``) received in
        ``stage`` to the per-party audit, by message kind (the stage without its epoch);
        returns its size (:func:`~medfed.fl.messages.payload_bytes`)."""
        kind = stage.rstrip("0123456789").rstrip("-") or stage
        got = M.inventory(content)
        entry = self.received.setdefault(party, {}).setdefault(
            kind, {"messages": 0, "binary": 0, "plain": 0, "bytes": 0, "fields": {}}
        )
        entry["messages"] += 1
        for key in ("binary", "plain", "bytes"):
            entry[key] += got[key]
        for name, how in got["fields"].items():
            before = entry["fields"].get(name, how)
            entry["fields"][name] = how if before == how else "mixed"
        return got["bytes"]

    def audit(self, name: Callable[[int], str]) -> dict[str, dict[str, dict]]:
        """The per-party audit with hospital names: what each party received, by kind."""
        return {
            (party if isinstance(party, str) else name(party)): kinds
            for party, kinds in self.received.items()
        }

    def exclude(self, stage: str, hospital: str, reason: str) -> None:
        """Record (and log) that ``hospital`` was left out of ``stage``, with a log-safe reason."""
        reason = log_safe(reason)
        log.warning("excluding %s from %s: %s", hospital, stage, reason)
        self.excluded.append({"stage": stage, "hospital": hospital, "reason": reason})


class RoundExchange:
    """The round loop both modes' strategies share: one Flower message per node, checked replies.

    Subclasses provide ``self.s`` (``reply_timeout``, ``node_wait_seconds``,
    ``expected_hospitals``, ``min_hospitals``, and ``signing``: the aggregator's
    :class:`~medfed.crypto.signing.SigningKey` with every party's pinned public key),
    ``self.ledger`` (:class:`Ledger`) and ``self.names`` (node id -> hospital name).
    """

    s: object
    ledger: Ledger
    names: dict[int, str]

    def _name(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def exchange_round(
        self,
        grid: Grid,
        stage: str,
        payloads: dict[int, dict],
        message_type: str,
        *,
        learn_names: bool = False,
    ) -> dict[int, Mapping]:
        """Send one message per node; return the accepted replies' records by node.

        Each message names the stage, carries a fresh round id and is signed by the
        aggregator (:func:`~medfed.fl.messages.sign_request`). A reply is accepted only if it
        comes from a node this round addressed, is not an error, echoes that node's round id,
        keeps the node's announced name, matches its digest and is signed by that hospital's
        pinned key for this run, message type, stage and round
        (:func:`~medfed.fl.messages.verify_reply`); every other node is excluded from the
        stage with the reason (no reply, error, or envelope violation). With ``learn_names`` a
        node's first accepted reply tells its hospital name.
        """
        key = self._signing_key()
        t0 = time.perf_counter()
        msgs, sent, down, up = [], {}, 0, 0
        for node, values in payloads.items():
            sent[node] = f"{stage}/{secrets.token_hex(8)}"
            values = {**values, M.STAGE: stage, M.ROUND_ID: sent[node]}
            values[M.SIGNATURE] = M.sign_request(key, values, message_type, node)
            content = M.make_content(**values)
            size = self.ledger.note(node, stage, content)
            self.ledger.down[node] += size
            down += size
            msgs.append(Message(content, dst_node_id=node, message_type=message_type))
        replies = grid.send_and_receive(msgs, timeout=self.s.reply_timeout)
        out: dict[int, Mapping] = {}
        failed: set[int] = set()
        gone: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in sent or node in out or node in failed:
                log.warning("ignoring an unexpected reply from node %s in %s", node, stage)
                continue
            if reply.has_error():
                if reply.error.code in M.NO_REPLY_CODES:
                    gone.add(node)  # the node is gone: handled below, like a timeout
                    continue
                failed.add(node)
                self.ledger.exclude(stage, self._name(node), error_reason(reply.error.reason))
                continue
            size = self.ledger.note("aggregator", stage, reply.content)
            self.ledger.up[node] += size
            up += size
            try:
                record = reply.content[M.RECORD]
                M.check_reply(
                    record,
                    round_id=sent[node],
                    hospital=self.names.get(node),
                    party=self._name(node),
                )
                claimed = record.get(M.HOSPITAL)
                M.verify_reply(
                    record,
                    key.pinned,
                    message_type=message_type,
                    stage=stage,
                    sender=self.names.get(node, None if claimed is None else str(claimed)),
                )
            except (M.ProtocolError, KeyError) as e:
                failed.add(node)
                self.ledger.exclude(stage, self._name(node), log_safe(str(e)))
                continue
            if learn_names and node not in self.names and M.HOSPITAL in record:
                self.names[node] = str(record[M.HOSPITAL])
            out[node] = record
            log.debug("%s: %s replied %s", stage, self._name(node), M.describe(reply.content))
        for node in payloads:
            if node not in out and node not in failed:
                self.ledger.exclude(
                    stage,
                    self._name(node),
                    "no reply: the node is unavailable"
                    if node in gone
                    else "no reply before the timeout",
                )
        self.ledger.rounds.append(
            {
                "stage": stage,
                "nodes": sorted(out),
                "seconds": round(time.perf_counter() - t0, 4),
                "bytes_down": down,
                "bytes_up": up,
            }
        )
        return out

    def _signing_key(self) -> SigningKey:
        key = getattr(self.s, "signing", None)
        if key is None:
            raise M.FederationError(
                "the aggregator has no signing key, so no hospital would accept its requests: "
                "provision the run's keys with medfed.crypto.signing.provision_keys and give "
                "the aggregator's key as its settings' `signing` (run_in_workspace does)"
            )
        return key

    def named_rounds(self) -> list[dict]:
        """The ledger's rounds with hospital names (known by the end of the run)."""
        return [
            {
                "stage": r["stage"],
                "hospitals": [self._name(n) for n in r["nodes"]],
                "seconds": r["seconds"],
                "bytes_down": r["bytes_down"],
                "bytes_up": r["bytes_up"],
            }
            for r in self.ledger.rounds
        ]

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once ``expected_hospitals`` are (or ``node_wait_seconds`` passed).

        Raises :class:`~medfed.fl.messages.FederationError` with fewer than ``min_hospitals``.
        """
        deadline = time.monotonic() + self.s.node_wait_seconds
        nodes: list[int] = []
        while time.monotonic() < deadline:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= self.s.expected_hospitals:
                return nodes
            time.sleep(0.1)
        if len(nodes) < self.s.min_hospitals:
            raise M.FederationError(f"only {len(nodes)} hospitals connected")
        return nodes
