"""Voxel overlap metrics against a reference (arXiv:2507.12092; nDSC: arXiv:2302.05432): DSC,
normalised DSC (nDSC) and voxel TPR / FPR / FDR. Pure numpy, no file I/O.

nDSC as in Molchanova et al., arXiv:2311.08931 (MS_WML_uncs, Shifts); ``docs/uncertainty.md``
lists the conventions (zero denominators). Masks are ``(X, Y, Z)`` or ``(X, Y)`` (one slice);
an optional mask restricts the voxels considered. All functions are pure.
"""

from __future__ import annotations

import numpy as np

from bids_app.core.metrics._checks import binary, same_shape, select

#: default reference lesion load of nDSC (WML, Shifts)
DEFAULT_NDSC_R = 0.001


def _confusion(pred, ref, mask) -> tuple[int, int, int, int]:
    p = binary(pred, "pred")
    g = binary(ref, "ref")
    m = None if mask is None else binary(mask, "mask")
    same_shape((p, "pred"), (g, "ref"), (m, "mask"))
    ps, gs = select(p, m), select(g, m)
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
    """Normalised DSC (arXiv:2302.05432): ``2TP / (2TP + FN + k FP)``, ``k = (1 - r)|Y| / (r (N - |Y|))``.

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
