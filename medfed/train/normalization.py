"""The shared feature map every hospital applies (both modes): whitening from summed moments.

Hospitals securely sum :func:`stats_vector` of their raw embeddings (feature sums, the upper
triangle of the second-moment matrix, and the sample count), decrypt the total and derive the
same :class:`FeatureMap` (:func:`feature_map_from_stats`):

* ``components > 0`` (the run's default is 192): PCA whitening. Centre on the global mean,
  project on the top eigenvectors of the global covariance and divide each by the square
  root of its eigenvalue. With ``samples_per_component`` only the top
  :func:`active_components` are kept, one per that many pooled training samples and at
  least :data:`MIN_ACTIVE`, so small federations do not fit noise directions while large
  ones keep the label signal in the small ones. Mode ``embeddings`` trains on that many
  features (:func:`public_width`, from the padded sample count the aggregator already
  sees); mode ``updates`` keeps the width ``components`` and zeroes the columns beyond the
  active ones, counted from the decrypted statistics, so the aggregator learns nothing new.
  The trained features are uncorrelated with unit variance, so the logistic loss is well
  conditioned (its Hessian is at most ``I / 4``, so a fixed step up to ``4`` decreases it;
  Bonte and Vercauteren 2018) and gradient descent converges in a few epochs. Directions
  with (numerically) zero variance get a zero column, so the width stays ``components``
  whatever the data's rank: the width is public, the rank is not.
* ``components == 0``: per-feature standardization only (no second moments).

``scale`` multiplies the mapped features. With differential privacy a hospital prepares its
data the same way in both modes (:func:`hospital_stats`, :func:`mapped_features`): unit-norm
embeddings, a noise share on its statistics, and (mode ``embeddings``) mapped rows clipped.
numpy only: importable without TenSEAL, torch or Flower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfed.privacy.mechanisms import HospitalDP, unit_rows
from medfed.privacy.sensitivity import clip_rows

#: Eigenvalues below this fraction of the largest are treated as zero variance.
RANK_TOLERANCE = 1e-9

#: Whitened components kept whatever the sample count (when the width allows).
MIN_ACTIVE = 96


def active_components(n: int, width: int, samples_per_component: int) -> int:
    """Components kept of ``width``: ``n // samples_per_component``, at least
    :data:`MIN_ACTIVE`, at most ``width`` (all of them when ``samples_per_component`` is 0)."""
    if not samples_per_component:
        return width
    return min(width, max(MIN_ACTIVE, int(n) // samples_per_component))


def public_width(d: int, components: int, padded_samples: int, samples_per_component: int) -> int:
    """Mode ``embeddings``: the width the head trains on, from public numbers only.

    :func:`active_components` of the padded sample count (every hospital's bucket count times
    the bucket, which the aggregator already sees), within :func:`trained_width`.
    """
    width = trained_width(d, components)
    if not components:
        return width
    return active_components(padded_samples, width, samples_per_component)


def stats_length(d: int, components: int) -> int:
    """Length of :func:`stats_vector` for ``d`` features (with second moments iff whitening)."""
    return (d + d * (d + 1) // 2 if components else 2 * d) + 1


def stats_vector(features: np.ndarray, components: int) -> np.ndarray:
    """What the shared feature map needs, summed securely over hospitals.

    ``[sum x (d), sum x_i x_j for i <= j (row-major upper triangle), n]`` when whitening
    (``components > 0``), else ``[sum x (d), sum x^2 (d), n]``.
    """
    x = np.asarray(features, dtype=np.float64)
    d = x.shape[1]
    if components:
        second = (x.T @ x)[np.triu_indices(d)]
    else:
        second = (x**2).sum(0)
    return np.concatenate([x.sum(0), second, [x.shape[0]]])


def hospital_stats(x: np.ndarray, components: int, dp: HospitalDP | None = None) -> np.ndarray:
    """A hospital's :func:`stats_vector`; with ``dp``, of its unit-norm embeddings plus its
    share of the noise (the count stays exact)."""
    stats = stats_vector(unit_rows(x) if dp else x, components)
    if dp:
        stats[:-1] += dp.noise(dp.stats_std(), len(stats) - 1)
    return stats


def mapped_features(
    raw: np.ndarray, fmap: FeatureMap, *, unit: bool = False, clip: float | None = None
) -> np.ndarray:
    """What the head trains on (and is evaluated on): ``fmap`` of the raw embeddings (with
    ``unit``, of the unit-norm ones: differential privacy), rows clipped to ``clip`` if given."""
    x = fmap(unit_rows(raw) if unit else raw)
    return clip_rows(x, clip) if clip is not None else x


def stats_ciphertexts(d: int, components: int, slots: int) -> int:
    """Ciphertexts of ``slots`` slots that one :func:`stats_vector` takes."""
    return -(-stats_length(d, components) // slots)


def trained_width(d: int, components: int) -> int:
    """Features the head trains on: ``components`` (at most ``d``), or ``d`` without PCA."""
    return min(d, components) if components else d


@dataclass(frozen=True)
class FeatureMap:
    """``x -> (x - mean) @ projection``: raw embeddings ``(n, d)`` to trained features."""

    mean: np.ndarray  # (d,)
    projection: np.ndarray  # (d, width)

    @property
    def width(self) -> int:
        """Features the head trains on (the projection's output width)."""
        return int(self.projection.shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Map raw embeddings ``(n, d)`` to trained features ``(n, width)``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"features of shape {x.shape} do not have {len(self.mean)} columns")
        return (x - self.mean) @ self.projection


def _moments(total: np.ndarray, d: int, components: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Global mean, covariance (per-feature variance without ``components``) and count."""
    total = np.asarray(total, dtype=np.float64)
    need = stats_length(d, components)
    if total.shape[0] < need:
        raise ValueError(f"the summed statistics have {total.shape[0]} values, expected {need}")
    n = float(total[need - 1])
    if not n >= 1 or not np.all(np.isfinite(total[:need])):
        raise ValueError("the securely summed statistics are not finite with a positive count")
    mean = total[:d] / n
    if not components:
        return mean, np.maximum(total[d : 2 * d] / n - mean**2, 0.0), n
    second = np.zeros((d, d))
    second[np.triu_indices(d)] = total[d : need - 1]
    second = second + np.triu(second, 1).T
    return mean, second / n - np.outer(mean, mean), n


def feature_map_from_stats(
    total: np.ndarray,
    d: int,
    components: int,
    scale: float = 1.0,
    samples_per_component: int = 0,
) -> FeatureMap:
    """The global feature map from the decrypted sum of every hospital's :func:`stats_vector`.

    Deterministic in ``total``: every hospital decrypts the same sum and gets the same map
    (eigenvector signs are fixed so that each column's largest entry is positive). The map
    has :func:`trained_width` columns; beyond :func:`active_components` they are zero.
    """
    mean, second, n = _moments(total, d, components)
    if not components:
        std = np.sqrt(second) + 1e-6
        return FeatureMap(mean, np.diag(scale / std / np.sqrt(d)))
    ev, vecs = np.linalg.eigh((second + second.T) / 2)
    order = np.argsort(ev)[::-1][: trained_width(d, components)]
    ev, vecs = ev[order], vecs[:, order]
    top = max(float(ev[0]), 0.0)
    keep = ev > RANK_TOLERANCE * top if top > 0 else np.zeros(len(ev), dtype=bool)
    keep[active_components(int(n), len(ev), samples_per_component) :] = False
    pivot = np.argmax(np.abs(vecs), axis=0)
    vecs = vecs * np.sign(vecs[pivot, np.arange(vecs.shape[1])])
    inv_sqrt = np.where(keep, 1.0 / np.sqrt(np.where(keep, ev, 1.0)), 0.0)
    return FeatureMap(mean, vecs * (scale * inv_sqrt))


def layout_feature_map(
    total: np.ndarray,
    d: int,
    components: int,
    samples_per_component: int,
    feature_scale: float,
    padded: int,
    layout_width: int,
) -> FeatureMap:
    """The shared feature map from the decrypted statistics ``total``, for a layout of
    ``padded`` samples (public: the bucket counts) that trains ``layout_width`` features;
    ``ValueError`` unless that is the width this party computes for it."""
    width = public_width(d, components, padded, samples_per_component)
    if width != layout_width:
        raise ValueError(
            f"the layout trains {layout_width} features, not {width} (the run's components "
            "for its padded sample count); every party must run one medfed version with one "
            "--components and --samples-per-component"
        )
    return feature_map_from_stats(total, d, components and width, feature_scale)


def shared_feature_map(
    train_sets: list[np.ndarray],
    over: list[int],
    components: int,
    scale: float,
    samples_per_component: int = 0,
) -> FeatureMap:
    """The map the hospitals in ``over`` derive from their summed statistics (plaintext
    twin of the secure statistics round, for the references)."""
    d = np.asarray(train_sets[0]).shape[1]
    total = sum(stats_vector(train_sets[i], components) for i in over)
    return feature_map_from_stats(total, d, components, scale, samples_per_component)
