"""Thresholding, minimum lesion size, connectivity and stable instance labels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bids_app.core.postprocess import (
    binarize,
    label_components,
    lesion_geometry,
    remove_small_components,
    segment_lesions,
)


def test_connectivity_reference_vector():
    # the CL benchmark's validation vector (arXiv:2507.12092): 3 / 2 / 1 components with 6 / 18 / 26-connectivity
    mask = np.zeros((5, 5, 5), bool)
    for v in [(1, 1, 1), (1, 2, 1), (2, 2, 2), (3, 3, 1)]:
        mask[v] = True
    assert [label_components(mask, c)[1] for c in (6, 18, 26)] == [3, 2, 1]


def test_labels_follow_scipy_raster_order():
    rng = np.random.default_rng(1)
    mask = rng.random((20, 21, 22)) > 0.85
    ours, n = label_components(mask, 6)
    ref, n_ref = ndimage.label(mask, ndimage.generate_binary_structure(3, 1))
    assert n == n_ref
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_labels_partition_matches_scipy(connectivity):
    rank = {6: 1, 18: 2, 26: 3}[connectivity]
    mask = np.random.default_rng(2).random((15, 15, 15)) > 0.7
    ours, n = label_components(mask, connectivity)
    ref, n_ref = ndimage.label(mask, ndimage.generate_binary_structure(3, rank))
    assert n == n_ref
    np.testing.assert_array_equal(ours, ref)  # same numbering too (raster order)


def test_min_size_keeps_components_of_at_least_min_size():
    mask = np.zeros((10, 10, 10), bool)
    mask[1, 1, 1:4] = True          # 3 voxels
    mask[5, 5, 1:5] = True          # 4 voxels
    kept = remove_small_components(mask, 4, 26)
    assert kept[5, 5, 1:5].all() and not kept[1, 1, 1:4].any()
    assert remove_small_components(mask, 1, 26).sum() == 7


def test_binarize_uses_greater_or_equal():
    prob = np.zeros((4, 4, 4), np.float32)
    prob[1, 1, 1] = 0.5
    prob[2, 2, 2] = 0.4999
    out = binarize(prob, 0.5, 1, 26)
    assert out[1, 1, 1] and not out[2, 2, 2]


def test_inputs_not_modified():
    prob = np.random.default_rng(0).random((3, 8, 8, 8)).astype(np.float32)
    prob /= prob.sum(0, keepdims=True)
    before = prob.copy()
    segment_lesions(prob, [1, 2], 0.3, 2, 18)
    binarize(prob[1], 0.3, 2, 18)
    np.testing.assert_array_equal(prob, before)


def test_segment_lesions_classes_and_order():
    probs = np.zeros((3, 12, 12, 12), np.float32)
    probs[0] = 1.0
    # class 2 lesion first in raster order, class 1 lesion later: class 1 labels still come first
    probs[:, 1:3, 1:3, 1:3] = np.array([0.1, 0.1, 0.8])[:, None, None, None]
    probs[:, 8:10, 8:10, 8:10] = np.array([0.1, 0.9, 0.0])[:, None, None, None]
    probs[:, 5, 5, 5] = [0.4, 0.6, 0.0]      # single voxel: removed by min size 2
    seg = segment_lesions(probs, [1, 2], {1: 0.5, 2: 0.5}, min_size=2, connectivity=26)
    assert seg.n_lesions == 2
    assert list(seg.instance_class) == [1, 2]
    assert (seg.instances[8:10, 8:10, 8:10] == 1).all() and (seg.instances[1:3, 1:3, 1:3] == 2).all()
    assert seg.dseg[5, 5, 5] == 0 and seg.instances[5, 5, 5] == 0


def test_segment_lesions_overlapping_thresholds_pick_the_likelier_class():
    probs = np.zeros((3, 4, 4, 4), np.float32)
    probs[0] = 1.0
    probs[:, 1, 1, 1] = [0.2, 0.35, 0.45]
    seg = segment_lesions(probs, [1, 2], 0.3, 1, 26)
    assert seg.dseg[1, 1, 1] == 2 and seg.n_lesions == 1


def test_empty_prediction():
    probs = np.zeros((3, 6, 6, 6), np.float32)
    probs[0] = 1
    seg = segment_lesions(probs, [1, 2], 0.5, 1, 26)
    assert seg.n_lesions == 0 and not seg.instances.any()
    geo = lesion_geometry(seg.instances, seg.n_lesions, np.eye(4))
    assert geo["n_voxels"].size == 0


def test_lesion_geometry():
    instances = np.zeros((10, 10, 10), np.int32)
    instances[2:4, 2:4, 2:4] = 1          # 8 voxels, centroid (2.5, 2.5, 2.5)
    instances[7, 7, 7] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10, 0, 5]
    geo = lesion_geometry(instances, 2, affine)
    assert list(geo["n_voxels"]) == [8, 1]
    assert geo["volume_mm3"][0] == pytest.approx(64.0)
    assert geo["centroid_x_vox"][0] == pytest.approx(2.5)
    assert geo["centroid_x_mm"][0] == pytest.approx(-5.0) and geo["centroid_z_mm"][1] == pytest.approx(19.0)


def test_segmentation_from_maps_round_trip_and_checks():
    from bids_app.core.postprocess import segment_lesions, segmentation_from_maps

    rng = np.random.default_rng(0)
    probs = np.zeros((3, 20, 20, 20), np.float32)
    probs[1] = ndimage.gaussian_filter(rng.random((20, 20, 20)), 1.5) > 0.55
    probs[2] = ndimage.gaussian_filter(rng.random((20, 20, 20)), 1.5) > 0.56
    seg = segment_lesions(probs, [1, 2], 0.5, min_size=2, connectivity=18)
    assert seg.n_lesions > 2 and set(np.unique(seg.instance_class)) == {1, 2}
    back = segmentation_from_maps(seg.dseg, seg.instances)
    np.testing.assert_array_equal(back.instance_class, seg.instance_class)
    np.testing.assert_array_equal(back.dseg, seg.dseg)
    np.testing.assert_array_equal(back.instances, seg.instances)
    empty = segmentation_from_maps(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.int16))
    assert empty.n_lesions == 0
    mixed = seg.dseg.copy()
    mixed[seg.instances == 1] = 2
    mixed[np.argwhere(seg.instances == 1)[0][0], np.argwhere(seg.instances == 1)[0][1],
          np.argwhere(seg.instances == 1)[0][2]] = 1
    with pytest.raises(ValueError, match="spans"):
        segmentation_from_maps(mixed, seg.instances)
    gap = seg.instances.copy()
    gap[gap == 1] = 0
    with pytest.raises(ValueError, match="1..n"):
        segmentation_from_maps(np.where(gap > 0, seg.dseg, 0), gap)
    with pytest.raises(ValueError, match="shape"):
        segmentation_from_maps(seg.dseg[:-1], seg.instances)


@pytest.mark.parametrize("t", [0.35, 0.45, 0.3])
def test_a_probability_exactly_at_the_float32_threshold_passes_for_every_class(t):
    """``p >= t`` compares in the probabilities' float32 (NumPy 2 weak scalars): a voxel at
    float32(t) passes even where float32(t) < t (0.35, 0.45), whichever class it belongs to,
    and one a float32 step below does not."""
    at, below = np.float32(t), np.nextafter(np.float32(t), np.float32(0))
    q = np.zeros((3, 20, 20, 20), np.float32)
    q[1, 2:5, 2:5, 2:5] = at          # class 1 at the threshold
    q[2, 8:11, 8:11, 8:11] = at       # class 2 at the threshold (class 1 is 0 there)
    q[2, 14:17, 14:17, 14:17] = below  # class 2 just below
    q[0] = 1 - q[1] - q[2]
    seg = segment_lesions(q, [1, 2], t, 1, 26)
    assert (seg.dseg[2:5, 2:5, 2:5] == 1).all()
    assert (seg.dseg[8:11, 8:11, 8:11] == 2).all()
    assert not seg.dseg[14:17, 14:17, 14:17].any()
    assert list(seg.instance_class) == [1, 2]
