"""Evaluation against a reference: lesion detection, DSC / nDSC, voxel rates, calibration and
error retention curves (pure numpy, no file I/O).

Definitions follow the papers' public code: lesion-wise detection as in Molchanova et al.,
arXiv:2507.12092 (Bench-Explain) and arXiv:2407.05761 (interpret-lesion-unc); retention curves and
nDSC as in Molchanova et al., arXiv:2311.08931 (MS_WML_uncs, Shifts); ``docs/uncertainty.md`` lists the
conventions (zero denominators, tie-breaks, AUC vs AAC).

* Masks are ``(X, Y, Z)``; a 2-D mask ``(X, Y)`` is treated as the one-slice volume
  ``(X, Y, 1)``, so connectivity 6 means 4-connected in the plane and 18/26 mean 8-connected.
* Components are labelled with :func:`bids_app.core.postprocess.label_components`
  (connectivity is a parameter and is returned with every result).
* Overlaps between predicted and reference lesions come from one joint histogram of
  (predicted label, reference label) pairs over the voxels where both are non-zero.
* Retention curves use a **stable** sort: voxels (patients, lesions) with equal uncertainty keep
  their input order (C-order flat index for voxels, row order for lesions and patients), and both
  AUC and AAC = 1 - AUC are returned.

All functions are pure: they never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bids_app.core.postprocess import check_connectivity, label_components, label_pair_counts

#: detection methods of §1.6
DETECTION_METHODS: tuple[str, ...] = ("iou_adj", "iou", "non_zero")
#: default detection method, IoU threshold and connectivity (CL convention; CLI defaults)
DEFAULT_METHOD = "iou_adj"
DEFAULT_DETECTION_THRESHOLD = 0.1
DEFAULT_CONNECTIVITY = 26
#: default reference lesion load of nDSC (WML, Shifts)
DEFAULT_NDSC_R = 0.001
#: number of uniform calibration bins (interpret-lesion-unc)
CALIBRATION_BINS = 30
#: number of retained fractions of the retention curves (``linspace(0, 1, 400)``)
RC_POINTS = 400
#: lesion retention metrics
LESION_RC_METRICS: tuple[str, ...] = ("LF1", "LPPV")
#: voxel retention metrics
VOXEL_RC_METRICS: tuple[str, ...] = ("DSC", "nDSC")


def _as_volume(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim == 2:  # a 2-D image is the one-slice volume (X, Y, 1); this is a view
        return arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be 2-D or 3-D, got shape {arr.shape}")
    return arr


def _binary(a, name: str) -> np.ndarray:
    return _as_volume(a, name) > 0


def _same_shape(*arrays: tuple[np.ndarray, str]) -> None:
    shapes = {arr.shape for arr, _ in arrays if arr is not None}
    if len(shapes) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{n} {a.shape}" for a, n in arrays if a is not None))


def _select(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Voxels considered: all (flattened, a view when possible) or those inside ``mask``."""
    return arr.reshape(-1) if mask is None else arr[mask]



# --------------------------------------------------------------------------------------------
# lesion-wise detection (§1.6)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LesionTypes:
    """Per-lesion result of :func:`classify_lesions`.

    Attributes
    ----------
    pred_labels, ref_labels : ndarray of int32, shape (X, Y, Z)
        Instance maps of the prediction and the reference (2-D input: ``(X, Y, 1)``).
    pred_score : ndarray of float64, shape (n_pred,)
        IoU_adj (``iou_adj``), the largest IoU with one reference lesion (``iou``), or 1/0 for
        any/no overlap (``non_zero``) of predicted lesion ``k`` at row ``k - 1``.
    pred_type : ndarray of str, shape (n_pred,)
        ``'TPL'``, ``'USL'`` or ``'FPL'``.
    ref_detected : ndarray of bool, shape (n_ref,)
        False for a false-negative lesion (FNL: no voxel overlap with the prediction).
    method : str
    threshold : float
    connectivity : int
    """

    pred_labels: np.ndarray
    ref_labels: np.ndarray
    pred_score: np.ndarray
    pred_type: np.ndarray
    ref_detected: np.ndarray
    method: str
    threshold: float
    connectivity: int

    @property
    def counts(self) -> dict[str, int]:
        """``TPL, FPL, USL, FNL`` counts."""
        return {
            "TPL": int(np.count_nonzero(self.pred_type == "TPL")),
            "FPL": int(np.count_nonzero(self.pred_type == "FPL")),
            "USL": int(np.count_nonzero(self.pred_type == "USL")),
            "FNL": int(np.count_nonzero(~self.ref_detected)),
        }


