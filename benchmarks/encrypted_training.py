"""Encrypted head training: medfed's diagonal layout against the per-sample layout, one run.

Everything is measured side by side in ONE process and ONE run (ratios, never timed asserts):

(a) medfed's encrypted epoch (weights, gradients, features and labels encrypted at the
    aggregator; one masked-sum round with a key-holding hospital per epoch), in-process and on
    K Ray workers;
(b) the per-sample layout (one ciphertext per sample, as in TenSEAL's tutorial and
    MedBlindTuner) at the same CKKS parameters and polynomial, timed on a subsample and scaled;
(c) the plaintext reference (same arithmetic on numpy) and exact logistic regression;
(d) the op-count floor: the epoch's ct*ct, relinearizations, rescales, ct*plain, rotations,
    encryptions and decryptions, per level, times each op's cost measured in this run;
(e) the machine's parallel capacity right after each Ray configuration's timing: a fixed SEAL
    workload on two Ray workers at once against one alone (the ceiling of
    ``worker_speedup_2v1``; a virtual machine's two cores are not always two).

The last output line is one JSON object. Example::

    python benchmarks/encrypted_training.py                      # 10000 x 192, binary
    python benchmarks/encrypted_training.py --classes 7 --n 5000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from collections import Counter

import numpy as np

from medfed.crypto.context import load_public_context, make_secret_context, public_context_bytes
from medfed.crypto.diagonal import pack_diagonal, plan_diagonal
from medfed.crypto.params import get_preset
from medfed.crypto.seal import SealEngine, SealVec
from medfed.train.diagonal_head import (
    DiagonalCompute,
    EncryptedDiagonalBackend,
    PlainDiagonalBackend,
    blocks_from_packed,
    diagonal_epoch,
    galois_steps,
    head_matrix,
    hospital_sums,
    train_diagonal,
)
from medfed.train.head import HeadSchedule, accuracy
from medfed.train.poly import fit_sigmoid, scaled_residual
from medfed.train.reference import train_exact_logreg


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic(n: int, d: int, classes: int, seed: int):
    """A learnable task: labels from a random linear model plus noise; unit-norm features."""
    rng = np.random.default_rng(seed)
    heads = 1 if classes == 2 else classes
    w = rng.normal(size=(d, heads))

    def draw(m):
        x = rng.normal(size=(m, d))
        s = x @ w + 0.5 * rng.normal(size=(m, heads)) * np.sqrt(d)
        y = (s[:, 0] > 0).astype(np.int64) if classes == 2 else np.argmax(s, axis=1)
        return x / np.sqrt(d), y

    return draw(n), draw(max(1000, n // 5))


class LocalKeyHolder:
    """The key-holding hospital, in-process: decrypts masked products, sums, re-encrypts."""

    def __init__(self, engine: SealEngine, layout, mask_bits: int) -> None:
        self.engine, self.layout, self.mask_bits = engine, layout, mask_bits

    def sum_masked(self, masked, step, decay=0.0):
        return (
            hospital_sums(self.engine, masked, self.layout, self.mask_bits, decay),
            "hospital-0",
        )


def encrypted_blocks(raw, hospital: SealEngine, aggregator: SealEngine, layout):
    """Hospital encrypts; aggregator loads the bytes (what the upload round does)."""

    def enc(v):
        return aggregator.from_bytes(hospital.encrypt_bytes(v), sender="h", item="x")

    return blocks_from_packed([b for _, b in sorted(raw.items())], layout, enc)


def timed_epochs(
    backend, computes, layout, schedule, epochs: int, warmup: int, after_warmup=None
) -> tuple[list, list]:
    """Seconds of ``warmup`` untimed epochs, then of ``epochs`` timed ones, back to back.

    Configurations are timed one after another, not interleaved: on this kind of virtual
    machine, memory left idle while another configuration runs comes back slowly, which would
    charge a cold start to every interleaved epoch. The first epochs after Ray workers start are
    slow too (their memory pools fill). ``after_warmup()`` runs before the first timed epoch.
    """
    w = [[backend.zeros() for _ in range(layout.n_groups)] for _ in range(layout.n_heads)]
    b = [backend.zeros() for _ in range(layout.n_heads)]
    seconds = []
    for r in range(warmup + epochs):
        if r == warmup and after_warmup is not None:
            after_warmup()
        t0 = time.perf_counter()
        w, b = diagonal_epoch(backend, computes, w, b, layout, schedule, r)
        seconds.append(time.perf_counter() - t0)
    return seconds[:warmup], seconds[warmup:]


class SealLoop:
    """Ray actor running a fixed SEAL workload (ct*ct products, a rotation) on public keys."""

    def __init__(self, public: bytes, galois: bytes) -> None:
        self.engine = SealEngine(load_public_context(public), galois_keys=galois)
        rng = np.random.default_rng(0)
        self.xs = [self.engine.encrypt(rng.random(self.engine.slots)) for _ in range(49)]

    def run(self, reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            z = self.engine.dot([(x, self.xs[-1]) for x in self.xs[:-1]])
            self.engine.rotate(z, 1)
        return time.perf_counter() - t0


def wait_for_exit(pids: list[int], timeout: float = 60.0) -> None:
    """Wait until the (local) worker processes ``pids`` are gone."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)


