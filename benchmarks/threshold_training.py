"""Encrypted head training under threshold keys against the shared key, one run, same data.

Run with the main environment's Python; the threshold column runs in the Python 3.10 OpenFHE
environment (``.venv-threshold``, made by ``bash .ci/threshold_env.sh``) as a child process of
this one, on the same seeded data, right after the shared-key column:

* shared key (TenSEAL/SEAL, preset ``--ckks``): the diagonal epoch in process, one masked-sum
  round per epoch with a key-holding hospital;
* threshold keys (OpenFHE, preset ``training``, ``--hospitals`` parties): the same epoch on
  the joint keys, every update refreshed collectively (interactive multiparty bootstrapping:
  every key share takes part, nobody decrypts).

Both: seconds per epoch (median of ``--timed-epochs`` after one untimed epoch), ciphertexts
refreshed per epoch, bytes per hospital per epoch; threshold also the joint evaluation keys'
setup (round-A share size, times). The data are isotropic synthetic features (the epoch's
cost does not depend on the values). The last output line is one JSON object::

    python benchmarks/threshold_training.py --n 2000 --d 192 --hospitals 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD_PYTHON = ROOT / ".venv-threshold" / "bin" / "python"


def data(n: int, d: int, hospitals: int, seed: int):
    """Standardized isotropic features and labels, split evenly over ``hospitals``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (x @ rng.normal(size=d) > 0).astype(np.int64)
    x = (x - x.mean(0)) / x.std(0) / np.sqrt(d)
    return [(x[i], y[i]) for i in np.array_split(np.arange(n), hospitals)]


def _layout(parts, slots: int, bucket: int):
    from medfed.crypto.diagonal import plan_diagonal
    from medfed.crypto.packing import n_buckets

    buckets = [n_buckets(len(x), bucket) for x, _ in parts]
    return plan_diagonal(
        buckets, slots=slots, n_classes=2, bucket=bucket, n_features=parts[0][0].shape[1]
    )


def _schedule():
    from medfed.train.head import HeadSchedule
    from medfed.train.poly import fit_sigmoid

    return HeadSchedule(1, 1.0, fit_sigmoid(3, 8.0), l2=0.02)


def _median_epoch(backend, compute, layout, timed: int) -> tuple[float, list[float]]:
    from medfed.train.diagonal.epoch import diagonal_epoch

    w = [[backend.zeros() for _ in range(layout.n_groups)] for _ in range(layout.n_heads)]
    b = [backend.zeros() for _ in range(layout.n_heads)]
    seconds = []
    for step in range(1 + timed):
        t0 = time.perf_counter()
        w, b = diagonal_epoch(backend, [compute], w, b, layout, _schedule(), step)
        seconds.append(time.perf_counter() - t0)
    return float(np.median(seconds[1:])), seconds


def shared_column(args) -> dict:
    """The shared-key epoch (SEAL), in this process."""
    from medfed.crypto.context import load_public_context, make_secret_context, public_context_bytes
    from medfed.crypto.diagonal import pack_diagonal, sum_packed
    from medfed.crypto.params import get_preset
    from medfed.crypto.seal import SealEngine
    from medfed.train.diagonal.backend import blocks_from_packed
    from medfed.train.diagonal.compute import DiagonalCompute
    from medfed.train.diagonal.encrypted import EncryptedDiagonalBackend, galois_steps
    from medfed.train.diagonal.keyholder import hospital_sums

    params = get_preset(args.ckks)
    parts = data(args.n, args.d, args.hospitals, args.seed)
    layout = _layout(parts, params.slots, args.bucket)
    secret = make_secret_context(params)
    hospital = SealEngine(secret)
    galois = hospital.make_galois_keys(galois_steps(layout))
    aggregator = SealEngine(load_public_context(public_context_bytes(secret)), galois_keys=galois)

    class KeyHolder:
        def sum_masked(self, masked, step):
            return hospital_sums(hospital, masked, layout), "hospital-0"

    backend = EncryptedDiagonalBackend(aggregator, layout, KeyHolder())
    packed = sum_packed(pack_diagonal(x, y, layout, i) for i, (x, y) in enumerate(parts))
    t0 = time.perf_counter()

    def enc(v):
        return aggregator.from_bytes(hospital.encrypt_bytes(v), sender="h", item="x")

    compute = DiagonalCompute(backend, layout)
    compute.blocks = blocks_from_packed(packed, layout, enc)
    encrypt_s = time.perf_counter() - t0
    median, seconds = _median_epoch(backend, compute, layout, args.timed_epochs)
    last = backend.records[-1]
    return {
        "keys": "shared",
        "preset": args.ckks,
        "slots": params.slots,
        "blocks": len(compute.blocks),
        "encrypt_seconds": encrypt_s,
        "seconds_per_epoch": median,
        "epochs_seconds": seconds,
        "refreshed_per_epoch": last["masked"]["products"] + last["masked"]["bias"],
        "refresh_rounds_per_epoch": 1,
        # the key holder receives the masked products and returns their sums; others: nothing
        "bytes_key_holder_per_epoch": last["bytes_to_hospital"] + last["bytes_from_hospital"],
        "bytes_other_hospitals_per_epoch": 0,
    }


