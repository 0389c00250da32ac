"""Head training in the diagonal layout: one loop, numpy or CKKS backend.

See :mod:`medfed.crypto.diagonal` for the layout. One epoch (full-batch gradient step)::

    Wb    = rot(W, b)                    b < baby            (chained +1 rotations)
    inner = sum_{g, b} D[g, a, b] * Wb   per giant step a    (one relinearization per sum)
    z     = inner_0 + rot(inner_1 + rot(inner_2 + ...))       (Horner, +baby rotations)
    r     = c * (sigmoid_approx(z + bias) - y)
    Q[g, a, b] = sum_blocks D[g, a, b] * rot(r, -baby * a)
    Qb    = sum_blocks mask * r
    W, bias -= key_holder_sums(Q, Qb)                         (one masked-sum round)

The plaintext reference (``PlainDiagonalBackend``) executes exactly this on numpy vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from medfed.crypto.diagonal import DiagonalLayout, gradient_map, rot, unpattern, weight_pattern
from medfed.crypto.masking import draw_mask
from medfed.train.head import HeadSchedule
from medfed.train.poly import scaled_residual


@dataclass
class Block:
    """One block of uploaded (encrypted or plain) vectors, summed over hospitals."""

    diagonals: list  # [group][giant][baby] -> vector
    mask: object
    targets: list  # [head] -> vector
    low: dict = field(default_factory=dict)  # cached lower-level copies for the backward pass


class DiagonalBackend(Protocol):
    def zeros(self) -> object: ...

    def dot(self, pairs: Sequence[tuple[object, object]]) -> object: ...

    def rotate(self, v: object, step: int) -> object: ...

    def lower(self, v: object, like: object) -> object:
        """``v`` at the level of ``like`` (identity for numpy)."""

    def finish(self, q: list, qb: list | None, steps: range) -> dict:
        """A compute's backward products (``q[head][group][baby]``) ready to leave it."""

    def sum_round(self, parts: list[dict], step: int) -> tuple[list, list]:
        """Weight and bias updates from every compute's finished products."""


def blocks_from_packed(packed, layout: DiagonalLayout, to_vec=None) -> list[Block]:
    """Training blocks from packed plaintext blocks; ``to_vec`` encrypts (identity: plaintext)."""
    to_vec = to_vec if to_vec is not None else (lambda v: v)
    G, A, B = layout.n_groups, layout.giant, layout.baby
    return [
        Block(
            [
                [[to_vec(b.diagonals[g, a, bb]) for bb in range(B)] for a in range(A)]
                for g in range(G)
            ],
            to_vec(b.mask),
            [to_vec(t) for t in b.targets],
        )
        for b in packed
    ]


def _low(block: Block, key: tuple, v: object, like: object, backend: DiagonalBackend) -> object:
    if key not in block.low:
        block.low[key] = backend.lower(v, like)
    return block.low[key]


