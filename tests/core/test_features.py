"""Per-lesion features on a constructed geometry with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from bids_app.core.lesions import dictionary as D
from bids_app.core.lesions import features as F
from bids_app.core.lesions import shape as S
from bids_app.core.lesions.location import LocationRules
from bids_app.core.registration import TemplateTransform

SHAPE = (40, 40, 30)


def _affine() -> np.ndarray:
    """Anisotropic (1, 1, 2) mm voxels, x flipped (LAS), shifted origin."""
    aff = np.diag([-1.0, 1.0, 2.0, 1.0])
    aff[:3, 3] = [20.0, -20.0, -30.0]
    return aff


def _lut() -> pd.DataFrame:
    return pd.DataFrame({"index": ["1", "3", "5", "34", "101-196"],
                         "name": ["wm", "ventricle", "brain stem", "thalamus", "cortex"],
                         "location_class": ["white_matter", "ventricle", "infratentorial", "deep_grey_matter",
                                            "cortex"]})


def _scene():
    """Atlas, GM map, brain mask and 9 lesions whose classes and distances are known."""
    atlas = np.ones(SHAPE, dtype=np.int32)
    atlas[18:22, 18:22, 13:17] = 3          # ventricle
    atlas[5:12, 5:12, 2:6] = 5              # brain stem
    atlas[28:32, 28:32, 10:14] = 34         # deep grey nucleus
    atlas[:, :, 24:] = 101                  # cortex (top slab)
    gm = np.zeros(SHAPE, dtype=np.float32)
    gm[:, :, 24:] = 0.9
    gm[28:32, 28:32, 10:14] = 0.9           # deep grey is GM too
    brain = np.zeros(SHAPE, dtype=bool)
    brain[1:-1, 1:-1, 1:-1] = True
    inst = np.zeros(SHAPE, dtype=np.int32)
    inst[22:24, 19:21, 14:15] = 1   # touches the ventricle along x: 1 mm -> periventricular
    inst[7:9, 7:9, 3:5] = 2         # brain stem -> infratentorial
    inst[10:13, 25:28, 25:27] = 3   # all in cortex -> intracortical -> cortical
    inst[30:33, 10:13, 22:26] = 4   # half WM, half cortex -> leukocortical -> cortical
    inst[5:8, 30:33, 22:24] = 5     # one slice (2 mm) below the cortex -> juxtacortical
    inst[30:33, 30:33, 4:6] = 6     # deep white matter
    inst[29:31, 29:31, 11:13] = 7   # in the deep grey nucleus: GM but not cortex
    inst[19:21, 25:27, 14:16] = 8   # 4 voxels (4 mm) from the ventricle along y -> deep WM
    inst[0:2, 15:17, 10:12] = 9     # on the image border (outside the brain mask)
    rng = np.random.default_rng(0)
    t1 = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
    t1[inst > 0] += 50.0
    flair = rng.normal(50.0, 5.0, SHAPE).astype(np.float32)
    return inst, 9, atlas, gm, brain, {"T1w": t1, "FLAIR": flair}


@pytest.fixture(scope="module")
def scene():
    return _scene()


@pytest.fixture(scope="module")
def table(scene):
    inst, n, atlas, gm, brain, channels = scene
    return F.lesion_features(inst, n, _affine(), channels, brain, gm, atlas, _lut())


def test_one_row_per_lesion_in_label_order(table):
    assert table.columns[0] == "label"
    assert table["label"].tolist() == list(range(1, 10))


def test_location_classes_on_constructed_cases(table):
    assert table["location_class"].tolist() == [
        "periventricular", "infratentorial", "cortical", "cortical", "juxtacortical", "deep_white_matter",
        "deep_white_matter", "deep_white_matter", "deep_white_matter"]
    assert table["cortical_type"].tolist()[:8] == [
        "none", "none", "intracortical", "leukocortical", "juxtacortical", "none", "none", "none"]
    assert table.loc[1, "atlas_class"] == "infratentorial" and table.loc[1, "atlas_label"] == 5
    assert table.loc[1, "atlas_name"] == "brain stem"
    assert table.loc[6, "atlas_class"] == "deep_grey_matter"


def test_gm_and_cortex_fractions(table):
    np.testing.assert_allclose(table["gm_fraction"].to_numpy()[:8], [0, 0, 1, 0.5, 0, 0, 1, 0])
    # the deep grey nucleus is GM but not cortex
    np.testing.assert_allclose(table["cortex_fraction"].to_numpy()[:8], [0, 0, 1, 0.5, 0, 0, 0, 0])


def test_distances_use_millimetres_on_anisotropic_voxels(table):
    dv = table["distance_to_ventricle_mm"].to_numpy()
    dc = table["distance_to_cortex_mm"].to_numpy()
    assert dv[0] == pytest.approx(1.0)          # adjacent along x (1 mm voxels)
    assert dv[7] == pytest.approx(4.0)          # 4 voxels along y
    assert dc[2] == 0.0 and dc[3] == 0.0        # overlap
    assert dc[4] == pytest.approx(2.0)          # one slice along z (2 mm)
    assert dc[5] == pytest.approx(2.0 * (24 - 5))
    # brute force for every lesion: min over lesion voxels and target voxels of the mm distance
    inst, n, atlas, gm, brain, _ = _scene()
    zooms = np.array([1.0, 1.0, 2.0])
    vent = np.argwhere(atlas == 3) * zooms
    for k in range(1, n + 1):
        pts = np.argwhere(inst == k) * zooms
        d = np.sqrt(((pts[:, None, :] - vent[None]) ** 2).sum(-1)).min()
        assert dv[k - 1] == pytest.approx(d)


def test_intensity_statistics_match_numpy(scene, table):
    inst, n, atlas, gm, brain, channels = scene
    for name, data in channels.items():
        for k in range(1, n + 1):
            v = data[inst == k].astype(np.float64)
            row = table.iloc[k - 1]
            assert row[f"{name}_mean"] == pytest.approx(v.mean())
            assert row[f"{name}_median"] == pytest.approx(np.median(v))
            assert row[f"{name}_sd"] == pytest.approx(v.std())
            assert row[f"{name}_p10"] == pytest.approx(np.percentile(v, 10))
            assert row[f"{name}_p90"] == pytest.approx(np.percentile(v, 90))
        outside = brain & (inst == 0)
        np.testing.assert_allclose(table[f"{name}_contrast_brain"], table[f"{name}_mean"] / data[outside].mean(),
                                   rtol=1e-6)


def test_contrast_references_match_a_direct_construction(scene, table):
    inst, n, atlas, gm, brain, channels = scene
    t1 = channels["T1w"].astype(np.float64)
    shells = []
    for k in range(1, n + 1):
        near = ndimage.distance_transform_edt(inst != k) <= 2.0  # voxel units, Euclidean ball
        shell = near & (inst == 0) & brain
        shells.append(shell)
        assert table.loc[k - 1, "T1w_contrast_shell"] == pytest.approx(t1[inst == k].mean() / t1[shell].mean())
    nawm = (atlas == 1) & brain & (gm <= 0.5) & (inst == 0) & ~np.any(shells, axis=0)
    np.testing.assert_allclose(table["T1w_contrast_nawm"], table["T1w_mean"] / t1[nawm].mean(), rtol=1e-6)
    # a lesion is brighter than its surroundings on T1w by construction
    assert (table["T1w_contrast_shell"] > 1.3).all()


def test_shape_features_match_full_image_filters(scene, table):
    import SimpleITK as sitk

    from bids_app.core.imageio import Image
    from bids_app.core.registration import to_sitk

    inst, n, *_ = scene
    f = sitk.LabelShapeStatisticsImageFilter()
    f.ComputePerimeterOn()
    f.ComputeFeretDiameterOn()
    f.ComputeOrientedBoundingBoxOn()
    f.Execute(to_sitk(Image(inst, _affine()), dtype=np.uint32))
    for k in range(1, n + 1):
        row = table.iloc[k - 1]
        assert f.GetPhysicalSize(k) == pytest.approx((inst == k).sum() * 2.0)
        for name in ("Perimeter", "Roundness", "FeretDiameter", "EquivalentSphericalRadius",
                     "NumberOfPixelsOnBorder"):
            assert row[f"sitk_{name}"] == pytest.approx(getattr(f, f"Get{name}")(k)), (k, name)
        np.testing.assert_allclose([row[f"sitk_PrincipalMoments_{i}"] for i in (1, 2, 3)],
                                   f.GetPrincipalMoments(k), atol=1e-9)
    # the border lesion is on the border; the others are not
    assert table["sitk_NumberOfPixelsOnBorder"].tolist() == [0] * 8 + [4]  # its x = 0 face
    np.testing.assert_allclose(table["radiomics_shape_VoxelVolume"], [(inst == k).sum() * 2.0 for k in range(1, 10)])


def test_radiomics_shape_matches_the_pyradiomics_extractor(scene, table):
    import SimpleITK as sitk
    from radiomics import featureextractor

    inst, *_ = scene
    ext = featureextractor.RadiomicsFeatureExtractor()
    ext.disableAllFeatures()
    ext.enableFeatureClassByName("shape")
    mask = sitk.GetImageFromArray(np.ascontiguousarray(inst.transpose(2, 1, 0)))
    mask.SetSpacing((1.0, 1.0, 2.0))
    image = sitk.GetImageFromArray(np.zeros(inst.shape[::-1], dtype=np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    for k in (3, 4, 6):
        result = ext.execute(image, mask, label=k)
        for name in S.RADIOMICS_SHAPE:
            assert table.loc[k - 1, f"radiomics_shape_{name}"] == pytest.approx(float(result[f"original_shape_{name}"]),
                                                                                rel=1e-9), (k, name)


def test_degenerate_lesions_give_nan_ratios():
    inst = np.zeros((10, 10, 10), dtype=np.int32)
    inst[5, 5, 5] = 1          # one voxel
    inst[1:4, 1:4, 1] = 2      # one voxel thick: flat
    out = F.lesion_features(inst, 2, np.eye(4))
    assert np.isnan(out.loc[0, "sitk_Elongation"]) and np.isnan(out.loc[0, "sitk_Flatness"])
    assert np.isfinite(out.loc[1, "sitk_Elongation"]) and np.isnan(out.loc[1, "sitk_Flatness"])
    # without GM map, atlas or channels: NaN/None there, no intensity columns
    assert out["gm_fraction"].isna().all() and out["location_class"].isna().all()
    assert not any(c.endswith("_mean") for c in out.columns)


def test_without_atlas_the_gm_map_still_gives_cortical_types(scene):
    inst, n, atlas, gm, brain, channels = scene
    out = F.lesion_features(inst, n, _affine(), channels, brain, gm)
    # without the atlas the deep grey nucleus counts as cortex
    assert out.loc[6, "cortex_fraction"] == 1.0 and out.loc[6, "cortical_type"] == "intracortical"
    assert out["location_class"].isna().all() and out["distance_to_ventricle_mm"].isna().all()
    assert out["T1w_contrast_nawm"].isna().all()  # no WM definition without atlas or wm_prob
    with_wm = F.lesion_features(inst, n, _affine(), channels, brain, gm, wm_prob=(gm < 0.5).astype(np.float32))
    assert with_wm["T1w_contrast_nawm"].notna().all()


def test_rules_are_configurable(scene):
    inst, n, atlas, gm, brain, channels = scene
    rules = LocationRules(periventricular_mm=4.0, priority=(
        "infratentorial", "cortical", "periventricular", "juxtacortical", "deep_grey_matter", "deep_white_matter"))
    out = F.lesion_features(inst, n, _affine(), None, brain, gm, atlas, _lut(),
                            F.FeatureOptions(shape=False, radiomics_shape=False, rules=rules))
    assert out.loc[7, "location_class"] == "periventricular"
    assert out.loc[6, "location_class"] == "deep_grey_matter"
    assert not any(c.startswith(("sitk_", "radiomics_")) for c in out.columns)


def test_no_lesions_gives_zero_rows_with_the_same_columns(scene, table):
    _, _, atlas, gm, brain, channels = scene
    empty = F.lesion_features(np.zeros(SHAPE, dtype=np.int32), 0, _affine(), channels, brain, gm, atlas, _lut())
    assert len(empty) == 0
    assert list(empty.columns) == list(table.columns)


def test_geometry_and_template_columns(scene):
    from bids_app.core.postprocess import lesion_geometry

    inst, n, *_ = scene
    shift = np.eye(4)
    shift[:3, 3] = [1.0, 2.0, 3.0]
    out = F.lesion_features(inst, n, _affine(), options=F.FeatureOptions(include_geometry=True),
                            template_transform=TemplateTransform.from_ras_matrix(shift))
    geo = lesion_geometry(inst, n, _affine())
    np.testing.assert_allclose(out["volume_mm3"], geo["volume_mm3"])
    np.testing.assert_allclose(out["centroid_x_template_mm"], geo["centroid_x_mm"] + 1.0)
    np.testing.assert_allclose(out["centroid_z_template_mm"], geo["centroid_z_mm"] + 3.0)


def test_data_dictionary_covers_every_column(table):
    entries = D.feature_dictionary(table.columns, ["T1w", "FLAIR"])
    assert set(entries) == set(table.columns)
    assert entries["FLAIR_p90"]["Description"].startswith("90th percentile") and "FLAIR" in entries["FLAIR_p90"][
        "Description"]
    assert entries["distance_to_cortex_mm"]["Units"] == "mm"
    assert entries["sitk_Perimeter"]["Units"] == "mm^2"
    assert entries["cortical_type"]["Levels"]["intracortical"] == "cortex_fraction >= 0.9"
    custom = D.feature_dictionary(["cortical_type", "location_class"],
                                  rules=LocationRules(intracortical_min=0.8, periventricular_mm=5))
    assert custom["cortical_type"]["Levels"]["intracortical"] == "cortex_fraction >= 0.8"
    assert "distance_to_ventricle_mm <= 5" in custom["location_class"]["Description"]


def test_bad_inputs_raise():
    inst = np.zeros((5, 5, 5), dtype=np.int32)
    inst[1, 1, 1] = 2
    with pytest.raises(ValueError):
        F.lesion_features(inst, 1, np.eye(4))                               # label above n
    with pytest.raises(ValueError):
        F.lesion_features(inst.astype(np.float32), 2, np.eye(4))            # not integer
    with pytest.raises(ValueError):
        F.lesion_features(inst, 2, np.eye(4), {"T1w": np.zeros((4, 4, 4))})  # shape mismatch
    with pytest.raises(ValueError):
        F.lesion_features(inst, 2, np.eye(4), atlas_labels=np.zeros_like(inst))  # atlas without LUT


def test_inputs_are_not_modified():
    inst, n, atlas, gm, brain, channels = _scene()
    ro = [inst, atlas, gm, brain, *channels.values()]
    copies = [a.copy() for a in ro]
    for a in ro:
        a.setflags(write=False)
    lut = _lut()
    lut_copy = lut.copy()
    F.lesion_features(inst, n, _affine(), channels, brain, gm, atlas, lut, wm_prob=gm)
    for a, c in zip(ro, copies):
        np.testing.assert_array_equal(a, c)
    pd.testing.assert_frame_equal(lut, lut_copy)
