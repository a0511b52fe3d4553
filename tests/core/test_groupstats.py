"""Cohort statistics: bootstrap, summaries, detection pooling, retention, ICC, regression."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bids_app.core.cohort.drivers import FULL_ELASTICNET_GRID, _grid_candidates, uncertainty_drivers
from bids_app.core.cohort.icc import icc, icc_table
from bids_app.core.cohort.summary import (
    DETECTION_COUNTS,
    IN_DOMAIN,
    OUT_OF_DOMAIN,
    SUMMARY_COLUMNS,
    assign_domain,
    bootstrap_mean,
    bootstrap_stand_err,
    detection_summary,
    patient_retention_table,
    sessions_table,
    summarise,
)
from bids_app.core.metrics.detection import detection_scores
from bids_app.core.metrics.retention import patient_retention_curve

#: Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
                         dtype=float)


def _long(x: np.ndarray) -> pd.DataFrame:
    n, k = x.shape
    return pd.DataFrame({"target": np.repeat(np.arange(n), k), "rater": np.tile([f"j{j}" for j in range(k)], n),
                         "rating": x.ravel()})


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------

def _reference_bootstrap_stand_err(a, n_iter=1000, sample_frac=0.5):
    """interpret-lesion-unc utils/metrics.py, verbatim logic (global seed)."""
    np.random.seed(0)
    boot_means = []
    for _ in range(n_iter):
        boot_means.append(np.random.choice(a, size=round(len(a) * sample_frac)).mean())
    return np.std(boot_means)


@pytest.mark.parametrize("n", [2, 5, 37, 38, 200])
def test_bootstrap_stand_err_reproduces_the_reference(n):
    a = np.random.default_rng(n).normal(size=n)
    state = np.random.get_state()
    try:
        expected = _reference_bootstrap_stand_err(a)
    finally:
        np.random.set_state(state)
    before = np.random.get_state()[1].copy()
    assert bootstrap_stand_err(a) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # global state untouched


def test_bootstrap_mean_is_seeded_and_percentile():
    x = np.arange(1.0, 21.0)
    a = bootstrap_mean(x, n_boot=500, seed=3)
    b = bootstrap_mean(x, n_boot=500, seed=3)
    assert a == b
    rng = np.random.default_rng(3)
    means = x[rng.integers(0, 20, size=(500, 20))].mean(axis=1)
    assert a["ci_low"] == pytest.approx(np.percentile(means, 2.5))
    assert a["ci_high"] == pytest.approx(np.percentile(means, 97.5))
    assert a["mean"] == 10.5 and a["median"] == 10.5 and a["n"] == 20
    assert a["sd"] == pytest.approx(x.std(ddof=1))
    assert a["ci_low"] < 10.5 < a["ci_high"]
    assert bootstrap_mean(x, n_boot=500, seed=4) != a
    # NaNs are dropped; constant data has a zero-width CI; empty input is NaN
    c = bootstrap_mean([2.0, np.nan, 2.0, 2.0])
    assert c["n"] == 3 and c["ci_low"] == c["ci_high"] == 2.0 and c["se"] == 0.0
    assert np.isnan(bootstrap_mean([])["mean"])
    assert np.isnan(bootstrap_mean([1.0])["sd"]) and np.isnan(bootstrap_stand_err([1.0]))


def test_summarise_groups_and_independence_of_columns():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(60)],
                          "site": np.repeat(["A", "B", "C"], 20),
                          "DSC": rng.random(60), "F1": rng.random(60), "threshold": 0.5})
    table.loc[3, "DSC"] = np.nan
    s = summarise(table, by="site", n_boot=200)
    assert list(s.columns) == list(SUMMARY_COLUMNS)
    assert set(s["variable"]) == {"DSC", "F1"}  # ids and parameters skipped
    assert s[s.group_by == "all"]["n"].tolist() == [59, 60]
    row = s[(s.group == "B") & (s.variable == "F1")].iloc[0]
    assert row["mean"] == pytest.approx(table.loc[table.site == "B", "F1"].mean())
    only = summarise(table, ["F1"], by="site", n_boot=200)
    pd.testing.assert_frame_equal(only.reset_index(drop=True),
                                  s[s.variable == "F1"].reset_index(drop=True))


# --------------------------------------------------------------------------------------------
# detection and domains
# --------------------------------------------------------------------------------------------

def _sessions():
    rows = []
    rng = np.random.default_rng(1)
    for i in range(12):
        tpl, fpl, usl, fnl = (int(v) for v in rng.integers(0, 6, size=4))
        rows.append({"participant_id": f"sub-{i:02d}", "site": "ABC"[i % 3],
                     "detection": {"TPL": tpl, "FPL": fpl, "USL": usl, "FNL": fnl,
                                   **detection_scores(tpl, fpl, usl, fnl), "method": "iou_adj", "threshold": 0.1},
                     "DSC": float(rng.random())})
    return rows


def test_detection_summary_pools_counts_per_site_and_domain():
    sessions = _sessions()
    flat = sessions_table(sessions)
    flat.columns = [c.replace("detection_", "") for c in flat.columns]
    res = detection_summary(flat, in_domain_sites=["A", "B"], n_boot=100)
    pooled = res.pooled.set_index(["group_by", "group"])
    assert pooled.loc[("all", "all"), "n_sessions"] == 12
    for key, sub in [(("all", "all"), flat), (("site", "C"), flat[flat.site == "C"]),
                     (("domain", OUT_OF_DOMAIN), flat[flat.site == "C"]),
                     (("domain", IN_DOMAIN), flat[flat.site != "C"])]:
        counts = {c: int(sub[c].sum()) for c in DETECTION_COUNTS}
        assert pooled.loc[key, list(DETECTION_COUNTS)].tolist() == list(counts.values())
        assert pooled.loc[key, "F1"] == pytest.approx(detection_scores(*counts.values())["F1"])
    summ = res.summary
    assert set(summ["variable"]) == {"F1", "recall", "precision", "USL_rate", "DSC"}
    f1_c = summ[(summ.group == "C") & (summ.variable == "F1")].iloc[0]
    assert f1_c["mean"] == pytest.approx(flat.loc[flat.site == "C", "F1"].mean())
    assert assign_domain(["A", "C", 3], ["A", 3]).tolist() == [IN_DOMAIN, OUT_OF_DOMAIN, IN_DOMAIN]
    mixed = flat.copy()
    mixed.loc[0, "threshold"] = 0.25
    with pytest.raises(ValueError, match="threshold"):
        detection_summary(mixed)
    # nested session dicts: the counts under a prefix
    nested = detection_summary(sessions, in_domain_sites=["A", "B"], counts_prefix="detection_", n_boot=100)
    pd.testing.assert_frame_equal(nested.pooled, res.pooled)
    assert set(nested.summary["variable"]) == {"detection_F1", "detection_recall", "detection_precision",
                                               "detection_USL_rate", "DSC"}


def test_patient_retention_table_uses_the_evaluation_curve():
    rng = np.random.default_rng(2)
    table = pd.DataFrame({"site": np.repeat(["A", "B"], 15), "PSU": rng.random(30), "DSC": rng.random(30)})
    table.loc[0, "PSU"] = np.nan
    out, curves = patient_retention_table(table, ["PSU"], ["DSC"], by="site")
    row = out[(out.group_by == "all")].iloc[0]
    ok = table.PSU.notna()
    ref = patient_retention_curve(table.PSU[ok], table.DSC[ok])
    assert row["n"] == 29 and row["auc"] == pytest.approx(ref.auc) and row["aac"] == pytest.approx(1 - ref.auc)
    assert row["auc_random"] == pytest.approx((table.DSC[ok].mean() + 1) / 2)
    assert row["auc_ideal"] >= row["auc"]
    np.testing.assert_allclose(curves[("all", "all", "PSU", "DSC")].values, ref.values)
    assert len(out) == 3


# --------------------------------------------------------------------------------------------
# ICC
# --------------------------------------------------------------------------------------------

def test_icc_reproduces_shrout_and_fleiss_table_2():
    res = icc(_long(SHROUT_FLEISS), "target", "rater", "rating")
    # the paper: ICC(3,1) = .71, ICC(3,4) = .91; its ANOVA table: BMS 11.24, JMS 32.49, EMS 1.02
    assert round(res["ICC3_1"], 2) == 0.71 and round(res["ICC3_k"], 2) == 0.91
    assert res["ICC3_1"] == pytest.approx(0.714840714840714, rel=1e-12)
    assert res["ICC3_k"] == pytest.approx(0.909315542377, rel=1e-10)
    assert (round(res["MS_R"], 2), round(res["MS_C"], 2), round(res["MS_E"], 2)) == (11.24, 32.49, 1.02)
    assert res["F"] == pytest.approx(11.027, abs=1e-3) and (res["df1"], res["df2"]) == (5, 15)
    assert res["n_targets"] == 6 and res["n_raters"] == 4 and res["n_dropped_targets"] == 0
    assert res["ICC3_1_ci_low"] < res["ICC3_1"] < res["ICC3_1_ci_high"]
    assert res["ICC3_k_ci_low"] < res["ICC3_k"] < res["ICC3_k_ci_high"]
    assert res["pval"] < 0.001


def test_icc_identities_and_missing_ratings():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 1)) + 0.5 * rng.normal(size=(30, 3)) + np.array([0.0, 1.0, -2.0])
    res = icc(_long(x), "target", "rater", "rating")
    k = x.shape[1]
    # ICC(3,k) is Cronbach's alpha; ICC(3,k) is the Spearman-Brown step-up of ICC(3,1)
    alpha = k / (k - 1) * (1 - x.var(axis=0, ddof=1).sum() / x.sum(axis=1).var(ddof=1))
    assert res["ICC3_k"] == pytest.approx(alpha, rel=1e-10)
    assert res["ICC3_k"] == pytest.approx(k * res["ICC3_1"] / (1 + (k - 1) * res["ICC3_1"]), rel=1e-10)
    # rater offsets do not matter (consistency); a missing rating drops its target
    shifted = icc(_long(x + np.array([5.0, 0.0, 0.0])), "target", "rater", "rating")
    assert shifted["ICC3_1"] == pytest.approx(res["ICC3_1"])
    long = _long(x)
    dropped = long.drop(index=[4]).reset_index(drop=True)    # target 1, rater j1
    dropped.loc[dropped.index[-1], "rating"] = np.nan         # target 29, rater j2
    part = icc(dropped, "target", "rater", "rating")
    full = icc(_long(np.delete(x, [1, 29], axis=0)), "target", "rater", "rating")
    assert part["n_dropped_targets"] == 2 and part["n_targets"] == 28
    assert part["ICC3_1"] == pytest.approx(full["ICC3_1"])
    with pytest.raises(ValueError, match="several ratings"):
        icc(pd.concat([long, long.iloc[:1]]), "target", "rater", "rating")
    assert np.isnan(icc(_long(x[:1]), "target", "rater", "rating")["ICC3_1"])
    table = long.rename(columns={"rating": "volume"}).assign(sphericity=long.rating * 2)
    out = icc_table(table, "target", "rater", ["volume", "sphericity"])
    assert out["feature"].tolist() == ["volume", "sphericity"]
    np.testing.assert_allclose(out["ICC3_1"], res["ICC3_1"])


# --------------------------------------------------------------------------------------------
# uncertainty-explanation regression
# --------------------------------------------------------------------------------------------

def _lesions(n=600, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    log_volume = rng.normal(3.0, 1.0, n)
    gm_overlap = rng.beta(1.0, 3.0, n)
    noise = {f"noise_{i}": rng.normal(size=n) for i in range(5)}
    roundness = 0.3 * log_volume + rng.normal(size=n)  # correlated with size, no effect of its own
    lsu = 0.6 - 0.08 * log_volume + 0.3 * gm_overlap + rng.normal(0.0, 0.03, n)
    return pd.DataFrame({"log_volume": log_volume, "gm_overlap": gm_overlap, "roundness": roundness, **noise,
                         "site": rng.choice(["A", "B", "C"], n), "LSU": lsu})


FEATURES = ["log_volume", "gm_overlap", "roundness"] + [f"noise_{i}" for i in range(5)]


def test_regression_recovers_the_true_drivers():
    table = _lesions()
    res = uncertainty_drivers(table, "LSU", FEATURES, n_repeats=3, test_mask=table.site == "C")
    top = res.importance.head(2)
    assert set(top["feature"]) == {"log_volume", "gm_overlap"}
    coef = res.importance.set_index("feature")["mean"]
    assert coef["log_volume"] < 0 < coef["gm_overlap"]
    # standardised coefficients: beta * sd(feature)
    assert coef["log_volume"] == pytest.approx(-0.08 * table.log_volume.std(), rel=0.1)
    assert coef["gm_overlap"] == pytest.approx(0.3 * table.gm_overlap.std(), rel=0.1)
    assert coef.drop(["log_volume", "gm_overlap"]).abs().max() < 0.01
    assert res.summary["cv_r2_mean"] > 0.8 and res.summary["test_r2_mean"] > 0.8
    assert res.summary["n_test"] == int((table.site == "C").sum())
    assert len(res.scores) == 3 and res.per_repeat.shape == (3, len(FEATURES))
    assert res.scores["n_selected"].min() >= 2


def test_fast_engine_equals_gridsearchcv():
    table = _lesions(n=120, seed=1)
    grid = {"rfe__n_features_to_select": [0.125, 0.25, 0.5, 1.0], "elasticnet__alpha": [1e-3, 1e-1],
            "elasticnet__l1_ratio": [0.0, 1.0]}
    fast = uncertainty_drivers(table, "LSU", FEATURES, grid=grid, n_repeats=2)
    slow = uncertainty_drivers(table, "LSU", FEATURES, grid=grid, n_repeats=2, engine="sklearn")
    pd.testing.assert_frame_equal(fast.scores, slow.scores, rtol=1e-9)
    pd.testing.assert_frame_equal(fast.per_repeat, slow.per_repeat, rtol=1e-9, atol=1e-12)
    parallel = uncertainty_drivers(table, "LSU", FEATURES, grid=grid, n_repeats=2, n_jobs=2)
    pd.testing.assert_frame_equal(fast.scores, parallel.scores)


def test_random_forest_importances_and_options():
    table = _lesions(n=300)
    rf = uncertainty_drivers(table, "LSU", FEATURES, model="random_forest", n_repeats=2,
                               grid={"n_estimators": [30], "min_samples_leaf": [5]})
    assert set(rf.importance.head(2)["feature"]) == {"log_volume", "gm_overlap"}
    assert rf.importance["mean"].sum() == pytest.approx(1.0)
    no_rfe = uncertainty_drivers(table, "LSU", FEATURES, n_repeats=1, rfe=False)
    assert no_rfe.scores["n_selected"].tolist() == [len(FEATURES)]
    bad = table.copy()
    bad.loc[:9, "gm_overlap"] = np.nan
    res = uncertainty_drivers(bad, "LSU", FEATURES, n_repeats=1)
    assert res.summary["n_dropped"] == 10 and res.summary["n_train"] == 290
    with pytest.raises(ValueError):
        uncertainty_drivers(table, "LSU", FEATURES, model="svm")
    assert len(_grid_candidates(FULL_ELASTICNET_GRID)) == 200


def test_inputs_are_not_modified():
    table = _lesions(n=100)
    copy = table.copy()
    summarise(table, ["LSU"], by="site", n_boot=50)
    uncertainty_drivers(table, "LSU", FEATURES, n_repeats=1)
    patient_retention_table(table, ["roundness"], ["LSU"])
    detection_summary(table, by="site", n_boot=50)
    pd.testing.assert_frame_equal(table, copy)
    sessions = _sessions()
    before = repr(sessions)
    detection_summary(sessions, n_boot=50)
    assert repr(sessions) == before
