"""An in-process Grid: runs the ClientApps directly, without Ray (tests, quick runs).

It implements the two Grid methods the aggregator uses. Replies are real Flower Messages
(errors included), so the aggregator's code path is the same as in Flower's simulation engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from medfed.fl.messages import FL_ROUND, RECORD

try:  # flwr >= 1.41; the Python 3.10 threshold environment has flwr 1.30, which lacks it
    from flwr.supercore.task_identity import TaskIdentity
except ImportError:  # pragma: no cover - depends on the installed flwr
    TaskIdentity = None

NODE_ID_BASE = 1000


class LocalGrid:
    """``unresponsive``: partition index -> the first FL round (``messages.FL_ROUND`` in a
    request) that hospital ignores; from then on it answers nothing (a simulated dropout)."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        fail: dict | None = None,
        unresponsive: dict[int, int] | None = None,
    ) -> None:
        self.client_app = client_app
        for attr in ("_run_id", "_task_id", "_node_id") if TaskIdentity else ():
            if getattr(TaskIdentity, attr) is None:  # Messages need a task identity
                setattr(TaskIdentity, attr, 0)
        # node ids are deliberately not in partition order (as in Flower, ids are random)
        self.contexts = {
            NODE_ID_BASE + num_nodes - 1 - i: Context(
                run_id=0,
                node_id=NODE_ID_BASE + num_nodes - 1 - i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.sent: list[Message] = []
        self.received: list[Message] = []
        drop = dict(unresponsive or {})
        self.unresponsive = {  # node id -> first ignored FL round
            node: drop[ctx.node_config["partition-id"]]
            for node, ctx in self.contexts.items()
            if ctx.node_config["partition-id"] in drop
        }
        self.silent: set[int] = set()  # nodes that have stopped answering

    def _ignores(self, msg: Message, node: int) -> bool:
        if node in self.unresponsive and node not in self.silent:
            record = msg.content.config_records.get(RECORD)
            fl_round = record.get(FL_ROUND) if record is not None else None
            if fl_round is not None and int(fl_round) >= self.unresponsive[node]:
                self.silent.add(node)
        return node in self.silent

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            if self._ignores(msg, node):
                continue  # no reply at all: the aggregator sees a timeout
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as e:  # noqa: BLE001 - becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            self.received.append(reply)
            replies.append(reply)
        return replies
