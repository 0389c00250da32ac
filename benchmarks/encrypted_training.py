"""Encrypted head training: time to the tuned reference, and medfed's layout against the
per-sample layout, one run.

Everything is measured side by side in ONE process and ONE run (ratios, never timed asserts),
with the run defaults' optimiser (PCA whitening to ``--components`` features from the summed
statistics, L2 penalty, lr, sigmoid radius; flags default to ``SimulationConfig``):

(a) time to accuracy: the encrypted head (weights, gradients, features and labels encrypted
    at the aggregator; one masked-sum round with a key-holding hospital per epoch) trained in
    process for ``--epochs`` epochs, every epoch timed, the weights decrypted after each
    (untimed) to score the test set: the seconds until it is within 0.5 pp of the reference;
(b) the yardsticks: the tuned plaintext reference on the raw features, the same fit on the
    whitened features, the same schedule on numpy, the majority class;
(c) medfed's encrypted epoch in process and on K Ray workers (``--workers``), median of
    ``--timed-epochs`` after ``--warmup``;
(d) the per-sample layout (one ciphertext per sample, as in TenSEAL's tutorial and
    MedBlindTuner) at the same CKKS parameters, polynomial and features, with the fewest
    rotations, timed sample by sample and scaled by its median;
(e) the op-count floor: the epoch's ct*ct, relinearizations, rescales, ct*plain, rotations,
    encryptions and decryptions, per level, times each op's cost measured in this run;
(f) with Ray workers, the machine's parallel capacity right after each configuration's
    timing: a fixed SEAL workload on two Ray workers at once against one alone.

Two synthetic cases (``--case``): ``illcond`` (the default), raw embeddings whose correlation
spectrum is the one measured on DeiT-tiny embeddings of BreastMNIST, and ``isotropic``
(independent normal features). The last output line is one JSON object. Example::

    python benchmarks/encrypted_training.py                       # illcond, 10000 x 192
    python benchmarks/encrypted_training.py --workers 0           # without Ray
    python benchmarks/encrypted_training.py --case isotropic --components 0
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

from medfed.config import SimulationConfig
from medfed.crypto.context import load_public_context, make_secret_context, public_context_bytes
from medfed.crypto.diagonal import pack_diagonal, plan_diagonal
from medfed.crypto.masking import refresh_security
from medfed.crypto.params import get_preset
from medfed.crypto.seal import SealEngine, SealVec
from medfed.experiments.yardsticks import majority_accuracy, tuned_reference
from medfed.train.diagonal.backend import blocks_from_packed
from medfed.train.diagonal.compute import DiagonalCompute
from medfed.train.diagonal.encrypted import EncryptedDiagonalBackend, galois_steps
from medfed.train.diagonal.epoch import diagonal_epoch, head_matrix
from medfed.train.diagonal.keyholder import hospital_sums
from medfed.train.diagonal.plain import PlainDiagonalBackend
from medfed.train.head import HeadSchedule, accuracy
from medfed.train.normalization import (
    feature_map_from_stats,
    public_width,
    stats_vector,
)
from medfed.train.poly import fit_sigmoid, scaled_residual, target_term

#: "Within 0.5 pp of the reference": the accuracy that counts as reaching it.
TOLERANCE_PP = 0.5

#: log10 of the eigenvalues of the correlation matrix of DeiT-tiny embeddings (192 features)
#: of BreastMNIST's 546 train images, at these (1-based) ranks; linear in between. The top
#: eigenvalue holds 107 of 192, the 10th is 0.49, the 50th 0.0026, 64 are above 1e-3.
DEIT_SPECTRUM = (
    (1, 2.03), (2, 1.69), (3, 1.10), (4, 0.97), (5, 0.69), (6, 0.34), (8, 0.23), (9, -0.06),
    (10, -0.31), (16, -1.0), (33, -2.0), (50, -2.59), (64, -3.0), (110, -4.0), (165, -5.0),
    (192, -5.7),
)  # fmt: skip

#: Label noise: score + LABEL_NOISE * N(0, 1) with a unit-variance score (oracle about 85 %).
LABEL_NOISE = 0.5


_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f} s] {msg}", file=sys.stderr, flush=True)


def deit_spectrum(d: int) -> np.ndarray:
    """``d`` correlation eigenvalues shaped like :data:`DEIT_SPECTRUM`, summing to ``d``."""
    ranks, values = zip(*DEIT_SPECTRUM, strict=True)
    lam = 10.0 ** np.interp(1 + np.arange(d) * 191 / max(d - 1, 1), ranks, values)
    return lam * d / lam.sum()


def _labels(score: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels and the noise-free (oracle) ones from unit-variance scores ``(m, heads)``."""
    if score.shape[1] == 1:
        return (score[:, 0] + noise[:, 0] > 0).astype(np.int64), (score[:, 0] > 0).astype(np.int64)
    return np.argmax(score + noise, axis=1), np.argmax(score, axis=1)


