"""Learned brain extraction (bids_app.core.brain_extraction): argument checks without the tool, and
a plausible mask on a real clinical T1w with skull (open_ms_data, downsampled) when deepbet is
installed. About 20 s on 2 CPU cores (deepbet always predicts on a 256^3 crop)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from bids_app.core import brain_extraction
from bids_app.errors import BadInputData, MissingInput, UsageError
from bids_app.testing import need_shared

RAW_T1W = ("open_ms_data", "longitudinal", "raw", "patient01", "study2_T1W.nii.gz")


@pytest.fixture
def no_deepbet(monkeypatch):
    """deepbet made unimportable, and the cached extractor forgotten (before and after)."""
    brain_extraction._extractor.cache_clear()
    monkeypatch.setitem(sys.modules, "deepbet", None)
    yield
    brain_extraction._extractor.cache_clear()


def test_missing_tool_names_the_install_line(no_deepbet):
    head = np.zeros((8, 8, 8), np.float32)
    head[2:6, 2:6, 2:6] = 1
    with pytest.raises(MissingInput) as err:
        brain_extraction.learned_brain_mask(head, np.eye(4))
    assert "pip install deepbet==1.0.2" in err.value.one_line()
    assert err.value.exit_code == 66


@pytest.mark.parametrize("bad", [
    dict(image=np.ones((4, 4, 4, 2)), affine=np.eye(4)),          # 4D
    dict(image=np.ones((4, 4, 4)), affine=np.eye(3)),             # not (4, 4)
    dict(image=np.ones((4, 4, 4)), affine=np.zeros((4, 4))),      # singular
    dict(image=np.full((4, 4, 4), 7.0), affine=np.eye(4)),        # constant
])
def test_bad_inputs_are_refused_before_the_model(bad, no_deepbet):
    with pytest.raises(BadInputData):
        brain_extraction.learned_brain_mask(bad["image"], bad["affine"])


def test_untrained_contrast_needs_consent(no_deepbet):
    head = np.random.default_rng(0).random((8, 8, 8))
    with pytest.raises(UsageError, match="trained on T1w"):
        brain_extraction.learned_brain_mask(head, np.eye(4), contrast="FLAIR")
    with pytest.raises(UsageError, match="device"):
        brain_extraction.learned_brain_mask(head, np.eye(4), device="tpu")


@pytest.fixture(scope="module")
def raw_t1w():
    """The clinical study2 T1w (skull on, 0.91 x 0.91 x 3 mm) at half its in-plane resolution."""
    from bids_app.core.imageio import load_image

    image = load_image(need_shared(*RAW_T1W))
    data = image.data[::2, ::2, :]
    affine = image.affine.copy()
    affine[:3, :2] *= 2
    return data, affine


@pytest.fixture(scope="module")
def learned(raw_t1w):
    """deepbet's mask of :func:`raw_t1w` (one prediction, shared by the tests below)."""
    pytest.importorskip("deepbet")
    pytest.importorskip("fill_voids")
    data, affine = raw_t1w
    return brain_extraction.learned_brain_mask(data, affine)


def test_mask_of_a_real_head_is_a_brain(raw_t1w, learned):
    from scipy import ndimage

    data, affine = raw_t1w
    mask, info = learned
    assert mask.shape == data.shape and mask.dtype == bool
    voxel_l = abs(np.linalg.det(affine[:3, :3])) / 1e6
    litres = mask.sum() * voxel_l
    assert 1.0 <= litres <= 1.8, litres
    assert info["brain_volume_litres"] == pytest.approx(litres, abs=1e-3)
    assert info["tool"] == "deepbet" and info["contrast_in_training"] and info["device"] == "cpu"
    # inside the head: the head is the filled foreground above a low intensity cut
    head = ndimage.binary_fill_holes(ndimage.binary_closing(data > 0.1 * np.percentile(data, 99), iterations=2))
    assert (mask & head).sum() >= 0.99 * mask.sum()
    assert mask.sum() < 0.8 * head.sum()  # the skull, scalp and neck are left out
    # one component, no holes, away from the image border
    assert ndimage.label(mask)[1] == 1
    assert np.array_equal(ndimage.binary_fill_holes(mask), mask)
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()
    # centred left-right: the brain's centre of mass lies near the head's
    assert abs(ndimage.center_of_mass(mask)[0] - ndimage.center_of_mass(head)[0]) < 0.1 * data.shape[0]


def test_mask_follows_the_stored_voxel_order(raw_t1w, learned):
    """Flipping the stored x axis (with the affine that says so) flips the mask, and nothing else."""
    data, affine = raw_t1w
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    flipped, _ = brain_extraction.learned_brain_mask(np.ascontiguousarray(data[::-1]), affine @ flip)
    assert np.array_equal(flipped[::-1], learned[0])