def parallel_capacity(public: bytes, galois: bytes, reps: int = 12) -> float:
    """How much SEAL work two Ray workers do at once, relative to one alone (2.0: two full
    cores). The ceiling of ``worker_speedup_2v1`` on this machine right now."""
    import ray

    actors = [ray.remote(num_cpus=1)(SealLoop).remote(public, galois) for _ in range(2)]
    try:
        ray.get([a.run.remote(2) for a in actors])  # started and warm
        alone = ray.get(actors[0].run.remote(reps))
        together = max(ray.get([a.run.remote(reps) for a in actors]))
    finally:
        for a in actors:
            ray.kill(a)
    return 2 * alone / together


def per_sample_baseline(params, x, y, samples: int, approx, lr: float) -> tuple[float, Counter]:
    """One ciphertext per sample: x_i * W, rotate-and-sum over all slots (z replicated),
    residual, x_i * r, accumulate. Same engine, parameters and polynomial as medfed."""
    secret = make_secret_context(params)
    engine = SealEngine(secret)
    steps = [2**i for i in range(int(math.log2(engine.slots)))]
    engine.galois = engine._load_galois(engine.make_galois_keys(steps))
    d = x.shape[1]
    w = engine.encrypt(np.zeros(engine.slots))
    c = lr / len(x)
    grad = None
    uploaded = []
    for i in range(samples):  # the upload is not part of an epoch: encrypt before timing
        xi = np.zeros(engine.slots)
        xi[:d] = x[i]
        uploaded.append((engine.encrypt(xi), engine.encrypt(np.full(engine.slots, float(y[i])))))
    engine.counts.clear()
    t0 = time.perf_counter()
    for ex, ey in uploaded:
        z = ex * w
        for s in steps:  # rotate-and-sum: every slot ends up holding x_i . w
            z = z + engine.rotate(z, s)
        r = scaled_residual(z, ey, approx, c)
        g = ex * r
        grad = g if grad is None else grad + g
    per_sample = (time.perf_counter() - t0) / samples
    return per_sample, Counter(engine.counts)


def _clock(reps: int, fn, *args) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps


def unit_costs(engine: SealEngine, hospital: SealEngine, depth: int, reps: int = 8) -> dict:
    """Seconds per op and level, measured now (the floor uses these)."""
    import tenseal.sealapi as sa

    rng = np.random.default_rng(0)
    costs: dict[tuple[str, int], float] = {}
    fresh = hospital.encrypt(rng.normal(size=engine.slots) * 0.1)
    fresh = engine.from_bytes(hospital.to_bytes(fresh), sender="bench", item="x")
    ev = engine.ev
    for level in range(depth + 1):
        ct = engine.mod_switch_to_level(fresh, level).ct
        if level < depth:  # at the last level a product's scale no longer fits
            three = sa.Ciphertext()
            ev.multiply(ct, ct, three)
            costs["mul_ct", level] = _clock(reps, ev.multiply, ct, ct, sa.Ciphertext())
            costs["relin", level] = _clock(
                reps, ev.relinearize, three, engine.relin, sa.Ciphertext()
            )
            costs["rescale", level] = _clock(reps, ev.rescale_to_next, ct, sa.Ciphertext())
            pt = engine.encode(0.5, ct.parms_id(), engine.scale)
            costs["mul_plain", level] = _clock(reps, ev.multiply_plain, ct, pt, sa.Ciphertext())
        if engine.galois is not None:
            costs["rotate", level] = _clock(
                reps, ev.rotate_vector, ct, 1, engine.galois, sa.Ciphertext()
            )
        hv = hospital.from_bytes(engine.to_bytes(SealVec(engine, ct)), sender="bench", item="x")
        costs["decrypt", level] = _clock(reps, hospital.decrypt, hv)
    costs["encrypt", 0] = _clock(reps, hospital.encrypt_seeded, np.zeros(engine.slots))
    return costs


