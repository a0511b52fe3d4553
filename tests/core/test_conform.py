"""Reorientation, rigid co-registration and brain masks (synthetic and real clinical scans)."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.core import conform
from bids_app.core.imageio import Image, load_image
from bids_app.core.registration import from_sitk_array, to_sitk
from bids_app.errors import BadInputData
from bids_app.testing import make_case, need_shared


@pytest.mark.parametrize("codes", ["LAS", "PSL", "RAS", "IPR"])
def test_canonical_roundtrip(codes):
    from nibabel import orientations as nio

    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    ornt = nio.axcodes2ornt(codes)
    affine = nio.inv_ornt_aff(nio.ornt_transform(nio.axcodes2ornt("RAS"), ornt), data.shape)
    affine = np.linalg.inv(affine) if False else affine
    img = Image(data, np.diag([1.0, 1.0, 1.0, 1.0]) @ nio.inv_ornt_aff(ornt, data.shape))
    canon, original = conform.to_canonical(img)
    assert nio.aff2axcodes(canon.affine) == ("R", "A", "S")
    # the same world position holds the same value
    ijk = np.array([1, 2, 3, 1.0])
    world = img.affine @ ijk
    ijk_c = np.rint(np.linalg.inv(canon.affine) @ world).astype(int)
    assert canon.data[tuple(ijk_c[:3])] == data[1, 2, 3]
    back = conform.from_canonical(canon.data, original)
    np.testing.assert_array_equal(back, data)
    stacked = conform.from_canonical(np.stack([canon.data, canon.data * 2]), original)
    np.testing.assert_array_equal(stacked[1], data * 2)


def _rotate(image: Image, angles_deg, translation_mm):
    """Resample the image through a rigid transform t on its own grid: moved(x) = image(t(x)).
    Aligning ``moved`` back needs T = t^-1 (moved(T(x)) = image(x))."""
    import SimpleITK as sitk

    t = sitk.Euler3DTransform()
    centre = image.affine[:3, :3] @ (np.array(image.shape) / 2) + image.affine[:3, 3]
    t.SetCenter([float(c) for c in np.diag([-1, -1, 1]) @ centre])
    t.SetRotation(*[np.radians(a) for a in angles_deg])
    t.SetTranslation(translation_mm)
    moved = sitk.Resample(to_sitk(image), to_sitk(image), t, sitk.sitkLinear, 0.0)
    return Image(from_sitk_array(moved), image.affine), t


def test_register_rigid_recovers_known_motion():
    image, _ = make_case(7, shape=(48, 56, 48))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    t1 = Image(image[0], affine)
    flair = Image(image[1], affine)
    moved, applied = _rotate(flair, (4.0, -3.0, 5.0), (3.0, -2.0, 4.0))
    transform = conform.register_rigid(t1, moved)
    assert not transform.identity
    # t(T(p)) must give p back across the field of view, within 1.25 voxels (2.5 mm): the
    # phantom is mostly noise, real anatomy registers better (see the patient01 test)
    found = transform.to_sitk()
    for p_lps in [(-20, -20, -20), (20, 30, 10), (0, 0, 0), (30, -30, 25)]:
        back = applied.TransformPoint(found.TransformPoint(p_lps))
        assert np.linalg.norm(np.subtract(back, p_lps)) < 2.5
    aligned = conform.resample_to(t1, moved, transform)
    assert conform.registration_quality(t1, aligned) > conform.registration_quality(
        t1, conform.resample_to(t1, moved, None))


def test_register_rigid_is_deterministic():
    image, _ = make_case(3, shape=(40, 40, 40))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moved, _ = _rotate(Image(image[1], affine), (2, 0, 3), (2, 1, 0))
    a = conform.register_rigid(Image(image[0], affine), moved)
    b = conform.register_rigid(Image(image[0], affine), moved)
    assert a.parameters == b.parameters


def test_non_overlapping_fields_of_view_are_refused():
    image, _ = make_case(1, shape=(32, 32, 32))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    far = affine.copy()
    far[:3, 3] = [500, 0, 0]
    with pytest.raises(BadInputData, match="do not overlap"):
        conform.register_rigid(Image(image[0], affine), Image(image[1], far))


def test_skull_stripped_detection_and_support_mask():
    data = np.zeros((110, 130, 110), np.float32)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in data.shape], indexing="ij"))
    data[(grid ** 2).sum(0) < 0.5] = 100
    stripped, reason = conform.skull_stripped_support(Image(data, np.diag([1.3, 1.3, 1.3, 1])))
    assert stripped, reason
    noisy = data + np.random.default_rng(0).random(data.shape).astype(np.float32)
    assert not conform.skull_stripped_support(Image(noisy, np.diag([1.3, 1.3, 1.3, 1])))[0]
    mask = conform.support_mask(Image(data, np.eye(4)))
    assert mask.sum() == (data > 0).sum()


@pytest.mark.slow
def test_real_clinical_scans_coregistration_and_template_mask():
    """FLAIR (0.72x0.72x4 mm, 36 slices) to T1W (0.72x0.72x3 mm, 39 slices) of the same session."""
    raw = need_shared("open_ms_data", "longitudinal", "raw", "patient01")
    t1 = load_image(raw / "study1_T1W.nii.gz")
    flair = load_image(raw / "study1_FLAIR.nii.gz")
    assert not conform.same_grid(t1, flair)
    assert conform.fov_overlap(t1, flair) > 0.9
    transform = conform.register_rigid(t1, flair)  # its cost is a benchmark figure, not a test
    # same session: the scanner headers already align the two series; registration must
    # not make it worse and must not move them far
    assert transform.metric_after <= transform.metric_before
    assert transform.translation_mm < 5.0 and transform.rotation_deg < 5.0
    resampled = conform.resample_to(t1, flair, transform)
    assert resampled.shape == t1.shape
    assert conform.registration_quality(t1, resampled) > 0.1
    # not skull-stripped -> template mask of plausible volume
    stripped, _ = conform.skull_stripped_support(t1)
    assert not stripped
    from bids_app.bids.templates import brain_mask_template

    tpl_t1, tpl_mask = brain_mask_template()
    mask, metric = conform.template_brain_mask(t1, load_image(tpl_t1), load_image(tpl_mask, check_values=False))
    litres = mask.sum() * np.prod(t1.zooms) / 1e6
    assert 0.9 < litres < 1.9, litres
    # the mask covers the bright brain tissue, not the dark background
    assert t1.data[mask].mean() > 2 * t1.data[~mask].mean()
