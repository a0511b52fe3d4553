"""Radiomics of saliency maps and the TP/FP refiner (bids_app.core.explain.refiner)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from bids_app.core.explain import SaliencyStore
from bids_app.core.explain import refiner as R


def _store(n_lesions=2, seed=0, shape=(24, 22, 18)):
    """A store with lesions that lie close together (their shells meet)."""
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    inst[5:10, 5:9, 4:8] = 1
    inst[12:15, 6:10, 5:9] = 2  # 3 voxels from lesion 1: the 2-voxel shells overlap
    maps, crops, bbox = [], [], []
    for lab in range(1, n_lesions + 1):
        where = np.argwhere(inst == lab)
        lo = np.maximum(where.min(0) - 4, 0)
        hi = np.minimum(where.max(0) + 5, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        m = rng.normal(size=(2, *inst[sl].shape)).astype(np.float32) * 0.02
        m[:, inst[sl] == lab] += rng.uniform(0.5, 1.0)
        maps.append(m)
        crops.append(inst[sl].copy())
        bbox.append([lo, hi])
    st = SaliencyStore(shape=shape, zooms=(1.0, 1.2, 1.5), labels=np.arange(1, n_lesions + 1, dtype=np.int32),
                       classes=np.ones(n_lesions, np.int32), bbox=np.asarray(bbox, np.int32),
                       maps={"smoothgrad_max": maps}, instances=crops, channel_names=["T1w", "FLAIR"])
    return st, inst


def test_93_features_of_the_six_classes():
    names = R.feature_names()
    assert len(names) == R.N_FEATURES == 93
    counts = Counter(n.split("_")[1] for n in names)
    assert counts == {"firstorder": 18, "glcm": 24, "glrlm": 16, "glszm": 16, "gldm": 14, "ngtdm": 5}
    assert all(n.startswith("original_") for n in names)


def test_whole_image_zscore_is_sitk_normalize():
    rng = np.random.default_rng(1)
    crop = rng.normal(size=(6, 7, 5)) * 3 + 1
    big = np.zeros((20, 21, 22))
    big[3:9, 4:11, 10:15] = crop
    ref = sitk.GetArrayFromImage(sitk.Normalize(sitk.GetImageFromArray(big)))
    mean, sd = R.whole_image_zscore(crop, big.size)
    np.testing.assert_allclose((big - mean) / sd, ref, atol=1e-12)


def test_roi_is_the_5x5x5_maximum_filter_with_labels_restored():
    _, inst = _store()
    roi = R.roi_label_map(inst)
    ref = ndimage.maximum_filter(inst, size=5)
    ref[inst > 0] = inst[inst > 0]
    np.testing.assert_array_equal(roi, ref)
    # the shells meet: the larger label wins there, and lesion 1 keeps its own voxels
    assert np.all(roi[inst == 1] == 1)
    assert np.any((roi == 2) & (ndimage.binary_dilation(inst == 1, iterations=2, structure=np.ones((3, 3, 3)))))


def test_crop_features_equal_whole_volume_pyradiomics():
    """Features from the stored crop == PyRadiomics on the whole grid with normalizeImage."""
    from radiomics import featureextractor

    st, inst = _store()
    X, names = R.saliency_features(st)  # FLAIR = channel 1
    assert X.shape == (2, 93) and np.isfinite(X).all()
    ex = featureextractor.RadiomicsFeatureExtractor(binWidth=10, normalize=True, normalizeScale=1)
    ex.disableAllFeatures()
    ex.disableAllImageTypes()
    ex.enableImageTypeByName("Original")
    for c in R.FEATURE_CLASSES:
        ex.enableFeatureClassByName(c)
    roi = R.roi_label_map(inst)
    for i in range(2):
        full = np.zeros(st.shape)
        full[st.slices(i)] = st.maps["smoothgrad_max"][i][1]
        img = sitk.GetImageFromArray(full.transpose(2, 1, 0))
        msk = sitk.GetImageFromArray((roi == i + 1).astype(np.uint8).transpose(2, 1, 0))
        img.SetSpacing(st.zooms)
        msk.SetSpacing(st.zooms)
        res = ex.execute(img, msk, label=1)
        ref = np.array([float(res[n]) for n in names])
        np.testing.assert_allclose(X[i], ref, rtol=1e-6, atol=1e-9)


def test_channel_selection():
    assert R.select_channel(["T1w", "FLAIR"]) == 1
    assert R.select_channel(["T1w", "T2w"]) == 0
    assert R.select_channel(["T1w", "FLAIR"], "t1w") == 0
    assert R.select_channel(["T1w", "FLAIR"], 1) == 1
    with pytest.raises(ValueError):
        R.select_channel(["T1w"], "FLAIR")


def test_truth_is_any_overlap():
    st, inst = _store()
    ref = np.zeros(st.shape, np.uint8)
    ref[9, 8, 7] = 1  # one voxel of lesion 1
    assert list(R.store_truth(st, ref)) == [True, False]
    with pytest.raises(ValueError, match="shape"):
        R.store_truth(st, ref[:-1])


def _separable(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.uniform(size=n) < 0.6
    X = rng.normal(size=(n, 6))
    X[:, 0] += 2.0 * y
    X[:, 3] -= 1.0 * y
    return X, y, [f"f{i}" for i in range(6)]


def test_refiner_matches_sklearn_and_is_plain_json():
    from sklearn.preprocessing import StandardScaler

    X, y, names = _separable()
    model = R.fit_refiner(X, y, names)
    model = json.loads(json.dumps(model))  # JSON-able, and still usable after the round trip
    p = R.predict_refiner(model, X, names)
    sc = StandardScaler().fit(X)
    ref = R._logistic_l1(1.0, {0: 0.29, 1: 0.71}).fit(sc.transform(X), y.astype(int))
    assert ref.get_params()["solver"] == "liblinear" and ref.get_params()["C"] == 1.0
    np.testing.assert_allclose(p, ref.predict_proba(sc.transform(X))[:, 1], rtol=1e-8)
    assert model["classifier"]["class_weight"] == {"FP": 0.29, "TP": 0.71}
    assert model["n_train"] == {"TP": int(y.sum()), "FP": int((~y).sum())}
    assert max(abs(v) for v in model["importance"]) == pytest.approx(1.0)
    assert np.mean((p >= 0.5) == y) >= 0.8
    keep = R.refine(p, model["threshold"])
    assert keep.dtype == bool and keep.sum() == (p >= 0.5).sum()
    # balanced weights, missing values imputed with the training mean
    bal = R.fit_refiner(X, y, names, class_weight="balanced")
    assert bal["classifier"]["class_weight"] == "balanced"
    Xn = X.copy()
    Xn[0, 0] = np.nan
    q = R.predict_refiner(bal, Xn)
    Xm = X.copy()
    Xm[0, 0] = bal["scaler_mean"][0]
    assert q[0] == pytest.approx(R.predict_refiner(bal, Xm)[0])


def test_refiner_refuses_one_class_and_wrong_features():
    X, y, names = _separable()
    with pytest.raises(ValueError, match="at least 2 TP and 2 FP"):
        R.fit_refiner(X, np.ones_like(y), names)
    model = R.fit_refiner(X, y, names)
    with pytest.raises(ValueError, match="feature names differ"):
        R.predict_refiner(model, X, names[::-1])
    with pytest.raises(ValueError, match="not an msxplain"):
        R.predict_refiner({"format": "x"}, X)


def test_features_do_not_modify_the_store():
    st, _ = _store()
    before = [m.copy() for m in st.maps["smoothgrad_max"]]
    inst_before = [c.copy() for c in st.instances]
    R.saliency_features(st, channel="T1w")
    assert all(np.array_equal(a, b) for a, b in zip(before, st.maps["smoothgrad_max"]))
    assert all(np.array_equal(a, b) for a, b in zip(inst_before, st.instances))


def test_the_refinement_rule_and_its_threshold():
    """One rule: keep p >= threshold and every unscored lesion; the requested threshold when >= 0,
    else the refiner's own."""
    model = {"threshold": 0.6}
    assert R.refinement_threshold(model) == 0.6 and R.refinement_threshold(model, -1.0) == 0.6
    assert R.refinement_threshold(model, 0.0) == 0.0 and R.refinement_threshold(model, 0.3) == 0.3
    assert list(R.refine(np.array([0.59, 0.6, np.nan]), 0.6)) == [False, True, True]


