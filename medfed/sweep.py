"""``python -m medfed.sweep CONFIG --out DIR``: run a grid of federations in parallel on Ray.

The grid comes from a YAML file (see ``configs/sweep_*.yaml`` and
:mod:`medfed.experiments.sweep`). Cells run as Ray tasks on a local Ray, or on a running
cluster given by ``--ray-address`` / ``RAY_ADDRESS`` (set by ``ray job submit``). Rerunning
into the same ``--out`` skips finished cells. Exit status: 0 all cells done, 1 some cell
failed (recorded with its error), 2 a usage error, 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m medfed.sweep``."""
    p = argparse.ArgumentParser(
        prog="python -m medfed.sweep",
        description="Run a grid of medfed federations (a sweep YAML from configs/) as Ray "
        "tasks, resumably, writing results.csv, plots and report.md.",
    )
    p.add_argument("config", help="sweep YAML with base:, grid: (e.g. configs/sweep_smoke.yaml)")
    p.add_argument("--out", help="output directory (default runs/sweeps/<name>)")
    p.add_argument(
        "--ray-address",
        help="GCS address of a running Ray cluster (host:6379 or 'auto'); default "
        "$RAY_ADDRESS, else a local Ray",
    )
    p.add_argument("--max-concurrency", type=int, help="cells in flight at once (default: all)")
    p.add_argument(
        "--serial", action="store_true", help="run cells one by one in this process, no Ray"
    )
    p.add_argument(
        "--no-retry-failed",
        dest="retry_failed",
        action="store_false",
        help="keep failed cells' records instead of rerunning them",
    )
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs, Ray worker logs")
    return p


def _dry_run(spec, cells, out, console) -> None:
    from rich.table import Table

    from medfed.experiments.sweep import load_record

    t = Table(title=f"sweep {spec.name}: {len(cells)} cells ({out})")
    t.add_column("cell", no_wrap=True)
    t.add_column("knobs")
    t.add_column("in --out", no_wrap=True)
    for c in cells:
        r = load_record(out, c.cell_id)
        t.add_row(c.cell_id, c.label(), r["status"] if r else "-")
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m medfed.sweep`` with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 all cells done, 1 some cell failed, 2 a usage error, 130
    interrupted.
    """
    from pathlib import Path

    from rich.console import Console

    from medfed.errors import MedfedError, format_user_error
    from medfed.experiments.sweep import RayExecutor, SerialExecutor, SweepSpec, run_sweep
    from medfed.scale.cluster import resolve_address
    from medfed.simulate import configure_logging

    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    try:
        if args.max_concurrency is not None and args.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        spec = SweepSpec.from_yaml(args.config)
        if args.max_concurrency is not None:
            import dataclasses

            spec = dataclasses.replace(spec, max_concurrency=args.max_concurrency)
        out = Path(args.out) if args.out else Path("runs") / "sweeps" / spec.name
        cells = spec.cells()
        address = None if args.serial else resolve_address(args.ray_address)
    except (MedfedError, ValueError) as e:  # ValueError: e.g. --max-concurrency 0
        print(format_user_error(e), file=sys.stderr)
        return 2
    if args.dry_run:
        _dry_run(spec, cells, out, console)
        return 0

    configure_logging(args.verbose)
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.serial:
        executor = SerialExecutor()
    else:
        executor = RayExecutor(
            address=address,
            max_concurrency=spec.max_concurrency,
            cpus_per_cell=spec.cpus_per_cell,
            log_to_driver=args.verbose,
        )
    t0 = time.perf_counter()
    try:
        outcome = run_sweep(
            spec,
            out,
            executor=executor,
            progress=args.progress,
            retry_failed=args.retry_failed,
            console=console,
        )
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished cells are saved in {out}; rerun the same command to "
            "run only the missing ones.",
            file=sys.stderr,
        )
        return 130
    except MedfedError as e:
        print(format_user_error(e), file=sys.stderr)
        return 2
    failed = outcome.failed
    console.print(
        f"{len(outcome.cells)} cells: {len(outcome.ran)} run, {len(outcome.skipped)} skipped "
        f"(already done), {len(failed)} failed; {time.perf_counter() - t0:.1f} s"
    )
    console.print(f"results: {out / 'results.csv'}  report: {out / 'report.md'}")
    if failed:
        console.print(f"[red]failed cells (errors in {out / 'report.md'}): {' '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