def threshold_column(args) -> dict:
    """The threshold epoch (OpenFHE), in this (3.10) process: every party in process."""
    from medfed.crypto.diagonal import pack_diagonal, sum_packed
    from medfed.crypto.threshold import (
        THRESHOLD_PRESETS,
        ThresholdAggregator,
        ThresholdContext,
        ThresholdParty,
    )
    from medfed.crypto.threshold.evaluator import ThresholdEngine
    from medfed.crypto.threshold.refresh import InProcessRefresher
    from medfed.train.diagonal.backend import blocks_from_packed
    from medfed.train.diagonal.compute import DiagonalCompute
    from medfed.train.diagonal.threshold import ThresholdDiagonalBackend, threshold_rotation_steps

    params = THRESHOLD_PRESETS["training"].with_parties(args.hospitals)
    parts = data(args.n, args.d, args.hospitals, args.seed)
    layout = _layout(parts, params.batch_size, args.bucket)
    t0 = time.perf_counter()
    context = ThresholdContext.generate(params)
    wire = context.to_bytes()
    parties = [
        ThresholdParty(context if i == 1 else ThresholdContext.from_bytes(wire), i)
        for i in range(1, params.parties + 1)
    ]
    running = None
    for p in parties:
        running = p.keygen(running)
    for p in parties:
        p.set_joint_public_key(running)
    bundles = {p.index: p.public_bundle for p in parties}
    for p in parties:
        p.set_peers(bundles)
    agg = ThresholdAggregator(wire, running)
    keygen_s = time.perf_counter() - t0
    steps = threshold_rotation_steps(layout)
    t0 = time.perf_counter()
    lead = parties[0].eval_key_share(steps)
    shares = [lead] + [p.eval_key_share(steps, lead) for p in parties[1:]]
    switch = agg.join_eval_key_shares(shares)
    agg.join_mult_key_shares([p.mult_key_share(switch) for p in parties])
    eval_keys_s = time.perf_counter() - t0
    engine = ThresholdEngine(agg)

    refresher = InProcessRefresher(agg, parties)
    backend = ThresholdDiagonalBackend(engine, layout, refresher)
    packed = sum_packed(pack_diagonal(x, y, layout, i) for i, (x, y) in enumerate(parts))
    t0 = time.perf_counter()
    compute = DiagonalCompute(backend, layout)
    compute.blocks = blocks_from_packed(
        packed, layout, lambda v: engine.from_bytes(parties[0].encrypt(v))
    )
    encrypt_s = time.perf_counter() - t0
    median, seconds = _median_epoch(backend, compute, layout, args.timed_epochs)
    epochs = 1 + args.timed_epochs
    return {
        "keys": "threshold",
        "preset": "training",
        "parties": params.parties,
        "threshold": params.threshold,
        "slots": params.batch_size,
        "blocks": len(compute.blocks),
        "keygen_seconds": keygen_s,
        "eval_keys_seconds": eval_keys_s,
        "rotation_steps": len(steps),
        "eval_key_share_bytes": len(lead),
        "encrypt_seconds": encrypt_s,
        "seconds_per_epoch": median,
        "epochs_seconds": seconds,
        "refreshed_per_epoch": refresher.rounds // epochs,
        "refresh_rounds_per_epoch": 1,  # all refreshes of an epoch can go in one message round
        # every hospital receives c1, a (and a sealed digest) and sends its shares
        "bytes_per_hospital_per_epoch": refresher.bytes_per_party // epochs,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="training samples")
    p.add_argument("--d", type=int, default=192, help="features")
    p.add_argument("--hospitals", type=int, default=5)
    p.add_argument("--bucket", type=int, default=32)
    p.add_argument("--ckks", default="fast", help="the shared-key preset")
    p.add_argument("--timed-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--column", choices=("both", "threshold"), default="both", help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.column == "threshold":
        print(json.dumps(threshold_column(args)))
        return 0
    shared = shared_column(args)
    print(f"shared key: {shared['seconds_per_epoch']:.2f} s/epoch", file=sys.stderr, flush=True)
    if not THRESHOLD_PYTHON.exists():
        print(f"no {THRESHOLD_PYTHON}: run `bash .ci/threshold_env.sh` first", file=sys.stderr)
        return 2
    child = subprocess.run(
        [str(THRESHOLD_PYTHON), __file__, *(argv or sys.argv[1:]), "--column", "threshold"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    if child.returncode:
        print(child.stderr[-3000:], file=sys.stderr)
        return child.returncode
    threshold = json.loads(child.stdout.strip().splitlines()[-1])
    rows = [
        ("seconds per epoch", "seconds_per_epoch", "{:.2f}"),
        ("ciphertexts refreshed per epoch", "refreshed_per_epoch", "{}"),
        ("slots per ciphertext", "slots", "{}"),
        ("blocks", "blocks", "{}"),
        ("encryption of the blocks (s)", "encrypt_seconds", "{:.1f}"),
    ]
    print(f"n = {args.n}, d = {args.d}, {args.hospitals} hospitals")
    print(f"{'':34s} {'shared':>12s} {'threshold':>12s}")
    for label, key, fmt in rows:
        print(f"{label:34s} {fmt.format(shared[key]):>12s} {fmt.format(threshold[key]):>12s}")
    mb = 1e6
    print(
        f"{'bytes per hospital per epoch (MB)':34s} "
        f"{'%.1f / 0' % (shared['bytes_key_holder_per_epoch'] / mb):>12s} "
        f"{threshold['bytes_per_hospital_per_epoch'] / mb:>12.1f}"
    )
    ratio = threshold["seconds_per_epoch"] / shared["seconds_per_epoch"]
    print(f"threshold / shared seconds per epoch: {ratio:.1f}x")
    print(json.dumps({"shared": shared, "threshold": threshold, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