def test_refine_lesions_scores_explained_lesions_and_keeps_the_others():
    store, _ = _store(n_lesions=2)
    names = R.feature_names()
    n = len(names)
    model = R.check_refiner({"format": R.REFINER_FORMAT, "version": 1, "feature_names": names,
                             "scaler_mean": [0.0] * n, "scaler_scale": [1.0] * n, "coef": [0.0] * n,
                             "intercept": 0.0, "threshold": 0.5})
    model["coef"][names.index("original_firstorder_Mean")] = 1.0
    labels = np.append(np.asarray(store.labels), int(store.labels.max()) + 1)  # one lesion not explained
    out = R.refine_lesions(model, store, labels, threshold=None)
    assert out.threshold == 0.5 and out.scored.tolist() == [True, True, False]
    assert out.reasons[-1] == R.NOT_EXPLAINED and out.failed_labels == []
    assert out.keep[-1] and out.keep[:2].tolist() == (out.p_true_lesion[:2] >= 0.5).tolist()
    strict = R.refine_lesions(model, store, labels, threshold=1.0)
    assert strict.threshold == 1.0 and strict.keep.tolist() == [False, False, True]
    inst = np.zeros((4, 4, 4), np.int32)
    inst[0, 0, :2] = 1
    inst[3, 3, 3] = 2
    dseg = R.refined_segmentation(inst, np.array([1, 2]), np.array([1, 3]), np.array([False, True]))
    assert dseg.dtype == np.int16 and dseg.sum() == 3 and dseg[3, 3, 3] == 3


