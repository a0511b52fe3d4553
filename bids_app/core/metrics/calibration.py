"""Calibration of a lesion-probability map against the reference (arXiv:2507.12092): CE, ECE, MCE and Brier
score over uniform bins, as interpret-lesion-unc (arXiv:2407.05761). Pure numpy, no file I/O;
``docs/uncertainty.md`` lists the conventions.
"""

from __future__ import annotations

import numpy as np

from bids_app.core.metrics._checks import as_volume, binary, same_shape, select

#: number of uniform calibration bins (interpret-lesion-unc)
CALIBRATION_BINS = 30


def calibration(
    prob: np.ndarray, ref: np.ndarray, n_bins: int = CALIBRATION_BINS, mask: np.ndarray | None = None
) -> dict:
    """Calibration of a lesion-probability map against the reference (arXiv:2507.12092).

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
    p = as_volume(prob, "prob")
    g = binary(ref, "ref")
    m = None if mask is None else binary(mask, "mask")
    same_shape((p, "prob"), (g, "ref"), (m, "mask"))
    ps = select(p, m).astype(np.float64)
    ys = select(g, m).astype(np.float64)
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
