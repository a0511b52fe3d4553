"""Patient-scale uncertainty of a deep ensemble: :func:`patient_uncertainty` (pure numpy).

PSU / PSU+ (one minus the mean class-aware IoU of the ensemble and member segmentations), the
brain-mask averages of the voxel measures (plain and min-max scaled, and the reference's
whole-volume variant) and the averages of the lesion measures over the finite lesions.

Definitions follow Molchanova et al., arXiv:2311.08931 (MS_WML_uncs) and arXiv:2407.05761
(interpret-lesion-unc); ``docs/uncertainty.md`` lists the conventions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from bids_app.core.postprocess import LesionSegmentation, check_connectivity
from bids_app.core.uncertainty.matching import member_segmentations
from bids_app.core.uncertainty.voxel import (
    EPS_VOXEL,
    VOXEL_MEASURES,
    check_lesion_labels,
    check_member_probs,
    voxel_uncertainty,
)


def _class_iou(a: np.ndarray, b: np.ndarray, cls: int | None = None) -> float:
    """IoU of two class maps (one class, or class-aware over all lesion classes); 1 if both empty."""
    if cls is None:
        inter = np.count_nonzero((a == b) & (a > 0))
        union = np.count_nonzero((a > 0) | (b > 0))
    else:
        ma, mb = a == cls, b == cls
        inter = np.count_nonzero(ma & mb)
        union = np.count_nonzero(ma | mb)
    return 1.0 if union == 0 else inter / union


def _minmax_mean(values: np.ndarray) -> float:
    """Mean after min-max scaling; values unchanged when max == min (reference rule)."""
    lo, hi = values.min(), values.max()
    if hi == lo:
        return float(values.mean())
    return float(((values - lo) / (hi - lo)).mean())


def patient_uncertainty(
    member_probs: np.ndarray,
    seg: LesionSegmentation,
    threshold: float | Mapping[int, float],
    min_size: int,
    connectivity: int,
    *,
    lesion_table: pd.DataFrame | None = None,
    lesion_labels: Sequence[int] | None = None,
    member_thresholds: Sequence | None = None,
    brain_mask: np.ndarray | None = None,
    voxel_maps: Mapping[str, np.ndarray] | None = None,
    member_segs: Sequence[LesionSegmentation] | None = None,
    member_segs_plus: Sequence[LesionSegmentation] | None = None,
    eps_voxel: float = EPS_VOXEL,
) -> dict:
    """Patient-scale uncertainty (arXiv:2311.08931).

    * ``PSU = 1 - mean_m IoU(seg_ens, seg_m)`` on the class maps (class-aware: a voxel is in the
      intersection when both say the same lesion class); ``IoU(∅, ∅) = 1``. With several lesion
      classes also ``PSU[c]`` per class. ``PSU+`` (and ``PSU+[c]``) with ``member_thresholds``.
    * ``avg_<u>`` / ``avg_scaled_<u>``: mean of voxel measure u **inside the brain mask**, before /
      after min-max scaling within the brain mask; ``avg_<u>_wholevolume_ref`` /
      ``avg_scaled_<u>_wholevolume_ref``: the reference variant ``mean(u · brain)`` over all voxels
      (scaling over the whole volume). Min-max scaling leaves values unchanged when max = min.
    * ``avg_<measure>`` / ``avg_scaled_<measure>`` for every lesion measure column: mean over the
      lesions with a **finite** value (scaled within the scan); ``n_nonfinite_<measure>`` counts
      the NaN/-inf lesions left out. NaN when no lesion has a finite value.

    Parameters
    ----------
    member_probs : ndarray, shape (M, C, X, Y, Z)
    seg : LesionSegmentation
        Ensemble lesions.
    threshold, min_size, connectivity, lesion_labels, member_thresholds
        As in :func:`lesion_uncertainty`.
    lesion_table : pandas.DataFrame, optional
        Output of :func:`lesion_uncertainty`; without it no lesion aggregates are returned.
    brain_mask : ndarray of bool, shape (X, Y, Z), optional
        Without it the whole volume is the "brain" (``brain_mask_given`` is False and both
        voxel-aggregate variants coincide).
    voxel_maps : dict, optional
        Output of :func:`voxel_uncertainty` (computed when absent).
    member_segs, member_segs_plus : list of LesionSegmentation, optional
        Precomputed member segmentations.

    Returns
    -------
    dict of str -> float or int
    """
    p = check_member_probs(member_probs)
    connectivity = check_connectivity(connectivity)
    labels = check_lesion_labels(p, lesion_labels)
    shape = tuple(p.shape[2:])
    if member_segs is None:
        member_segs = member_segmentations(p, threshold, min_size, connectivity, labels)
    if member_thresholds is not None and member_segs_plus is None:
        member_segs_plus = member_segmentations(p, member_thresholds, min_size, connectivity, labels)

    out: dict = {"n_lesions": int(seg.n_lesions)}
    if len(labels) > 1:
        for c in labels:
            out[f"n_lesions[{c}]"] = int(np.count_nonzero(np.asarray(seg.instance_class) == c))

    def psu(segs, key):
        out[key] = 1.0 - float(np.mean([_class_iou(seg.dseg, s.dseg) for s in segs]))
        if len(labels) > 1:
            for c in labels:
                out[f"{key}[{c}]"] = 1.0 - float(np.mean([_class_iou(seg.dseg, s.dseg, c) for s in segs]))

    psu(member_segs, "PSU")
    if member_segs_plus is not None:
        psu(member_segs_plus, "PSU+")

    if brain_mask is None:
        brain = None
        n_brain = int(np.prod(shape))
    else:
        brain = np.asarray(brain_mask, dtype=bool)
        if brain.shape != shape:
            raise ValueError(f"brain mask shape {brain.shape} != probability grid {shape}")
        n_brain = int(np.count_nonzero(brain))
    out["brain_mask_given"] = brain is not None
    out["n_brain_voxels"] = n_brain
    if voxel_maps is None:
        voxel_maps = voxel_uncertainty(p, eps=eps_voxel)
    n_total = int(np.prod(shape))
    for name in VOXEL_MEASURES:
        u = np.asarray(voxel_maps[name])
        inside = u.reshape(-1) if brain is None else u[brain]
        if inside.size == 0:
            out[f"avg_{name}"] = out[f"avg_scaled_{name}"] = float("nan")
            out[f"avg_{name}_wholevolume_ref"] = out[f"avg_scaled_{name}_wholevolume_ref"] = 0.0
            continue
        total = float(inside.sum(dtype=np.float64))
        out[f"avg_{name}"] = total / inside.size
        out[f"avg_scaled_{name}"] = _minmax_mean(inside.astype(np.float64))
        # reference: mean(u * brain) over all voxels, scaling over the whole volume
        lo, hi = float(u.min()), float(u.max())
        out[f"avg_{name}_wholevolume_ref"] = total / n_total
        if hi == lo:
            out[f"avg_scaled_{name}_wholevolume_ref"] = total / n_total
        else:
            out[f"avg_scaled_{name}_wholevolume_ref"] = (total - inside.size * lo) / (hi - lo) / n_total

    if lesion_table is not None:
        skip = {"label", "class", "n_members_matched", "n_voxels", "volume_mm3"}
        skip |= {f"centroid_{a}_{u}" for a in "xyz" for u in ("vox", "mm")}
        for col in lesion_table.columns:
            if col in skip:
                continue
            values = lesion_table[col].to_numpy(dtype=np.float64)
            finite = values[np.isfinite(values)]
            out[f"n_nonfinite_{col}"] = int(values.size - finite.size)
            if finite.size == 0:
                out[f"avg_{col}"] = out[f"avg_scaled_{col}"] = float("nan")
            else:
                out[f"avg_{col}"] = float(finite.mean())
                out[f"avg_scaled_{col}"] = _minmax_mean(finite)
    return out
