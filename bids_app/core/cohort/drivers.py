"""What drives lesion uncertainty: the regression of a lesion's uncertainty on its features (pure
pandas / numpy / scikit-learn, no file I/O).

:func:`uncertainty_drivers` is the regression of arXiv:2504.04814: StandardScaler ->
RFE(DecisionTreeRegressor) -> ElasticNet, grid search with a shuffled 5-fold CV refit on R²,
repeated over random states, or random-forest importances. ``docs/features.md`` §3.4 gives the
recipe. All functions are pure.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

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
#: random-forest grids (the reference's values are not all known: "full" is inferred)
SMALL_FOREST_GRID: dict[str, list] = {"n_estimators": [100], "max_features": [0.5], "min_samples_leaf": [5]}
FULL_FOREST_GRID: dict[str, list] = {
    "n_estimators": [20, 50, 100, 200, 300],
    "max_features": ["sqrt", 0.5, 1.0],
    "max_depth": [None, 10],
    "min_samples_split": [2, 10],
    "min_samples_leaf": [1, 5],
    "bootstrap": [True, False],
}


@dataclass(frozen=True)
class DriversResult:
    """Result of :func:`uncertainty_drivers`.

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
    """One repeat of :func:`uncertainty_drivers`: (score row, coefficients, kept mask)."""
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


def uncertainty_drivers(
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
) -> DriversResult:
    """The regression of lesion uncertainty on lesion features of arXiv:2504.04814 (``docs/features.md`` §3.4).

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
    DriversResult
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
    return DriversResult(scores, importance, per_repeat, summary)
