"""Tests of bids_app.core.metrics (detection, overlap, calibration, retention): hand-computed cases,
brute-force transcriptions of the definitions, the Metrics Reloaded object-detection fixtures, panoptica
as an oracle, purity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bids_app.core.metrics.calibration import calibration
from bids_app.core.metrics.detection import DETECTION_METHODS, classify_lesions, detection_scores, lesion_detection
from bids_app.core.metrics.overlap import dice, ndsc, voxel_metrics, voxel_rates
from bids_app.core.metrics.retention import (
    LESION_RC_METRICS,
    lesion_retention_baselines,
    lesion_retention_curve,
    patient_retention_curve,
    voxel_retention_curve,
)
from bids_app.core.postprocess import label_components

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "data" / "metricsreloaded_object_detection"


def _readonly(a):
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def _blobs(shape, n, rng, max_r=4):
    m = np.zeros(shape, dtype=bool)
    for _ in range(n):
        c = rng.integers(0, shape)
        r = rng.integers(1, max_r, 3)
        m[tuple(slice(max(0, c[i] - r[i]), c[i] + r[i]) for i in range(3))] = True
    return m


def _random_pair(seed, shape=(36, 36, 36)):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    ref = _blobs(shape, 9, rng)
    pred = ndimage.binary_dilation(ref) if seed % 2 else ref.copy()
    pred = np.roll(pred, rng.integers(-2, 3, 3), axis=(0, 1, 2))
    pred |= _blobs(shape, 3, rng)
    pred &= ~_blobs(shape, 3, rng)
    return pred, ref


# --------------------------------------------------------------------------------------------
# connectivity and detection
# --------------------------------------------------------------------------------------------

def test_connectivity_check_from_spec():
    mask = np.zeros((5, 5, 5), dtype=bool)
    for v in [(1, 1, 1), (1, 2, 1), (2, 2, 2), (3, 3, 1)]:
        mask[v] = True
    for conn, n in ((6, 3), (18, 2), (26, 1)):
        assert label_components(mask, conn)[1] == n
        out = lesion_detection(mask, mask, "iou", 0.5, conn)
        assert out["n_pred_lesions"] == out["n_ref_lesions"] == out["TPL"] == n
        assert out["connectivity"] == conn


def test_split_reference_lesion_iou_adj_vs_iou():
    """A reference bar of 10 voxels predicted as two pieces of 4 (gap of 2)."""
    ref = np.zeros((12, 3, 3), dtype=bool)
    ref[0:10, 1, 1] = True
    pred = np.zeros_like(ref)
    pred[0:4, 1, 1] = True
    pred[6:10, 1, 1] = True
    adj = classify_lesions(pred, ref, "iou_adj", 0.5, 26)
    # K' = ref (10); Q = the other piece (4) -> 4 / |P ∪ (K' \ Q)| = 4 / 6
    np.testing.assert_allclose(adj.pred_score, [4 / 6, 4 / 6])
    assert adj.pred_type.tolist() == ["TPL", "TPL"] and adj.ref_detected.tolist() == [True]
    iou = classify_lesions(pred, ref, "iou", 0.5, 26)
    np.testing.assert_allclose(iou.pred_score, [0.4, 0.4])
    assert iou.pred_type.tolist() == ["USL", "USL"]
    out = lesion_detection(pred, ref, "iou", 0.5, 26)
    assert (out["TPL"], out["USL"], out["FPL"], out["FNL"]) == (0, 2, 0, 0)
    assert out["F1"] == 0.0 and out["recall"] == 1.0 and out["precision"] == 0.0 and out["USL_rate"] == 1.0
    nz = lesion_detection(pred, ref, "non_zero", 0.9, 26)
    assert (nz["TPL"], nz["USL"], nz["F1"]) == (2, 0, 1.0)


def _brute_types(pred, ref, method, t, conn):
    """Literal transcription of §1.6 with whole-volume masks (one predicted lesion at a time)."""
    pl, n_p = label_components(pred, conn)
    gl, n_g = label_components(ref, conn)
    y_pred = pl > 0
    scores = []
    for k in range(1, n_p + 1):
        cc = pl == k
        hits = [g for g in np.unique(gl[cc]) if g]
        if method == "non_zero":
            scores.append(1.0 if hits else 0.0)
        elif method == "iou":
            scores.append(max([np.sum(cc & (gl == g)) / np.sum(cc | (gl == g)) for g in hits], default=0.0))
        else:
            if not hits:
                scores.append(0.0)
                continue
            kp = np.isin(gl, hits)
            q = y_pred & ~cc
            scores.append(np.sum(cc & kp) / np.sum(cc | (kp & ~(kp & q))))
    scores = np.array(scores)
    types = np.where(scores >= t, "TPL", np.where(scores > 0, "USL", "FPL"))
    fnl = sum(1 for g in range(1, n_g + 1) if not np.any(y_pred[gl == g]))
    return scores, types, fnl


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", DETECTION_METHODS)
def test_detection_matches_brute_force(seed, method):
    pred, ref = _random_pair(seed)
    conn = (6, 18, 26)[seed % 3]
    res = classify_lesions(pred, ref, method, 0.3, conn)
    scores, types, fnl = _brute_types(pred, ref, method, 0.3, conn)
    np.testing.assert_allclose(res.pred_score, scores, rtol=1e-12)
    assert res.pred_type.tolist() == types.tolist()
    assert res.counts["FNL"] == fnl


def test_zero_denominator_conventions():
    empty = np.zeros((6, 6, 6), dtype=bool)
    some = empty.copy()
    some[1:3, 1:3, 1:3] = True
    both_empty = lesion_detection(empty, empty)
    assert (both_empty["F1"], both_empty["recall"], both_empty["precision"], both_empty["USL_rate"]) \
        == (1.0, 1.0, 1.0, 0.0)
    no_pred = lesion_detection(empty, some)
    assert (no_pred["F1"], no_pred["recall"], no_pred["precision"], no_pred["USL_rate"]) == (0.0, 0.0, 0.0, 1.0)
    assert no_pred["FNL"] == 1
    no_ref = lesion_detection(some, empty)
    assert (no_ref["F1"], no_ref["recall"], no_ref["precision"], no_ref["USL_rate"]) == (0.0, 1.0, 0.0, 0.0)
    assert no_ref["FPL"] == 1
    assert no_ref["method"] == "iou_adj" and no_ref["threshold"] == 0.1 and no_ref["connectivity"] == 26
    with pytest.raises(ValueError, match="method"):
        lesion_detection(some, some, "dice")
    with pytest.raises(ValueError, match="threshold"):
        lesion_detection(some, some, "iou", 0.0)


def test_threshold_tie_is_tpl():
    ref = np.zeros((8, 3, 3), dtype=bool)
    ref[0:4, 1, 1] = True
    pred = np.zeros_like(ref)
    pred[0:2, 1, 1] = True  # IoU exactly 0.5
    assert classify_lesions(pred, ref, "iou", 0.5, 6).pred_type.tolist() == ["TPL"]
    assert classify_lesions(pred, ref, "iou", 0.5000001, 6).pred_type.tolist() == ["USL"]


def test_two_d_input_is_a_one_slice_volume():
    pred, ref = _random_pair(5, shape=(40, 40, 1))
    three = lesion_detection(pred, ref, "iou_adj", 0.25, 6)
    two = lesion_detection(pred[..., 0], ref[..., 0], "iou_adj", 0.25, 6)
    assert two == three
    assert dice(pred[..., 0], ref[..., 0]) == dice(pred, ref)


def test_pred_instances_align_with_given_labels():
    pred, ref = _random_pair(6)
    labels, n = label_components(pred, 18)
    shuffled = np.zeros_like(labels)
    perm = np.random.default_rng(0).permutation(n) + 1
    shuffled[labels > 0] = perm[labels[labels > 0] - 1]
    a = classify_lesions(pred, ref, "iou_adj", 0.2, 18)
    b = classify_lesions(None, ref, "iou_adj", 0.2, 18, pred_instances=shuffled)
    np.testing.assert_allclose(b.pred_score[perm - 1], a.pred_score)
    gap = shuffled.copy()
    gap[gap == 1] = 0  # label 1 no longer used
    with pytest.raises(ValueError, match="every label"):
        classify_lesions(None, ref, "iou_adj", 0.2, 18, pred_instances=gap)


# --------------------------------------------------------------------------------------------
# Metrics Reloaded fixtures (2-D objects, 100 x 100 x 1)
# --------------------------------------------------------------------------------------------

def _fixtures():
    nib = pytest.importorskip("nibabel")
    if not FIXTURES.is_dir():
        pytest.skip("shared Metrics Reloaded fixtures not available")
    refs = [np.asarray(nib.load(FIXTURES / "refs" / f"ref{i}.nii.gz").dataobj) > 0 for i in range(1, 6)]
    preds = [np.asarray(nib.load(FIXTURES / "preds" / f"pred{i}.nii.gz").dataobj) > 0 for i in range(1, 6)]
    return refs, preds


def test_metricsreloaded_objects_pairwise():
    """Object by object (each file one object): our IoU reproduces the notebook's mask IoUs and TP = 2.

    Metrics Reloaded: TP 2, FP 3, FN 3, F1 0.4 at IoU > 0.5 with one-to-one assignment. Our rule
    reproduces TP (the IoU matrix is diagonal, so any assignment agrees), not FP/FN/F1: the empty
    pred2 is no lesion for us (MR counts it as a prediction), and a reference object overlapped
    only below the threshold is a USL on the prediction side, not an FNL (FNL = no overlap).
    """
    refs, preds = _fixtures()
    scores = []
    totals = {"TPL": 0, "FPL": 0, "USL": 0, "FNL": 0}
    for r, p in zip(refs, preds):
        res = classify_lesions(p, r, "iou", 0.5, 26)
        scores.append(res.pred_score[0] if res.pred_score.size else 0.0)
        for k, v in res.counts.items():
            totals[k] += v
    np.testing.assert_allclose(scores, [0.516, 0.0, 0.788, 0.036, 0.218], atol=5e-4)
    assert totals == {"TPL": 2, "FPL": 0, "USL": 2, "FNL": 1}
    # off-diagonal: only ref5 / pred3 overlap (IoU 0.013)
    assert classify_lesions(preds[2], refs[4], "iou", 0.5, 26).pred_score[0] == pytest.approx(0.013, abs=5e-4)
    assert detection_scores(totals["TPL"], totals["FPL"], totals["USL"], totals["FNL"])["F1"] == pytest.approx(4 / 7)


def test_metricsreloaded_objects_as_one_image():
    """All objects in one image: ref3 and ref5 overlap (38 voxels) and merge into one lesion.

    With label maps the overlapping reference objects cannot stay separate, so pred3 is compared
    with ref3 ∪ ref5: IoU 0.405 (USL at 0.5, where MR's object-wise IoU 0.788 makes it a TP) and
    IoU_adj 361 / 758 = 0.476 (pred5's voxels inside ref3 ∪ ref5 are removed from the union).
    """
    refs, preds = _fixtures()
    ref, pred = np.any(refs, axis=0), np.any(preds, axis=0)
    for conn in (6, 26):
        iou = lesion_detection(pred, ref, "iou", 0.5, conn)
        counts = (iou["n_ref_lesions"], iou["n_pred_lesions"], iou["TPL"], iou["USL"], iou["FPL"], iou["FNL"])
        assert counts == (4, 4, 1, 3, 0, 1)
        res = classify_lesions(pred, ref, "iou_adj", 0.5, conn)
        # predicted lesions in raster order: pred4, pred5, pred1, pred3
        np.testing.assert_allclose(res.pred_score, [1 / 28, 0.2009, 0.5155, 361 / 758], atol=5e-5)
    assert lesion_detection(pred, ref, "non_zero", 0.5, 26)["F1"] == pytest.approx(8 / 9)


# --------------------------------------------------------------------------------------------
# panoptica as an oracle (its naive threshold matcher = our "iou" rule)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_panoptica_oracle(seed):
    panoptica = pytest.importorskip("panoptica")
    panoptica.disable_citation_reminder()
    pred, ref = _random_pair(seed + 10)
    for threshold, many_to_one in ((0.3, True), (0.5, True), (0.5, False), (0.7, False)):
        # many-to-one: each prediction matched to its best reference if IoU >= t (our rule for
        # any t); one-to-one coincides for t >= 0.5, where IoU >= t makes the pairing unique
        evaluator = panoptica.Panoptica_Evaluator(
            expected_input=panoptica.InputType.SEMANTIC,
            instance_approximator=panoptica.ConnectedComponentsInstanceApproximator(),  # cc3d, 26-connectivity
            instance_matcher=panoptica.NaiveThresholdMatching(matching_threshold=threshold,
                                                               allow_many_to_one=many_to_one),
            decision_metric=panoptica.Metric.IOU, decision_threshold=threshold,
        )
        res = evaluator.evaluate(pred.astype(np.uint8), ref.astype(np.uint8), verbose=False)["ungrouped"]
        ours = lesion_detection(pred, ref, "iou", threshold, 26)
        assert res.tp == ours["TPL"]
        assert res.n_pred_instances == ours["n_pred_lesions"] and res.n_ref_instances == ours["n_ref_lesions"]
        assert res.global_bin_dsc == pytest.approx(dice(pred, ref), abs=1e-12)


# --------------------------------------------------------------------------------------------
# voxel metrics and calibration
# --------------------------------------------------------------------------------------------

def test_dice_ndsc_and_rates():
    n = 1000
    ref = np.zeros((10, 10, 10), dtype=bool)
    pred = np.zeros_like(ref)
    ref.reshape(-1)[:10] = True
    pred.reshape(-1)[5:15] = True  # TP 5, FN 5, FP 5
    assert dice(pred, ref) == pytest.approx(0.5)
    k = (1 - 0.001) * 10 / (0.001 * (n - 10))
    assert ndsc(pred, ref, 0.001) == pytest.approx(10 / (10 + 5 + k * 5))
    assert ndsc(pred, ref, 10 / n) == pytest.approx(0.5)  # r = actual load -> k = 1 -> DSC
    empty = np.zeros_like(ref)
    assert dice(empty, empty) == 1.0 and ndsc(empty, empty) == 1.0
    assert ndsc(pred, empty) == 0.0  # k = 1 for an empty reference
    full = np.ones_like(ref)
    assert ndsc(full, full) == 1.0  # |Y| = N -> k = 1
    rates = voxel_rates(pred, ref)
    assert rates == pytest.approx({"TPRvox": 0.5, "FPRvox": 5 / 990, "FDRvox": 0.5})
    assert voxel_rates(empty, empty) == {"TPRvox": 1.0, "FPRvox": 0.0, "FDRvox": 0.0}
    no_ref = voxel_rates(pred, empty)
    assert np.isnan(no_ref["TPRvox"]) and no_ref["FDRvox"] == 1.0
    assert voxel_rates(empty, ref)["FDRvox"] == 0.0
    brain = np.zeros_like(ref)
    brain.reshape(-1)[:100] = True
    assert ndsc(pred, ref, 0.001, mask=brain) == pytest.approx(10 / (10 + 5 + (0.999 * 10 / (0.001 * 90)) * 5))
    vm = voxel_metrics(pred, ref, 0.001)
    assert set(vm) == {"DSC", "nDSC", "TPRvox", "FPRvox", "FDRvox", "ndsc_r"}


def test_calibration_matches_sklearn():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    rng = np.random.default_rng(0)
    prob = rng.beta(0.3, 2.0, size=(20, 20, 20))
    prob.reshape(-1)[:50] = 2 / 30  # exactly on an inner edge: lower bin, as sklearn
    ref = rng.uniform(size=prob.shape) < prob
    res = calibration(prob, ref)
    prob_true, prob_pred = calibration_curve(ref.reshape(-1), prob.reshape(-1), n_bins=30)
    assert res["CE"] == pytest.approx(np.mean(np.abs(prob_pred - prob_true)), rel=1e-12)
    assert res["Brier"] == pytest.approx(brier_score_loss(ref.reshape(-1), prob.reshape(-1)), rel=1e-12)
    # ECE / MCE: direct loop over the 30 bins
    edges = np.linspace(0, 1, 31)
    p, y = prob.reshape(-1), ref.reshape(-1)
    ece, mce = 0.0, 0.0
    for b in range(30):
        sel = (p > edges[b]) & (p <= edges[b + 1]) if b else (p <= edges[1])
        if sel.any():
            gap = abs(p[sel].mean() - y[sel].mean())
            ece += gap * sel.sum() / p.size
            mce = max(mce, gap)
    assert res["ECE"] == pytest.approx(ece, rel=1e-12) and res["MCE"] == pytest.approx(mce, rel=1e-12)
    assert res["n_bins"] == 30
    with pytest.raises(ValueError):
        calibration(prob + 1, ref)


# --------------------------------------------------------------------------------------------
# retention curves
# --------------------------------------------------------------------------------------------

def _brute_voxel_rc(pred, ref, u, fracs, r):
    order = np.argsort(u.reshape(-1), kind="stable")
    p, g = pred.reshape(-1)[order], ref.reshape(-1)[order]
    n = p.size
    dsc, nd = [], []
    for f in fracs:
        pos = int(n * f)
        cur = np.concatenate([p[:pos], g[pos:]])
        dsc.append(dice(cur[:, None, None], g[:, None, None]))
        nd.append(ndsc(cur[:, None, None], g[:, None, None], r))
    return np.array(dsc), np.array(nd)


@pytest.mark.parametrize("seed", range(3))
def test_voxel_retention_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    ref = rng.uniform(size=(12, 10, 8)) < 0.1
    pred = ref ^ (rng.uniform(size=ref.shape) < 0.08)
    u = np.round(rng.uniform(size=ref.shape), 1)  # 11 distinct values: massive ties
    fracs = np.linspace(0, 1, 57)
    curves = voxel_retention_curve(pred, ref, u, fracs=fracs, r=0.01)
    dsc, nd = _brute_voxel_rc(pred, ref, u, fracs, 0.01)
    np.testing.assert_allclose(curves["DSC"].values, dsc, rtol=1e-12)
    np.testing.assert_allclose(curves["nDSC"].values, nd, rtol=1e-12)
    for c in curves.values():
        assert c.auc + c.aac == pytest.approx(1.0) and c.values[0] == 1.0  # nothing retained: all reference
    assert curves["DSC"].auc == pytest.approx(np.trapezoid(dsc, fracs))
    default = voxel_retention_curve(pred, ref, u)
    assert default["DSC"].fracs.size == 400


def test_voxel_retention_tie_break_is_flat_index_order():
    """All uncertainties equal: the retained voxels are the first ones in C order."""
    ref = np.zeros((4, 1, 1), dtype=bool)
    pred = np.array([True, False, False, False])[:, None, None]  # voxel 0 is a FP
    ref[3] = True  # voxel 3 is a FN
    curve = voxel_retention_curve(pred, ref, np.zeros(ref.shape), metrics=["DSC"], fracs=[0, 0.25, 0.5, 0.75, 1.0])
    # keep 1 voxel: FP kept, FN replaced -> DSC 2/3; keep all -> 0
    np.testing.assert_allclose(curve["DSC"].values, [1.0, 2 / 3, 2 / 3, 2 / 3, 0.0])


def test_lesion_retention_hand_example():
    types = ["TPL", "FPL", "USL"]
    curve = lesion_retention_curve(types, np.array([0.1, 0.9, 0.5]), n_fn=1, metric="LF1", fracs=[0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(curve.values, [0.8, 0.8, 0.5, 0.4])
    assert curve.auc == pytest.approx((0.8 + 0.65 + 0.45) / 3) and curve.aac == pytest.approx(1 - curve.auc)
    lppv = lesion_retention_curve(types, np.array([0.1, 0.9, 0.5]), n_fn=1, metric="LPPV", fracs=[0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(lppv.values, [1.0, 1.0, 0.5, 1 / 3])
    # ties: rejected in row order; NaN = most uncertain (rejected first)
    tied = lesion_retention_curve(types, np.array([0.5, 0.5, 0.5]), 1, "LF1", fracs=[0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tied.values, [0.8, 0.5, 0.4, 0.4])  # TPL, FPL, USL rejected in that order
    nan_first = lesion_retention_curve(types, np.array([0.9, np.nan, 0.5]), 1, "LF1", fracs=[0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(nan_first.values, [0.8, 0.5, 0.5, 0.4])  # FPL (NaN), TPL (0.9), USL (0.5)
    empty = lesion_retention_curve([], np.array([]), n_fn=2, metric="LPPV")
    assert np.all(empty.values == 1.0) and empty.auc == pytest.approx(1.0)


def test_lesion_retention_matches_reference_interp1d_and_baselines():
    from scipy.interpolate import interp1d

    rng = np.random.default_rng(3)
    types = rng.choice(["TPL", "FPL", "USL"], size=23)
    u = rng.uniform(size=23)
    fracs = np.linspace(0, 1, 400)
    for metric in LESION_RC_METRICS:
        curve = lesion_retention_curve(types, u, 4, metric)
        # reference: argsort ascending then reversed (no ties here), rejection updates, slinear interp
        lt = types[np.argsort(u)][::-1].copy()

        def score(t, metric=metric):
            tp, fp, us = (t == "TPL").sum(), (t == "FPL").sum(), (t == "USL").sum()
            if metric == "LF1":
                den = tp + 0.5 * (fp + us + 4)
                return tp / den if den else 0.0
            return tp / (tp + fp + us) if tp + fp + us else 1.0

        vals = [score(lt)]
        for i in range(lt.size):
            lt[i] = {"FPL": "TNL", "USL": "TPL"}.get(lt[i], lt[i])
            vals.append(score(lt))
        ref = interp1d([k / lt.size for k in range(lt.size + 1)], vals[::-1], kind="slinear",
                       fill_value="extrapolate")(fracs)
        np.testing.assert_allclose(curve.values, ref, rtol=1e-12)
        base = lesion_retention_baselines(types, 4, metric, seed=0)
        assert base["ideal"].auc >= curve.auc and base["ideal"].auc >= base["random"].auc
        again = lesion_retention_baselines(types, 4, metric, seed=0)
        np.testing.assert_array_equal(again["random"].values, base["random"].values)


def test_patient_retention_curve():
    u = np.array([0.2, 0.9, 0.5])
    dsc = np.array([0.8, 0.3, 0.6])
    curve = patient_retention_curve(u, dsc)
    # replace most uncertain first: [0.8,0.3,0.6] -> [0.8,1,0.6] -> [0.8,1,1] -> [1,1,1]; reversed
    np.testing.assert_allclose(curve.values, [1.0, 2.8 / 3, 2.4 / 3, 1.7 / 3])
    np.testing.assert_allclose(curve.fracs, [0, 1 / 3, 2 / 3, 1])
    assert curve.auc == pytest.approx(np.trapezoid(curve.values, curve.fracs))
    assert curve.aac == pytest.approx(1 - curve.auc)
    with pytest.raises(ValueError):
        patient_retention_curve([], [])


# --------------------------------------------------------------------------------------------
# purity
# --------------------------------------------------------------------------------------------

def test_functions_do_not_modify_inputs():
    pred, ref = _random_pair(7, shape=(20, 20, 20))
    rng = np.random.default_rng(7)
    prob = rng.uniform(size=pred.shape)
    u = rng.uniform(size=pred.shape)
    brain = np.ones(pred.shape, dtype=bool)
    ro = {k: _readonly(v) for k, v in dict(pred=pred, ref=ref, prob=prob, u=u, brain=brain).items()}
    labels, _ = label_components(pred, 26)
    ro_labels = _readonly(labels)
    classify_lesions(ro["pred"], ro["ref"], "iou_adj", 0.1, 26)
    classify_lesions(None, ro["ref"], "iou", 0.1, 26, pred_instances=ro_labels)
    lesion_detection(ro["pred"], ro["ref"])
    dice(ro["pred"], ro["ref"], ro["brain"])
    ndsc(ro["pred"], ro["ref"], 0.001, ro["brain"])
    voxel_rates(ro["pred"], ro["ref"], ro["brain"])
    voxel_metrics(ro["pred"], ro["ref"], mask=ro["brain"])
    calibration(ro["prob"], ro["ref"], mask=ro["brain"])
    voxel_retention_curve(ro["pred"], ro["ref"], ro["u"], mask=ro["brain"])
    types = _readonly(np.array(["TPL", "FPL", "USL"]))
    lu = _readonly(np.array([0.3, 0.2, 0.1]))
    lesion_retention_curve(types, lu, 1)
    lesion_retention_baselines(types, 1)
    patient_retention_curve(lu, _readonly(np.array([0.5, 0.6, 0.7])))
    for name, arr in dict(pred=pred, ref=ref, prob=prob, u=u, brain=brain).items():
        np.testing.assert_array_equal(ro[name], arr)