def _check_method(method: str, threshold: float) -> tuple[str, float]:
    if method not in DETECTION_METHODS:
        raise ValueError(f"unknown detection method {method!r}; choose from {DETECTION_METHODS}")
    threshold = float(threshold)
    if not 0.0 < threshold <= 1.0:
        # with t = 0 every lesion, even one without overlap, would be "IoU >= t": TPL
        raise ValueError(f"detection threshold must be in (0, 1], got {threshold}")
    return method, threshold


def classify_lesions(
    pred_mask: np.ndarray | None,
    ref_mask: np.ndarray,
    method: str = DEFAULT_METHOD,
    threshold: float = DEFAULT_DETECTION_THRESHOLD,
    connectivity: int = DEFAULT_CONNECTIVITY,
    *,
    pred_instances: np.ndarray | None = None,
) -> LesionTypes:
    """Classify every predicted lesion as TPL / USL / FPL and every reference lesion as detected / FNL.

    For a predicted component ``P`` (§1.6):

    * ``iou_adj``: ``K'`` = union of the reference components meeting ``P``, ``Q`` = the other
      predicted voxels, ``IoU_adj = |P ∩ K'| / |P ∪ (K' \\ (K' ∩ Q))|`` (0 when ``K'`` is empty).
      Because ``P ∩ Q = ∅`` this equals ``Σ_g |P ∩ g| / (|P| + Σ_g (|g| - |g ∩ Ŷ|))`` over the
      reference components ``g`` meeting ``P``, computed from one joint histogram;
    * ``iou``: the largest plain IoU of ``P`` with one reference component;
    * ``non_zero``: score 1 with any overlap, else 0 (the threshold is not used).

    TPL if score >= threshold, USL if 0 < score < threshold, FPL if score = 0. A reference
    component is FNL when no predicted voxel overlaps it.

    Parameters
    ----------
    pred_mask : ndarray, shape (X, Y, Z) or (X, Y)
        Predicted lesion mask (non-zero = lesion). Ignored when ``pred_instances`` is given.
    ref_mask : ndarray, same shape
        Reference mask (non-zero = lesion).
    method : {'iou_adj', 'iou', 'non_zero'}
    threshold : float in (0, 1]
        IoU threshold (0.1 in the CL repo; 0.25 is Bench-Explain's function default).
    connectivity : {6, 18, 26}
        Used to label both masks (26 = Bench-Explain, 18 = interpret-lesion-unc).
    pred_instances : ndarray of int, optional
        An existing instance map of the prediction (labels ``1..n``), e.g. the ensemble's
        ``LesionSegmentation.instances``, so that the types line up with a lesion table.

    Returns
    -------
    LesionTypes
    """
    method, threshold = _check_method(method, threshold)
    connectivity = check_connectivity(connectivity)
    ref = _binary(ref_mask, "ref_mask")
    if pred_instances is not None:
        pred_lab = _as_volume(pred_instances, "pred_instances").astype(np.int32, copy=False)
        if pred_lab.min(initial=0) < 0:
            raise ValueError("pred_instances must be non-negative labels")
        n_pred = int(pred_lab.max(initial=0))
        if np.any(np.bincount(pred_lab.reshape(-1), minlength=n_pred + 1)[1:] == 0):
            raise ValueError("pred_instances must use every label 1..n (a missing label would count as an FPL)")
    else:
        pred = _binary(pred_mask, "pred_mask")
        _same_shape((pred, "pred_mask"), (ref, "ref_mask"))
        pred_lab, n_pred = label_components(pred, connectivity)
    _same_shape((pred_lab, "prediction"), (ref, "ref_mask"))
    ref_lab, n_ref = label_components(ref, connectivity)

    p_flat, g_flat = pred_lab.reshape(-1), ref_lab.reshape(-1)
    both = np.flatnonzero((p_flat > 0) & (g_flat > 0))
    pp, gg, inter = label_pair_counts(p_flat[both], g_flat[both], n_ref)
    inter = inter.astype(np.float64)
    size_p = np.bincount(p_flat, minlength=n_pred + 1).astype(np.float64)
    size_g = np.bincount(g_flat, minlength=n_ref + 1).astype(np.float64)
    g_in_pred = np.bincount(gg, weights=inter, minlength=n_ref + 1)  # |g ∩ Ŷ|
    p_overlap = np.bincount(pp, weights=inter, minlength=n_pred + 1)  # |P ∩ Y|

    score = np.zeros(n_pred + 1)
    if method == "iou":
        np.maximum.at(score, pp, inter / (size_p[pp] + size_g[gg] - inter))
    elif method == "iou_adj":
        den = size_p + np.bincount(pp, weights=size_g[gg] - g_in_pred[gg], minlength=n_pred + 1)
        hit = p_overlap > 0
        score[hit] = p_overlap[hit] / den[hit]
    else:  # non_zero
        score[p_overlap > 0] = 1.0
    score = score[1:]
    types = np.full(n_pred, "FPL", dtype="<U3")
    types[score > 0] = "USL"
    types[score >= threshold] = "TPL"
    return LesionTypes(
        pred_labels=pred_lab, ref_labels=ref_lab, pred_score=score, pred_type=types,
        ref_detected=g_in_pred[1:] > 0, method=method, threshold=threshold, connectivity=connectivity,
    )


