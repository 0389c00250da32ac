"""``python -m medfed.simulate``: run one federation and print a summary table.

Every option can also come from a YAML file (``--config configs/default.yaml``); flags given on
the command line override the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from medfed.config import SimulationConfig


def build_parser(prog: str = "python -m medfed.simulate") -> argparse.ArgumentParser:
    """The command line: every :class:`~medfed.config.SimulationConfig` field, ``--config``
    and ``-v``; options not given are left out (the config file's or the default apply)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Federated fine-tuning of a classification head on CKKS-encrypted DeiT "
        "embeddings (MedBlindTuner-style), with Flower hospitals and an untrusted aggregator.",
    )
    S = argparse.SUPPRESS
    p.add_argument("--config", help="YAML file with any of the options below")
    p.add_argument("--hospitals", type=int, default=S, help="number of hospitals (default 5)")
    p.add_argument(
        "--mode",
        default=S,
        metavar="{embeddings,updates}",
        help="embeddings (default: the aggregator trains on encrypted embeddings) or updates "
        "(hospitals train locally, the aggregator adds encrypted updates)",
    )
    p.add_argument(
        "--keys",
        default=S,
        metavar="{shared,threshold,none}",
        help="shared (default; one CKKS key held by every hospital), threshold (OpenFHE t-of-n "
        "keys, Python 3.10 with --features) or none (mode updates: plain FedAvg baseline)",
    )
    p.add_argument(
        "--dataset",
        default=S,
        help="MedMNIST flag (e.g. breastmnist, pneumoniamnist) or path to a MedMNIST-layout npz",
    )
    p.add_argument("--data-root", default=S, help="folder with MedMNIST npz files")
    p.add_argument(
        "--model",
        default=S,
        metavar="{deit_tiny,deit_small,deit_base}",
        help="frozen backbone (default deit_tiny)",
    )
    p.add_argument("--weights", default=S, help="local pretrained weights file for the backbone")
    p.add_argument("--img-size", type=int, default=S, help="backbone input size (default 224)")
    p.add_argument(
        "--split", default=S, metavar="{iid,dirichlet}", help="iid (default) or dirichlet"
    )
    p.add_argument("--alpha", type=float, default=S, help="Dirichlet concentration (0.5)")
    p.add_argument("--seed", type=int, default=S, help="partition seed (0)")
    p.add_argument(
        "--ckks",
        default=S,
        metavar="{fast,standard,deep}",
        help="CKKS preset: fast (default), standard, deep",
    )
    p.add_argument("--epochs", type=int, default=S, help="full-batch epochs (20)")
    p.add_argument("--lr", type=float, default=S, help="learning rate (1.0)")
    p.add_argument("--l2", type=float, default=S, help="L2 penalty on the head's weights (0.02)")
    p.add_argument(
        "--components",
        type=int,
        default=S,
        help="PCA-whitened width to train on, from securely summed moments (192; 0: "
        "standardize only)",
    )
    p.add_argument(
        "--samples-per-component",
        type=int,
        default=S,
        help="keep one whitened component per this many pooled training samples, at least 96; "
        "the rest of the width stays zero (64; 0: keep all)",
    )
    p.add_argument("--rounds", type=int, default=S, help="mode updates: FedAvg rounds (10)")
    p.add_argument(
        "--local-epochs", type=int, default=S, help="mode updates: local epochs per round (5)"
    )
    p.add_argument(
        "--dropouts",
        type=int,
        default=S,
        help="hospitals that stop answering mid-training (mode updates: from the middle round; "
        "mode embeddings, threshold keys: from the middle epoch's refresh) (0)",
    )
    p.add_argument(
        "--features",
        default=S,
        help="precomputed embeddings (.npz with train_features, train_labels, test_features, "
        "test_labels) instead of --dataset/--model; needs no torch",
    )
    p.add_argument("--sigmoid-degree", type=int, default=S, help="1, 3 (default) or 5")
    p.add_argument("--sigmoid-radius", type=float, default=S, help="approximation interval (24)")
    p.add_argument("--feature-scale", type=float, default=S, help="feature norm scale (1.0)")
    p.add_argument(
        "--bucket",
        type=int,
        default=S,
        help="padding granularity in samples (32); hospitals announce ceil(n / bucket), so a "
        "smaller bucket reveals sample counts more precisely",
    )
    p.add_argument(
        "--allow-small-bucket",
        action="store_true",
        default=S,
        help="accept --bucket below 32, which reveals each hospital's sample count to within "
        "the bucket (exactly with --bucket 1); recorded in metrics.json and the summary",
    )
    p.add_argument(
        "--backend",
        default=S,
        metavar="{flower,local,deploy}",
        help="flower (Ray simulation, default), local (in-process) or deploy (a local Flower "
        "deployment: separate processes, TLS, SuperNode auth; python -m medfed.deploy)",
    )
    p.add_argument(
        "--audit",
        action="store_true",
        default=S,
        help="with --backend deploy: record the files the aggregator's process opened and "
        "scan its memory for the hospitals' secrets (metrics.json 'deployment')",
    )
    p.add_argument("--workers", type=int, default=S, help="Ray encrypted batch workers (0)")
    p.add_argument(
        "--ray-address", default=S, help="join a running Ray cluster (default: $RAY_ADDRESS)"
    )
    p.add_argument("--client-cpus", type=float, default=S, help="CPUs per simulated hospital")
    p.add_argument("--cache-dir", default=S, help="feature cache folder")
    p.add_argument("--out", default=S, help="write config.yaml, rounds.jsonl, metrics.json here")
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=S,
        help="no progress bars (for logs and Ray jobs)",
    )
    p.add_argument(
        "--inject",
        action="append",
        default=S,
        metavar="SPEC",
        help="inject a fault (repeatable): dropout|crash|corrupt:hospital=I,round=STAGE or "
        "slow:hospital=I,seconds=S[,round=STAGE]; STAGE is stats, upload, sum-<epoch> or final",
    )
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=S,
        help="record-level differential privacy of the released head at this epsilon (noise "
        "calibrated to it; see docs/privacy.md)",
    )
    p.add_argument(
        "--dp-noise", type=float, default=S, help="the noise multiplier instead of --dp-epsilon"
    )
    p.add_argument("--dp-delta", type=float, default=S, help="the delta of --dp-epsilon (1e-5)")
    p.add_argument(
        "--dp-clip",
        type=float,
        default=S,
        help="updates: per-sample gradient norm bound; embeddings: feature row norm bound (1.0)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from_args(
    argv: list[str] | None = None, prog: str = "python -m medfed.simulate", **fixed: object
) -> tuple[SimulationConfig, bool]:
    """(the run's config: defaults, then ``--config`` file, then flags, then ``fixed``
    fields; ``-v`` given)."""
    args = vars(build_parser(prog).parse_args(argv)) | fixed
    verbose = args.pop("verbose")
    path = args.pop("config", None)
    base = SimulationConfig.from_yaml(path) if path else SimulationConfig()
    return SimulationConfig.from_dict({**base.to_dict(), **args}, source="command line"), verbose


