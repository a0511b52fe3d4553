"""Member segmentations and the matching of member lesions to ensemble lesions (pure numpy).

* :func:`ensemble_segmentation` segments the ensemble mean ``p̄`` and :func:`member_segmentations`
  every member with :func:`bids_app.core.postprocess.segment_lesions` (the ensemble's threshold,
  minimum size and connectivity, or the members' own thresholds for the ``+`` variants);
* :func:`gather_ensemble` / :func:`gather_member` collect the lesion voxels once;
  :func:`match_member` matches each ensemble lesion of class ``c`` with the member lesion of class
  ``c`` of largest IoU (and IoU_adj, IoU_fast), from joint histograms of (ensemble label, member
  label) pairs; :func:`matched_voxel_keys` and :func:`matched_pair_intersection` give the voxels and
  pairwise overlaps of the matched member lesions. No loop touches the whole volume once per lesion.

Definitions follow Molchanova et al., arXiv:2311.08931 (MS_WML_uncs) and arXiv:2407.05761
(interpret-lesion-unc); ``docs/uncertainty.md`` lists the conventions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bids_app.core.postprocess import LesionSegmentation, label_pair_counts, segment_lesions
from bids_app.core.uncertainty.voxel import check_lesion_labels, check_member_probs


def _per_member(value, n_members: int, name: str) -> list:
    """A threshold given once (float or {class: float}) or once per member (a sequence)."""
    if isinstance(value, (Mapping, float, int, np.floating, np.integer)):
        return [value] * n_members
    values = list(value)
    if len(values) != n_members:
        raise ValueError(f"{name} needs one entry per member ({n_members}), got {len(values)}")
    return values


#: how the members' outputs are averaged into the ensemble's probability map (docs/uncertainty.md)
ENSEMBLE_MEANS = ("probabilities", "logits")
DEFAULT_ENSEMBLE_MEAN = "probabilities"
#: a softmax probability that underflowed to 0 is read as the smallest normal float32
_PROBABILITY_FLOOR = float(np.finfo(np.float32).tiny)


def ensemble_mean(member_probs: np.ndarray, mean: str = "probabilities") -> np.ndarray:
    """The ensemble's probability map ``p̄``.

    ``probabilities``: the mean of the members' softmax probabilities, the deep-ensemble
    convention on which the uncertainty measures are defined (Lakshminarayanan et al., NeurIPS
    2017; arXiv:2311.08931). ``logits``: the softmax of the members' mean logits, what nnU-Net's
    ensembling computes (``nnUNetPredictor`` averages the members' logits, then applies the softmax;
    Isensee et al., Nat. Methods 2021). msxplain keeps probabilities, not logits, but
    ``log p_m = z_m - logsumexp(z_m)`` differs from the logits by one value per voxel and member, which
    the softmax removes: ``softmax(mean_m log p_m) = softmax(mean_m z_m)``; and since nnU-Net's
    resampling to the input grid is linear, averaging after it gives the same map as before it.
    A probability that underflowed to 0 is floored at the smallest normal float32 (log ≈ -87.3).

    Parameters
    ----------
    member_probs : ndarray, shape (M, C, X, Y, Z)
        Softmax probabilities of each member (classes including background).
    mean : {"probabilities", "logits"}

    Returns
    -------
    ndarray of float64, shape (C, X, Y, Z)
        Sums to 1 over the classes.
    """
    p = check_member_probs(member_probs)
    if mean == "probabilities":
        return p.mean(axis=0, dtype=np.float64)  # float64: no float32 rounding across the threshold
    if mean != "logits":
        raise ValueError(f"mean must be one of {ENSEMBLE_MEANS}, not {mean!r}")
    log_mean = np.zeros(p.shape[1:], dtype=np.float64)
    for member in p:  # one member at a time: (C, X, Y, Z) float64 at most twice
        log_mean += np.log(np.maximum(np.asarray(member, dtype=np.float64), _PROBABILITY_FLOOR))
    log_mean /= p.shape[0]
    log_mean -= log_mean.max(axis=0, keepdims=True)
    np.exp(log_mean, out=log_mean)
    log_mean /= log_mean.sum(axis=0, keepdims=True)
    return log_mean


def ensemble_segmentation(
    member_probs: np.ndarray,
    threshold: float | Mapping[int, float],
    min_size: int,
    connectivity: int,
    lesion_labels: Sequence[int] | None = None,
    mean: str = "probabilities",
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
    mean : {"probabilities", "logits"}
        How ``p̄`` is computed (:func:`ensemble_mean`).

    Returns
    -------
    LesionSegmentation
    """
    p = check_member_probs(member_probs)
    labels = check_lesion_labels(p, lesion_labels)
    return segment_lesions(ensemble_mean(p, mean), labels, threshold, min_size=min_size, connectivity=connectivity)


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
    labels = check_lesion_labels(p, lesion_labels)
    thresholds = _per_member(threshold, p.shape[0], "threshold")
    return [
        segment_lesions(p[m], labels, thresholds[m], min_size=min_size, connectivity=connectivity)
        for m in range(p.shape[0])
    ]


