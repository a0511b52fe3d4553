"""Cohort summaries of the group level (pure pandas / numpy, no file I/O).

* :func:`bootstrap_mean` / :func:`bootstrap_stand_err` / :func:`summarise`: mean, sd, median,
  percentile bootstrap CI (seeded, ``n_boot`` full-size resamples) and the bootstrap SE of
  arXiv:2407.05761 (std of the means of half-size resamples with replacement, seed 0,
  exactly as interpret-lesion-unc's ``bootstrap_stand_err``), overall and per site / domain.
* :func:`flatten_metrics`, :func:`sessions_table`: one row per session from nested metric dicts.
* :func:`assign_domain`, :func:`detection_summary`: pooled (summed counts) and per-session
  (mean [CI]) lesion detection metrics, overall, per site and in- vs out-of-domain.
* :func:`patient_retention_table`: patient-scale retention curves (arXiv:2311.08931) per uncertainty
  measure and metric, with the random and ideal baselines.

``docs/features.md`` gives the recipes. All functions are pure.
"""

from __future__ import annotations

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
        FNL`` and ``F1, precision, recall, USL_rate`` computed from them (the conventions of arXiv:2507.12092).
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
    """Patient-scale retention curves (arXiv:2311.08931) for every (uncertainty measure, metric) pair.

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

