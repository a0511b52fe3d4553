"""Inputs and voxel-scale uncertainty of a deep ensemble (pure numpy, no file I/O).

* :func:`binary_member_probs` turns one lesion-probability map per member into the
  ``(M, C, X, Y, Z)`` layout; :func:`check_member_probs` and :func:`check_lesion_labels` validate
  the inputs of every stage;
* :func:`voxel_uncertainty`: the maps of :data:`VOXEL_MEASURES` (NC, EoE, ExE, MI, EPKL, RMI; ε =
  1e-10) over **all** C classes, in float64 blocks of :func:`voxel_measures_block`, which the lesion
  stage also applies to the lesion voxels alone.

Definitions follow Molchanova et al., arXiv:2311.08931 (MS_WML_uncs); ``docs/uncertainty.md`` lists
the conventions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: voxel measures, in output order (arXiv:2311.08931)
VOXEL_MEASURES: tuple[str, ...] = ("NC", "EoE", "ExE", "MI", "EPKL", "RMI")
#: ε inside the voxel-measure logarithms (MS_WML_uncs)
EPS_VOXEL = 1e-10

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


def check_lesion_labels(member_probs: np.ndarray, lesion_labels) -> list[int]:
    """Lesion classes of ``(M, C, X, Y, Z)`` probabilities: ``lesion_labels`` checked, or ``1..C-1`` if None."""
    n_classes = member_probs.shape[1]
    labels = list(range(1, n_classes)) if lesion_labels is None else [int(c) for c in lesion_labels]
    if not labels or any(c < 1 or c >= n_classes for c in labels):
        raise ValueError(f"lesion_labels must be class indices in 1..{n_classes - 1}, got {lesion_labels!r}")
    return labels


# --------------------------------------------------------------------------------------------
# voxel scale
# --------------------------------------------------------------------------------------------

def voxel_measures_block(p: np.ndarray, want: frozenset[str], eps: float) -> dict[str, np.ndarray]:
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
    """Voxel-scale uncertainty maps of a deep ensemble (arXiv:2311.08931).

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
        values = voxel_measures_block(block, want, eps)
        for name in names:
            out[name][x0:x1] = values[name].reshape(x1 - x0, ny, nz)
    return out
