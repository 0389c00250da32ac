"""Server-side pieces shared by both modes (crypto-free: the 3.10 threshold path uses them)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

log = logging.getLogger(__name__)


def make_strategy_app(make_strategy: Callable[[], object], results: dict) -> ServerApp:
    """A ServerApp that runs ``make_strategy().run(grid)`` and fills ``results`` when done.

    Both modes' strategies expose ``run(grid) -> dict`` and a ``ledger`` of exclusions.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = make_strategy()
        try:
            results.update(strategy.run(grid))
        except Exception as e:  # noqa: BLE001 - reported to the caller, not swallowed
            results["error"] = f"{type(e).__name__}: {e}"
            results["excluded"] = strategy.ledger.excluded
            raise

    return app


def log_safe(text: str, limit: int = 300) -> str:
    """A reason fit for logs and metrics.json: printable, one line, bounded length."""
    text = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Ledger:
    """Bytes and seconds per party and per round, as the aggregator observes them."""

    up: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    down: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    rounds: list[dict] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)

    def exclude(self, stage: str, hospital: str, reason: str) -> None:
        reason = log_safe(reason)
        log.warning("excluding %s from %s: %s", hospital, stage, reason)
        self.excluded.append({"stage": stage, "hospital": hospital, "reason": reason})
