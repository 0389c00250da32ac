import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.crypto.packing import (
    LayoutError,
    n_buckets,
    pack_hospital,
    plan_layout,
    replicate,
    segment_sums,
    unreplicate,
)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    n_classes=st.sampled_from([2, 3, 5]),
    bucket=st.sampled_from([16, 32]),
)
def test_packing_places_every_sample_once_and_padding_is_zero(sizes, n_classes, bucket):
    rng = np.random.default_rng(0)
    d, slots = 3, 1024
    layout = plan_layout(
        [n_buckets(s, bucket) for s in sizes],
        slots=slots,
        n_classes=n_classes,
        bucket=bucket,
        n_features=d,
    )
    x_sum = np.zeros((layout.n_blocks, d + 1, slots))
    y_sum = np.zeros((layout.n_blocks, slots))
    all_x, all_y = [], []
    for h, s in enumerate(sizes):
        x = rng.normal(size=(s, d))
        y = rng.integers(0, n_classes, s)
        all_x.append(x)
        all_y.append(y)
        for block, (xb, yb) in pack_hospital(x, y, n_classes, layout, h).items():
            x_sum[block] += xb
            y_sum[block] += yb
    x_all, y_all = np.vstack(all_x), np.concatenate(all_y)
    mask_total = sum(segment_sums(x_sum[b, d], layout) for b in range(layout.n_blocks))
    assert np.allclose(mask_total, len(y_all))  # validity mask counts real samples per segment
    feat_total = sum(segment_sums(x_sum[b, 0], layout) for b in range(layout.n_blocks))
    assert np.allclose(feat_total, x_all[:, 0].sum())
    label_total = sum(segment_sums(y_sum[b], layout) for b in range(layout.n_blocks))
    if n_classes == 2:
        assert np.allclose(label_total, y_all.sum())
    else:
        assert np.allclose(label_total, np.bincount(y_all, minlength=n_classes))
    # slots past the segments stay empty
    tail = layout.n_segments * layout.seg_size
    assert not x_sum[:, :, tail:].any()


def test_only_bucket_counts_leak():
    assert n_buckets(1, 32) == n_buckets(32, 32) == 1
    assert n_buckets(33, 32) == 2


def test_replicate_roundtrip():
    layout = plan_layout([2], slots=256, n_classes=3, bucket=16, n_features=2)
    vals = np.array([1.5, -2.0, 0.25])
    vec = replicate(vals, layout)
    assert np.allclose(unreplicate(vec, layout), vals)
    assert np.allclose(segment_sums(vec, layout), vals * layout.seg_size)


def test_too_many_classes_for_slots_names_fix():
    with pytest.raises(LayoutError, match="larger CKKS preset"):
        plan_layout([1], slots=64, n_classes=8, bucket=16, n_features=2)


def test_wrong_feature_width_rejected():
    layout = plan_layout([1], slots=256, n_classes=2, bucket=16, n_features=4)
    with pytest.raises(LayoutError, match="columns"):
        pack_hospital(np.zeros((3, 5)), np.zeros(3, int), 2, layout, 0)
