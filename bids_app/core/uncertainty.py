"""Voxel-, lesion- and patient-scale uncertainty of a deep ensemble (pure numpy, no file I/O).

Definitions follow Molchanova et al., arXiv:2311.08931 (MS_WML_uncs) and arXiv:2407.05761
(interpret-lesion-unc);
``docs/uncertainty.md`` lists every convention and every NaN / -inf case. In short:

* inputs are per-member class probabilities ``member_probs`` of shape ``(M, C, X, Y, Z)``
  (members, classes with background at 0, space); a single lesion-probability map per member
  is turned into that layout by :func:`binary_member_probs`;
* voxel measures (ε = 1e-10) run over **all** C classes;
* lesion measures of a lesion of class ``c`` use ``p_m[c]`` as the lesion probability and the
  member lesions of class ``c``; member masks are built with
  :func:`bids_app.core.postprocess.segment_lesions`, i.e. with the ensemble's threshold,
  minimum size and connectivity (or the members' own thresholds for the ``+`` variants);
* everything lesion-wise is a label-indexed reduction (``np.bincount`` over the voxels of the
  lesions, joint histograms of (ensemble label, member label) pairs): no loop touches the whole
  volume once per lesion.

Stages (one call each, so a Nipype interface can wrap one function): :func:`voxel_uncertainty`,
:func:`member_segmentations`, :func:`lesion_uncertainty`, :func:`patient_uncertainty`, or
everything at once with :func:`compute_uncertainty`.

All functions are pure: they never modify their inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bids_app.core.postprocess import (
    LesionSegmentation,
    check_connectivity,
    label_pair_counts,
    lesion_geometry,
    segment_lesions,
)

#: voxel measures, in output order (§2.3)
VOXEL_MEASURES: tuple[str, ...] = ("NC", "EoE", "ExE", "MI", "EPKL", "RMI")
#: structural lesion measures, in output order (§2.4, §3.4); "LSU" is ``ddu`` of the CL repo
STRUCTURAL_MEASURES: tuple[str, ...] = (
    "LSU", "LSU+", "ddu_adj", "ddu_fast", "srmi", "smi", "seoe", "vvc", "avg_pwdice", "global_iou",
)
#: voxel measures whose lesion ``logsum`` is not reported: NC < 0 everywhere, so ln(NC) is NaN
#: for every lesion (the reference code returns that NaN); see docs/uncertainty.md
LOGSUM_SKIPPED: tuple[str, ...] = ("NC",)
#: ε inside the voxel-measure logarithms (MS_WML_uncs)
EPS_VOXEL = 1e-10
#: ε inside the structural-measure logarithms (interpret-lesion-unc ``les_measures``)
EPS_STRUCT = 1e-5

# voxels per block in voxel_uncertainty: bounds the float64 temporaries to a few tens of MB
_BLOCK_VOXELS = 1 << 18


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------

def binary_member_probs(lesion_probs: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Stack per-member lesion probabilities into the ``(M, 2, X, Y, Z)`` layout.

    Parameters
    ----------
    lesion_probs : ndarray of float, shape (M, X, Y, Z)
        Probability of the lesion class for each member, in [0, 1].
    dtype : numpy dtype
        Output dtype (float32 keeps an M = 10 ensemble of a 1 mm brain under 600 MB).

    Returns
    -------
    ndarray, shape (M, 2, X, Y, Z)
        Class 0 = background = ``1 - p``, class 1 = lesion = ``p``. A new array.
    """
    p = np.asarray(lesion_probs)
    if p.ndim != 4:
        raise ValueError(f"expected (M, X, Y, Z) lesion probabilities, got shape {p.shape}")
    out = np.empty((p.shape[0], 2) + p.shape[1:], dtype=dtype)
    out[:, 1] = p
    np.subtract(1, out[:, 1], out=out[:, 0])
    return out


