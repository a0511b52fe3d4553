"""Template registration, atlas warping, lookup tables and location rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bids_app.core import registration as R
from bids_app.core.imageio import Image, load_image
from bids_app.core.lesions import location as L
from bids_app.errors import BadInputData
from bids_app.testing import need_shared

TPL = ("templateflow", "tpl-MNI152NLin2009cAsym")


def _lut() -> pd.DataFrame:
    return pd.DataFrame({
        "index": ["1", "2", "3", "4", "5", "34", "101-196", "255"],
        "name": ["lwm", "rwm", "lv", "rv", "stem", "thal", "ctx", "cereb"],
        "location_class": ["white_matter", "white_matter", "ventricle", "ventricle", "infratentorial",
                           "deep_grey_matter", "cortex", "infratentorial"],
    })


# --------------------------------------------------------------------------------------------
# lookup table
# --------------------------------------------------------------------------------------------

def test_parse_lut_expands_ranges_and_looks_up():
    lut = L.parse_atlas_lut(_lut())
    assert lut.index.size == 7 + 96
    assert np.all(np.diff(lut.index) > 0)
    np.testing.assert_array_equal(lut.class_of(np.array([3, 150, 255, 7, 0])),
                                  np.array(["ventricle", "cortex", "infratentorial", None, None], dtype=object))
    assert lut.name_of(np.array([101]))[0] == "ctx"
    atlas = np.array([[[0, 3, 4, 101, 196, 197]]])
    np.testing.assert_array_equal(lut.mask_of(atlas, ["ventricle"]), [[[False, True, True, False, False, False]]])
    np.testing.assert_array_equal(lut.mask_of(atlas, ["cortex"]), [[[False, False, False, True, True, False]]])


def test_parse_the_real_hoparc_table():
    path = need_shared(*TPL, "tpl-MNI152NLin2009cAsym_res-01_desc-HOparc_dseg.tsv")
    lut = L.parse_atlas_lut(pd.read_csv(path, sep="\t", dtype=str), str(path))
    classes = dict(zip(lut.index.tolist(), lut.location_class.tolist()))
    assert classes[3] == classes[4] == "ventricle"
    assert classes[5] == classes[255] == "infratentorial"
    assert classes[1] == classes[2] == "white_matter"
    assert all(classes[i] == "cortex" for i in range(101, 197))
    assert classes[34] == "deep_grey_matter"


@pytest.mark.parametrize("table", [
    pd.DataFrame({"index": [1], "name": ["a"]}),                                    # no location_class
    pd.DataFrame({"index": ["x"], "location_class": ["cortex"]}),                   # unparsable
    pd.DataFrame({"index": ["1", "1-3"], "location_class": ["cortex", "cortex"]}),  # duplicate
    pd.DataFrame({"index": ["0"], "location_class": ["cortex"]}),                   # background listed
])
def test_bad_lut_is_a_user_error(table):
    with pytest.raises(BadInputData):
        L.parse_atlas_lut(table, "atlas.tsv")


# --------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------

def test_cortical_types_follow_the_thresholds():
    frac = np.array([1.0, 0.9, 0.89, 0.1, 0.09, 0.0, 0.0, 0.0, np.nan])
    dist = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.01, np.nan, 0.0])
    got = L.cortical_type(frac, dist)
    assert got.tolist() == ["intracortical", "intracortical", "leukocortical", "leukocortical", "juxtacortical",
                            "juxtacortical", "none", "none", None]
    wide = L.cortical_type(frac, dist, L.LocationRules(juxtacortical_mm=3.0))
    assert wide[6] == "juxtacortical"


def test_location_classes_follow_the_priority():
    majority = ["infratentorial", "white_matter", "white_matter", "white_matter", "white_matter", "deep_grey_matter",
                "cortex", None]
    ctype = ["none", "leukocortical", "none", "juxtacortical", "none", "none", "juxtacortical", "none"]
    dvent = np.array([0.0, 1.0, 3.0, 2.0, 3.5, 10.0, 10.0, 1.0])
    got = L.location_class(majority, ctype, dvent)
    assert got.tolist() == ["infratentorial", "cortical", "periventricular", "periventricular", "deep_white_matter",
                            "deep_white_matter", "juxtacortical", None]
    rules = L.LocationRules(priority=("infratentorial", "cortical", "juxtacortical", "periventricular",
                                      "deep_grey_matter", "deep_white_matter"))
    got = L.location_class(majority, ctype, dvent, rules)
    assert got[3] == "juxtacortical" and got[5] == "deep_grey_matter"
    with pytest.raises(ValueError):
        L.LocationRules(priority=("nowhere",))


def test_atlas_assignment_majority_and_ties():
    inst = np.zeros((6, 1, 1), dtype=np.int32)
    inst[:3, 0, 0] = 1
    inst[3:5, 0, 0] = 2
    inst[5, 0, 0] = 3
    atlas = np.array([5, 255, 1, 101, 150, 0], dtype=np.int32).reshape(6, 1, 1)
    out = L.atlas_assignment(inst, 3, atlas, L.parse_atlas_lut(_lut()))
    # lesion 1: labels 5, 255, 1 each once -> smallest label 1; classes infratentorial x2 -> infratentorial
    assert out.label.tolist() == [1, 101, 0]
    assert out.location_class.tolist() == ["infratentorial", "cortex", None]
    np.testing.assert_allclose(out.class_fraction, [2 / 3, 1.0, 0.0])
    np.testing.assert_allclose(out.label_fraction, [1 / 3, 0.5, 0.0])
    assert out.name.tolist() == ["lwm", "ctx", None]


# --------------------------------------------------------------------------------------------
# transforms and warping
# --------------------------------------------------------------------------------------------

def _oblique_ras() -> np.ndarray:
    a, b = np.radians(7.0), np.radians(-4.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = np.eye(4)
    m[:3, :3] = 1.05 * rz @ rx
    m[:3, 3] = [6.0, -4.0, 9.0]
    return m


def test_template_transform_conventions_match_simpleitk():
    m = _oblique_ras()
    t = R.TemplateTransform.from_ras_matrix(m)
    np.testing.assert_allclose(t.ras_matrix, m, atol=1e-12)
    pts = np.array([[10.0, -20.0, 30.0], [0.0, 0.0, 0.0], [-50.0, 40.0, -10.0]])
    expected = pts @ m[:3, :3].T + m[:3, 3]
    np.testing.assert_allclose(t.subject_to_template(pts), expected, atol=1e-9)
    np.testing.assert_allclose(t.template_to_subject(expected), pts, atol=1e-9)
    # ITK works in LPS: x_lps = diag(-1, -1, 1) x_ras
    itk = t.to_sitk()
    lps = np.diag([-1.0, -1.0, 1.0])
    for p, q in zip(pts, expected):
        np.testing.assert_allclose(lps @ np.array(itk.TransformPoint(tuple(lps @ p))), q, atol=1e-9)
    # a centred ITK transform gives the same RAS matrix
    again = R.TemplateTransform.from_sitk(itk)
    np.testing.assert_allclose(again.ras_matrix, m, atol=1e-9)


def test_warp_labels_nearest_is_exact_on_a_flipped_grid():
    rng = np.random.default_rng(0)
    atlas = rng.integers(0, 6, size=(9, 10, 11)).astype(np.int32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-8, -9, -10]
    # the subject grid is the template grid seen in LAS order (x flipped), identity transform
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 8
    subj_aff = aff @ flip
    ident = R.TemplateTransform.from_ras_matrix(np.eye(4))
    got = R.warp_labels_to_subject(atlas, aff, atlas.shape, subj_aff, ident)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, atlas[::-1])
    prob = rng.random((9, 10, 11)).astype(np.float32)
    np.testing.assert_allclose(R.warp_probability_to_subject(prob, aff, prob.shape, subj_aff, ident), prob[::-1],
                               atol=1e-6)


def test_warp_to_template_moves_a_block_by_the_transform():
    shape = (30, 30, 30)
    aff = np.eye(4)
    aff[:3, 3] = [-15, -15, -15]
    mask = np.zeros(shape, dtype=np.float32)
    mask[10:14, 12:16, 8:12] = 1
    shift = np.eye(4)
    shift[:3, 3] = [3.0, -2.0, 5.0]  # subject -> template
    t = R.TemplateTransform.from_ras_matrix(shift)
    out = R.warp_to_template(mask, aff, shape, aff, t, "nearest")
    expected = np.zeros(shape, dtype=np.float32)
    expected[13:17, 10:14, 13:17] = 1
    np.testing.assert_array_equal(out, expected)
    # and back: template labels onto the subject grid undo it
    back = R.warp_labels_to_subject(expected.astype(np.int32), aff, shape, aff, t)
    np.testing.assert_array_equal(back, mask.astype(np.int32))


def test_lesion_frequency_map_counts_subjects():
    shape = (20, 20, 20)
    aff = np.eye(4)
    a = np.zeros(shape, dtype=bool)
    a[5:8, 5:8, 5:8] = True
    b = np.zeros(shape, dtype=bool)
    b[6:9, 5:8, 5:8] = True
    ident = R.TemplateTransform.from_ras_matrix(np.eye(4))
    shift = np.eye(4)
    shift[0, 3] = -1.0  # subject b's lesion lands where a's is, in the template
    freq = L.lesion_frequency_map(iter([(a, aff, ident), (b, aff, R.TemplateTransform.from_ras_matrix(shift))]),
                                  shape, aff)
    assert freq.n_subjects == 2 and freq.count.dtype == np.uint16
    assert freq.count.max() == 2 and (freq.count == 2).sum() == 27
    np.testing.assert_array_equal(freq.count[a], 2)
    np.testing.assert_allclose(freq.fraction[a], 1.0)
    empty = L.lesion_frequency_map([], shape, aff)
    assert empty.n_subjects == 0 and not empty.fraction.any()


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------

def _template_t1w_2mm() -> Image:
    return load_image(need_shared(*TPL, "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz"))


def test_register_to_template_recovers_a_known_affine():
    """A synthetic 'subject' is the template seen through a known affine: subject point x shows
    the template at m(x). Registration must find m (within 2 mm over the brain)."""
    import SimpleITK as sitk

    from bids_app.core.registration import from_sitk_array, to_sitk

    tpl = _template_t1w_2mm()
    m = _oblique_ras()
    truth = R.TemplateTransform.from_ras_matrix(m)
    # subject grid: 2.2 mm, LAS order, different origin
    shape = (84, 100, 84)
    subj_aff = np.diag([-2.2, 2.2, 2.2, 1.0])
    subj_aff[:3, 3] = [92.0, -115.0, -80.0]
    grid = sitk.Image([int(s) for s in shape], sitk.sitkFloat32)
    ref = to_sitk(Image(np.zeros(shape, np.float32), subj_aff))
    grid.CopyInformation(ref)
    subject = from_sitk_array(sitk.Resample(to_sitk(tpl), grid, truth.to_sitk(), sitk.sitkLinear, 0.0,
                                            sitk.sitkFloat32))
    found = R.register_to_template(Image(subject, subj_aff), tpl, shrink_factors=(2, 1), smoothing_mm=(2.0, 0.0))
    assert found.template == "MNI152NLin2009cAsym" and np.isfinite(found.metric)
    # compare the two maps on brain-sized points of the subject
    rng = np.random.default_rng(0)
    pts = rng.uniform(-60, 60, size=(200, 3))
    err = np.linalg.norm(found.subject_to_template(pts) - truth.subject_to_template(pts), axis=1)
    assert err.max() < 2.0, err.max()
    # deterministic: a rerun is bit-identical
    again = R.register_to_template(Image(subject, subj_aff), tpl, shrink_factors=(2, 1), smoothing_mm=(2.0, 0.0))
    assert again == found


def test_functions_do_not_modify_inputs():
    atlas = np.arange(60, dtype=np.int32).reshape(3, 4, 5) % 7
    atlas.setflags(write=False)
    prob = np.linspace(0, 1, 60, dtype=np.float32).reshape(3, 4, 5)
    prob.setflags(write=False)
    aff = np.eye(4)
    aff.setflags(write=False)
    t = R.TemplateTransform.from_ras_matrix(np.eye(4))
    R.warp_labels_to_subject(atlas, aff, atlas.shape, aff, t)
    R.warp_probability_to_subject(prob, aff, prob.shape, aff, t)
    R.warp_to_template(prob, aff, prob.shape, aff, t)
    table = _lut()
    copy = table.copy()
    lut = L.parse_atlas_lut(table)
    pd.testing.assert_frame_equal(table, copy)
    inst = (atlas > 3).astype(np.int32)
    inst.setflags(write=False)
    L.atlas_assignment(inst, 1, np.full(atlas.shape, 3, dtype=np.int32), lut)
