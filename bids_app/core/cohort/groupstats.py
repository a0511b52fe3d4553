"""Cohort statistics of the group level (pure pandas / numpy / scikit-learn, no file I/O).

* :func:`bootstrap_mean` / :func:`bootstrap_stand_err` / :func:`summarise`: mean, sd, median,
  percentile bootstrap CI (seeded, ``n_boot`` full-size resamples) and the bootstrap SE of
  arXiv:2407.05761 (std of the means of half-size resamples with replacement, seed 0,
  exactly as interpret-lesion-unc's ``bootstrap_stand_err``), overall and per site / domain.
* :func:`assign_domain`, :func:`detection_summary`: pooled (summed counts) and per-session
  (mean [CI]) lesion detection metrics, overall, per site and in- vs out-of-domain.
* :func:`patient_retention_table`: patient-scale retention curves (§2.7) per uncertainty
  measure and metric, with the random and ideal baselines.
* :func:`icc` / :func:`icc_table`: ICC(3,1) and ICC(3,k) (two-way mixed, consistency) from a long
  table, with F test and confidence intervals (Shrout & Fleiss 1979; McGraw & Wong 1996).
* :func:`explain_uncertainty`: the uncertainty-explanation regression of §3.6
  (StandardScaler -> RFE(DecisionTreeRegressor) -> ElasticNet, grid search with a shuffled
  5-fold CV refit on R², repeated over random states), or random-forest importances.

``docs/features.md`` gives the recipes and a worked ICC example. All functions are pure.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bids_app.core.metrics.detection import detection_scores
from bids_app.core.metrics.retention import RetentionCurve, patient_retention_curve

#: default number of bootstrap resamples and CI level
N_BOOT = 1000
CI_LEVEL = 0.95
#: values of the ``domain`` column written by :func:`assign_domain`
IN_DOMAIN, OUT_OF_DOMAIN = "in-domain", "out-of-domain"
#: lesion detection counts pooled by :func:`detection_summary`
DETECTION_COUNTS: tuple[str, ...] = ("TPL", "FPL", "USL", "FNL")
#: columns of a session table that are parameters or identifiers, not metrics
NON_METRIC_COLUMNS: frozenset[str] = frozenset({
    "threshold", "connectivity", "method", "participant_id", "session_id", "site", "domain", "r", "ndsc_r",
    "detection_threshold", "min_size", "l_min",
})
SUMMARY_COLUMNS: tuple[str, ...] = ("group_by", "group", "variable", "n", "mean", "sd", "median", "ci_low", "ci_high",
                                    "se")

#: the grid of interpret-lesion-unc's elasticnet_repeated_cv.py (arXiv:2504.04814): 8 x 5 x 5 = 200 candidates
FULL_ELASTICNET_GRID: dict[str, list] = {
    "rfe__n_features_to_select": [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0],
    "elasticnet__alpha": [float(a) for a in np.logspace(-4, 2, 5)],
    "elasticnet__l1_ratio": [0.0, 0.25, 0.5, 0.75, 1.0],
}
#: the default grid: 4 x 3 x 2 = 24 candidates (seconds on ~2000 lesions)
SMALL_ELASTICNET_GRID: dict[str, list] = {
    "rfe__n_features_to_select": [0.25, 0.5, 0.75, 1.0],
    "elasticnet__alpha": [1e-3, 1e-2, 1e-1],
    "elasticnet__l1_ratio": [0.5, 1.0],
}
#: random-forest grids (the reference's values are not all known: "full" is inferred, §3.6)
SMALL_FOREST_GRID: dict[str, list] = {"n_estimators": [100], "max_features": [0.5], "min_samples_leaf": [5]}
FULL_FOREST_GRID: dict[str, list] = {
    "n_estimators": [20, 50, 100, 200, 300],
    "max_features": ["sqrt", 0.5, 1.0],
    "max_depth": [None, 10],
    "min_samples_split": [2, 10],
    "min_samples_leaf": [1, 5],
    "bootstrap": [True, False],
}


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------

def _clean(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    return x[np.isfinite(x)]


def bootstrap_stand_err(values, n_iter: int = 1000, sample_frac: float = 0.5, seed: int = 0) -> float:
    """Bootstrap standard error (interpret-lesion-unc's ``bootstrap_stand_err``, arXiv:2407.05761).

    The population standard deviation of the means of ``n_iter`` resamples of
    ``round(n * sample_frac)`` values drawn with replacement, from ``np.random.RandomState(seed)``:
    the numbers of interpret-lesion-unc's ``bootstrap_stand_err`` (which seeds the global
    generator with 0), without touching numpy's global state.

    Parameters
    ----------
    values : array-like of float, shape (n,)
        Non-finite values are dropped first.

    Returns
    -------
    float
        NaN when fewer than one value would be drawn (n < 2 with the default fraction).
    """
    x = _clean(values)
    k = round(x.size * sample_frac)  # Python's round, as the reference
    if x.size == 0 or k < 1:
        return float("nan")
    rs = np.random.RandomState(seed)
    # one randint call of shape (n_iter, k) consumes the stream exactly as n_iter choice() calls
    idx = rs.randint(0, x.size, size=(int(n_iter), k))
    return float(np.std(x[idx].mean(axis=1)))


def _boot_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = x.size
    chunk = max(1, (1 << 22) // max(n, 1))
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        out[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def bootstrap_mean(values, n_boot: int = N_BOOT, ci: float = CI_LEVEL, seed: int = 0) -> dict[str, float]:
    """Mean with a percentile bootstrap CI and the spec's bootstrap SE.

    Parameters
    ----------
    values : array-like of float, shape (n,)
        Non-finite values are dropped.
    n_boot : int
        Full-size resamples with replacement, from ``np.random.default_rng(seed)``.
    ci : float
        Two-sided level; the CI is the (1-ci)/2 and (1+ci)/2 percentiles (linear interpolation)
        of the resampled means.
    seed : int

    Returns
    -------
    dict
        ``n, mean, sd`` (ddof 1), ``median, ci_low, ci_high, se`` (:func:`bootstrap_stand_err`,
        seed 0). NaN where undefined (n = 0; sd with n = 1; ``ci_*`` equal the mean when n = 1).
    """
    x = _clean(values)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": np.nan, "sd": np.nan, "median": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                "se": np.nan}
    means = _boot_means(x, int(n_boot), seed)
    lo, hi = np.percentile(means, [50 * (1 - ci), 50 * (1 + ci)])
    return {"n": n, "mean": float(x.mean()), "sd": float(x.std(ddof=1)) if n > 1 else np.nan,
            "median": float(np.median(x)), "ci_low": float(lo), "ci_high": float(hi),
            "se": bootstrap_stand_err(x)}


def _numeric_columns(table: pd.DataFrame, exclude=()) -> list[str]:
    skip = set(exclude) | NON_METRIC_COLUMNS
    return [c for c in table.columns if c not in skip and pd.api.types.is_numeric_dtype(table[c])
            and not pd.api.types.is_bool_dtype(table[c])]


def _groupings(table: pd.DataFrame, by) -> list[tuple[str, object, pd.DataFrame]]:
    by = [by] if isinstance(by, str) else list(by or ())
    out: list[tuple[str, object, pd.DataFrame]] = [("all", "all", table)]
    for col in by:
        if col not in table.columns:
            raise KeyError(f"grouping column {col!r} not in the table")
        for value, sub in table.groupby(col, sort=True, dropna=True):
            out.append((col, value, sub))
    return out


def summarise(table: pd.DataFrame, columns: Sequence[str] | None = None, by: str | Sequence[str] = (), *,
              n_boot: int = N_BOOT, ci: float = CI_LEVEL, seed: int = 0) -> pd.DataFrame:
    """Per-group summaries with bootstrap CIs, in long format.

    Parameters
    ----------
    table : DataFrame
        One row per unit (participant, session, lesion).
    columns : sequence of str, optional
        Variables to summarise (default: every numeric column except identifiers/parameters).
    by : str or sequence of str
        Grouping columns (e.g. ``("site", "domain")``); each gives its own set of rows, after
        the ``all`` rows.
    n_boot, ci, seed
        See :func:`bootstrap_mean`; every (group, variable) is resampled from the same seed, so
        a result does not depend on which other variables are summarised.

    Returns
    -------
    DataFrame
        Columns ``group_by`` ("all" or the grouping column), ``group`` (its value), ``variable``,
        ``n, mean, sd, median, ci_low, ci_high, se``.
    """
    cols = list(columns) if columns is not None else _numeric_columns(table, exclude=[by] if isinstance(by, str)
                                                                        else by)
    rows = []
    for group_by, group, sub in _groupings(table, by):
        for col in cols:
            stats = bootstrap_mean(sub[col].to_numpy(dtype=np.float64, na_value=np.nan), n_boot, ci, seed)
            rows.append({"group_by": group_by, "group": group, "variable": col, **stats})
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


# --------------------------------------------------------------------------------------------
# sessions, domains and detection metrics
# --------------------------------------------------------------------------------------------

def flatten_metrics(metrics: Mapping, sep: str = "_", prefix: str = "") -> dict:
    """Flatten nested metric dicts: ``{"detection": {"F1": 1}}`` -> ``{"detection_F1": 1}``."""
    out: dict = {}
    for key, value in metrics.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, sep, name))
        else:
            out[name] = value
    return out


def sessions_table(sessions: pd.DataFrame | Sequence[Mapping]) -> pd.DataFrame:
    """A session table from a DataFrame or a sequence of (possibly nested) metric dicts."""
    if isinstance(sessions, pd.DataFrame):
        return sessions.copy()
    return pd.DataFrame([flatten_metrics(s) for s in sessions])


def assign_domain(sites, in_domain_sites: Sequence) -> np.ndarray:
    """``"in-domain"`` for the training sites, ``"out-of-domain"`` otherwise.

    Parameters
    ----------
    sites : array-like, shape (n,)
    in_domain_sites : sequence
        Sites seen in training.

    Returns
    -------
    ndarray of object, shape (n,)
    """
    s = np.asarray(sites, dtype=object)
    inside = np.isin(s.astype(str), [str(v) for v in in_domain_sites])
    return np.where(inside, IN_DOMAIN, OUT_OF_DOMAIN).astype(object)


@dataclass(frozen=True)
class DetectionSummary:
    """Result of :func:`detection_summary`.

    Attributes
    ----------
    pooled : DataFrame
        One row per group: ``group_by, group, n_sessions``, the summed counts ``TPL, FPL, USL,
        FNL`` and ``F1, precision, recall, USL_rate`` computed from them (§1.6 conventions).
    summary : DataFrame
        :func:`summarise` of the per-session metrics (mean [CI] and SE per group).
    """

    pooled: pd.DataFrame
    summary: pd.DataFrame


def detection_summary(
    sessions: pd.DataFrame | Sequence[Mapping],
    *,
    by: str | Sequence[str] = ("site", "domain"),
    in_domain_sites: Sequence | None = None,
    metrics: Sequence[str] | None = None,
    counts_prefix: str = "",
    n_boot: int = N_BOOT,
    ci: float = CI_LEVEL,
    seed: int = 0,
) -> DetectionSummary:
    """Pooled and per-session lesion detection metrics, overall, per site and per domain.

    Parameters
    ----------
    sessions : DataFrame or sequence of dict
        One row (dict) per evaluated session with the counts ``TPL, FPL, USL, FNL`` and the
        per-session metrics (e.g. the output of
        :func:`bids_app.core.metrics.detection.lesion_detection` plus voxel metrics and ``site``).
    by : str or sequence of str
        Grouping columns; absent ones are skipped (``domain`` is added when
        ``in_domain_sites`` is given).
    in_domain_sites : sequence, optional
        Training sites: adds ``domain`` = in-domain / out-of-domain from ``site``.
    metrics : sequence of str, optional
        Per-session metrics to summarise (default: numeric columns except the counts and
        parameters).
    counts_prefix : str
        Prefix of the count and parameter columns, e.g. ``"detection_"`` for sessions given as
        nested dicts ``{"detection": {"TPL": ...}}`` (flattened by :func:`flatten_metrics`).

    Returns
    -------
    DetectionSummary
        Without the four count columns, ``pooled`` only holds ``n_sessions``.

    Raises
    ------
    ValueError
        The sessions mix detection methods or thresholds (their counts cannot be pooled).
    """
    table = sessions_table(sessions)
    for col in (f"{counts_prefix}method", f"{counts_prefix}threshold", f"{counts_prefix}connectivity"):
        if col in table.columns and table[col].nunique(dropna=True) > 1:
            raise ValueError(f"sessions mix several detection {col}s {sorted(map(str, table[col].unique()))}; "
                             "summarise each setting separately")
    if in_domain_sites is not None:
        if "site" not in table.columns:
            raise KeyError("in_domain_sites needs a 'site' column")
        table["domain"] = assign_domain(table["site"], in_domain_sites)
    by = [by] if isinstance(by, str) else list(by)
    by = [b for b in by if b in table.columns]
    count_cols = [f"{counts_prefix}{c}" for c in DETECTION_COUNTS]
    missing = [c for c in count_cols if c not in table.columns]
    pooled_rows = []
    for group_by, group, sub in _groupings(table, by):
        row: dict = {"group_by": group_by, "group": group, "n_sessions": int(len(sub))}
        if not missing:
            counts = {c: int(np.nansum(sub[f"{counts_prefix}{c}"].to_numpy(dtype=np.float64)))
                      for c in DETECTION_COUNTS}
            row.update(counts)
            row.update(detection_scores(counts["TPL"], counts["FPL"], counts["USL"], counts["FNL"]))
        pooled_rows.append(row)
    if metrics is None:
        skip = set(count_cols) | {f"{counts_prefix}{c}" for c in ("n_pred_lesions", "n_ref_lesions", "method",
                                                                   "threshold", "connectivity")}
        metrics = [c for c in _numeric_columns(table, exclude=by) if c not in skip]
    summary = summarise(table, metrics, by, n_boot=n_boot, ci=ci, seed=seed)
    return DetectionSummary(pd.DataFrame(pooled_rows), summary)


# --------------------------------------------------------------------------------------------
# patient-scale retention curves
# --------------------------------------------------------------------------------------------

def patient_retention_table(
    table: pd.DataFrame,
    uncertainty_columns: Sequence[str],
    metric_columns: Sequence[str],
    *,
    by: str | Sequence[str] = (),
    replace_with: float = 1.0,
) -> tuple[pd.DataFrame, dict[tuple, RetentionCurve]]:
    """Patient-scale retention curves (§2.7) for every (uncertainty measure, metric) pair.

    Uses :func:`bids_app.core.metrics.retention.patient_retention_curve` on the rows where both values
    are finite.

    Returns
    -------
    table : DataFrame
        ``group_by, group, uncertainty, metric, n, auc, aac``, ``auc_random`` (expected AUC of a
        random order: ``(mean + replace_with) / 2``) and ``auc_ideal`` (patients replaced from
        the worst metric up).
    curves : dict
        ``(group_by, group, uncertainty, metric) -> RetentionCurve``.
    """
    rows = []
    curves: dict[tuple, RetentionCurve] = {}
    for group_by, group, sub in _groupings(table, by):
        for unc in uncertainty_columns:
            for met in metric_columns:
                u = sub[unc].to_numpy(dtype=np.float64, na_value=np.nan)
                v = sub[met].to_numpy(dtype=np.float64, na_value=np.nan)
                ok = np.isfinite(u) & np.isfinite(v)
                row = {"group_by": group_by, "group": group, "uncertainty": unc, "metric": met, "n": int(ok.sum()),
                       "auc": np.nan, "aac": np.nan, "auc_random": np.nan, "auc_ideal": np.nan}
                if ok.any():
                    curve = patient_retention_curve(u[ok], v[ok], replace_with, met)
                    ideal = patient_retention_curve(-v[ok], v[ok], replace_with, met)
                    curves[(group_by, group, unc, met)] = curve
                    row.update(auc=curve.auc, aac=curve.aac, auc_random=(float(v[ok].mean()) + replace_with) / 2.0,
                               auc_ideal=ideal.auc)
                rows.append(row)
    return pd.DataFrame(rows), curves


# --------------------------------------------------------------------------------------------
# ICC
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# uncertainty-explanation regression
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExplanationResult:
    """Result of :func:`explain_uncertainty`.

    Attributes
    ----------
    scores : DataFrame
        One row per repeat: ``random_state``, the best candidate's mean CV ``cv_r2,
        cv_explained_variance, cv_mse, cv_mae``, held-out ``test_r2, test_mse, test_mae`` (NaN
        without a test set), ``n_selected`` and the best parameters (``param_*``).
    importance : DataFrame
        One row per feature, sorted by decreasing ``abs(mean)``: ``feature, mean, sd`` over
        repeats of the ElasticNet coefficient of the standardised feature (0 when RFE dropped
        it) or of the random-forest impurity importance, ``selected_fraction`` (repeats in
        which RFE kept it) and ``nonzero_fraction``.
    per_repeat : DataFrame
        Repeats x features: the coefficient (importance) of each repeat.
    summary : dict
        ``model, target, n_train, n_test, n_dropped, n_repeats, cv_r2_mean, cv_r2_sd,
        test_r2_mean, test_r2_sd, grid`` (the candidate values).
    """

    scores: pd.DataFrame
    importance: pd.DataFrame
    per_repeat: pd.DataFrame
    summary: dict


def _elasticnet_pipeline(random_state: int, rfe: bool = True):
    from sklearn.feature_selection import RFE
    from sklearn.linear_model import ElasticNet
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeRegressor

    steps = [("scaler", StandardScaler())]
    if rfe:
        steps.append(("rfe", RFE(DecisionTreeRegressor(random_state=random_state))))
    steps.append(("elasticnet", ElasticNet(max_iter=10000, tol=1e-6)))
    return Pipeline(steps)


_SCORING = {"r2": "r2", "explained_variance": "explained_variance", "mse": "neg_mean_squared_error",
            "mae": "neg_mean_absolute_error"}


def _scores(y, pred) -> dict[str, float]:
    """R², explained variance, MSE and MAE with sklearn's definitions (``force_finite``: a constant
    target scores 1 when predicted exactly, else 0), in plain numpy (the search calls it
    thousands of times; sklearn's input validation would dominate)."""
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    res = y - pred
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float((res ** 2).sum())
    var_y = float(np.var(y))
    var_res = float(np.var(res))

    def ratio(num, den):
        if den == 0.0:
            return 1.0 if num == 0.0 else 0.0
        return 1.0 - num / den

    return {"r2": ratio(ss_res, ss_tot), "explained_variance": ratio(var_res, var_y),
            "mse": float(np.mean(res ** 2)), "mae": float(np.mean(np.abs(res)))}


def _fit_elasticnet(x: np.ndarray, y: np.ndarray, alpha: float, l1_ratio: float):
    from sklearn.linear_model import ElasticNet

    model = ElasticNet(alpha=alpha, l1_ratio=l1_ratio, max_iter=10000, tol=1e-6)
    # inputs are validated once by the caller: float64, finite; Fortran order as sklearn would make
    return model.fit(np.asfortranarray(x, dtype=np.float64), np.ascontiguousarray(y, dtype=np.float64),
                     check_input=False)


def _rfe_ranking(x: np.ndarray, y: np.ndarray, random_state: int) -> np.ndarray:
    """sklearn RFE ranking (step 1, DecisionTreeRegressor) down to one feature.

    Each step drops exactly one feature, so the features kept by ``RFE(n_features_to_select=m)``
    are those of ranking ``<= m``: one elimination path serves every candidate size.
    """
    from sklearn.feature_selection import RFE
    from sklearn.tree import DecisionTreeRegressor

    if x.shape[1] < 2:
        return np.ones(x.shape[1], dtype=np.int64)
    return RFE(DecisionTreeRegressor(random_state=random_state), n_features_to_select=1).fit(x, y).ranking_


def _rfe_size(n_features: int, value) -> int:
    """Number of features RFE keeps for ``n_features_to_select`` (sklearn's rule)."""
    if value is None:
        return n_features // 2
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return min(int(value), n_features)
    return int(n_features * float(value))


def _grid_candidates(grid: Mapping[str, Sequence]) -> list[dict]:
    """Candidates in sklearn's ParameterGrid order (sorted keys, last key fastest)."""
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _fast_elasticnet_search(x, y, grid, random_state, n_splits, use_rfe):
    """GridSearchCV(StandardScaler -> RFE(tree) -> ElasticNet, KFold(shuffle), refit='r2'),
    computed with one RFE elimination path per fold instead of one per candidate."""
    from sklearn.model_selection import KFold
    from sklearn.preprocessing import StandardScaler

    candidates = _grid_candidates(grid)
    p = x.shape[1]
    fold_scores = np.full((len(candidates), n_splits, 4), np.nan)
    for f, (tr, te) in enumerate(KFold(n_splits, shuffle=True, random_state=random_state).split(x)):
        scaler = StandardScaler().fit(x[tr])
        xtr, xte = scaler.transform(x[tr]), scaler.transform(x[te])
        ranking = _rfe_ranking(xtr, y[tr], random_state) if use_rfe else np.ones(p, dtype=np.int64)
        for c, cand in enumerate(candidates):
            m = _rfe_size(p, cand.get("rfe__n_features_to_select", 1.0)) if use_rfe else p
            if m < 1:
                continue  # sklearn: the pipeline fails, the candidate scores NaN
            keep = ranking <= m
            model = _fit_elasticnet(xtr[:, keep], y[tr], cand["elasticnet__alpha"], cand["elasticnet__l1_ratio"])
            s = _scores(y[te], xte[:, keep] @ model.coef_ + model.intercept_)
            fold_scores[c, f] = [s["r2"], s["explained_variance"], s["mse"], s["mae"]]
    means = fold_scores.mean(axis=1)  # NaN for failed candidates
    r2 = means[:, 0]
    best = int(np.argmax(np.where(np.isnan(r2), -np.inf, r2)))  # first best, as rankdata(min) + argmin
    cand = candidates[best]
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    ranking = _rfe_ranking(xs, y, random_state) if use_rfe else np.ones(p, dtype=np.int64)
    m = _rfe_size(p, cand.get("rfe__n_features_to_select", 1.0)) if use_rfe else p
    keep = ranking <= m
    model = _fit_elasticnet(xs[:, keep], y, cand["elasticnet__alpha"], cand["elasticnet__l1_ratio"])

    def predict(x_new):
        return model.predict(scaler.transform(x_new)[:, keep])

    coef = np.zeros(p)
    coef[keep] = model.coef_
    cv = {"r2": means[best, 0], "explained_variance": means[best, 1], "mse": means[best, 2], "mae": means[best, 3]}
    return cand, cv, coef, keep, predict


def _sklearn_search(x, y, grid, random_state, n_splits, model, use_rfe, n_jobs):
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.model_selection import GridSearchCV, KFold

    if model == "elasticnet":
        estimator = _elasticnet_pipeline(random_state, use_rfe)
        if not use_rfe:
            grid = {k: v for k, v in grid.items() if not k.startswith("rfe__")}
    else:
        estimator = RandomForestRegressor(random_state=random_state, n_jobs=1)
    search = GridSearchCV(estimator, dict(grid), scoring=_SCORING, refit="r2", n_jobs=n_jobs,
                          cv=KFold(n_splits, shuffle=True, random_state=random_state))
    search.fit(x, y)
    res = search.cv_results_
    i = search.best_index_
    cv = {"r2": res["mean_test_r2"][i], "explained_variance": res["mean_test_explained_variance"][i],
          "mse": -res["mean_test_mse"][i], "mae": -res["mean_test_mae"][i]}
    best = search.best_estimator_
    p = x.shape[1]
    if model == "elasticnet":
        keep = best.named_steps["rfe"].support_ if use_rfe else np.ones(p, dtype=bool)
        coef = np.zeros(p)
        coef[keep] = best.named_steps["elasticnet"].coef_
    else:
        keep = np.ones(p, dtype=bool)
        coef = best.feature_importances_.astype(np.float64)
    return dict(search.best_params_), cv, coef, keep, best.predict


def _one_repeat(rs, *, x, y, grid, n_splits, model, rfe, fast, test_x, test_y, search_jobs):
    """One repeat of :func:`explain_uncertainty`: (score row, coefficients, kept mask)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ElasticNet convergence / l1_ratio=0 notes, NaN candidates
        if fast:
            params, cv, coef, keep, predict = _fast_elasticnet_search(x, y, grid, rs, n_splits, rfe)
        else:
            params, cv, coef, keep, predict = _sklearn_search(x, y, grid, rs, n_splits, model, rfe, search_jobs)
        row = {"random_state": rs, "cv_r2": cv["r2"], "cv_explained_variance": cv["explained_variance"],
               "cv_mse": cv["mse"], "cv_mae": cv["mae"], "test_r2": np.nan, "test_mse": np.nan, "test_mae": np.nan,
               "n_selected": int(np.sum(keep))}
        if test_y.size:
            s = _scores(test_y, predict(test_x))
            row.update(test_r2=s["r2"], test_mse=s["mse"], test_mae=s["mae"])
    row.update({f"param_{k}": v for k, v in params.items()})
    return row, coef, keep


def explain_uncertainty(
    table: pd.DataFrame,
    target: str,
    features: Sequence[str],
    *,
    model: str = "elasticnet",
    grid: str | Mapping[str, Sequence] = "small",
    n_repeats: int = 10,
    random_states: Sequence[int] | None = None,
    n_splits: int = 5,
    test_mask=None,
    rfe: bool = True,
    engine: str = "fast",
    n_jobs: int | None = None,
) -> ExplanationResult:
    """The uncertainty-explanation regression of arXiv:2504.04814 (``docs/features.md`` §3.4).

    For each random state ``rs`` (default ``0..n_repeats-1``): a grid search over the
    candidates with ``KFold(n_splits, shuffle=True, random_state=rs)``, scored with R²,
    explained variance, MSE and MAE and refit on R² (the first best candidate in
    ``ParameterGrid`` order wins ties), of

    * ``model="elasticnet"``: ``StandardScaler -> RFE(DecisionTreeRegressor(random_state=rs))
      -> ElasticNet(max_iter=1e4, tol=1e-6)``; the importance of a feature is the ElasticNet
      coefficient of the standardised feature in the refit model (0 when RFE drops it);
    * ``model="random_forest"``: ``RandomForestRegressor(random_state=rs)``; the importance is
      its impurity importance.

    Parameters
    ----------
    table : DataFrame
        One row per lesion; rows with a non-finite target or feature are dropped.
    target : str
        E.g. ``"LSU"``.
    features : sequence of str
    grid : {"small", "full"} or dict
        ``"small"``: :data:`SMALL_ELASTICNET_GRID` / :data:`SMALL_FOREST_GRID` (default);
        ``"full"``: the spec's 200-candidate grid (:data:`FULL_ELASTICNET_GRID`) /
        :data:`FULL_FOREST_GRID`; or sklearn-style ``{"elasticnet__alpha": [...], ...}``.
    n_repeats : int
    random_states : sequence of int, optional
        Overrides ``range(n_repeats)``.
    n_splits : int
    test_mask : array-like of bool, shape (len(table),), optional
        Held-out rows (e.g. the test site): excluded from the search and scored with the refit
        model of every repeat.
    rfe : bool
        ``False`` skips RFE (the spec's "only IoU" condition).
    engine : {"fast", "sklearn"}
        ElasticNet only: ``"fast"`` gives GridSearchCV's results with one RFE elimination path
        per fold (RFE with step 1 is nested); ``"sklearn"`` runs ``GridSearchCV`` literally (a
        test checks both agree). Random forests always use ``GridSearchCV``.
    n_jobs : int, optional
        Parallel workers (joblib): over the repeats with the fast engine, inside
        ``GridSearchCV`` otherwise. Results do not depend on it.

    Returns
    -------
    ExplanationResult
    """
    if model not in ("elasticnet", "random_forest"):
        raise ValueError(f"model must be 'elasticnet' or 'random_forest', got {model!r}")
    if engine not in ("fast", "sklearn"):
        raise ValueError(f"engine must be 'fast' or 'sklearn', got {engine!r}")
    features = list(features)
    if not features:
        raise ValueError("need at least one feature")
    if isinstance(grid, str):
        if grid not in ("small", "full"):
            raise ValueError(f"grid must be 'small', 'full' or a dict, got {grid!r}")
        if model == "elasticnet":
            grid = SMALL_ELASTICNET_GRID if grid == "small" else FULL_ELASTICNET_GRID
        else:
            grid = SMALL_FOREST_GRID if grid == "small" else FULL_FOREST_GRID
    grid = {k: list(v) for k, v in grid.items()}
    if model == "elasticnet":
        grid.setdefault("elasticnet__alpha", [1.0])
        grid.setdefault("elasticnet__l1_ratio", [0.5])
        if rfe:
            grid.setdefault("rfe__n_features_to_select", [1.0])
        else:
            grid.pop("rfe__n_features_to_select", None)

    x_all = table[features].to_numpy(dtype=np.float64, na_value=np.nan)
    y_all = table[target].to_numpy(dtype=np.float64, na_value=np.nan)
    ok = np.isfinite(x_all).all(axis=1) & np.isfinite(y_all)
    test = np.zeros(len(table), dtype=bool) if test_mask is None else np.asarray(test_mask, dtype=bool).reshape(-1)
    if test.size != len(table):
        raise ValueError(f"test_mask has {test.size} entries for {len(table)} rows")
    train_rows = ok & ~test
    test_rows = ok & test
    x, y = x_all[train_rows], y_all[train_rows]
    if x.shape[0] < n_splits:
        raise ValueError(f"only {x.shape[0]} complete training rows for {n_splits}-fold CV")
    states = list(random_states) if random_states is not None else list(range(int(n_repeats)))

    test_x, test_y = x_all[test_rows], y_all[test_rows]
    fast = model == "elasticnet" and engine == "fast"
    job = dict(x=x, y=y, grid=grid, n_splits=n_splits, model=model, rfe=rfe, fast=fast, test_x=test_x,
               test_y=test_y, search_jobs=None if fast else n_jobs)
    if fast and n_jobs not in (None, 1) and len(states) > 1:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs)(delayed(_one_repeat)(rs, **job) for rs in states)
    else:
        results = [_one_repeat(rs, **job) for rs in states]
    rows = [r[0] for r in results]
    coefs = [r[1] for r in results]
    kept = [r[2] for r in results]
    scores = pd.DataFrame(rows)
    per_repeat = pd.DataFrame(np.asarray(coefs), columns=features, index=pd.Index(states, name="random_state"))
    kept_arr = np.asarray(kept, dtype=bool)
    coef_arr = np.asarray(coefs)
    importance = pd.DataFrame({
        "feature": features,
        "mean": coef_arr.mean(axis=0),
        "sd": coef_arr.std(axis=0, ddof=1) if len(states) > 1 else np.full(len(features), np.nan),
        "selected_fraction": kept_arr.mean(axis=0),
        "nonzero_fraction": (coef_arr != 0).mean(axis=0),
    })
    importance = importance.iloc[np.argsort(-np.abs(importance["mean"].to_numpy()), kind="stable")].reset_index(
        drop=True)
    summary = {
        "model": model, "target": target, "features": features, "n_train": int(train_rows.sum()),
        "n_test": int(test_rows.sum()), "n_dropped": int((~ok).sum()), "n_repeats": len(states),
        "cv_r2_mean": float(scores["cv_r2"].mean()),
        "cv_r2_sd": float(scores["cv_r2"].std(ddof=1)) if len(states) > 1 else float("nan"),
        "test_r2_mean": float(scores["test_r2"].mean()) if test_rows.any() else float("nan"),
        "test_r2_sd": float(scores["test_r2"].std(ddof=1)) if test_rows.any() and len(states) > 1 else float("nan"),
        "grid": grid, "engine": engine if model == "elasticnet" else "sklearn", "rfe": bool(rfe),
    }
    return ExplanationResult(scores, importance, per_repeat, summary)
