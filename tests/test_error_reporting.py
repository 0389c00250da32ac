"""How failures are reported: every error reply carries one of Flower's codes, named once in
medfed.fl.messages, and each Flower log line reaches the console once."""

import ast
import logging
from pathlib import Path

from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

import medfed
from medfed.fl import messages as M
from medfed.fl.local_grid import LocalGrid
from medfed.fl.updates import make_updates_hospital_app


def test_the_named_codes_are_flowers_own():
    assert M.NODE_UNAVAILABLE == ErrorCode.NODE_UNAVAILABLE
    assert M.APP_RAISED == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert M.APP_CRASHED == ErrorCode.CLIENT_APP_CRASHED
    assert M.NODE_UNAVAILABLE in M.NO_REPLY_CODES
    assert M.APP_RAISED not in M.NO_REPLY_CODES and M.APP_CRASHED not in M.NO_REPLY_CODES


def test_only_messages_builds_error_replies():
    """Error(...) is constructed in medfed.fl.messages only (error_reply), never with a bare
    number elsewhere."""
    root = Path(medfed.__file__).parent
    builders = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Error":
                builders.add(str(path.relative_to(root)))
    assert builders == {"fl/messages.py"}


def _message(message_type: str, grid: LocalGrid) -> Message:
    node = next(iter(grid.get_node_ids()))
    return Message(
        M.make_content(**{M.STAGE: "stats"}), dst_node_id=node, message_type=message_type
    )


def test_an_exception_escaping_a_client_app_is_an_app_raised_reply():
    app = ClientApp()

    @app.query("stats")
    def stats(msg, context):
        raise RuntimeError("boom")

    grid = LocalGrid(app, 1)
    (reply,) = grid.send_and_receive([_message(M.MSG_STATS, grid)])
    assert reply.error.code == M.APP_RAISED and reply.error.reason == "RuntimeError: boom"


def test_a_failing_hospital_handler_replies_app_raised_and_keeps_the_details(tmp_path):
    from tests.conftest import synthetic_hospitals
    from tests.fl_helpers import provision_signed

    meta = {"keys": "none", "n_classes": 2, "ckks": "fast", "feature_scale": 1.0}
    aggregator = provision_signed(tmp_path, synthetic_hospitals(1, n=20, d=4), None, meta)
    (tmp_path / "hospital_0" / "data.npz").unlink()  # no data: loading it fails
    grid = LocalGrid(make_updates_hospital_app(tmp_path), 1)
    msg = _message(M.MSG_UPDATE_STATS, grid)
    values = {**msg.content[M.RECORD], M.ROUND_ID: "stats/x"}  # signed, as the aggregator does
    values[M.SIGNATURE] = M.sign_request(
        aggregator, values, M.MSG_UPDATE_STATS, msg.metadata.dst_node_id
    )
    msg = Message(
        M.make_content(**values),
        dst_node_id=msg.metadata.dst_node_id,
        message_type=M.MSG_UPDATE_STATS,
    )
    (reply,) = grid.send_and_receive([msg])
    assert reply.error.code == M.APP_RAISED
    assert reply.error.reason == (
        "hospital-0: stats failed; details are in the hospital's own errors.log"
    )  # no error class: it would tell a failed decryption from any other failure
    assert "data.npz" in (tmp_path / "hospital_0" / "errors.log").read_text()


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of ``logger`` reaches (its own, then its ancestors')."""
    found: list[logging.Handler] = []
    while logger is not None:
        found += logger.handlers
        logger = logger.parent if logger.propagate else None
    return found


def test_a_flower_log_line_is_printed_once_by_medfeds_handler():
    import flwr.common.logger  # noqa: F401 - Flower adds its console handler on import
    from rich.logging import RichHandler

    from medfed.simulate import configure_logging

    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    saved = (root.handlers[:], root.level, flwr.handlers[:], flwr.level)
    try:
        assert len(_console_handlers(flwr)) >= 1
        configure_logging(False)
        (handler,) = _console_handlers(flwr)
        assert isinstance(handler, RichHandler)
        assert not handler.filter(flwr.makeRecord("flwr", logging.INFO, "", 0, "x", (), None))
        assert handler.filter(flwr.makeRecord("flwr", logging.ERROR, "", 0, "x", (), None))
    finally:
        root.handlers[:], flwr.handlers[:] = saved[0], saved[2]
        root.setLevel(saved[1])
        flwr.setLevel(saved[3])