def detection_scores(tpl: int, fpl: int, usl: int, fnl: int) -> dict[str, float]:
    """F1, recall, precision and USL-rate from lesion counts, with the §1.6 conventions.

    ``F1 = 2TPL / (2TPL + FPL + USL + FNL)`` (1 if the denominator is 0);
    ``recall = TPL / (TPL + FNL)`` (1 if 0); ``precision = TPL / (TPL + FPL + USL)``
    (if 0: 1 when FNL = 0, else 0); ``USL_rate = USL / (TPL + FPL + USL)`` (if 0: 0 when
    FNL = 0, else 1).
    """
    f1_den = 2 * tpl + fpl + usl + fnl
    n_pred = tpl + fpl + usl
    return {
        "F1": 2.0 * tpl / f1_den if f1_den > 0 else 1.0,
        "recall": tpl / (tpl + fnl) if tpl + fnl > 0 else 1.0,
        "precision": tpl / n_pred if n_pred > 0 else (1.0 if fnl == 0 else 0.0),
        "USL_rate": usl / n_pred if n_pred > 0 else (0.0 if fnl == 0 else 1.0),
    }


def lesion_detection(
    pred_mask: np.ndarray | None,
    ref_mask: np.ndarray,
    method: str = DEFAULT_METHOD,
    threshold: float = DEFAULT_DETECTION_THRESHOLD,
    connectivity: int = DEFAULT_CONNECTIVITY,
    *,
    pred_instances: np.ndarray | None = None,
) -> dict:
    """Lesion-wise detection metrics of one scan (§1.6).

    Parameters
    ----------
    pred_mask, ref_mask, method, threshold, connectivity, pred_instances
        As in :func:`classify_lesions`.

    Returns
    -------
    dict
        ``F1, precision, recall, USL_rate`` (see :func:`detection_scores`), the counts
        ``TPL, FPL, USL, FNL``, ``n_pred_lesions, n_ref_lesions``, and the parameters
        ``method, threshold, connectivity``.
    """
    types = classify_lesions(pred_mask, ref_mask, method, threshold, connectivity, pred_instances=pred_instances)
    counts = types.counts
    out: dict = detection_scores(counts["TPL"], counts["FPL"], counts["USL"], counts["FNL"])
    out.update(counts)
    out.update({
        "n_pred_lesions": int(types.pred_type.size),
        "n_ref_lesions": int(types.ref_detected.size),
        "method": types.method,
        "threshold": types.threshold,
        "connectivity": types.connectivity,
    })
    return out


# --------------------------------------------------------------------------------------------
# voxel metrics (§1.6.7, §2.8)
# --------------------------------------------------------------------------------------------

def _confusion(pred, ref, mask) -> tuple[int, int, int, int]:
    p = _binary(pred, "pred")
    g = _binary(ref, "ref")
    m = None if mask is None else _binary(mask, "mask")
    _same_shape((p, "pred"), (g, "ref"), (m, "mask"))
    ps, gs = _select(p, m), _select(g, m)
    tp = int(np.count_nonzero(ps & gs))
    n_p, n_g = int(np.count_nonzero(ps)), int(np.count_nonzero(gs))
    return tp, n_p - tp, n_g - tp, ps.size - n_p - n_g + tp