def check_member_probs(member_probs: np.ndarray) -> np.ndarray:
    """Validate ``(M, C, X, Y, Z)`` member probabilities; returns them as an ndarray (no copy).

    Raises
    ------
    ValueError
        Wrong number of dimensions, fewer than 2 classes, no member, or values outside
        [0, 1] (NaN and Inf included: ``min``/``max`` propagate NaN, so one pass each suffices).
    """
    p = np.asarray(member_probs)
    if p.ndim != 5:
        raise ValueError(f"expected member probabilities of shape (M, C, X, Y, Z), got {p.shape}")
    if p.shape[0] < 1 or p.shape[1] < 2:
        raise ValueError(f"need at least 1 member and 2 classes (background + lesion), got {p.shape[:2]}")
    if p.dtype.kind not in "fiu":
        raise ValueError(f"member probabilities must be numeric, got dtype {p.dtype}")
    lo, hi = p.min(), p.max()
    if not (lo >= 0 and hi <= 1):  # False for NaN too
        raise ValueError(f"member probabilities must lie in [0, 1] (got min {lo}, max {hi}); clip or renormalise them")
    return p


def _lesion_labels(member_probs: np.ndarray, lesion_labels) -> list[int]:
    n_classes = member_probs.shape[1]
    labels = list(range(1, n_classes)) if lesion_labels is None else [int(c) for c in lesion_labels]
    if not labels or any(c < 1 or c >= n_classes for c in labels):
        raise ValueError(f"lesion_labels must be class indices in 1..{n_classes - 1}, got {lesion_labels!r}")
    return labels


def _per_member(value, n_members: int, name: str) -> list:
    """A threshold given once (float or {class: float}) or once per member (a sequence)."""
    if isinstance(value, (Mapping, float, int, np.floating, np.integer)):
        return [value] * n_members
    values = list(value)
    if len(values) != n_members:
        raise ValueError(f"{name} needs one entry per member ({n_members}), got {len(values)}")
    return values


# --------------------------------------------------------------------------------------------
# voxel scale
# --------------------------------------------------------------------------------------------

def _voxel_measures_block(p: np.ndarray, want: frozenset[str], eps: float) -> dict[str, np.ndarray]:
    """Voxel measures of a block of probabilities ``p`` (M, C, n) -> {name: float64 (n,)}."""
    p = p.astype(np.float64, copy=False)
    n_members = p.shape[0]
    pbar = p.mean(axis=0)  # (C, n)
    out: dict[str, np.ndarray] = {}
    if "NC" in want:
        out["NC"] = -pbar.max(axis=0)
    if not want - {"NC"}:
        return out
    eoe = -(pbar * np.log(pbar + eps)).sum(axis=0)
    logp = np.log(p + eps)  # (M, C, n)
    exe = -(p * logp).sum(axis=1).mean(axis=0)
    mi = eoe - exe
    epkl = -(pbar * logp.mean(axis=0)).sum(axis=0) - exe
    rmi = epkl - mi
    # MI, EPKL and RMI are >= 0 exactly (Jensen with the concave -p ln(p + eps) and ln(p + eps);
    # EPKL is a covariance of p_m and ln(p_m + eps)). Where all members agree exactly they are 0,
    # but the float mean of M equal numbers can differ from them by one ulp, leaving +-1e-17:
    # set those voxels to exactly 0 and clip the remaining rounding negatives at 0, so that
    # logsum sees a true 0 (-> -inf, documented) instead of ln of a negative number (NaN).
    if n_members == 1:
        agree = np.ones(p.shape[2], dtype=bool)
    else:
        agree = (p.max(axis=0) == p.min(axis=0)).all(axis=0)
    for arr in (mi, epkl, rmi):
        arr[agree] = 0.0
        np.maximum(arr, 0.0, out=arr)
    for name, arr in (("EoE", eoe), ("ExE", exe), ("MI", mi), ("EPKL", epkl), ("RMI", rmi)):
        if name in want:
            out[name] = arr
    return out


