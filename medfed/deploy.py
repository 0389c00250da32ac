"""``python -m medfed.deploy``: run one federation as a local Flower deployment.

The same options and config files as ``python -m medfed.simulate`` and the same
``metrics.json``; the parties are separate OS processes on 127.0.0.1: a SuperLink (TLS,
SuperNode authentication), one SuperNode per hospital (its own workspace, data partition and
keys, provisioned in its own process) and the aggregator's ServerApp, started with
``flwr run``. Every process is stopped at the end. See docs/deployment.md.
"""

from __future__ import annotations

import sys

from medfed.simulate import main as simulate_main

PROG = "python -m medfed.deploy"


def main(argv: list[str] | None = None) -> int:
    """Exit status as ``python -m medfed.simulate``'s; the backend is always "deploy"."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--backend" or a.startswith("--backend=") for a in args):
        print(f"{PROG} always deploys; drop --backend (or use python -m medfed.simulate)")
        return 2
    return simulate_main(args, PROG, backend="deploy")


if __name__ == "__main__":
    sys.exit(main())