def dice(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """DSC = 2|P ∩ R| / (|P| + |R|); 1 when both masks are empty.

    Parameters
    ----------
    pred, ref : ndarray, shape (X, Y, Z) or (X, Y)
        Non-zero = lesion.
    mask : ndarray of bool, optional
        Voxels considered (e.g. the brain mask).
    """
    tp, fp, fn, _ = _confusion(pred, ref, mask)
    den = 2 * tp + fp + fn
    return 1.0 if den == 0 else 2.0 * tp / den


def _ndsc_from_counts(tp, fp, fn, n_ref, n_total, r):
    if 2 * tp + fp + fn == 0:
        return 1.0
    k = 1.0 if (n_ref == 0 or n_ref == n_total) else (1.0 - r) * n_ref / (r * (n_total - n_ref))
    return 2.0 * tp / (2.0 * tp + fn + k * fp)


def ndsc(pred: np.ndarray, ref: np.ndarray, r: float = DEFAULT_NDSC_R, mask: np.ndarray | None = None) -> float:
    """Normalised DSC (§2.8): ``2TP / (2TP + FN + k FP)``, ``k = (1 - r)|Y| / (r (N - |Y|))``.

    ``k = 1`` when the reference is empty or fills all N voxels considered; 1 when both masks are
    empty.

    Parameters
    ----------
    pred, ref : ndarray, shape (X, Y, Z) or (X, Y)
    r : float in (0, 1)
        Reference lesion load (0.001 WML, 2e-5 CL).
    mask : ndarray of bool, optional
        Voxels considered; N = their number (whole volume without a mask).
    """
    if not 0.0 < float(r) < 1.0:
        raise ValueError(f"nDSC r must be in (0, 1), got {r}")
    tp, fp, fn, tn = _confusion(pred, ref, mask)
    return _ndsc_from_counts(tp, fp, fn, tp + fn, tp + fp + fn + tn, float(r))


def voxel_rates(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Voxel TPR, FPR and FDR.

    ``TPRvox = TP / (TP + FN)``, ``FPRvox = FP / (FP + TN)``, ``FDRvox = FP / (FP + TP)``. Both
    masks empty: 1, 0, 0 (reference). Otherwise an empty denominator gives: TPR NaN (empty
    reference: undefined), FPR NaN (no negative voxel), FDR 0 (nothing predicted, nothing
    falsely discovered).
    """
    tp, fp, fn, tn = _confusion(pred, ref, mask)
    if tp + fp + fn == 0:
        return {"TPRvox": 1.0, "FPRvox": 0.0, "FDRvox": 0.0}
    return {
        "TPRvox": tp / (tp + fn) if tp + fn else float("nan"),
        "FPRvox": fp / (fp + tn) if fp + tn else float("nan"),
        "FDRvox": fp / (fp + tp) if fp + tp else 0.0,
    }


def voxel_metrics(pred: np.ndarray, ref: np.ndarray, r: float = DEFAULT_NDSC_R, mask: np.ndarray | None = None) -> dict:
    """``DSC``, ``nDSC``, ``TPRvox``, ``FPRvox``, ``FDRvox`` and ``ndsc_r`` in one pass."""
    out = {"DSC": dice(pred, ref, mask), "nDSC": ndsc(pred, ref, r, mask)}
    out.update(voxel_rates(pred, ref, mask))
    out["ndsc_r"] = float(r)
    return out


def calibration(
    prob: np.ndarray, ref: np.ndarray, n_bins: int = CALIBRATION_BINS, mask: np.ndarray | None = None
) -> dict:
    """Calibration of a lesion-probability map against the reference (§1.6.8).

    Uniform bins over [0, 1] with the ``sklearn.calibration_curve`` binning
    (``np.searchsorted(edges[1:-1], p)``: a value on an inner edge goes to the lower bin).

    * ``CE`` = mean over non-empty bins of ``|mean p - fraction positive|`` (unweighted);
    * ``ECE`` = the same gaps weighted by the bin counts; ``MCE`` = the largest gap;
    * ``Brier`` = ``mean (p - y)^2``.

    Parameters
    ----------
    prob : ndarray of float, shape (X, Y, Z) or (X, Y)
        Lesion probability in [0, 1].
    ref : ndarray, same shape
        Non-zero = lesion.
    n_bins : int
    mask : ndarray of bool, optional
        Voxels considered (e.g. the brain mask).

    Returns
    -------
    dict
        ``CE, ECE, MCE, Brier, n_bins``; NaN metrics when no voxel is considered.
    """
    p = _as_volume(prob, "prob")
    g = _binary(ref, "ref")
    m = None if mask is None else _binary(mask, "mask")
    _same_shape((p, "prob"), (g, "ref"), (m, "mask"))
    ps = _select(p, m).astype(np.float64)
    ys = _select(g, m).astype(np.float64)
    n_bins = int(n_bins)
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if ps.size == 0:
        nan = float("nan")
        return {"CE": nan, "ECE": nan, "MCE": nan, "Brier": nan, "n_bins": n_bins}
    lo, hi = ps.min(), ps.max()
    if not (lo >= 0 and hi <= 1):
        raise ValueError(f"probabilities must lie in [0, 1], got min {lo}, max {hi}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], ps)
    total = np.bincount(ids, minlength=n_bins)
    conf = np.bincount(ids, weights=ps, minlength=n_bins)
    pos = np.bincount(ids, weights=ys, minlength=n_bins)
    used = total > 0
    gap = np.abs(conf[used] / total[used] - pos[used] / total[used])
    return {
        "CE": float(gap.mean()),
        "ECE": float(np.sum(gap * total[used]) / ps.size),
        "MCE": float(gap.max()),
        "Brier": float(np.mean((ps - ys) ** 2)),
        "n_bins": n_bins,
    }


# --------------------------------------------------------------------------------------------
# retention curves (§2.7)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetentionCurve:
    """An error retention curve.

    Attributes
    ----------
    fracs : ndarray of float64, shape (K,)
        Retained fraction (x), increasing from 0 to 1.
    values : ndarray of float64, shape (K,)
        Metric at each retained fraction.
    auc : float
        Trapezoidal area under the curve (higher = better uncertainty).
    aac : float
        ``1 - auc`` (the "area above the curve" of MS_WML_uncs; lower = better).
    metric : str
    """

    fracs: np.ndarray
    values: np.ndarray
    auc: float
    aac: float
    metric: str

    @classmethod
    def from_values(cls, fracs: np.ndarray, values: np.ndarray, metric: str) -> RetentionCurve:
        auc = float(np.trapezoid(values, fracs))
        return cls(np.asarray(fracs, dtype=np.float64), np.asarray(values, dtype=np.float64), auc, 1.0 - auc, metric)


def _fracs(fracs) -> np.ndarray:
    f = np.linspace(0.0, 1.0, RC_POINTS) if fracs is None else np.asarray(fracs, dtype=np.float64)
    if f.ndim != 1 or f.size < 2 or np.any(np.diff(f) < 0) or f[0] < 0 or f[-1] > 1:
        raise ValueError("fracs must be an increasing 1-D array in [0, 1] with at least 2 points")
    return f


def voxel_retention_curve(
    pred: np.ndarray,
    ref: np.ndarray,
    uncertainty: np.ndarray,
    metrics: Sequence[str] = VOXEL_RC_METRICS,
    fracs: np.ndarray | None = None,
    r: float = DEFAULT_NDSC_R,
    mask: np.ndarray | None = None,
) -> dict[str, RetentionCurve]:
    """Voxel-scale error retention curves (§2.7).

    Voxels are sorted by ascending uncertainty with a **stable** sort (ties keep C-order flat
    index order; NaN sorts last, i.e. as most uncertain). For each retained fraction f the first
    ``floor(N f)`` voxels keep their prediction and the others are replaced by the reference;
    the metric is computed on all N voxels considered. Implemented with prefix counts of
    TP/FP/FN in sorted order, so the cost is one sort, not one metric per fraction.

    Parameters
    ----------
    pred, ref : ndarray, shape (X, Y, Z) or (X, Y)
        Binary prediction and reference (non-zero = lesion).
    uncertainty : ndarray of float, same shape
        Voxel uncertainty (higher = less certain).
    metrics : sequence of {'DSC', 'nDSC'}
    fracs : ndarray, optional
        Retained fractions (default ``linspace(0, 1, 400)``).
    r : float
        nDSC reference lesion load.
    mask : ndarray of bool, optional
        Voxels considered (the CL repo uses the brain mask); N = their number.

    Returns
    -------
    dict of str -> RetentionCurve
    """
    for name in metrics:
        if name not in VOXEL_RC_METRICS:
            raise ValueError(f"unknown voxel retention metric {name!r}; choose from {VOXEL_RC_METRICS}")
    f = _fracs(fracs)
    p = _binary(pred, "pred")
    g = _binary(ref, "ref")
    u = _as_volume(uncertainty, "uncertainty")
    m = None if mask is None else _binary(mask, "mask")
    _same_shape((p, "pred"), (g, "ref"), (u, "uncertainty"), (m, "mask"))
    us = _select(u, m)
    n = us.size
    order = np.argsort(us, kind="stable")
    ps = _select(p, m)[order]
    gs = _select(g, m)[order]
    r = float(r)
    if "nDSC" in metrics and not 0.0 < r < 1.0:
        raise ValueError(f"nDSC r must be in (0, 1), got {r}")
    pos = (n * f).astype(np.int64)  # floor(N f), as int(N * frac) in the reference
    n_ref = int(np.count_nonzero(gs))

    def before(sel):  # how many selected voxels lie in the retained prefix [0, pos)
        return np.searchsorted(np.flatnonzero(sel), pos)

    c_tp = before(ps & gs)
    c_fp = before(ps & ~gs)
    c_fn = before(~ps & gs)
    c_ref = before(gs)
    tp = c_tp + (n_ref - c_ref)  # the replaced suffix contributes its reference voxels as TP
    fp, fn = c_fp, c_fn
    out = {}
    for name in metrics:
        if name == "DSC":
            den = 2 * tp + fp + fn
            vals = np.where(den > 0, 2.0 * tp / np.maximum(den, 1), 1.0)
        else:
            k = 1.0 if (n_ref == 0 or n_ref == n) else (1.0 - r) * n_ref / (r * (n - n_ref))
            den = 2.0 * tp + fn + k * fp
            vals = np.where(2 * tp + fp + fn > 0, 2.0 * tp / np.where(den > 0, den, 1.0), 1.0)
        out[name] = RetentionCurve.from_values(f, vals, name)
    return out


def _lesion_metric(tpl, fpl, usl, n_fn, metric):
    tpl, fpl, usl = (np.asarray(x, dtype=np.float64) for x in (tpl, fpl, usl))
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "LF1":
            den = tpl + 0.5 * (fpl + usl + n_fn)
            return np.where(den > 0, tpl / den, 0.0)
        den = tpl + fpl + usl
        return np.where(den > 0, tpl / den, 1.0)


def _descending_order(u: np.ndarray) -> np.ndarray:
    """Most uncertain first; NaN counts as most uncertain; ties keep row order (stable)."""
    key = np.where(np.isnan(u), -np.inf, -u)
    return np.argsort(key, kind="stable")


def _check_types(lesion_types) -> np.ndarray:
    t = np.asarray(lesion_types).astype(str)
    bad = set(np.unique(t)) - {"TPL", "FPL", "USL"}
    if bad:
        raise ValueError(f"lesion types must be TPL, FPL or USL, got {sorted(bad)}")
    return t


def lesion_retention_curve(
    lesion_types: Sequence[str] | np.ndarray,
    uncertainty: np.ndarray,
    n_fn: int,
    metric: str = "LF1",
    fracs: np.ndarray | None = None,
) -> RetentionCurve:
    """Lesion-scale retention curve (CL variant of §2.7).

    Lesions are rejected one at a time from the most uncertain (stable descending sort, ties in
    row order, NaN first). A rejected FPL becomes a true negative (leaves the counts), a rejected
    USL becomes a TPL, a rejected TPL stays TPL. ``LF1 = TPL / (TPL + ½(FPL + USL + n_fn))`` (0 if
    the denominator is 0); ``LPPV = TPL / (TPL + USL + FPL)`` (1 if 0). The n + 1 points sit at
    retained fractions ``k / n`` and are linearly interpolated onto ``fracs``. With no lesion the
    curve is constant (the metric of the empty set).

    Parameters
    ----------
    lesion_types : sequence of {'TPL', 'FPL', 'USL'}, length n
        Types of the predicted lesions (e.g. ``LesionTypes.pred_type``).
    uncertainty : ndarray of float, shape (n,)
        One value per lesion (higher = less certain).
    n_fn : int
        Number of false-negative reference lesions (FNL).
    metric : {'LF1', 'LPPV'}
    fracs : ndarray, optional
        Default ``linspace(0, 1, 400)``.

    Returns
    -------
    RetentionCurve
    """
    if metric not in LESION_RC_METRICS:
        raise ValueError(f"unknown lesion retention metric {metric!r}; choose from {LESION_RC_METRICS}")
    f = _fracs(fracs)
    t = _check_types(lesion_types)
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    if u.size != t.size:
        raise ValueError(f"{t.size} lesion types but {u.size} uncertainty values")
    n = t.size
    tpl0, fpl0, usl0 = (int(np.count_nonzero(t == k)) for k in ("TPL", "FPL", "USL"))
    if n == 0:
        vals = np.full(f.shape, float(_lesion_metric(0, 0, 0, n_fn, metric)))
        return RetentionCurve.from_values(f, vals, metric)
    rejected = t[_descending_order(u)]
    rej_fpl = np.concatenate([[0], np.cumsum(rejected == "FPL")])  # after k rejections, k = 0..n
    rej_usl = np.concatenate([[0], np.cumsum(rejected == "USL")])
    vals_k = _lesion_metric(tpl0 + rej_usl, fpl0 - rej_fpl, usl0 - rej_usl, n_fn, metric)
    x = np.arange(n + 1)[::-1] / n  # retained fraction after k rejections
    vals = np.interp(f, x[::-1], vals_k[::-1])
    return RetentionCurve.from_values(f, vals, metric)


def lesion_retention_baselines(
    lesion_types: Sequence[str] | np.ndarray,
    n_fn: int,
    metric: str = "LF1",
    fracs: np.ndarray | None = None,
    seed: int = 0,
    n_random: int = 1,
) -> dict[str, RetentionCurve]:
    """Ideal and random baselines of :func:`lesion_retention_curve`.

    * ``ideal``: uncertainty FPL = 2, USL = 1, TPL = 0 (errors rejected first);
    * ``random``: uncertainty = a random permutation (``numpy.random.default_rng(seed)``); with
      ``n_random > 1`` the curves of that many permutations are averaged.
    """
    t = _check_types(lesion_types)
    ideal_u = np.select([t == "FPL", t == "USL"], [2.0, 1.0], 0.0)
    out = {"ideal": lesion_retention_curve(t, ideal_u, n_fn, metric, fracs)}
    rng = np.random.default_rng(seed)
    curves = [lesion_retention_curve(t, rng.permutation(t.size).astype(np.float64), n_fn, metric, fracs)
              for _ in range(max(1, int(n_random)))]
    mean_vals = np.mean([c.values for c in curves], axis=0)
    out["random"] = RetentionCurve.from_values(curves[0].fracs, mean_vals, metric)
    return out


def patient_retention_curve(
    uncertainty: Sequence[float] | np.ndarray,
    metric_values: Sequence[float] | np.ndarray,
    replace_with: float = 1.0,
    metric: str = "DSC",
) -> RetentionCurve:
    """Patient-scale retention curve (§2.7, group level).

    Starting from the mean metric of all n patients, the most uncertain patient's metric is
    replaced by ``replace_with`` (a perfect score), one patient at a time (stable descending
    sort, ties in input order, NaN uncertainty first). The curve is placed at retained
    fractions ``linspace(0, 1, n + 1)``.

    Parameters
    ----------
    uncertainty : array of float, shape (n,)
    metric_values : array of float, shape (n,)
        E.g. DSC per patient.
    replace_with : float
    metric : str
        Name recorded in the result.

    Returns
    -------
    RetentionCurve
    """
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    v = np.asarray(metric_values, dtype=np.float64).reshape(-1)
    if u.size != v.size or u.size == 0:
        raise ValueError(f"need as many metric values as uncertainties (n >= 1), got {v.size} and {u.size}")
    n = u.size
    replaced = v[_descending_order(u)]
    k = np.arange(n + 1)
    rc = (v.sum() - np.concatenate([[0.0], np.cumsum(replaced)]) + k * float(replace_with)) / n
    return RetentionCurve.from_values(np.linspace(0.0, 1.0, n + 1), rc[::-1], metric)


# --------------------------------------------------------------------------------------------
# One call per session (used by the participant workflow)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionEvaluation:
    """Everything :func:`evaluate_session` computes.

    Attributes
    ----------
    metrics : dict
        Flat JSON-able metrics: ``<scope>/<metric>`` with scope ``all`` (every lesion class
        together) or a class name, plus voxel retention ``AUC``/``AAC`` per voxel measure and
        lesion retention ``AUC``/``AAC`` per lesion measure (with ideal and random baselines).
    lesion_type : ndarray of str, shape (n_lesions,)
        TPL / USL / FPL of each predicted lesion (label order).
    lesion_score : ndarray of float, shape (n_lesions,)
    curves : dict
        Retention curves (fractions and values) for plotting.
    """

    metrics: dict
    lesion_type: np.ndarray
    lesion_score: np.ndarray
    curves: dict


def evaluate_session(
    instances: np.ndarray,
    instance_class: np.ndarray,
    ref_classes: np.ndarray,
    class_names: dict[int, str],
    lesion_prob: np.ndarray,
    *,
    brain_mask: np.ndarray | None = None,
    voxel_maps: dict[str, np.ndarray] | None = None,
    lesion_measures: dict[str, np.ndarray] | None = None,
    method: str = DEFAULT_METHOD,
    threshold: float = DEFAULT_DETECTION_THRESHOLD,
    connectivity: int = DEFAULT_CONNECTIVITY,
    ndsc_r: float = DEFAULT_NDSC_R,
    n_bins: int = CALIBRATION_BINS,
) -> SessionEvaluation:
    """Evaluate one session's segmentation (and its uncertainty) against reference masks.

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)
        The ensemble's lesion instances (labels 1..n across all classes).
    instance_class : ndarray of int, shape (n,)
        Class index of each instance.
    ref_classes : ndarray of int, shape (X, Y, Z)
        Reference class map (0 background, model class indices).
    class_names : dict
        Class index -> name.
    lesion_prob : ndarray of float, shape (X, Y, Z)
        Ensemble probability of "any lesion" (1 - background), for calibration.
    brain_mask : ndarray of bool, optional
        Voxels considered by voxel metrics, calibration and voxel retention curves.
    voxel_maps : dict, optional
        Voxel uncertainty maps -> voxel retention curves (DSC, nDSC).
    lesion_measures : dict, optional
        Lesion uncertainty per lesion (label order) -> lesion retention curves (LF1, LPPV).

    Returns
    -------
    SessionEvaluation
    """
    instances = np.asarray(instances)
    ref_classes = np.asarray(ref_classes)
    pred_any = instances > 0
    ref_any = ref_classes > 0
    metrics: dict = {"method": method, "detection_threshold": float(threshold), "connectivity": int(connectivity),
                     "ndsc_r": float(ndsc_r), "calibration_bins": int(n_bins),
                     "brain_mask_used": brain_mask is not None}
    types = classify_lesions(None, ref_any, method, threshold, connectivity, pred_instances=instances)
    scopes = [("all", pred_any, ref_any, types)]
    for index, name in sorted(class_names.items()):
        keep = np.concatenate([[False], np.asarray(instance_class) == index])
        class_instances = np.where(keep[instances], instances, 0)
        # renumber the class's lesions 1..k (label order preserved)
        labels = np.flatnonzero(keep)
        remap = np.zeros(instances.max() + 1 if instances.size else 1, dtype=np.int32)
        remap[labels] = np.arange(1, labels.size + 1, dtype=np.int32)
        class_types = classify_lesions(None, ref_classes == index, method, threshold, connectivity,
                                       pred_instances=remap[class_instances])
        scopes.append((name, class_instances > 0, ref_classes == index, class_types))
    for scope, pred, ref, scope_types in scopes:
        c = scope_types.counts
        for key, value in detection_scores(c["TPL"], c["FPL"], c["USL"], c["FNL"]).items():
            metrics[f"{scope}/{key}"] = value
        for key, value in scope_types.counts.items():
            metrics[f"{scope}/{key}"] = value
        metrics[f"{scope}/n_pred"] = int(scope_types.pred_type.size)
        metrics[f"{scope}/n_ref"] = int(scope_types.ref_detected.size)
        for key, value in voxel_metrics(pred, ref, ndsc_r, brain_mask).items():
            if key != "ndsc_r":
                metrics[f"{scope}/{key}"] = value
    for key, value in calibration(lesion_prob, ref_any, n_bins, brain_mask).items():
        metrics[f"all/{key}"] = value
    curves: dict = {}
    for name, u in (voxel_maps or {}).items():
        for metric, curve in voxel_retention_curve(pred_any, ref_any, u, mask=brain_mask, r=ndsc_r).items():
            metrics[f"voxel_rc/{name}/{metric}_AUC"] = curve.auc
            metrics[f"voxel_rc/{name}/{metric}_AAC"] = curve.aac
            curves[f"voxel_rc/{name}/{metric}"] = curve
    n_fn = types.counts["FNL"]
    for metric in LESION_RC_METRICS:
        for base, curve in lesion_retention_baselines(types.pred_type, n_fn, metric).items():
            metrics[f"lesion_rc/{base}/{metric}_AUC"] = curve.auc
            curves[f"lesion_rc/{base}/{metric}"] = curve
        for name, u in (lesion_measures or {}).items():
            curve = lesion_retention_curve(types.pred_type, np.asarray(u, dtype=np.float64), n_fn, metric)
            metrics[f"lesion_rc/{name}/{metric}_AUC"] = curve.auc
            metrics[f"lesion_rc/{name}/{metric}_AAC"] = curve.aac
            curves[f"lesion_rc/{name}/{metric}"] = curve
    return SessionEvaluation(metrics=metrics, lesion_type=types.pred_type, lesion_score=types.pred_score,
                             curves=curves)
