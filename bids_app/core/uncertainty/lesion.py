"""Lesion-scale uncertainty of a deep ensemble: :func:`lesion_uncertainty` (pure numpy).

One row per ensemble lesion: the structural measures of :data:`STRUCTURAL_MEASURES` (LSU, LSU+,
ddu_adj, ddu_fast, srmi, smi, seoe, vvc, avg_pwdice, global_iou; ε = 1e-5) and the mean and
``logsum`` of every voxel measure over the lesion. A lesion of class ``c`` uses ``p_m[c]`` and the
member lesions of class ``c`` (:mod:`bids_app.core.uncertainty.matching`); everything is a
label-indexed reduction (``np.bincount`` over the lesion voxels).

Definitions follow Molchanova et al., arXiv:2311.08931 (MS_WML_uncs) and arXiv:2407.05761
(interpret-lesion-unc); ``docs/uncertainty.md`` lists every convention and every NaN / -inf case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from bids_app.core.postprocess import LesionSegmentation, check_connectivity
from bids_app.core.uncertainty.matching import (
    gather_ensemble,
    gather_member,
    gather_probs,
    match_member,
    matched_pair_intersection,
    matched_voxel_keys,
    member_segmentations,
)
from bids_app.core.uncertainty.voxel import (
    EPS_VOXEL,
    VOXEL_MEASURES,
    check_lesion_labels,
    check_member_probs,
    voxel_measures_block,
)

#: structural lesion measures, in output order (arXiv:2311.08931, arXiv:2407.05761); "LSU" is ``ddu`` of the CL repo
STRUCTURAL_MEASURES: tuple[str, ...] = (
    "LSU", "LSU+", "ddu_adj", "ddu_fast", "srmi", "smi", "seoe", "vvc", "avg_pwdice", "global_iou",
)
#: voxel measures whose lesion ``logsum`` is not reported: NC < 0 everywhere, so ln(NC) is NaN
#: for every lesion (the reference code returns that NaN); see docs/uncertainty.md
LOGSUM_SKIPPED: tuple[str, ...] = ("NC",)
#: ε inside the structural-measure logarithms (interpret-lesion-unc ``les_measures``)
EPS_STRUCT = 1e-5


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
    """Uncertainty of every predicted lesion (arXiv:2311.08931, arXiv:2407.05761), one row per lesion in label order.

    For ensemble lesion ``L`` of class ``c`` and member ``m`` with lesion map ``seg_m`` (built with
    the ensemble's threshold, ``min_size`` and connectivity), ``L_m`` is the member-m lesion of
    class ``c`` that intersects ``L`` with the largest IoU (ties: smallest member label; empty if
    none). Then, with ``p = p[c]``:

    * ``LSU`` (= ``ddu``) ``= 1 - mean_m IoU(L, L_m)`` (IoU 0 when ``L_m`` is empty);
    * ``LSU+``: the same with the members' own thresholds (only when ``member_thresholds``);
    * ``ddu_adj = 1 - mean_m IoU_adj(L)`` against member m's lesions, ``Q`` = the other
      ensemble voxels of class ``c`` (the formula of arXiv:2507.12092);
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
    labels = check_lesion_labels(p, lesion_labels)
    n_members = p.shape[0]
    if tuple(seg.instances.shape) != tuple(p.shape[2:]):
        raise ValueError(f"segmentation shape {seg.instances.shape} != probability grid {p.shape[2:]}")
    if member_segs is None:
        member_segs = member_segmentations(p, threshold, min_size, connectivity, labels)
    if member_thresholds is not None and member_segs_plus is None:
        member_segs_plus = member_segmentations(p, member_thresholds, min_size, connectivity, labels)
    if len(member_segs) != n_members or (member_segs_plus is not None and len(member_segs_plus) != n_members):
        raise ValueError("member_segs must hold one segmentation per member")

    ens = gather_ensemble(seg)
    n = ens.n
    n_vox = int(np.prod(p.shape[2:]))
    size = ens.size.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_size = np.where(ens.size > 0, 1.0 / size, np.nan)
    columns: dict[str, np.ndarray] = {
        "label": np.arange(1, n + 1, dtype=np.int64),
        "class": ens.label_class[1:].copy(),
    }

    members = [gather_member(s) for s in member_segs]
    matches = [match_member(ens, mem) for mem in members]
    best = np.stack([mt.best for mt in matches])  # (M, n + 1)
    matched_size = np.stack([mem.size[mt.best] * (mt.best > 0) for mem, mt in zip(members, matches)]).astype(np.float64)
    columns["n_members_matched"] = (best[:, 1:] > 0).sum(axis=0)

    columns["LSU"] = 1.0 - np.mean([mt.best_iou for mt in matches], axis=0)[1:]
    if member_segs_plus is not None:
        plus = [match_member(ens, gather_member(s)) for s in member_segs_plus]
        columns["LSU+"] = 1.0 - np.mean([mt.best_iou for mt in plus], axis=0)[1:]
    columns["ddu_adj"] = 1.0 - np.mean([mt.iou_adj for mt in matches], axis=0)[1:]
    columns["ddu_fast"] = 1.0 - np.mean([mt.iou_fast for mt in matches], axis=0)[1:]

    # --- probability-based structural measures on the ensemble lesion voxels
    pe = gather_probs(p, ens.cls, ens.coords)  # (M, V)
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
        pm_all = gather_probs(p, mem.label_class[mem.lab], coords)  # (M, V_m)
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
                inter = matched_pair_intersection(members[i], members[j], best[i], best[j])
                denom = matched_size[i] + matched_size[j]
                with np.errstate(divide="ignore", invalid="ignore"):
                    dsc_sum += np.where(denom > 0, 2.0 * inter / denom, 1.0)  # DSC(∅, ∅) = 1
                n_pairs += 1
        columns["avg_pwdice"] = (dsc_sum / n_pairs)[1:]
    else:
        columns["avg_pwdice"] = np.full(n, np.nan)  # no pair exists: documented
    keys = np.concatenate([matched_voxel_keys(best[m], members[m], n_vox) for m in range(n_members)])
    uniq, cover = np.unique(keys, return_counts=True)
    owner = uniq // n_vox
    union = np.bincount(owner, minlength=n + 1).astype(np.float64)
    inter_all = np.bincount(owner[cover == n_members], minlength=n + 1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        columns["global_iou"] = (inter_all / union)[1:]  # NaN when no member matched

    # --- aggregates of the voxel measures
    if voxel_maps is None:
        at_lesions = p[:, :, ens.coords[0], ens.coords[1], ens.coords[2]]  # (M, C, V)
        vox = voxel_measures_block(at_lesions, frozenset(VOXEL_MEASURES), eps_voxel)
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
