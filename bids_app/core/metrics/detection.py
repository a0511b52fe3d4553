"""Lesion-wise detection against a reference (arXiv:2507.12092): every predicted lesion is a TPL, USL or FPL and
every reference lesion detected or an FNL; F1, recall, precision and USL-rate from the counts.
Pure numpy, no file I/O.

Definitions follow the papers' public code: lesion-wise detection as in Molchanova et al.,
arXiv:2507.12092 (Bench-Explain) and arXiv:2407.05761 (interpret-lesion-unc);
``docs/uncertainty.md`` lists the conventions (zero denominators, tie-breaks).

* Masks are ``(X, Y, Z)``; a 2-D mask ``(X, Y)`` is treated as the one-slice volume
  ``(X, Y, 1)``, so connectivity 6 means 4-connected in the plane and 18/26 mean 8-connected.
* Components are labelled with :func:`bids_app.core.postprocess.label_components`
  (connectivity is a parameter and is returned with every result).
* Overlaps between predicted and reference lesions come from one joint histogram of
  (predicted label, reference label) pairs over the voxels where both are non-zero.

The defaults here (method, IoU threshold, connectivity) are the app's and CLI's defaults. All
functions are pure: they never modify their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bids_app.core.metrics._checks import as_volume, binary, same_shape
from bids_app.core.postprocess import check_connectivity, label_components, label_pair_counts

#: detection methods of arXiv:2507.12092's code
DETECTION_METHODS: tuple[str, ...] = ("iou_adj", "iou", "non_zero")
#: default detection method, IoU threshold and connectivity (CL convention; CLI defaults)
DEFAULT_METHOD = "iou_adj"
DEFAULT_DETECTION_THRESHOLD = 0.1
DEFAULT_CONNECTIVITY = 26


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

    For a predicted component ``P`` (arXiv:2507.12092):

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
    ref = binary(ref_mask, "ref_mask")
    if pred_instances is not None:
        pred_lab = as_volume(pred_instances, "pred_instances").astype(np.int32, copy=False)
        if pred_lab.min(initial=0) < 0:
            raise ValueError("pred_instances must be non-negative labels")
        n_pred = int(pred_lab.max(initial=0))
        if np.any(np.bincount(pred_lab.reshape(-1), minlength=n_pred + 1)[1:] == 0):
            raise ValueError("pred_instances must use every label 1..n (a missing label would count as an FPL)")
    else:
        pred = binary(pred_mask, "pred_mask")
        same_shape((pred, "pred_mask"), (ref, "ref_mask"))
        pred_lab, n_pred = label_components(pred, connectivity)
    same_shape((pred_lab, "prediction"), (ref, "ref_mask"))
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
    """F1, recall, precision and USL-rate from lesion counts, with the conventions of arXiv:2507.12092.

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
    """Lesion-wise detection metrics of one scan (arXiv:2507.12092).

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