def _check_measures(measures) -> tuple[str, ...]:
    if measures is None:
        return VOXEL_MEASURES
    measures = tuple(measures)
    unknown = [m for m in measures if m not in VOXEL_MEASURES]
    if unknown:
        raise ValueError(f"unknown voxel measures {unknown}; choose from {VOXEL_MEASURES}")
    return measures


def voxel_uncertainty(
    member_probs: np.ndarray,
    measures: Sequence[str] | None = None,
    eps: float = EPS_VOXEL,
    dtype=np.float32,
) -> dict[str, np.ndarray]:
    """Voxel-scale uncertainty maps of a deep ensemble (§2.3).

    With ``p̄_c = mean_m p_m,c`` and sums over all C classes:
    ``NC = -max_c p̄_c``; ``EoE = -Σ_c p̄_c ln(p̄_c + ε)``;
    ``ExE = mean_m[-Σ_c p_m,c ln(p_m,c + ε)]``; ``MI = EoE - ExE``;
    ``EPKL = -Σ_c p̄_c mean_m ln(p_m,c + ε) - ExE``; ``RMI = EPKL - MI``.
    MI, EPKL and RMI are exactly 0 where all members agree and are clipped at 0 (they are
    non-negative by Jensen's inequality; negatives can only be rounding).

    Parameters
    ----------
    member_probs : ndarray of float, shape (M, C, X, Y, Z)
        Softmax probabilities of every member, classes incl. background at 0, in [0, 1].
    measures : sequence of str, optional
        Subset of :data:`VOXEL_MEASURES` (default: all, in that order).
    eps : float
        ε inside the logarithms (1e-10 as in MS_WML_uncs).
    dtype : numpy dtype
        Dtype of the returned maps; computation is float64 in blocks of ~2.6e5 voxels, so
        the extra memory is the output maps plus a few tens of MB.

    Returns
    -------
    dict of str -> ndarray, shape (X, Y, Z)
        One map per measure, unitless (nats for the entropies / informations).
    """
    p = check_member_probs(member_probs)
    names = _check_measures(measures)
    want = frozenset(names)
    n_members, n_classes, nx, ny, nz = p.shape
    out = {name: np.empty((nx, ny, nz), dtype=dtype) for name in names}
    step = max(1, _BLOCK_VOXELS // max(1, ny * nz))
    for x0 in range(0, nx, step):
        x1 = min(nx, x0 + step)
        block = p[:, :, x0:x1].reshape(n_members, n_classes, -1)
        values = _voxel_measures_block(block, want, eps)
        for name in names:
            out[name][x0:x1] = values[name].reshape(x1 - x0, ny, nz)
    return out


# --------------------------------------------------------------------------------------------
# member segmentations and matching
# --------------------------------------------------------------------------------------------

def ensemble_segmentation(
    member_probs: np.ndarray,
    threshold: float | Mapping[int, float],
    min_size: int,
    connectivity: int,
    lesion_labels: Sequence[int] | None = None,
) -> LesionSegmentation:
    """Segment the ensemble mean probability ``p̄`` with :func:`postprocess.segment_lesions`.

    Parameters
    ----------
    member_probs : ndarray, shape (M, C, X, Y, Z)
    threshold : float or dict {class index: float}
        Rule ``p̄ >= threshold``.
    min_size : int
        Smallest lesion kept, in voxels (reference ``l_min`` + 1).
    connectivity : {6, 18, 26}
    lesion_labels : sequence of int, optional
        Lesion classes (default ``1..C-1``).

    Returns
    -------
    LesionSegmentation
    """
    p = check_member_probs(member_probs)
    labels = _lesion_labels(p, lesion_labels)
    pbar = p.mean(axis=0, dtype=np.float64)  # float64: no float32 rounding across the threshold
    return segment_lesions(pbar, labels, threshold, min_size=min_size, connectivity=connectivity)


def member_segmentations(
    member_probs: np.ndarray,
    threshold,
    min_size: int,
    connectivity: int,
    lesion_labels: Sequence[int] | None = None,
) -> list[LesionSegmentation]:
    """Segment every member exactly like the ensemble (same helper, size and connectivity).

    Parameters
    ----------
    member_probs : ndarray, shape (M, C, X, Y, Z)
    threshold : float, dict {class: float}, or a sequence of M of those
        One threshold for all members (the ensemble's: LSU, PSU) or one per member (the
        members' own tuned thresholds: LSU+, PSU+).
    min_size, connectivity, lesion_labels
        As in :func:`ensemble_segmentation`.

    Returns
    -------
    list of LesionSegmentation, length M
    """
    p = check_member_probs(member_probs)
    labels = _lesion_labels(p, lesion_labels)
    thresholds = _per_member(threshold, p.shape[0], "threshold")
    return [
        segment_lesions(p[m], labels, thresholds[m], min_size=min_size, connectivity=connectivity)
        for m in range(p.shape[0])
    ]


@dataclass
class _EnsembleLesions:
    """Voxels of the ensemble lesions, gathered once (everything lesion-wise works on them)."""

    n: int
    idx: np.ndarray  # (V,) flat C-order indices of lesion voxels
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    lab: np.ndarray  # (V,) lesion label 1..n of each voxel
    cls: np.ndarray  # (V,) class of each voxel's lesion
    size: np.ndarray  # (n + 1,) voxels per label (index 0 unused)
    label_class: np.ndarray  # (n + 1,) class per label (index 0 = 0)


def _gather_ensemble(seg: LesionSegmentation) -> _EnsembleLesions:
    inst = np.asarray(seg.instances)
    n = int(seg.n_lesions)
    idx = np.flatnonzero(inst)
    lab = inst.reshape(-1)[idx].astype(np.int64)
    if lab.size and (lab.max() > n or lab.min() < 1):
        raise ValueError("seg.instances holds labels outside 1..n_lesions")
    label_class = np.zeros(n + 1, dtype=np.int64)
    label_class[1:] = np.asarray(seg.instance_class, dtype=np.int64)
    size = np.bincount(lab, minlength=n + 1)
    coords = np.unravel_index(idx, inst.shape)
    return _EnsembleLesions(n, idx, coords, lab, label_class[lab], size, label_class)


@dataclass
class _MemberLesions:
    n: int
    idx: np.ndarray  # (V_m,) flat indices of the member's lesion voxels
    lab: np.ndarray  # (V_m,) member label of each
    size: np.ndarray  # (n + 1,)
    label_class: np.ndarray  # (n + 1,)
    instances: np.ndarray  # flat view of the label map


def _gather_member(seg: LesionSegmentation) -> _MemberLesions:
    inst = np.asarray(seg.instances).reshape(-1)
    n = int(seg.n_lesions)
    idx = np.flatnonzero(inst)
    lab = inst[idx].astype(np.int64)
    label_class = np.zeros(n + 1, dtype=np.int64)
    label_class[1:] = np.asarray(seg.instance_class, dtype=np.int64)
    return _MemberLesions(n, idx, lab, np.bincount(lab, minlength=n + 1), label_class, inst)


@dataclass
class _Match:
    """Ensemble lesions (rows 1..n) against one member's lesions of the same class."""

    best: np.ndarray  # (n + 1,) member label with the largest IoU, 0 = none
    best_iou: np.ndarray  # (n + 1,)
    iou_adj: np.ndarray  # (n + 1,)
    iou_fast: np.ndarray  # (n + 1,)



def _match_member(ens: _EnsembleLesions, mem: _MemberLesions) -> _Match:
    n = ens.n
    f_at = mem.instances[ens.idx].astype(np.int64)  # member label at each ensemble lesion voxel
    same = (f_at > 0) & (mem.label_class[f_at] == ens.cls)  # a lesion of class c matches class c only
    pe, pf, inter = label_pair_counts(ens.lab[same], f_at[same], mem.n)
    inter = inter.astype(np.float64)
    iou = inter / (ens.size[pe] + mem.size[pf] - inter)

    best = np.zeros(n + 1, dtype=np.int64)
    best_iou = np.zeros(n + 1)
    if pe.size:
        # largest IoU per ensemble lesion; ties -> smallest member label (the reference loops over
        # np.unique labels and replaces only on a strictly larger IoU)
        order = np.lexsort((pf, -iou, pe))
        first = order[np.r_[True, pe[order][1:] != pe[order][:-1]]]
        best[pe[first]] = pf[first]
        best_iou[pe[first]] = iou[first]

    # IoU_adj(L) with K' = member lesions meeting L, Q = other ensemble voxels of the class:
    # |L ∩ K'| / |L ∪ (K' \ Q)| = Σ I(L,l) / (|L| + Σ_l (|l| - |l ∩ Ŷ|)), because L ∩ Q = ∅.
    inter_tot = np.bincount(pe, weights=inter, minlength=n + 1)
    l_in_pred = np.bincount(pf, weights=inter, minlength=mem.n + 1)  # |l ∩ Ŷ_c|
    den_adj = ens.size + np.bincount(pe, weights=mem.size[pf] - l_in_pred[pf], minlength=n + 1)
    iou_adj = np.zeros(n + 1)
    hit = inter_tot > 0
    iou_adj[hit] = inter_tot[hit] / den_adj[hit]

    # IoU against the whole member mask of the lesion's class (ddu_fast)
    class_vox = np.bincount(mem.label_class, weights=mem.size, minlength=int(ens.label_class.max(initial=0)) + 1)
    den_fast = ens.size + class_vox[ens.label_class] - inter_tot
    iou_fast = np.zeros(n + 1)
    ok = den_fast > 0
    iou_fast[ok] = inter_tot[ok] / den_fast[ok]
    return _Match(best, best_iou, iou_adj, iou_fast)


def _gather_probs(member_probs: np.ndarray, cls: np.ndarray, coords) -> np.ndarray:
    """``p_m[cls_v](v)`` for listed voxels -> float64 (M, V); advanced indexing, any memory layout."""
    return member_probs[:, cls, coords[0], coords[1], coords[2]].astype(np.float64)


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(k)`` for every k in ``lengths``."""
    total = int(lengths.sum())
    return np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _matched_voxel_keys(best: np.ndarray, mem: _MemberLesions, n_vox: int) -> np.ndarray:
    """Keys ``label * n_vox + voxel`` of the voxels of each ensemble lesion's matched member lesion.

    A member lesion can be the best match of several ensemble lesions; its voxels are then
    listed once per ensemble lesion. Size = Σ_L |L_m| (a few times the lesion volume).
    """
    e_ids = np.flatnonzero(best)
    if e_ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    f_ids = best[e_ids]
    order = np.argsort(f_ids, kind="stable")
    e_sorted = e_ids[order]
    count = np.bincount(f_ids, minlength=mem.n + 1)
    start = np.cumsum(count) - count
    reps = count[mem.lab]
    keep = reps > 0
    vox, lab, reps = mem.idx[keep], mem.lab[keep], reps[keep]
    e_rep = e_sorted[np.repeat(start[lab], reps) + _ragged_arange(reps)]
    return e_rep.astype(np.int64) * n_vox + np.repeat(vox, reps)


# --------------------------------------------------------------------------------------------
# lesion scale
# --------------------------------------------------------------------------------------------

def lesion_uncertainty(
    member_probs: np.ndarray,
    seg: LesionSegmentation,
    threshold: float | Mapping[int, float],
    min_size: int,
    connectivity: int,
    *,
    lesion_labels: Sequence[int] | None = None,
    member_thresholds: Sequence | None = None,
    voxel_maps: Mapping[str, np.ndarray] | None = None,
    member_segs: Sequence[LesionSegmentation] | None = None,
    member_segs_plus: Sequence[LesionSegmentation] | None = None,
    eps_voxel: float = EPS_VOXEL,
    eps_struct: float = EPS_STRUCT,
) -> pd.DataFrame:
    """Uncertainty of every predicted lesion (§2.4, §3.4), one row per lesion in label order.

    For ensemble lesion ``L`` of class ``c`` and member ``m`` with lesion map ``seg_m`` (built with
    the ensemble's threshold, ``min_size`` and connectivity), ``L_m`` is the member-m lesion of
    class ``c`` that intersects ``L`` with the largest IoU (ties: smallest member label; empty if
    none). Then, with ``p = p[c]``:

    * ``LSU`` (= ``ddu``) ``= 1 - mean_m IoU(L, L_m)`` (IoU 0 when ``L_m`` is empty);
    * ``LSU+``: the same with the members' own thresholds (only when ``member_thresholds``);
    * ``ddu_adj = 1 - mean_m IoU_adj(L)`` against member m's lesions, ``Q`` = the other
      ensemble voxels of class ``c`` (§1.6 formula);
    * ``ddu_fast = 1 - mean_m IoU(L, seg_m[c])`` (the whole member mask of class c);
    * ``srmi = mean_L ln(p̄ + ε) - mean_{m, L} ln(p_m + ε)``;
    * ``smi = -(1/M) Σ_m mean_{L_m} [ln(p̄ + ε) - ln(p_m + ε)]`` (0 for members with empty ``L_m``);
    * ``seoe = -P ln P`` with ``P = Π_m mean_L p_m`` (no ε: **NaN when P = 0**, as the reference);
    * ``vvc = std_m |L_m| / mean_m |L_m|`` (population std; **NaN when every L_m is empty**);
    * ``avg_pwdice`` = mean DSC(L_i, L_j) over member pairs (DSC of two empty masks = 1);
    * ``global_iou = |∩_m L_m| / |∪_m L_m|`` (0 if some L_m is empty; **NaN if all are**);
    * ``mean_<u>`` = mean of voxel measure u over L, ``logsum_<u> = Σ_L ln u`` (**-inf** when u = 0
      somewhere in L, e.g. MI where all members agree); no ``logsum_NC`` (NC < 0: always NaN).

    Parameters
    ----------
    member_probs : ndarray of float, shape (M, C, X, Y, Z)
    seg : LesionSegmentation
        The ensemble lesions (normally :func:`ensemble_segmentation` with the same parameters).
    threshold : float or dict {class: float}
        Ensemble threshold, applied to the members for LSU and the matched lesions.
    min_size : int
        Smallest lesion kept, in voxels.
    connectivity : {6, 18, 26}
    lesion_labels : sequence of int, optional
        Lesion classes (default ``1..C-1``).
    member_thresholds : sequence of M floats or dicts, optional
        Members' own thresholds; adds the ``LSU+`` column.
    voxel_maps : dict of str -> ndarray (X, Y, Z), optional
        Output of :func:`voxel_uncertainty`; when absent the voxel measures are computed at
        the lesion voxels only (same formulas, float64).
    member_segs, member_segs_plus : list of LesionSegmentation, optional
        Precomputed :func:`member_segmentations` (ensemble / own thresholds), to share work
        with :func:`patient_uncertainty`.
    eps_voxel, eps_struct : float
        ε of the voxel measures (1e-10) and of the structural logarithms (1e-5).

    Returns
    -------
    pandas.DataFrame
        Columns ``label``, ``class``, ``n_members_matched`` (members with a non-empty ``L_m``),
        then the structural measures of :data:`STRUCTURAL_MEASURES` (``LSU+`` only with
        ``member_thresholds``), then ``mean_<u>`` and ``logsum_<u>``. float64; zero rows when
        there is no lesion.
    """
    p = check_member_probs(member_probs)
    connectivity = check_connectivity(connectivity)
    labels = _lesion_labels(p, lesion_labels)
    n_members = p.shape[0]
    if tuple(seg.instances.shape) != tuple(p.shape[2:]):
        raise ValueError(f"segmentation shape {seg.instances.shape} != probability grid {p.shape[2:]}")
    if member_segs is None:
        member_segs = member_segmentations(p, threshold, min_size, connectivity, labels)
    if member_thresholds is not None and member_segs_plus is None:
        member_segs_plus = member_segmentations(p, member_thresholds, min_size, connectivity, labels)
    if len(member_segs) != n_members or (member_segs_plus is not None and len(member_segs_plus) != n_members):
        raise ValueError("member_segs must hold one segmentation per member")

    ens = _gather_ensemble(seg)
    n = ens.n
    n_vox = int(np.prod(p.shape[2:]))
    size = ens.size.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_size = np.where(ens.size > 0, 1.0 / size, np.nan)
    columns: dict[str, np.ndarray] = {
        "label": np.arange(1, n + 1, dtype=np.int64),
        "class": ens.label_class[1:].copy(),
    }

    members = [_gather_member(s) for s in member_segs]
    matches = [_match_member(ens, mem) for mem in members]
    best = np.stack([mt.best for mt in matches])  # (M, n + 1)
    matched_size = np.stack([mem.size[mt.best] * (mt.best > 0) for mem, mt in zip(members, matches)]).astype(np.float64)
    columns["n_members_matched"] = (best[:, 1:] > 0).sum(axis=0)

    columns["LSU"] = 1.0 - np.mean([mt.best_iou for mt in matches], axis=0)[1:]
    if member_segs_plus is not None:
        plus = [_match_member(ens, _gather_member(s)) for s in member_segs_plus]
        columns["LSU+"] = 1.0 - np.mean([mt.best_iou for mt in plus], axis=0)[1:]
    columns["ddu_adj"] = 1.0 - np.mean([mt.iou_adj for mt in matches], axis=0)[1:]
    columns["ddu_fast"] = 1.0 - np.mean([mt.iou_fast for mt in matches], axis=0)[1:]

    # --- probability-based structural measures on the ensemble lesion voxels
    pe = _gather_probs(p, ens.cls, ens.coords)  # (M, V)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mean = np.log(pe.mean(axis=0) + eps_struct)
        mean_log = np.log(pe + eps_struct).mean(axis=0)
        columns["srmi"] = (np.bincount(ens.lab, weights=log_mean - mean_log, minlength=n + 1) * inv_size)[1:]
        member_mean = np.stack([np.bincount(ens.lab, weights=pe[m], minlength=n + 1)
                                for m in range(n_members)]) * inv_size
        prod = member_mean.prod(axis=0)
        columns["seoe"] = (-prod * np.log(prod))[1:]  # NaN when prod == 0 (0 * -inf), as the reference

    # --- smi on the matched member lesions
    smi = np.zeros(n + 1)
    for m, (mem, mt) in enumerate(zip(members, matches)):
        if mem.idx.size == 0 or not np.any(mt.best):
            continue
        coords = np.unravel_index(mem.idx, p.shape[2:])
        pm_all = _gather_probs(p, mem.label_class[mem.lab], coords)  # (M, V_m)
        diff = np.log(pm_all.mean(axis=0) + eps_struct) - np.log(pm_all[m] + eps_struct)
        per_lesion = np.bincount(mem.lab, weights=diff, minlength=mem.n + 1)
        has = mt.best > 0
        smi[has] += per_lesion[mt.best[has]] / mem.size[mt.best[has]]
    columns["smi"] = -(smi / n_members)[1:]

    # --- Roy et al. measures on the matched member lesions {L_m}
    with np.errstate(divide="ignore", invalid="ignore"):
        columns["vvc"] = (matched_size.std(axis=0) / matched_size.mean(axis=0))[1:]  # NaN if all empty
    if n_members > 1:
        dsc_sum = np.zeros(n + 1)
        n_pairs = 0
        for i in range(n_members):
            for j in range(i):
                inter = _matched_pair_intersection(members[i], members[j], best[i], best[j])
                denom = matched_size[i] + matched_size[j]
                with np.errstate(divide="ignore", invalid="ignore"):
                    dsc_sum += np.where(denom > 0, 2.0 * inter / denom, 1.0)  # DSC(∅, ∅) = 1
                n_pairs += 1
        columns["avg_pwdice"] = (dsc_sum / n_pairs)[1:]
    else:
        columns["avg_pwdice"] = np.full(n, np.nan)  # no pair exists: documented
    keys = np.concatenate([_matched_voxel_keys(best[m], members[m], n_vox) for m in range(n_members)])
    uniq, cover = np.unique(keys, return_counts=True)
    owner = uniq // n_vox
    union = np.bincount(owner, minlength=n + 1).astype(np.float64)
    inter_all = np.bincount(owner[cover == n_members], minlength=n + 1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        columns["global_iou"] = (inter_all / union)[1:]  # NaN when no member matched

    # --- aggregates of the voxel measures
    if voxel_maps is None:
        at_lesions = p[:, :, ens.coords[0], ens.coords[1], ens.coords[2]]  # (M, C, V)
        vox = _voxel_measures_block(at_lesions, frozenset(VOXEL_MEASURES), eps_voxel)
    else:
        vox = {}
        for name in VOXEL_MEASURES:
            if name not in voxel_maps:
                raise ValueError(f"voxel_maps lacks {name!r}")
            vox[name] = np.asarray(voxel_maps[name])[ens.coords].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in VOXEL_MEASURES:
            columns[f"mean_{name}"] = (np.bincount(ens.lab, weights=vox[name], minlength=n + 1) * inv_size)[1:]
        for name in VOXEL_MEASURES:
            if name in LOGSUM_SKIPPED:
                continue
            columns[f"logsum_{name}"] = np.bincount(ens.lab, weights=np.log(vox[name]), minlength=n + 1)[1:]

    order = ["label", "class", "n_members_matched"] + [m for m in STRUCTURAL_MEASURES if m in columns]
    order += [f"mean_{u}" for u in VOXEL_MEASURES] + [f"logsum_{u}" for u in VOXEL_MEASURES if u not in LOGSUM_SKIPPED]
    return pd.DataFrame({k: columns[k] for k in order})


def _matched_pair_intersection(
    mi: _MemberLesions, mj: _MemberLesions, best_i: np.ndarray, best_j: np.ndarray
) -> np.ndarray:
    """|L_i ∩ L_j| per ensemble lesion, from the joint histogram of member i and j labels."""
    out = np.zeros(best_i.shape[0])
    both = (best_i > 0) & (best_j > 0)
    if not np.any(both) or mi.idx.size == 0:
        return out
    lab_j = mj.instances[mi.idx].astype(np.int64)
    keep = lab_j > 0
    a, b, counts = label_pair_counts(mi.lab[keep], lab_j[keep], mj.n)
    if counts.size == 0:
        return out
    keys = a * (mj.n + 1) + b  # sorted, as _pair_counts returns them
    query = best_i[both] * (mj.n + 1) + best_j[both]
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    found = keys[pos] == query
    vals = np.where(found, counts[pos], 0).astype(np.float64)
    out[both] = vals
    return out


# --------------------------------------------------------------------------------------------
# patient scale
# --------------------------------------------------------------------------------------------

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
    """Patient-scale uncertainty (§2.5).

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
    labels = _lesion_labels(p, lesion_labels)
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


# --------------------------------------------------------------------------------------------
# geometry, painting, all stages at once
# --------------------------------------------------------------------------------------------

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
    labels = _lesion_labels(p, lesion_labels)
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
