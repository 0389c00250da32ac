"""The ServerApp shell shared by both modes (no crypto imports: the 3.10 threshold path uses it)."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp


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
