"""The training loop: one full-batch gradient step over computes, epochs from zero weights.

:func:`diagonal_epoch` plans the epoch (:mod:`~medfed.train.diagonal.planner`), submits each
share's calls to its compute (in process or on a Ray worker) and applies the backend's
masked-sum round; :func:`train_diagonal` runs the schedule's epochs; :func:`head_matrix` turns
decrypted (or plain) pattern vectors into the head's weight matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from medfed.crypto.diagonal import DiagonalLayout, unpattern, weight_pattern
from medfed.train.diagonal.backend import DiagonalBackend
from medfed.train.diagonal.claims import ClaimBoard
from medfed.train.diagonal.planner import plan_shares, plan_tasks, submission_order
from medfed.train.head import HeadSchedule


def diagonal_epoch(
    backend: DiagonalBackend,
    computes: Sequence,
    weights: list[list[object]],
    biases: list[object],
    layout: DiagonalLayout,
    schedule: HeadSchedule,
    step: int,
) -> tuple[list[list[object]], list[object]]:
    """One full-batch gradient step over computes that each own a share of the work.

    ``computes`` are :class:`~medfed.train.diagonal.compute.DiagonalCompute` objects, or
    proxies of remote ones (Ray actors) with ``submit_rotate``/``submit_forward``/
    ``submit_residuals``/``submit_backward`` returning handles (:func:`plan_tasks` says which
    calls each compute gets). Weight rotations, partial ``z`` and residuals go from compute to
    compute without a stop at the driver (remote handles pass object references).
    """
    c, approx = schedule.lr / layout.n_padded, schedule.approx
    shares = plan_shares(layout, len(computes), computes[0].n_blocks)
    plans = plan_tasks(shares, layout.giant)
    comps = [computes[sh.compute] for sh in shares]
    board = ClaimBoard() if any(sh.contests for sh in shares) else None
    rotated = {  # shared rotations go out first; a share that shares none rotates in forward
        j: submit(comp, "rotate", weights, sh).share()
        for j, (comp, sh) in enumerate(zip(comps, shares, strict=True))
        if sh.exchange
    }
    fwd = []
    for j, (comp, sh) in enumerate(zip(comps, shares, strict=True)):
        others = [r for m, r in rotated.items() if m != j]
        fused = next((t.blocks for t in plans[j] if t.fused), ())
        own = None if sh.exchange else weights
        fwd.append(
            submit(comp, "forward", own, others, sh, biases, c, approx, fused, board).share()
        )
    published, backward = {}, []
    for j, t in submission_order(plans):
        task, comp, sh = plans[j][t], comps[j], shares[j]
        if task.method == "residuals":
            if task.fused:  # formed by the forward call, published with its partial z
                published[j, task.blocks] = fwd[j]
                continue
            src = [fwd[m] for m in task.sources]
            handle = submit(comp, "residuals", src, biases, c, approx, sh, task.blocks)
            published[j, task.blocks] = handle.share()
        else:
            inputs = [published[key] for key in task.inputs]
            backward.append(submit(comp, "backward", inputs, sh, task.blocks, task.last))
    parts = [p for p in (h.result() for h in backward) if p is not None]  # raises any failure
    decayed = weights if schedule.decay else None
    decayed_b = biases if schedule.decay and schedule.penalize_bias else None
    upd_w, upd_b = backend.sum_round(parts, step, decayed, schedule.decay, decayed_b)
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

    share = result  # what other computes receive: the value itself


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
) -> tuple[list[list[object]], list[object]]:
    """Train from zero weights (every compute holds the blocks' targets)."""
    weights = [[backend.zeros() for _ in range(layout.n_groups)] for _ in range(layout.n_heads)]
    biases = [backend.zeros() for _ in range(layout.n_heads)]
    for step in range(schedule.epochs):
        weights, biases = diagonal_epoch(backend, computes, weights, biases, layout, schedule, step)
        if on_step is not None:
            on_step(step)
    return weights, biases


def decrypted_head(vectors: list[np.ndarray], layout, who: str) -> np.ndarray:
    """The head matrix from its decrypted slot vectors (per head: one per group, then the
    bias); :class:`CiphertextError` if it is not finite or absurdly large."""
    from medfed.crypto.errors import CiphertextError

    per_head = layout.n_groups + 1
    weights = head_matrix(
        [list(vectors[k * per_head : (k + 1) * per_head - 1]) for k in range(layout.n_heads)],
        [vectors[(k + 1) * per_head - 1] for k in range(layout.n_heads)],
        layout,
    )
    if not np.all(np.isfinite(weights)) or np.abs(weights).max() > 1e6:
        raise CiphertextError(f"{who}: the decrypted head is not finite or absurdly large")
    return weights


def head_matrix(weights: list[list[np.ndarray]], biases: list[np.ndarray], layout) -> np.ndarray:
    """Decrypted/plain pattern vectors -> ``(d + 1, heads)`` matrix (bias row last)."""
    cols = []
    for wk, bk in zip(weights, biases, strict=True):
        w = unpattern(np.stack([np.asarray(v) for v in wk]), layout)[: layout.n_features]
        cols.append(np.concatenate([w, [float(np.mean(np.asarray(bk)))]]))
    return np.stack(cols, axis=1)


def perturb_head(
    weights: list[list[object]],
    biases: list[object],
    layout: DiagonalLayout,
    noise: np.ndarray,
) -> tuple[list[list[object]], list[object]]:
    """The head plus ``noise`` (``(n_features + 1, heads)``, the bias row last), added slot-wise
    in the weight pattern and the replicated bias: on ciphertexts, inside them (the inverse
    of :func:`head_matrix`'s reading; padded features get none)."""
    noise = np.asarray(noise, dtype=np.float64)
    if noise.shape != (layout.n_features + 1, layout.n_heads):
        raise ValueError(f"head noise of shape {noise.shape} does not fit the layout")
    width = layout.n_groups * layout.group
    new_w, new_b = [], []
    for k, (wk, bk) in enumerate(zip(weights, biases, strict=True)):
        column = np.zeros(width)
        column[: layout.n_features] = noise[:-1, k]
        pattern = weight_pattern(column, layout)
        new_w.append([w + pattern[g] for g, w in enumerate(wk)])
        new_b.append(bk + np.full(layout.slots, noise[-1, k]))
    return new_w, new_b
