"""An in-process Grid: runs the ClientApps directly, without Ray (tests, quick runs).

It implements the two Grid methods the aggregator uses. Replies are real Flower Messages
(errors included), so the aggregator's code path is the same as in Flower's simulation engine:
an exception that escapes a ClientApp becomes an :data:`~medfed.fl.messages.APP_RAISED` error
reply, as Flower's engine turns a ``ClientAppException`` into one. Dropouts and other faults
are the hospitals' own doing (:mod:`medfed.fl.faults`, a mod of their ClientApp), not this
grid's.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from medfed.fl import messages as M

try:  # flwr >= 1.41; the Python 3.10 threshold environment has flwr 1.30, which lacks it
    from flwr.supercore.task_identity import TaskIdentity
except ImportError:  # pragma: no cover - depends on the installed flwr
    TaskIdentity = None

NODE_ID_BASE = 1000


class LocalGrid:
    """``num_nodes`` hospitals served in this process by one ``client_app``; node ``i``'s
    ``partition-id`` is its hospital index (its node id is not in partition order, as in
    Flower, where ids are random)."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        for attr in ("_run_id", "_task_id", "_node_id") if TaskIdentity else ():
            if getattr(TaskIdentity, attr) is None:  # Messages need a task identity
                setattr(TaskIdentity, attr, 0)
        self.contexts = {
            NODE_ID_BASE + num_nodes - 1 - i: Context(
                run_id=0,
                node_id=NODE_ID_BASE + num_nodes - 1 - i,
                node_config={M.PARTITION_ID: i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        """The hospitals' node ids."""
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Run each message through its node's ClientApp, in order; one reply per message."""
        replies = []
        for msg in messages:
            self.sent.append(msg)
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = msg.metadata.dst_node_id
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as e:  # noqa: BLE001 - becomes an error reply, as in Flower
                reply = M.error_reply(msg, M.APP_RAISED, f"{type(e).__name__}: {e}")
            reply.metadata.__dict__["_src_node_id"] = node
            self.received.append(reply)
            replies.append(reply)
        return replies
