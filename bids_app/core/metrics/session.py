"""One call per session (used by the participant workflow's evaluation node): lesion detection per
class, voxel metrics, calibration and voxel / lesion retention curves against the reference masks,
as one flat JSON-able dict (``docs/uncertainty.md``). Pure numpy, no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bids_app.core.metrics.calibration import CALIBRATION_BINS, calibration
from bids_app.core.metrics.detection import (
    DEFAULT_CONNECTIVITY,
    DEFAULT_DETECTION_THRESHOLD,
    DEFAULT_METHOD,
    classify_lesions,
    detection_scores,
)
from bids_app.core.metrics.overlap import DEFAULT_NDSC_R, voxel_metrics
from bids_app.core.metrics.retention import (
    LESION_RC_METRICS,
    lesion_retention_baselines,
    lesion_retention_curve,
    voxel_retention_curve,
)


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