@dataclass
class EnsembleLesions:
    """Voxels of the ensemble lesions, gathered once (everything lesion-wise works on them)."""

    n: int
    idx: np.ndarray  # (V,) flat C-order indices of lesion voxels
    coords: tuple[np.ndarray, np.ndarray, np.ndarray]
    lab: np.ndarray  # (V,) lesion label 1..n of each voxel
    cls: np.ndarray  # (V,) class of each voxel's lesion
    size: np.ndarray  # (n + 1,) voxels per label (index 0 unused)
    label_class: np.ndarray  # (n + 1,) class per label (index 0 = 0)


def gather_ensemble(seg: LesionSegmentation) -> EnsembleLesions:
    """Voxels, labels, classes and sizes of the ensemble lesions of ``seg``."""
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
    return EnsembleLesions(n, idx, coords, lab, label_class[lab], size, label_class)


@dataclass
class MemberLesions:
    """Voxels of one member's lesions, gathered once."""

    n: int
    idx: np.ndarray  # (V_m,) flat indices of the member's lesion voxels
    lab: np.ndarray  # (V_m,) member label of each
    size: np.ndarray  # (n + 1,)
    label_class: np.ndarray  # (n + 1,)
    instances: np.ndarray  # flat view of the label map


def gather_member(seg: LesionSegmentation) -> MemberLesions:
    """Voxels, labels, sizes and classes of one member's lesions."""
    inst = np.asarray(seg.instances).reshape(-1)
    n = int(seg.n_lesions)
    idx = np.flatnonzero(inst)
    lab = inst[idx].astype(np.int64)
    label_class = np.zeros(n + 1, dtype=np.int64)
    label_class[1:] = np.asarray(seg.instance_class, dtype=np.int64)
    return MemberLesions(n, idx, lab, np.bincount(lab, minlength=n + 1), label_class, inst)


@dataclass
class Match:
    """Ensemble lesions (rows 1..n) against one member's lesions of the same class."""

    best: np.ndarray  # (n + 1,) member label with the largest IoU, 0 = none
    best_iou: np.ndarray  # (n + 1,)
    iou_adj: np.ndarray  # (n + 1,)
    iou_fast: np.ndarray  # (n + 1,)


def match_member(ens: EnsembleLesions, mem: MemberLesions) -> Match:
    """Match every ensemble lesion with the member's lesions of its class (best IoU, IoU_adj, IoU_fast)."""
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
    return Match(best, best_iou, iou_adj, iou_fast)


def gather_probs(member_probs: np.ndarray, cls: np.ndarray, coords) -> np.ndarray:
    """``p_m[cls_v](v)`` for listed voxels -> float64 (M, V); advanced indexing, any memory layout."""
    return member_probs[:, cls, coords[0], coords[1], coords[2]].astype(np.float64)


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(k)`` for every k in ``lengths``."""
    total = int(lengths.sum())
    return np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def matched_voxel_keys(best: np.ndarray, mem: MemberLesions, n_vox: int) -> np.ndarray:
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


def matched_pair_intersection(
    mi: MemberLesions, mj: MemberLesions, best_i: np.ndarray, best_j: np.ndarray
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
    keys = a * (mj.n + 1) + b  # sorted, as label_pair_counts returns them
    query = best_i[both] * (mj.n + 1) + best_j[both]
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    found = keys[pos] == query
    vals = np.where(found, counts[pos], 0).astype(np.float64)
    out[both] = vals
    return out