def floor_seconds(counts: Counter, costs: dict) -> float:
    total = 0.0
    for (op, level), n in counts.items():
        if (op, level) in costs:
            total += n * costs[op, level]
        else:  # fall back to the nearest measured level of that op
            levels = [lv for (o, lv) in costs if o == op]
            if levels:
                total += n * costs[op, min(levels, key=lambda lv: abs(lv - level))]
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10000, help="training samples")
    p.add_argument("--d", type=int, default=192, help="features (deit_tiny: 192)")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--epochs", type=int, default=7, help="epochs timed per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed epochs before them")
    p.add_argument("--accuracy-epochs", type=int, default=10, help="epochs for the accuracy run")
    p.add_argument("--lr", type=float, default=8.0)
    p.add_argument("--ckks", default="fast")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to compare (0: skip Ray)")
    p.add_argument("--baseline-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    params = get_preset(args.ckks)
    approx = fit_sigmoid(3, 8.0)
    (x, y), (xt, yt) = synthetic(args.n, args.d, args.classes, args.seed)
    bucket = 32
    layout = plan_diagonal(
        [math.ceil(args.n / bucket)],
        slots=params.slots,
        n_classes=args.classes,
        bucket=bucket,
        n_features=args.d,
    )
    log(
        f"layout: {layout.n_blocks} blocks x {layout.n_groups} groups of {layout.group} "
        f"(baby {layout.baby}, giant {layout.giant}), {layout.n_heads} head(s), CKKS {params.name}"
    )

    secret = make_secret_context(params)
    hospital = SealEngine(secret)
    galois = hospital.make_galois_keys(galois_steps(layout))
    public = public_context_bytes(secret)
    aggregator = SealEngine(load_public_context(public), galois_keys=galois)
    raw = pack_diagonal(x, y, layout, 0)
    t0 = time.perf_counter()
    blocks = encrypted_blocks(raw, hospital, aggregator, layout)
    upload_seconds = time.perf_counter() - t0
    keyholder = LocalKeyHolder(hospital, layout, params.mask_bits)

    # (a) medfed, in process (with the op counts) and on K Ray workers; median epoch of each
    backend = EncryptedDiagonalBackend(aggregator, layout, keyholder, params.mask_bits)
    compute = DiagonalCompute(backend, layout)
    compute.blocks = blocks
    schedule = HeadSchedule(1, args.lr, approx)

    def clear_counts():
        aggregator.counts.clear()
        hospital.counts.clear()

    warmup_seconds, epoch_seconds = {}, {}
    warmup_seconds["in-process"], epoch_seconds["in-process"] = timed_epochs(
        backend, [compute], layout, schedule, args.epochs, args.warmup, clear_counts
    )
    counts = aggregator.counts + hospital.counts  # the timed in-process epochs only
    # (d) the ops' unit costs, right after the in-process epochs they are compared with
    costs = unit_costs(aggregator, hospital, params.depth)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip() and int(w) > 0]
    capacity: dict[str, float] = {}
    if worker_counts:
        import ray

        from medfed.scale.cluster import ray_session
        from medfed.scale.workers import start_workers, stop_workers

        with ray_session(None, num_cpus=max(2, *worker_counts)):
            for k in worker_counts:
                remotes = start_workers(
                    k, aggregator, public, galois, layout, params.mask_bits, blocks
                )
                pids = ray.get(  # the actors' processes, to see them exit below
                    [c.actor.__ray_call__.remote(lambda _: os.getpid()) for c in remotes]
                )
                try:
                    warmup_seconds[str(k)], epoch_seconds[str(k)] = timed_epochs(
                        backend, remotes, layout, schedule, args.epochs, args.warmup
                    )
                finally:
                    stop_workers(remotes)
                wait_for_exit(pids)  # a dying worker frees its memory: not in the next timing
                capacity[str(k)] = parallel_capacity(public, galois)
        after = ", ".join(f"{c:.2f}x after the {k}-worker timing" for k, c in capacity.items())
        log(
            f"parallel capacity (SEAL work of 2 Ray workers at once / 1 alone; 2.0: two full "
            f"cores): {after}"
        )
    counts = Counter({k: v / args.epochs for k, v in counts.items()})
    by_workers = {name: float(np.median(sec)) for name, sec in epoch_seconds.items()}
    for name, sec in by_workers.items():
        log(
            f"medfed {name if name == 'in-process' else f'on {name} Ray worker(s)'}: "
            f"{sec:.2f} s/epoch (median of {args.epochs}, after {args.warmup} warm-up)"
        )
    in_process = by_workers["in-process"]
    refresh = backend.records[-1]
    best_key = min(by_workers, key=by_workers.get)
    seconds_per_epoch = by_workers[best_key]

    # accuracy: encrypted vs the plaintext reference (same code, numpy), vs exact LR
    acc_schedule = HeadSchedule(args.accuracy_epochs, args.lr, approx)
    w_enc, b_enc = train_diagonal(backend, [compute], layout, acc_schedule)

    def dec(v):
        blob = aggregator.to_bytes(v)
        return hospital.decrypt(hospital.from_bytes(blob, sender="a", item="w"))

    head_enc = head_matrix([[dec(v) for v in wk] for wk in w_enc], [dec(b) for b in b_enc], layout)
    plain = DiagonalCompute(PlainDiagonalBackend(layout), layout)
    plain.blocks = blocks_from_packed([b for _, b in sorted(raw.items())], layout)
    t0 = time.perf_counter()
    w_pl, b_pl = train_diagonal(PlainDiagonalBackend(layout), [plain], layout, acc_schedule)
    plain_seconds = (time.perf_counter() - t0) / args.accuracy_epochs
    head_plain = head_matrix(w_pl, b_pl, layout)
    t0 = time.perf_counter()
    exact = train_exact_logreg(
        x, y, args.classes, args.accuracy_epochs, args.lr * args.n / layout.n_padded
    )
    exact_seconds = (time.perf_counter() - t0) / args.accuracy_epochs
    acc, acc_plain = accuracy(head_enc, xt, yt), accuracy(head_plain, xt, yt)

    # (b) per-sample baseline
    per_sample, base_counts = per_sample_baseline(
        params, x, y, args.baseline_samples, approx, args.lr
    )
    baseline = per_sample * args.n * layout.n_heads
    log(f"per-sample layout: {per_sample * 1000:.1f} ms/sample -> {baseline:.0f} s/epoch")

    # (d) floor
    floor = floor_seconds(counts, costs)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "n": args.n,
        "d": args.d,
        "classes": args.classes,
        "ckks": params.name,
        "layout": {
            "blocks": layout.n_blocks,
            "groups": layout.n_groups,
            "group": layout.group,
            "baby": layout.baby,
            "giant": layout.giant,
        },
        "seconds_per_epoch": seconds_per_epoch,
        "seconds_per_epoch_by_workers": by_workers,
        "epoch_seconds_by_workers": {
            name: [round(v, 4) for v in sec] for name, sec in epoch_seconds.items()
        },
        "warmup_seconds_by_workers": {
            name: [round(v, 4) for v in sec] for name, sec in warmup_seconds.items()
        },
        "workers": best_key,
        "parallel_capacity_2v1": {k: round(c, 3) for k, c in capacity.items()} or None,
        "worker_speedup_2v1": (by_workers["1"] / by_workers["2"])
        if {"1", "2"} <= set(by_workers)
        else None,
        "baseline_seconds_per_epoch": baseline,
        "baseline_ms_per_sample": per_sample * 1000,
        "baseline_samples_timed": args.baseline_samples,
        "speedup_vs_per_sample": baseline / seconds_per_epoch,
        "speedup_vs_per_sample_in_process": baseline / in_process,
        "plaintext_seconds_per_epoch": plain_seconds,
        "exact_numpy_seconds_per_epoch": exact_seconds,
        "floor_seconds": floor,
        "floor_fraction": floor / in_process,
        "op_counts_per_epoch": {
            f"{op}@{lv}": round(v, 1) for (op, lv), v in sorted(counts.items())
        },
        "baseline_op_counts_per_sample": {
            f"{op}@{lv}": v / args.baseline_samples for (op, lv), v in sorted(base_counts.items())
        },
        "unit_costs_ms": {
            f"{op}@{lv}": round(v * 1000, 3) for (op, lv), v in sorted(costs.items())
        },
        "accuracy": acc,
        "plaintext_accuracy": acc_plain,
        "exact_accuracy": accuracy(exact, xt, yt),
        "accuracy_gap_pp": 100 * (acc - acc_plain),
        "accuracy_epochs": args.accuracy_epochs,
        "max_weight_error": float(np.abs(head_enc - head_plain).max()),
        "refreshes_per_epoch": 1,
        "refresh_bytes": refresh["bytes_to_hospital"] + refresh["bytes_from_hospital"],
        "refresh_bytes_to_hospital": refresh["bytes_to_hospital"],
        "refresh_bytes_from_hospital": refresh["bytes_from_hospital"],
        "upload_seconds": upload_seconds,
        "peak_rss_mb": rss_mb,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
