"""Intraclass correlation of the group level (pure pandas / numpy / scipy, no file I/O).

:func:`icc` / :func:`icc_table`: ICC(3,1) and ICC(3,k) (two-way mixed, consistency) from a long
table, with F test and confidence intervals (Shrout & Fleiss 1979; McGraw & Wong 1996).
``docs/features.md`` §3.3 gives a worked example. All functions are pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from bids_app.core.cohort.summary import CI_LEVEL


def icc(table: pd.DataFrame, target: str, rater: str, rating: str, *, ci: float = CI_LEVEL) -> dict:
    """ICC(3,1) and ICC(3,k): two-way mixed effects, consistency (Shrout & Fleiss 1979, case 3).

    With ``n`` targets and ``k`` raters, the two-way ANOVA without replication gives the mean
    squares of targets (rows) ``MS_R``, raters (columns) ``MS_C`` and residual ``MS_E``; then
    ``ICC(3,1) = (MS_R - MS_E) / (MS_R + (k - 1) MS_E)`` and
    ``ICC(3,k) = (MS_R - MS_E) / MS_R``. ``F = MS_R / MS_E`` with ``(n - 1, (n - 1)(k - 1))``
    degrees of freedom; the CIs follow McGraw & Wong (1996) (as pingouin's ``intraclass_corr``).

    Parameters
    ----------
    table : DataFrame
        Long format: one row per (target, rater) rating.
    target, rater, rating : str
        Column names (e.g. lesion/ROI id, site or session, feature value).
    ci : float

    Returns
    -------
    dict
        ``ICC3_1, ICC3_k, F, df1, df2, pval, ICC3_1_ci_low/high, ICC3_k_ci_low/high, MS_R, MS_C,
        MS_E, n_targets, n_raters, n_dropped_targets``. Targets lacking a rating from any rater
        (or with a non-finite rating) are dropped first (``n_dropped_targets``); fewer than 2
        targets or raters give NaN ICCs.

    Raises
    ------
    ValueError
        A (target, rater) pair is rated twice.
    """
    from scipy import stats

    sub = table[[target, rater, rating]]
    if sub.duplicated([target, rater]).any():
        raise ValueError(f"some ({target}, {rater}) pairs have several ratings; aggregate them first")
    wide = sub.pivot(index=target, columns=rater, values=rating).astype(np.float64)
    complete = np.isfinite(wide.to_numpy()).all(axis=1)
    n_dropped = int((~complete).sum())
    x = wide.to_numpy()[complete]
    n, k = x.shape
    out = {"ICC3_1": np.nan, "ICC3_k": np.nan, "F": np.nan, "df1": max(n - 1, 0), "df2": max((n - 1) * (k - 1), 0),
           "pval": np.nan, "ICC3_1_ci_low": np.nan, "ICC3_1_ci_high": np.nan, "ICC3_k_ci_low": np.nan,
           "ICC3_k_ci_high": np.nan, "MS_R": np.nan, "MS_C": np.nan, "MS_E": np.nan, "n_targets": int(n),
           "n_raters": int(k), "n_dropped_targets": n_dropped}
    if n < 2 or k < 2:
        return out
    grand = x.mean()
    ss_r = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_c = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_e = ((x - grand) ** 2).sum() - ss_r - ss_c
    df1, df2 = n - 1, (n - 1) * (k - 1)
    ms_r, ms_c, ms_e = ss_r / df1, ss_c / (k - 1), max(ss_e, 0.0) / df2
    out.update(MS_R=float(ms_r), MS_C=float(ms_c), MS_E=float(ms_e))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["ICC3_1"] = float((ms_r - ms_e) / (ms_r + (k - 1) * ms_e))
        out["ICC3_k"] = float((ms_r - ms_e) / ms_r)
        f = ms_r / ms_e
    if np.isfinite(f):
        alpha = 1.0 - ci
        out["F"] = float(f)
        out["pval"] = float(stats.f.sf(f, df1, df2))
        f_l = f / stats.f.ppf(1 - alpha / 2, df1, df2)
        f_u = f * stats.f.ppf(1 - alpha / 2, df2, df1)
        out["ICC3_1_ci_low"] = float((f_l - 1) / (f_l + k - 1))
        out["ICC3_1_ci_high"] = float((f_u - 1) / (f_u + k - 1))
        out["ICC3_k_ci_low"] = float(1 - 1 / f_l)
        out["ICC3_k_ci_high"] = float(1 - 1 / f_u)
    return out


def icc_table(table: pd.DataFrame, target: str, rater: str, features: Sequence[str], *,
              ci: float = CI_LEVEL) -> pd.DataFrame:
    """:func:`icc` for every feature column: one row per feature (``feature`` first)."""
    rows = [{"feature": f, **icc(table, target, rater, f, ci=ci)} for f in features]
    return pd.DataFrame(rows)

