"""Error retention curves (arXiv:2311.08931) at voxel, lesion and patient scale, with the lesion curves' ideal
and random baselines. Pure numpy, no file I/O.

Retention curves as in Molchanova et al., arXiv:2311.08931 (MS_WML_uncs, Shifts) and
arXiv:2407.05761 (interpret-lesion-unc); ``docs/uncertainty.md`` lists the conventions (AUC vs AAC,
tie-breaks). The curves use a **stable** sort: voxels (patients, lesions) with equal uncertainty
keep their input order (C-order flat index for voxels, row order for lesions and patients), and
both AUC and AAC = 1 - AUC are returned. All functions are pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bids_app.core.metrics._checks import as_volume, binary, same_shape, select
from bids_app.core.metrics.overlap import DEFAULT_NDSC_R

#: number of retained fractions of the retention curves (``linspace(0, 1, 400)``)
RC_POINTS = 400
#: lesion retention metrics
LESION_RC_METRICS: tuple[str, ...] = ("LF1", "LPPV")
#: voxel retention metrics
VOXEL_RC_METRICS: tuple[str, ...] = ("DSC", "nDSC")


@dataclass(frozen=True)
class RetentionCurve:
    """An error retention curve.

    Attributes
    ----------
    fracs : ndarray of float64, shape (K,)
        Retained fraction (x), increasing from 0 to 1.
    values : ndarray of float64, shape (K,)
        Metric at each retained fraction.
    auc : float
        Trapezoidal area under the curve (higher = better uncertainty).
    aac : float
        ``1 - auc`` (the "area above the curve" of MS_WML_uncs; lower = better).
    metric : str
    """

    fracs: np.ndarray
    values: np.ndarray
    auc: float
    aac: float
    metric: str

    @classmethod
    def from_values(cls, fracs: np.ndarray, values: np.ndarray, metric: str) -> RetentionCurve:
        auc = float(np.trapezoid(values, fracs))
        return cls(np.asarray(fracs, dtype=np.float64), np.asarray(values, dtype=np.float64), auc, 1.0 - auc, metric)


def _fracs(fracs) -> np.ndarray:
    f = np.linspace(0.0, 1.0, RC_POINTS) if fracs is None else np.asarray(fracs, dtype=np.float64)
    if f.ndim != 1 or f.size < 2 or np.any(np.diff(f) < 0) or f[0] < 0 or f[-1] > 1:
        raise ValueError("fracs must be an increasing 1-D array in [0, 1] with at least 2 points")
    return f


def voxel_retention_curve(
    pred: np.ndarray,
    ref: np.ndarray,
    uncertainty: np.ndarray,
    metrics: Sequence[str] = VOXEL_RC_METRICS,
    fracs: np.ndarray | None = None,
    r: float = DEFAULT_NDSC_R,
    mask: np.ndarray | None = None,
) -> dict[str, RetentionCurve]:
    """Voxel-scale error retention curves (arXiv:2311.08931).

    Voxels are sorted by ascending uncertainty with a **stable** sort (ties keep C-order flat
    index order; NaN sorts last, i.e. as most uncertain). For each retained fraction f the first
    ``floor(N f)`` voxels keep their prediction and the others are replaced by the reference;
    the metric is computed on all N voxels considered. Implemented with prefix counts of
    TP/FP/FN in sorted order, so the cost is one sort, not one metric per fraction.

    Parameters
    ----------
    pred, ref : ndarray, shape (X, Y, Z) or (X, Y)
        Binary prediction and reference (non-zero = lesion).
    uncertainty : ndarray of float, same shape
        Voxel uncertainty (higher = less certain).
    metrics : sequence of {'DSC', 'nDSC'}
    fracs : ndarray, optional
        Retained fractions (default ``linspace(0, 1, 400)``).
    r : float
        nDSC reference lesion load.
    mask : ndarray of bool, optional
        Voxels considered (the CL repo uses the brain mask); N = their number.

    Returns
    -------
    dict of str -> RetentionCurve
    """
    for name in metrics:
        if name not in VOXEL_RC_METRICS:
            raise ValueError(f"unknown voxel retention metric {name!r}; choose from {VOXEL_RC_METRICS}")
    f = _fracs(fracs)
    p = binary(pred, "pred")
    g = binary(ref, "ref")
    u = as_volume(uncertainty, "uncertainty")
    m = None if mask is None else binary(mask, "mask")
    same_shape((p, "pred"), (g, "ref"), (u, "uncertainty"), (m, "mask"))
    us = select(u, m)
    n = us.size
    order = np.argsort(us, kind="stable")
    ps = select(p, m)[order]
    gs = select(g, m)[order]
    r = float(r)
    if "nDSC" in metrics and not 0.0 < r < 1.0:
        raise ValueError(f"nDSC r must be in (0, 1), got {r}")
    pos = (n * f).astype(np.int64)  # floor(N f), as int(N * frac) in the reference
    n_ref = int(np.count_nonzero(gs))

    def before(sel):  # how many selected voxels lie in the retained prefix [0, pos)
        return np.searchsorted(np.flatnonzero(sel), pos)

    c_tp = before(ps & gs)
    c_fp = before(ps & ~gs)
    c_fn = before(~ps & gs)
    c_ref = before(gs)
    tp = c_tp + (n_ref - c_ref)  # the replaced suffix contributes its reference voxels as TP
    fp, fn = c_fp, c_fn
    out = {}
    for name in metrics:
        if name == "DSC":
            den = 2 * tp + fp + fn
            vals = np.where(den > 0, 2.0 * tp / np.maximum(den, 1), 1.0)
        else:
            k = 1.0 if (n_ref == 0 or n_ref == n) else (1.0 - r) * n_ref / (r * (n - n_ref))
            den = 2.0 * tp + fn + k * fp
            vals = np.where(2 * tp + fp + fn > 0, 2.0 * tp / np.where(den > 0, den, 1.0), 1.0)
        out[name] = RetentionCurve.from_values(f, vals, name)
    return out


def _lesion_metric(tpl, fpl, usl, n_fn, metric):
    tpl, fpl, usl = (np.asarray(x, dtype=np.float64) for x in (tpl, fpl, usl))
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "LF1":
            den = tpl + 0.5 * (fpl + usl + n_fn)
            return np.where(den > 0, tpl / den, 0.0)
        den = tpl + fpl + usl
        return np.where(den > 0, tpl / den, 1.0)


def _descending_order(u: np.ndarray) -> np.ndarray:
    """Most uncertain first; NaN counts as most uncertain; ties keep row order (stable)."""
    key = np.where(np.isnan(u), -np.inf, -u)
    return np.argsort(key, kind="stable")


def _check_types(lesion_types) -> np.ndarray:
    t = np.asarray(lesion_types).astype(str)
    bad = set(np.unique(t)) - {"TPL", "FPL", "USL"}
    if bad:
        raise ValueError(f"lesion types must be TPL, FPL or USL, got {sorted(bad)}")
    return t


def lesion_retention_curve(
    lesion_types: Sequence[str] | np.ndarray,
    uncertainty: np.ndarray,
    n_fn: int,
    metric: str = "LF1",
    fracs: np.ndarray | None = None,
) -> RetentionCurve:
    """Lesion-scale retention curve (the cortical-lesion variant of arXiv:2311.08931's curves).

    Lesions are rejected one at a time from the most uncertain (stable descending sort, ties in
    row order, NaN first). A rejected FPL becomes a true negative (leaves the counts), a rejected
    USL becomes a TPL, a rejected TPL stays TPL. ``LF1 = TPL / (TPL + ½(FPL + USL + n_fn))`` (0 if
    the denominator is 0); ``LPPV = TPL / (TPL + USL + FPL)`` (1 if 0). The n + 1 points sit at
    retained fractions ``k / n`` and are linearly interpolated onto ``fracs``. With no lesion the
    curve is constant (the metric of the empty set).

    Parameters
    ----------
    lesion_types : sequence of {'TPL', 'FPL', 'USL'}, length n
        Types of the predicted lesions (e.g. ``LesionTypes.pred_type``).
    uncertainty : ndarray of float, shape (n,)
        One value per lesion (higher = less certain).
    n_fn : int
        Number of false-negative reference lesions (FNL).
    metric : {'LF1', 'LPPV'}
    fracs : ndarray, optional
        Default ``linspace(0, 1, 400)``.

    Returns
    -------
    RetentionCurve
    """
    if metric not in LESION_RC_METRICS:
        raise ValueError(f"unknown lesion retention metric {metric!r}; choose from {LESION_RC_METRICS}")
    f = _fracs(fracs)
    t = _check_types(lesion_types)
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    if u.size != t.size:
        raise ValueError(f"{t.size} lesion types but {u.size} uncertainty values")
    n = t.size
    tpl0, fpl0, usl0 = (int(np.count_nonzero(t == k)) for k in ("TPL", "FPL", "USL"))
    if n == 0:
        vals = np.full(f.shape, float(_lesion_metric(0, 0, 0, n_fn, metric)))
        return RetentionCurve.from_values(f, vals, metric)
    rejected = t[_descending_order(u)]
    rej_fpl = np.concatenate([[0], np.cumsum(rejected == "FPL")])  # after k rejections, k = 0..n
    rej_usl = np.concatenate([[0], np.cumsum(rejected == "USL")])
    vals_k = _lesion_metric(tpl0 + rej_usl, fpl0 - rej_fpl, usl0 - rej_usl, n_fn, metric)
    x = np.arange(n + 1)[::-1] / n  # retained fraction after k rejections
    vals = np.interp(f, x[::-1], vals_k[::-1])
    return RetentionCurve.from_values(f, vals, metric)


def lesion_retention_baselines(
    lesion_types: Sequence[str] | np.ndarray,
    n_fn: int,
    metric: str = "LF1",
    fracs: np.ndarray | None = None,
    seed: int = 0,
    n_random: int = 1,
) -> dict[str, RetentionCurve]:
    """Ideal and random baselines of :func:`lesion_retention_curve`.

    * ``ideal``: uncertainty FPL = 2, USL = 1, TPL = 0 (errors rejected first);
    * ``random``: uncertainty = a random permutation (``numpy.random.default_rng(seed)``); with
      ``n_random > 1`` the curves of that many permutations are averaged.
    """
    t = _check_types(lesion_types)
    ideal_u = np.select([t == "FPL", t == "USL"], [2.0, 1.0], 0.0)
    out = {"ideal": lesion_retention_curve(t, ideal_u, n_fn, metric, fracs)}
    rng = np.random.default_rng(seed)
    curves = [lesion_retention_curve(t, rng.permutation(t.size).astype(np.float64), n_fn, metric, fracs)
              for _ in range(max(1, int(n_random)))]
    mean_vals = np.mean([c.values for c in curves], axis=0)
    out["random"] = RetentionCurve.from_values(curves[0].fracs, mean_vals, metric)
    return out


def patient_retention_curve(
    uncertainty: Sequence[float] | np.ndarray,
    metric_values: Sequence[float] | np.ndarray,
    replace_with: float = 1.0,
    metric: str = "DSC",
) -> RetentionCurve:
    """Patient-scale retention curve (arXiv:2311.08931, group level).

    Starting from the mean metric of all n patients, the most uncertain patient's metric is
    replaced by ``replace_with`` (a perfect score), one patient at a time (stable descending
    sort, ties in input order, NaN uncertainty first). The curve is placed at retained
    fractions ``linspace(0, 1, n + 1)``.

    Parameters
    ----------
    uncertainty : array of float, shape (n,)
    metric_values : array of float, shape (n,)
        E.g. DSC per patient.
    replace_with : float
    metric : str
        Name recorded in the result.

    Returns
    -------
    RetentionCurve
    """
    u = np.asarray(uncertainty, dtype=np.float64).reshape(-1)
    v = np.asarray(metric_values, dtype=np.float64).reshape(-1)
    if u.size != v.size or u.size == 0:
        raise ValueError(f"need as many metric values as uncertainties (n >= 1), got {v.size} and {u.size}")
    n = u.size
    replaced = v[_descending_order(u)]
    k = np.arange(n + 1)
    rc = (v.sum() - np.concatenate([[0.0], np.cumsum(replaced)]) + k * float(replace_with)) / n
    return RetentionCurve.from_values(np.linspace(0.0, 1.0, n + 1), rc[::-1], metric)