def split_giant_steps(giant: int, parts: int) -> list[range]:
    """Contiguous, balanced ranges of giant steps, one per worker."""
    parts = max(1, min(parts, giant))
    edges = [round(i * giant / parts) for i in range(parts + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(parts)]


class DiagonalCompute:
    """The data-parallel part of an epoch over a range of giant steps (a worker's share)."""

    def __init__(self, backend: DiagonalBackend, layout: DiagonalLayout) -> None:
        self.backend = backend
        self.layout = layout
        self.blocks: list[Block] = []

    def targets(self) -> list[list[object]]:
        return [blk.targets for blk in self.blocks]

    def _rotate_by(self, v, giant_steps: int, sign: int):
        for _ in range(giant_steps):
            v = self.backend.rotate(v, sign * self.layout.baby)
        return v

    def forward(self, weights: list[list[object]], steps: range) -> list[list[object]]:
        """Partial ``z`` (without bias) per head and block, from the giant steps in ``steps``."""
        L, be = self.layout, self.backend
        out = []
        for k in range(L.n_heads):
            w_rot = []
            for g in range(L.n_groups):
                chain = [weights[k][g]]
                for _ in range(1, L.baby):
                    chain.append(be.rotate(chain[-1], 1))
                w_rot.append(chain)
            per_block = []
            for blk in self.blocks:
                z = None
                for a in reversed(steps):  # Horner over this worker's giant steps
                    inner = be.dot(
                        [
                            (blk.diagonals[g][a][b], w_rot[g][b])
                            for g in range(L.n_groups)
                            for b in range(L.baby)
                        ]
                    )
                    z = inner if z is None else inner + be.rotate(z, L.baby)
                per_block.append(self._rotate_by(z, steps.start, +1))
            out.append(per_block)
        return out

    def backward(self, residuals: list[list[object]], steps: range, with_bias: bool):
        """Products ``Q[head][group][baby]`` summed over ``steps`` (and the bias products)."""
        L, be = self.layout, self.backend
        q_all, qb_all = [], []
        for k in range(L.n_heads):
            shifted = []
            for r in residuals[k]:
                chain = [self._rotate_by(r, steps.start, -1)]
                for _ in range(1, len(steps)):
                    chain.append(be.rotate(chain[-1], -L.baby))
                shifted.append(chain)
            q = [
                [
                    be.dot(
                        [
                            (_low(blk, (g, a, b), blk.diagonals[g][a][b], sr[i], be), sr[i])
                            for blk, sr in zip(self.blocks, shifted, strict=True)
                            for i, a in enumerate(steps)
                        ]
                    )
                    for b in range(L.baby)
                ]
                for g in range(L.n_groups)
            ]
            q_all.append(q)
            if with_bias:
                qb_all.append(
                    be.dot(
                        [
                            (_low(blk, ("mask",), blk.mask, r, be), r)
                            for blk, r in zip(self.blocks, residuals[k], strict=True)
                        ]
                    )
                )
        return be.finish(q_all, qb_all if with_bias else None, steps)


def diagonal_epoch(
    backend: DiagonalBackend,
    computes: Sequence,
    weights: list[list[object]],
    biases: list[object],
    layout: DiagonalLayout,
    schedule: HeadSchedule,
    step: int,
    targets: list[list[object]] | None = None,
) -> tuple[list[list[object]], list[object]]:
    """One full-batch gradient step over computes that each own a range of giant steps.

    ``computes`` are :class:`DiagonalCompute` objects, or proxies of remote ones (Ray actors)
    with ``submit_forward``/``submit_backward`` returning handles with ``result()``.
    """
    c = schedule.lr / layout.n_padded
    ranges = split_giant_steps(layout.giant, len(computes))
    computes = computes[: len(ranges)]
    if targets is None:
        targets = computes[0].targets()
    handles = [
        submit(comp, "forward", weights, rng) for comp, rng in zip(computes, ranges, strict=True)
    ]
    partial = [h.result() for h in handles]
    residuals = []
    for k in range(layout.n_heads):
        per_block = []
        for i in range(len(partial[0][k])):
            z = partial[0][k][i]
            for part in partial[1:]:
                z = z + part[k][i]
            per_block.append(scaled_residual(z + biases[k], targets[i][k], schedule.approx, c))
        residuals.append(per_block)
    handles = [
        submit(comp, "backward", residuals, rng, j == 0)
        for j, (comp, rng) in enumerate(zip(computes, ranges, strict=True))
    ]
    parts = [h.result() for h in handles]
    upd_w, upd_b = backend.sum_round(parts, step)
    new_w = [
        [w - u for w, u in zip(wk, uk, strict=True)] for wk, uk in zip(weights, upd_w, strict=True)
    ]
    new_b = [b - u for b, u in zip(biases, upd_b, strict=True)]
    return new_w, new_b


class _Done:
    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


def submit(compute, method: str, *args):
    """Start ``method`` on a compute: remote proxies run in parallel, local ones right away."""
    remote = getattr(compute, f"submit_{method}", None)
    if remote is not None:
        return remote(*args)
    return _Done(getattr(compute, method)(*args))


def train_diagonal(
    backend: DiagonalBackend,
    computes: Sequence,
    layout: DiagonalLayout,
    schedule: HeadSchedule,
    on_step: Callable[[int], None] | None = None,
    targets: list[list[object]] | None = None,
) -> tuple[list[list[object]], list[object]]:
    """Train from zero weights; ``targets[block][head]`` default to the first compute's."""
    weights = [[backend.zeros() for _ in range(layout.n_groups)] for _ in range(layout.n_heads)]
    biases = [backend.zeros() for _ in range(layout.n_heads)]
    for step in range(schedule.epochs):
        weights, biases = diagonal_epoch(
            backend, computes, weights, biases, layout, schedule, step, targets
        )
        if on_step is not None:
            on_step(step)
    return weights, biases


def keyholder_sums(q: np.ndarray, qb: np.ndarray, layout: DiagonalLayout) -> tuple:
    """Plain linear map from (masked) products to pattern updates: what a hospital computes."""
    grads = gradient_map(q, layout)
    return weight_pattern(grads, layout), np.full(layout.slots, float(np.sum(qb)))


class PlainDiagonalBackend:
    """numpy slot vectors: the plaintext reference of the encrypted diagonal path."""

    def __init__(self, layout: DiagonalLayout) -> None:
        self.layout = layout

    def zeros(self) -> np.ndarray:
        return np.zeros(self.layout.slots)

    def dot(self, pairs):
        return sum(a * b for a, b in pairs)

    def rotate(self, v, step):
        return rot(v, step)

    def lower(self, v, like):
        return v

    def finish(self, q, qb, steps):
        return {"q": q, "qb": qb}

    def sum_round(self, parts, step):
        L = self.layout
        upd_w, upd_b = [], []
        for k in range(L.n_heads):
            q = np.stack([np.asarray(p["q"][k]) for p in parts])  # (parts, G, B, S)
            pattern, bias = keyholder_sums(q, parts[0]["qb"][k], L)
            upd_w.append(list(pattern))
            upd_b.append(bias)
        return upd_w, upd_b


def head_matrix(weights: list[list[np.ndarray]], biases: list[np.ndarray], layout) -> np.ndarray:
    """Decrypted/plain pattern vectors -> ``(d + 1, heads)`` matrix (bias row last)."""
    cols = []
    for wk, bk in zip(weights, biases, strict=True):
        w = unpattern(np.stack([np.asarray(v) for v in wk]), layout)[: layout.n_features]
        cols.append(np.concatenate([w, [float(np.mean(np.asarray(bk)))]]))
    return np.stack(cols, axis=1)


class EncryptedDiagonalBackend:
    """The aggregator's CKKS backend: public key, relinearization and three Galois keys."""

    def __init__(self, engine, layout: DiagonalLayout, keyholder, mask_bits: int, rng=None):
        from medfed.crypto.masking import mask_rng

        if engine.private:
            raise ValueError("the aggregator's backend must be built on a public context")
        self.engine = engine
        self.layout = layout
        self.keyholder = keyholder
        self.mask_bits = mask_bits
        self.rng = rng if rng is not None else mask_rng()
        self.records: list[dict] = []

    def zeros(self):
        return self.engine.encrypt(np.zeros(self.layout.slots))

    def dot(self, pairs):
        return self.engine.dot(pairs)

    def rotate(self, v, step):
        return self.engine.rotate(v, step)

    def lower(self, v, like):
        return self.engine.mod_switch_to_level(v, like.level)

    def finish(self, q, qb, steps):
        """Mask and serialize products where they were computed (a worker, or in-process).

        Returns the masked bytes and the masks' image under the key holder's linear map, so
        the driver never re-serializes and never sees an unmasked product leave.
        """
        L, S, e = self.layout, self.layout.slots, self.engine
        out = {"q": [], "qb": None, "mask_pattern": [], "mask_bias": []}
        for k in range(L.n_heads):
            masks = np.stack(
                [
                    [draw_mask(self.rng, S, self.mask_bits) for _ in range(L.baby)]
                    for _ in range(L.n_groups)
                ]
            )
            out["q"].append(
                [
                    [e.to_bytes(q[k][g][b] + masks[g, b]) for b in range(L.baby)]
                    for g in range(L.n_groups)
                ]
            )
            out["mask_pattern"].append(weight_pattern(gradient_map(masks, L), L))
        if qb is not None:
            out["qb"] = []
            for k in range(L.n_heads):
                m = draw_mask(self.rng, S, self.mask_bits)
                out["qb"].append(e.to_bytes(qb[k] + m))
                out["mask_bias"].append(float(m.sum()))
        return out

    def sum_round(self, parts, step):
        import time

        from medfed.crypto.context import CiphertextError

        t0 = time.perf_counter()
        L, e = self.layout, self.engine
        masked = []
        for k in range(L.n_heads):
            for part in parts:
                masked.extend(v for g in part["q"][k] for v in g)
            masked.append(parts[0]["qb"][k])
        per_head = L.n_groups + 1
        while True:  # a key holder whose reply is unusable is dropped; the next one retries
            replies, who = self.keyholder.sum_masked(masked, step)
            try:
                if len(replies) != per_head * L.n_heads:
                    raise CiphertextError(
                        f"{who} returned {len(replies)} sums in the masked-sum round, expected "
                        f"{per_head * L.n_heads}; it must answer with one per masked vector group"
                    )
                loaded = [
                    e.from_bytes(r, sender=who, item=f"sum {j // per_head}/{j % per_head}")
                    for j, r in enumerate(replies)
                ]
                break
            except CiphertextError as err:
                reject = getattr(self.keyholder, "reject", None)
                if reject is None:
                    raise
                reject(who, str(err), step)
        upd_w, upd_b = [], []
        for k in range(L.n_heads):
            pattern = sum(p["mask_pattern"][k] for p in parts)
            bias = np.full(L.slots, parts[0]["mask_bias"][k])
            got = loaded[k * per_head : (k + 1) * per_head]
            upd_w.append([gv - p for gv, p in zip(got[:-1], pattern, strict=True)])
            upd_b.append(got[-1] - bias)
        self.records.append(
            {
                "step": step,
                "hospital": who,
                "bytes_to_hospital": sum(len(b) for b in masked),
                "bytes_from_hospital": sum(len(b) for b in replies),
                "seconds": time.perf_counter() - t0,
            }
        )
        return upd_w, upd_b


def hospital_sums(
    engine, masked: list[bytes], layout: DiagonalLayout, mask_bits: int
) -> list[bytes]:
    """The key holder's side of the round: decrypt masked products, sum, re-encrypt.

    Per head the aggregator sends ``parts x groups x baby`` masked product vectors (one set per
    worker) and one masked bias vector; the reply is one pattern ciphertext per group and one
    replicated bias ciphertext.
    """
    from medfed.crypto.context import CiphertextError

    S, H, unit = layout.slots, layout.n_heads, layout.n_groups * layout.baby
    if len(masked) % H or (len(masked) // H - 1) % unit or len(masked) // H - 1 < unit:
        raise CiphertextError(
            f"the aggregator sent {len(masked)} masked vectors; expected a multiple of "
            f"{unit} products plus one bias vector per head ({H} heads)"
        )
    per_head = len(masked) // H
    bound = 2.0 ** (mask_bits + 3)
    out = []
    for k in range(H):
        values = np.stack(
            [
                engine.decrypt(engine.from_bytes(b, sender="aggregator", item=f"masked {k}/{i}"))
                for i, b in enumerate(masked[k * per_head : (k + 1) * per_head])
            ]
        )
        if not np.all(np.isfinite(values)) or np.abs(values).max() > bound:
            raise CiphertextError(
                "masked values from the aggregator decrypt outside the mask range: not "
                "encrypted under this consortium's key, or corrupt."
            )
        pattern, bias = keyholder_sums(values[:-1].reshape(-1, unit, S), values[-1], layout)
        out.extend(engine.to_bytes(engine.encrypt(p)) for p in pattern)
        out.append(engine.to_bytes(engine.encrypt(bias)))
    return out


def galois_steps(layout: DiagonalLayout) -> list[int]:
    """The only rotations the aggregator needs keys for; all others are chained from these."""
    return sorted({1, layout.baby, -layout.baby})
