"""All uncertainty stages of one session at once (:func:`compute_uncertainty`) and lesion maps.

:func:`compute_uncertainty` segments the ensemble, computes the voxel maps and the member
segmentations once and shares them between the lesion and patient stages; it returns an
:class:`UncertaintyResult`. :func:`paint_lesions` paints one value per lesion into a map.
See ``docs/uncertainty.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bids_app.core.postprocess import LesionSegmentation, check_connectivity, lesion_geometry
from bids_app.core.uncertainty.lesion import EPS_STRUCT, lesion_uncertainty
from bids_app.core.uncertainty.matching import ensemble_segmentation, member_segmentations
from bids_app.core.uncertainty.patient import patient_uncertainty
from bids_app.core.uncertainty.voxel import EPS_VOXEL, check_lesion_labels, check_member_probs, voxel_uncertainty

#: voxel measures written as maps unless asked otherwise: total (EoE), aleatoric (ExE) and
#: epistemic (MI) uncertainty (docs/uncertainty.md)
DEFAULT_VOXEL_MAPS: tuple[str, ...] = ("EoE", "ExE", "MI")
#: lesion measures written as painted maps unless asked otherwise (every one is in the lesion table)
DEFAULT_LESION_MAPS: tuple[str, ...] = ("LSU", "mean_MI")


def paint_lesions(instances: np.ndarray, values: np.ndarray, background: float = 0.0, dtype=np.float32) -> np.ndarray:
    """Lesion map: every voxel of lesion ``k`` gets ``values[k - 1]``.

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)
    values : ndarray, shape (n_lesions,)
    background : float
    dtype : numpy dtype

    Returns
    -------
    ndarray, shape (X, Y, Z)
    """
    inst = np.asarray(instances)
    lut = np.concatenate([[background], np.asarray(values, dtype=np.float64)]).astype(dtype)
    return lut[inst]


@dataclass(frozen=True)
class UncertaintyResult:
    """Everything :func:`compute_uncertainty` produces.

    Attributes
    ----------
    segmentation : LesionSegmentation
        Ensemble lesions (labels of ``lesions['label']``).
    voxel_maps : dict of str -> ndarray (X, Y, Z), float32
    lesions : pandas.DataFrame
        Geometry columns followed by :func:`lesion_uncertainty`'s columns.
    patient : dict
    parameters : dict
        Threshold, minimum size, connectivity, ε and lesion classes used.
    """

    segmentation: LesionSegmentation
    voxel_maps: dict
    lesions: pd.DataFrame
    patient: dict
    parameters: dict = field(default_factory=dict)


def compute_uncertainty(
    member_probs: np.ndarray,
    *,
    threshold: float | Mapping[int, float],
    min_size: int,
    connectivity: int,
    lesion_labels: Sequence[int] | None = None,
    member_thresholds: Sequence | None = None,
    brain_mask: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    eps_voxel: float = EPS_VOXEL,
    eps_struct: float = EPS_STRUCT,
    segmentation: LesionSegmentation | None = None,
) -> UncertaintyResult:
    """All uncertainty stages from member probabilities: segmentation, voxel, lesion, patient.

    Member segmentations are computed once and shared by the lesion and patient stages.

    Parameters
    ----------
    member_probs : ndarray of float, shape (M, C, X, Y, Z)
    threshold : float or dict {class: float}
        Ensemble threshold (``p̄ >= threshold``), also applied to the members.
    min_size : int
        Smallest lesion kept, in voxels.
    connectivity : {6, 18, 26}
    lesion_labels : sequence of int, optional
        Lesion classes (default ``1..C-1``).
    member_thresholds : sequence of M floats or dicts, optional
        For LSU+ and PSU+.
    brain_mask : ndarray of bool (X, Y, Z), optional
    affine : ndarray (4, 4), optional
        For centroids in mm and volumes.
    eps_voxel, eps_struct : float
    segmentation : LesionSegmentation, optional
        The ensemble segmentation when it was computed already with the same threshold, size
        and connectivity (:func:`ensemble_segmentation`); None computes it here.

    Returns
    -------
    UncertaintyResult
    """
    p = check_member_probs(member_probs)
    connectivity = check_connectivity(connectivity)
    labels = check_lesion_labels(p, lesion_labels)
    if segmentation is None:
        seg = ensemble_segmentation(p, threshold, min_size, connectivity, labels)
    elif segmentation.instances.shape != p.shape[2:]:
        raise ValueError(f"segmentation {segmentation.instances.shape} does not match the probabilities {p.shape}")
    else:
        seg = segmentation
    voxel_maps = voxel_uncertainty(p, eps=eps_voxel)
    segs = member_segmentations(p, threshold, min_size, connectivity, labels)
    segs_plus = None
    if member_thresholds is not None:
        segs_plus = member_segmentations(p, member_thresholds, min_size, connectivity, labels)
    table = lesion_uncertainty(
        p, seg, threshold, min_size, connectivity, lesion_labels=labels, member_thresholds=member_thresholds,
        voxel_maps=voxel_maps, member_segs=segs, member_segs_plus=segs_plus, eps_voxel=eps_voxel, eps_struct=eps_struct,
    )
    patient = patient_uncertainty(
        p, seg, threshold, min_size, connectivity, lesion_table=table, lesion_labels=labels,
        member_thresholds=member_thresholds, brain_mask=brain_mask, voxel_maps=voxel_maps,
        member_segs=segs, member_segs_plus=segs_plus, eps_voxel=eps_voxel,
    )
    geometry = pd.DataFrame(lesion_geometry(seg.instances, seg.n_lesions, affine))
    lesions = geometry.merge(table, on="label", how="left", validate="one_to_one")
    lesions = lesions[["label", "class"] + [c for c in lesions.columns if c not in ("label", "class")]]
    if isinstance(threshold, Mapping):
        thr_record = {str(k): float(v) for k, v in threshold.items()}
    else:
        thr_record = float(threshold)
    parameters = {
        "threshold": thr_record,
        "threshold_rule": "p >= threshold",
        "min_lesion_size_voxels": int(min_size),
        "connectivity": connectivity,
        "lesion_labels": labels,
        "member_thresholds": None if member_thresholds is None else [
            {str(k): float(v) for k, v in t.items()} if isinstance(t, Mapping) else float(t) for t in member_thresholds
        ],
        "eps_voxel": float(eps_voxel),
        "eps_struct": float(eps_struct),
        "n_members": int(p.shape[0]),
        "n_classes": int(p.shape[1]),
    }
    return UncertaintyResult(seg, voxel_maps, lesions, patient, parameters)