def illcond(n: int, d: int, classes: int, seed: int):
    """Raw embeddings with the DeiT correlation spectrum, labels not separable.

    ``x = (u @ mix) * std + mean`` with ``u`` a standard normal latent ``(m, d)`` and
    ``mix = sqrt(lam) V^T`` from a random correlation matrix ``V diag(lam) V^T`` whose
    eigenvalues ``lam`` are :func:`deit_spectrum` (Davies-Higham, ``scipy``); per-feature
    scales (log-normal around 0.41, as measured) and means. Labels: the latent's linear score
    ``u @ beta`` with ``beta_k ~ N(0, 1) * lam_k ** 0.25`` (a factor's label weight falls with
    the square root of its standard deviation, between what BreastMNIST's and RetinaMNIST's
    embeddings show), unit variance, plus ``LABEL_NOISE`` normal noise; argmax over heads for
    several classes. Returns train and test ``(x, y, oracle_y)`` and ``beta`` ``(d, heads)``.
    """
    from scipy.stats import random_correlation

    rng = np.random.default_rng(seed)
    heads = 1 if classes == 2 else classes
    lam = deit_spectrum(d)
    corr = random_correlation.rvs(lam, random_state=rng, tol=1e-8)
    ev, vec = np.linalg.eigh(corr)
    order = np.argsort(ev)[::-1]
    mix = np.sqrt(np.maximum(ev[order], 0.0))[:, None] * vec[:, order].T
    std = np.exp(np.log(0.41) + 0.6 * rng.normal(size=d))
    mean = 0.85 * rng.normal(size=d)
    beta = rng.normal(size=(d, heads)) * lam[:, None] ** 0.25
    beta /= np.sqrt((beta**2).sum(0))

    def draw(m):
        u = rng.normal(size=(m, d))
        y, oracle = _labels(u @ beta, LABEL_NOISE * rng.normal(size=(m, heads)))
        return (u @ mix) * std + mean, y, oracle

    return draw(n), draw(max(1000, n // 5)), beta


def isotropic(n: int, d: int, classes: int, seed: int):
    """Independent unit-normal features divided by ``sqrt(d)``; labels from a random linear
    model plus ``LABEL_NOISE`` noise (same returns as :func:`illcond`)."""
    rng = np.random.default_rng(seed)
    heads = 1 if classes == 2 else classes
    beta = rng.normal(size=(d, heads))
    beta /= np.sqrt((beta**2).sum(0))

    def draw(m):
        u = rng.normal(size=(m, d))
        y, oracle = _labels(u @ beta, LABEL_NOISE * rng.normal(size=(m, heads)))
        return u / np.sqrt(d), y, oracle

    return draw(n), draw(max(1000, n // 5)), beta


def spectrum_summary(x: np.ndarray) -> dict:
    """The train features' correlation eigenvalues: top (and its share), 10th, 50th, count
    above 1e-3 (constant features left out)."""
    x = x[:, x.std(0) > 0]
    ev = np.sort(np.linalg.eigvalsh(np.corrcoef(x.T)))[::-1]

    def at(k):
        return float(ev[k - 1]) if len(ev) >= k else None

    return {
        "top": at(1),
        "top_share": float(ev[0] / ev.sum()),
        "10th": at(10),
        "50th": at(50),
        "above_1e-3": int((ev > 1e-3).sum()),
    }


class LocalKeyHolder:
    """The key-holding hospital, in-process: decrypts masked products, sums, re-encrypts."""

    def __init__(self, engine: SealEngine, layout) -> None:
        self.engine, self.layout = engine, layout

    def sum_masked(self, masked, step):
        return hospital_sums(self.engine, masked, self.layout), "hospital-0"


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


def per_sample_baseline(
    params, x, y, samples: int, warmup: int, approx, seed: int
) -> tuple[list[float], Counter, float]:
    """One ciphertext per sample, with the fewest rotations, timed sample by sample.

    Each sample ``x_i`` (``width`` features) is encrypted repeated across every slot with
    period ``P`` (the power of two at least ``width``); the weights and the bias are repeated
    the same way. Per sample: ``p = x_i * w`` (ct*ct), rotate-and-sum with ``log2(P)``
    rotations (every slot then holds ``x_i . w``), ``z = p + b``, the residual (the same
    polynomial; its target term kept from the upload, as medfed keeps it), ``x_i * r``
    (ct*ct; ``x_i`` kept at the residual's level, as medfed keeps its lowered diagonals), and
    the gradient and bias sums: additions, no per-sample rotation. Same engine, parameters
    and polynomial as medfed; the learning rate would scale the sums once per epoch (a
    scalar in the residual costs the same). ``warmup`` samples run first, untimed. Returns
    the seconds of each timed sample, the op counts of the timed samples and the largest
    error of their decrypted gradient and bias sums against numpy, relative to the largest.
    """
    secret = make_secret_context(params)
    engine = SealEngine(secret)
    S, width = engine.slots, x.shape[1]
    period = 1 << max(0, math.ceil(math.log2(width)))
    steps = [1 << i for i in range(int(math.log2(period)))]
    if steps:
        engine.galois = engine._load_galois(engine.make_galois_keys(steps))
    c = 1.0  # the learning rate scales the summed gradient once per epoch, outside the loop
    rng = np.random.default_rng(seed)
    w_plain = 0.1 * rng.normal(size=width)  # some weights, so that the check sees z
    b_plain = 0.05

    def repeated(v):
        out = np.zeros(period)
        out[: len(v)] = v
        return np.tile(out, S // period)

    w = engine.encrypt(repeated(w_plain))
    b = engine.mod_switch_to_level(engine.encrypt(np.full(S, b_plain)), 1)  # at z's level

    def forward(ex, term):
        p = ex * w
        for s in steps:  # rotate-and-sum: every slot ends up holding x_i . w
            p = p + engine.rotate(p, s)
        return scaled_residual(p + b, None, approx, c, term)

    rows = np.arange(warmup + samples) % len(x)
    uploaded = []
    for i in rows:  # the upload is not part of an epoch: encrypt (and lower) before timing
        ex = engine.encrypt(repeated(x[i]))
        term = target_term(engine.encrypt(np.full(S, float(y[i]))), approx, c)
        uploaded.append((ex, term))
    r_level = forward(*uploaded[0]).level
    uploaded = [(ex, engine.mod_switch_to_level(ex, r_level), t) for ex, t in uploaded]
    grad = grad_b = None
    seconds = []
    for j, (ex, ex_low, term) in enumerate(uploaded):
        if j == warmup:
            engine.counts.clear()
            grad = grad_b = None
        t0 = time.perf_counter()
        r = forward(ex, term)
        g = ex_low * r
        grad = g if grad is None else grad + g
        grad_b = r if grad_b is None else grad_b + r
        seconds.append(time.perf_counter() - t0)
    counts = Counter(engine.counts)
    xs, ys = x[rows[warmup:]], y[rows[warmup:]]
    r_plain = c * (approx(xs @ w_plain + b_plain) - ys)
    want = np.append(xs.T @ r_plain, r_plain.sum())
    got = np.append(engine.decrypt(grad)[:width], engine.decrypt(grad_b)[0])
    return seconds[warmup:], counts, float(np.abs(got - want).max() / np.abs(want).max())


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


def train_to_reference(backend, compute, layout, schedule, decrypt_head, test_x, test_y):
    """Train from zero weights for ``schedule.epochs`` epochs, each timed; after each, decrypt
    the head (untimed) and score the test set. Returns the epoch seconds, the accuracies, and
    the last head."""
    w = [[backend.zeros() for _ in range(layout.n_groups)] for _ in range(layout.n_heads)]
    b = [backend.zeros() for _ in range(layout.n_heads)]
    seconds, accs, head = [], [], None
    for step in range(schedule.epochs):
        t0 = time.perf_counter()
        w, b = diagonal_epoch(backend, [compute], w, b, layout, schedule, step)
        seconds.append(time.perf_counter() - t0)
        head = decrypt_head(w, b)
        accs.append(accuracy(head, test_x, test_y))
    return seconds, accs, head


def time_to_reference(seconds: list[float], accs: list[float], reference: float):
    """Cumulative seconds and epochs until an accuracy is within :data:`TOLERANCE_PP` of
    ``reference`` (``None, None`` if none is)."""
    for k, acc in enumerate(accs):
        if 100 * (reference - acc) <= TOLERANCE_PP + 1e-9:
            return float(sum(seconds[: k + 1])), k + 1
    return None, None


def main(argv=None) -> int:
    cfg = SimulationConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=("illcond", "isotropic"), default="illcond")
    p.add_argument("--n", type=int, default=10000, help="training samples")
    p.add_argument("--d", type=int, default=192, help="raw features (deit_tiny: 192)")
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--components", type=int, default=cfg.components, help="0: standardize")
    p.add_argument(
        "--samples-per-component",
        type=int,
        default=cfg.samples_per_component,
        help="components kept: one per this many samples, at least 96 (0: all)",
    )
    p.add_argument("--feature-scale", type=float, default=cfg.feature_scale)
    p.add_argument("--epochs", type=int, default=cfg.epochs, help="epochs of the accuracy run")
    p.add_argument("--lr", type=float, default=cfg.lr)
    p.add_argument("--l2", type=float, default=cfg.l2)
    p.add_argument("--degree", type=int, default=cfg.sigmoid_degree, help="sigmoid degree")
    p.add_argument("--radius", type=float, default=cfg.sigmoid_radius, help="sigmoid radius")
    p.add_argument("--ckks", default=cfg.ckks)
    p.add_argument("--timed-epochs", type=int, default=7, help="epochs timed per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed epochs before them")
    p.add_argument("--workers", default="1,2", help="Ray worker counts to time (0: skip Ray)")
    p.add_argument("--baseline-samples", type=int, default=64, help="per-sample layout, timed")
    p.add_argument("--baseline-warmup", type=int, default=8, help="untimed samples first")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run_t0 = time.perf_counter()

    params = get_preset(args.ckks)
    approx = fit_sigmoid(args.degree, args.radius)
    schedule = HeadSchedule(args.epochs, args.lr, approx, args.l2)
    make = illcond if args.case == "illcond" else isotropic
    (x, y, _), (xt, yt, oracle), beta = make(args.n, args.d, args.classes, args.seed)
    # the statistics round: what the hospital (here one, holding every row) contributes to the
    # secure sum, decrypted; the feature map every hospital derives from it
    total = stats_vector(x, args.components)
    bucket = cfg.bucket
    buckets = math.ceil(args.n / bucket)
    # the width the aggregator plans from the (public) padded sample count
    width = public_width(args.d, args.components, buckets * bucket, args.samples_per_component)
    fmap = feature_map_from_stats(total, args.d, args.components and width, args.feature_scale)
    xw, xtw = fmap(x), fmap(xt)
    layout = plan_diagonal(
        [buckets],
        slots=params.slots,
        n_classes=args.classes,
        bucket=bucket,
        n_features=fmap.width,
    )
    log(
        f"case {args.case}: {args.n} x {args.d} raw, {fmap.width} trained features; layout: "
        f"{layout.n_blocks} blocks x {layout.n_groups} groups of {layout.group} (baby "
        f"{layout.baby}, giant {layout.giant}), {layout.n_heads} head(s), CKKS {params.name}"
    )

    secret = make_secret_context(params)
    hospital = SealEngine(secret)
    galois = hospital.make_galois_keys(galois_steps(layout))
    public = public_context_bytes(secret)
    aggregator = SealEngine(load_public_context(public), galois_keys=galois)
    raw = pack_diagonal(xw, y, layout, 0)
    t0 = time.perf_counter()
    blocks = encrypted_blocks(raw, hospital, aggregator, layout)
    upload_seconds = time.perf_counter() - t0
    keyholder = LocalKeyHolder(hospital, layout)
    backend = EncryptedDiagonalBackend(aggregator, layout, keyholder)
    compute = DiagonalCompute(backend, layout)
    compute.blocks = blocks

    def decrypt_head(w, b):
        def dec(v):
            return hospital.decrypt(
                hospital.from_bytes(aggregator.to_bytes(v), sender="a", item="w")
            )

        return head_matrix([[dec(v) for v in wk] for wk in w], [dec(v) for v in b], layout)

    # (a) time to accuracy: every epoch timed, the check after it untimed
    train_seconds, accs, head_enc = train_to_reference(
        backend, compute, layout, schedule, decrypt_head, xtw, yt
    )
    trained_rounds = list(backend.records)  # the accuracy run's refresh rounds, no timing's
    log(
        f"encrypted training: {sum(train_seconds):.1f} s for {args.epochs} epochs, test "
        f"accuracy {' '.join(f'{a:.4f}' for a in accs)}"
    )

    # (c) medfed's epoch, in process (with the op counts) and on K Ray workers
    def clear_counts():
        aggregator.counts.clear()
        hospital.counts.clear()

    epoch_schedule = HeadSchedule(1, args.lr, approx, args.l2)
    warmup_seconds, epoch_seconds = {}, {}
    warmup_seconds["in-process"], epoch_seconds["in-process"] = timed_epochs(
        backend, [compute], layout, epoch_schedule, args.timed_epochs, args.warmup, clear_counts
    )
    counts = aggregator.counts + hospital.counts  # the timed in-process epochs only
    refresh = backend.records[-1]
    # (e) the ops' unit costs, right after the in-process epochs they are compared with
    costs = unit_costs(aggregator, hospital, params.depth)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip() and int(w) > 0]
    capacity: dict[str, float] = {}
    if worker_counts:
        import ray

        from medfed.scale.cluster import ray_session
        from medfed.scale.workers import start_workers, stop_workers

        with ray_session(None, num_cpus=max(2, *worker_counts)):
            for k in worker_counts:
                remotes = start_workers(k, aggregator, public, galois, layout, blocks)
                pids = ray.get(  # the actors' processes, to see them exit below
                    [c.actor.__ray_call__.remote(lambda _: os.getpid()) for c in remotes]
                )
                try:
                    warmup_seconds[str(k)], epoch_seconds[str(k)] = timed_epochs(
                        backend, remotes, layout, epoch_schedule, args.timed_epochs, args.warmup
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
    counts = Counter({k: v / args.timed_epochs for k, v in counts.items()})
    by_workers = {name: float(np.median(sec)) for name, sec in epoch_seconds.items()}
    for name, sec in by_workers.items():
        log(
            f"medfed {name if name == 'in-process' else f'on {name} Ray worker(s)'}: "
            f"{sec:.3f} s/epoch (median of {args.timed_epochs}, after {args.warmup} warm-up)"
        )
    in_process = by_workers["in-process"]

    # (b) the same schedule on plaintext (numpy, same loop): the approximation's share of the gap
    plain_backend = PlainDiagonalBackend(layout)  # also records the values the run masked
    plain = DiagonalCompute(plain_backend, layout)
    plain.blocks = blocks_from_packed([b for _, b in sorted(raw.items())], layout)
    plain_seconds, plain_accs, head_plain = train_to_reference(
        plain_backend,
        plain,
        layout,
        schedule,
        lambda w, b: head_matrix(w, b, layout),
        xtw,
        yt,
    )

    security = refresh_security(plain_backend.records, trained_rounds)
    log(
        f"refresh security over the {args.epochs}-epoch run: "
        f"{security['refresh_security_bits']:.1f} bits (by kind: "
        + ", ".join(
            f"{k} {v:.1f}"
            for k, v in security["refresh_security_bits_by_kind"].items()
            if v is not None
        )
        + ")"
    )

    # (d) per-sample baseline on the same trained features
    sample_seconds, base_counts, base_error = per_sample_baseline(
        params, xw, y, args.baseline_samples, args.baseline_warmup, approx, args.seed
    )
    per_sample = float(np.median(sample_seconds))
    baseline = per_sample * args.n * layout.n_heads
    spread = {
        q: float(np.percentile(sample_seconds, v)) * 1000
        for q, v in (("min", 0), ("p10", 10), ("p90", 90), ("max", 100))
    }
    log(
        f"per-sample layout: {per_sample * 1000:.2f} ms/sample (median of "
        f"{len(sample_seconds)}; p10 {spread['p10']:.2f}, p90 {spread['p90']:.2f}) -> "
        f"{baseline:.0f} s/epoch"
    )

    # (e) floor
    floor = floor_seconds(counts, costs)

    # (b) yardsticks: the tuned plaintext reference on the raw features (the target), the same
    # on the trained (whitened) features (the best a head on them reaches), the majority class
    t0 = time.perf_counter()
    ref = tuned_reference(x, y, xt, yt, args.classes, args.seed)
    reference_seconds = time.perf_counter() - t0
    ceiling = tuned_reference(xw, y, xtw, yt, args.classes, args.seed)
    reached, epochs_to = time_to_reference(train_seconds, accs, ref["reference_accuracy"])
    acc = accs[-1]
    log(
        f"reference {ref['reference_accuracy']:.4f} (C {ref['reference_C']}, fitted in "
        f"{reference_seconds:.0f} s), on the {fmap.width} trained features "
        f"{ceiling['reference_accuracy']:.4f}; encrypted {acc:.4f}; seconds to reference: "
        f"{reached if reached is None else round(reached, 2)}"
    )
    signal = (
        float((beta[: fmap.width] ** 2).sum() / (beta**2).sum())
        if args.case == "illcond" and args.components
        else None
    )
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "case": args.case,
        "n": args.n,
        "d": args.d,
        "classes": args.classes,
        "components": args.components,
        "samples_per_component": args.samples_per_component,
        "width": fmap.width,
        "ckks": params.name,
        "schedule": {
            "epochs": args.epochs,
            "lr": args.lr,
            "l2": args.l2,
            "sigmoid_degree": args.degree,
            "sigmoid_radius": args.radius,
        },
        "layout": {
            "blocks": layout.n_blocks,
            "groups": layout.n_groups,
            "group": layout.group,
            "baby": layout.baby,
            "giant": layout.giant,
        },
        "feature_spectrum": spectrum_summary(x),
        "label_signal_in_components": signal,
        "oracle_accuracy": float(np.mean(oracle == yt)),
        "reference_accuracy": ref["reference_accuracy"],
        "reference_auc": ref["reference_auc"],
        "reference_C": ref["reference_C"],
        "reference_fit_seconds": reference_seconds,
        "whitened_reference_accuracy": ceiling["reference_accuracy"],
        "majority_accuracy": majority_accuracy(y, yt),
        "encrypted_accuracy": acc,
        "accuracy_per_epoch": accs,
        "encryption_cost_pp": 100 * (ref["reference_accuracy"] - acc),
        "tolerance_pp": TOLERANCE_PP,
        "seconds_to_reference": reached,
        "epochs_to_reference": epochs_to,
        "train_epoch_seconds": [round(s, 4) for s in train_seconds],
        "plaintext_accuracy": plain_accs[-1],
        "plaintext_accuracy_per_epoch": plain_accs,
        "accuracy_gap_pp": 100 * (acc - plain_accs[-1]),
        "max_weight_error": float(np.abs(head_enc - head_plain).max()),
        "seconds_per_epoch": in_process,
        "seconds_per_epoch_by_workers": by_workers,
        "epoch_seconds_by_workers": {
            name: [round(v, 4) for v in sec] for name, sec in epoch_seconds.items()
        },
        "warmup_seconds_by_workers": {
            name: [round(v, 4) for v in sec] for name, sec in warmup_seconds.items()
        },
        "workers": min(by_workers, key=by_workers.get),
        "parallel_capacity_2v1": {k: round(c, 3) for k, c in capacity.items()} or None,
        "worker_speedup_2v1": (by_workers["1"] / by_workers["2"])
        if {"1", "2"} <= set(by_workers)
        else None,
        "speedup_vs_per_sample_by_workers": {
            name: per_sample * args.n * layout.n_heads / sec for name, sec in by_workers.items()
        },
        "baseline_seconds_per_epoch": baseline,
        "baseline_ms_per_sample": per_sample * 1000,
        "baseline_ms_per_sample_spread": spread,
        "baseline_samples_timed": len(sample_seconds),
        "baseline_rotations_per_sample": sum(
            v for (op, _), v in base_counts.items() if op == "rotate"
        )
        / len(sample_seconds),
        "baseline_relative_error": base_error,
        "speedup_vs_per_sample": baseline / in_process,
        "plaintext_seconds_per_epoch": float(np.median(plain_seconds)),
        "floor_seconds": floor,
        "floor_fraction": floor / in_process,
        "op_counts_per_epoch": {
            f"{op}@{lv}": round(v, 1) for (op, lv), v in sorted(counts.items())
        },
        "baseline_op_counts_per_sample": {
            f"{op}@{lv}": v / len(sample_seconds) for (op, lv), v in sorted(base_counts.items())
        },
        "unit_costs_ms": {
            f"{op}@{lv}": round(v * 1000, 3) for (op, lv), v in sorted(costs.items())
        },
        "refreshes_per_epoch": 1,
        "refresh_bytes": refresh["bytes_to_hospital"] + refresh["bytes_from_hospital"],
        "refresh_bytes_to_hospital": refresh["bytes_to_hospital"],
        "refresh_bytes_from_hospital": refresh["bytes_from_hospital"],
        **security,  # refresh_security_bits (-log2 of the masks' union bound), by kind, ...
        "upload_seconds": upload_seconds,
        "wall_seconds": time.perf_counter() - run_t0,
        "peak_rss_mb": rss_mb,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
