"""An in-process Grid: runs the ClientApps directly, without Ray (tests, quick runs).

It implements the two Grid methods the aggregator uses. Replies are real Flower Messages
(errors included), so the aggregator's code path is the same as in Flower's simulation engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

NODE_ID_BASE = 1000


class LocalGrid:
    def __init__(self, client_app: ClientApp, num_nodes: int, fail: dict | None = None) -> None:
        self.client_app = client_app
        for attr in ("_run_id", "_task_id", "_node_id"):  # Messages need a task identity
            if getattr(TaskIdentity, attr) is None:
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
            try:
                reply = self.client_app(msg, self.contexts[node])
            except Exception as e:  # noqa: BLE001 - becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            self.received.append(reply)
            replies.append(reply)
        return replies