def configure_logging(verbose: bool) -> None:
    """One console handler for every log line: medfed's own logs at INFO (DEBUG with -v);
    Flower, Ray and friends at ERROR (INFO with -v).

    Flower's ``flwr`` logger comes with a console handler of its own; it is removed, so that a
    Flower line (e.g. a hospital's exception) is printed once, by this handler, instead of
    once by each.
    """
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_time=False, markup=False)
    if not verbose:  # Flower resets its own logger's level at run time; filter at the handler
        handler.addFilter(
            lambda r: not r.name.startswith(("flwr", "ray")) or r.levelno >= logging.ERROR
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("medfed").setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("flwr", "ray", "alembic"):  # medfed reports client failures itself
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.ERROR)
    _drop_flower_console_handler()


def _drop_flower_console_handler() -> None:
    """Flower adds its console handler to ``flwr`` on import: import it now, then remove it
    (the ``flwr`` records still reach the root handler)."""
    from flwr.common.logger import ConsoleHandler

    flwr = logging.getLogger("flwr")
    for h in list(flwr.handlers):
        if isinstance(h, ConsoleHandler):
            flwr.removeHandler(h)


def main(
    argv: list[str] | None = None, prog: str = "python -m medfed.simulate", **fixed: object
) -> int:
    """Exit status 0 on success, 2 for a :class:`~medfed.errors.MedfedError` (its message names
    the fix), 1 for a :class:`~medfed.fl.messages.FederationError` (a run that could not finish).

    ``fixed``: config fields this entry point sets whatever the flags say (``medfed.deploy``'s
    backend).
    """
    from medfed.errors import MedfedError, format_user_error

    try:
        cfg, verbose = config_from_args(argv, prog, **fixed)
    except MedfedError as e:
        print(format_user_error(e), file=sys.stderr)
        return 2
    configure_logging(verbose)
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from medfed.embed import UntrainedBackboneWarning

    # logged once by medfed.embed and repeated in the summary; no duplicate Python warning
    warnings.filterwarnings("ignore", category=UntrainedBackboneWarning)
    from medfed.fl.messages import FederationError
    from medfed.runner import print_summary, run

    try:
        result = run(cfg)
    except FederationError as e:  # a MedfedError, but a run that failed: too few hospitals left
        print(format_user_error(e), file=sys.stderr)
        return 1
    except MedfedError as e:
        print(format_user_error(e), file=sys.stderr)
        return 2
    print_summary(result)
    if cfg.out:
        print(f"results written to {cfg.out}/metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