def test_explanation_and_refinement_tables():
    from bids_app.core.explain.tables import (
        SessionLesions,
        explanation_outputs,
        refinement_parameters,
        refinement_summary,
        refinement_table,
    )

    lesions = SessionLesions.from_record({"label": [1, 2, 3], "class_index": [1, 2, 1], "n_voxels": [5, 9, 9]})
    assert lesions.largest(0).tolist() == [1, 2, 3] and lesions.largest(2).tolist() == [2, 3]
    assert lesions.class_of_label().tolist() == [1, 2, 1]
    assert SessionLesions.from_record({}).class_of_label().shape == (0,)
    store, _ = _store(n_lesions=2)
    labels = np.append(np.asarray(store.labels), int(store.labels.max()) + 1)
    out = explanation_outputs(store, labels)
    assert list(out.table["label"]) == labels.tolist() and list(out.table["explained"]) == [1, 1, 0]
    assert out.table.columns[-1] == "explained" and set(out.table.columns[1:-1]) <= set(out.dictionary)
    assert out.summary["not_explained_labels"] == [int(labels[-1])] and out.summary["n_explained"] == 2
    assert [m.desc for m in out.maps] == ["smoothgradmaxT1w", "smoothgradmaxFLAIR"]
    refinement = R.Refinement(labels=labels, p_true_lesion=np.array([0.2, 0.8, np.nan]),
                              reasons=[None, None, R.NOT_EXPLAINED], threshold=0.5,
                              keep=np.array([False, True, True]))
    table, dictionary = refinement_table(refinement)
    assert list(table.columns) == ["label", "p_true_lesion", "refiner_scored", "refiner_unscored_reason",
                                   "refined_keep"] and list(dictionary) == list(table.columns[1:])
    assert "p_true_lesion >= 0.5," in dictionary["refined_keep"]["Description"]
    part = refinement_summary(refinement, "refiner.json", {}, False)
    assert part == {"refinement": {"refiner": "refiner.json", "refiner_explain_config": None, "threshold": 0.5,
                                   "n_dropped": 1, "dropped_labels": [int(labels[0])], "n_unscored": 1,
                                   "n_features_failed": 0, "features_failed_labels": [],
                                   "segmentation_written": False}}
    assert refinement_parameters(refinement)["DroppedLabels"] == [int(labels[0])]
