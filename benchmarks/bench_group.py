"""Benchmark of issue 6: group-level statistics on 1000 synthetic participants, and the per-lesion
features (+ template registration and atlas warping) on a 182 x 218 x 182 volume with ~60 lesions.

Group part (always): 1000 synthetic session summaries (5 sites, 2 of them in-domain) given as
nested metric dicts, then

* ``sessions_table`` (flattening), ``detection_summary`` (pooled counts + mean [95 % CI] / SE of
  every per-session metric, overall, per site and per domain; 1000 bootstrap resamples);
* ``summarise`` of 12 session variables by site and domain;
* ``patient_retention_table``: 3 patient uncertainties x 2 metrics, overall and per site;
* ``icc_table``: 10 lesion features of 60 lesions measured at the 5 sites (ICC(3,1), ICC(3,k));
* ``uncertainty_drivers`` on 2000 lesions x 12 features: ElasticNet + RFE, 10 repeats of 5-fold
  CV, default (small) grid; optionally ``--full-grid`` (the spec's 200 candidates) and
  ``--forest``.

Features part (``--features``, needs ``../shared/data``): real FLAIR/T1 of open_ms_data
``patient07`` (FSL MNI 1 mm grid, 182 x 218 x 182) with the lesion mask of ``patient14`` (59
lesions, 26-connectivity), registration of the T1 to MNI152NLin2009cAsym (2 mm template), warping
of the 1 mm GM probseg and HOparc atlas, then ``lesion_features`` (all blocks) and
``lesion_meshes``.

Usage::

    python benchmarks/bench_group.py                 # group statistics
    python benchmarks/bench_group.py --features      # + per-lesion features on real data
    python benchmarks/bench_group.py --full-grid --forest
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

try:
    from bids_app.core.cohort import summary
    from bids_app.core.cohort.drivers import uncertainty_drivers
    from bids_app.core.cohort.icc import icc_table
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bids_app.core.cohort import summary
    from bids_app.core.cohort.drivers import uncertainty_drivers
    from bids_app.core.cohort.icc import icc_table

from bids_app.core.metrics.detection import detection_scores

SITES = ("A", "B", "C", "D", "E")
IN_DOMAIN = ("A", "B")


class Timer:
    def __init__(self):
        self.rows: list[tuple[str, float]] = []

    def __call__(self, name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        dt = time.perf_counter() - t0
        self.rows.append((name, dt))
        print(f"  {name:<58s} {dt:8.2f} s", flush=True)
        return out


# --------------------------------------------------------------------------------------------
# synthetic cohort
# --------------------------------------------------------------------------------------------

def synthetic_sessions(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        site = SITES[i % len(SITES)]
        shift = SITES.index(site) * 0.03
        quality = float(np.clip(rng.normal(0.7 - shift, 0.12), 0.05, 0.98))
        n_ref = int(rng.integers(1, 40))
        tpl = int(rng.binomial(n_ref, quality))
        fnl = n_ref - tpl
        fpl = int(rng.poisson(3 + 10 * (1 - quality)))
        usl = int(rng.poisson(1))
        psu = float(1 - quality + rng.normal(0, 0.05))
        out.append({
            "participant_id": f"sub-{i:04d}", "session_id": "n/a", "site": site,
            "detection": {"TPL": tpl, "FPL": fpl, "USL": usl, "FNL": fnl, **detection_scores(tpl, fpl, usl, fnl),
                          "n_pred_lesions": tpl + fpl + usl, "n_ref_lesions": n_ref, "method": "iou_adj",
                          "threshold": 0.1, "connectivity": 26},
            "voxel": {"DSC": quality * 0.9, "nDSC": quality * 0.92, "TPRvox": quality, "FDRvox": 1 - quality},
            "uncertainty": {"PSU": psu, "PSU_plus": psu + rng.normal(0, 0.05),
                            "mean_MI": psu * 0.1 + rng.normal(0, 0.01)},
            "lesions": {"n_lesions": tpl + fpl + usl, "total_volume_mm3": float(rng.lognormal(8, 1))},
        })
    return out


def synthetic_lesions(n: int, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols = {
        "log_volume": rng.normal(3.5, 1.0, n), "gm_fraction": rng.beta(1.0, 3.0, n),
        "sphericity": rng.beta(8, 2, n), "elongation": rng.lognormal(0.3, 0.2, n),
        "distance_to_cortex_mm": rng.gamma(2.0, 5.0, n), "distance_to_ventricle_mm": rng.gamma(2.0, 8.0, n),
        "FLAIR_contrast_shell": rng.normal(1.5, 0.2, n), "T1w_contrast_shell": rng.normal(0.8, 0.1, n),
    }
    for i in range(4):
        cols[f"noise_{i}"] = rng.normal(size=n)
    t = pd.DataFrame(cols)
    t["LSU"] = (0.7 - 0.1 * t.log_volume + 0.25 * t.gm_fraction - 0.2 * (t.sphericity - 0.8)
                + rng.normal(0, 0.05, n)).clip(0, 1)
    t["site"] = rng.choice(SITES, n)
    return t


def travelling_lesions(n_lesions: int = 60, n_features: int = 10, seed: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n_lesions, n_features))
    rows = []
    for s, site in enumerate(SITES):
        values = truth + rng.normal(0, 0.4, size=truth.shape) + s * 0.1
        for i in range(n_lesions):
            rows.append({"lesion": i, "site": site, **{f"f{j}": values[i, j] for j in range(n_features)}})
    return pd.DataFrame(rows)


def group_benchmark(args, timer: Timer) -> None:
    print(f"Group statistics ({args.participants} participants, 5 sites, n_boot = 1000)")

    def imports():
        import scipy.stats  # noqa: F401
        import sklearn.ensemble  # noqa: F401
        import sklearn.feature_selection  # noqa: F401
        import sklearn.linear_model  # noqa: F401
        import sklearn.model_selection  # noqa: F401

    timer("imports (scipy.stats, sklearn; once per process)", imports)
    sessions = synthetic_sessions(args.participants)
    table = timer("sessions_table (flatten 1000 nested dicts)", summary.sessions_table, sessions)
    res = timer("detection_summary (pooled + 11 metrics, all/site/domain)", summary.detection_summary, table,
                in_domain_sites=IN_DOMAIN, counts_prefix="detection_")
    table["domain"] = summary.assign_domain(table["site"], IN_DOMAIN)
    cols = ["voxel_DSC", "voxel_nDSC", "voxel_TPRvox", "voxel_FDRvox", "uncertainty_PSU", "uncertainty_PSU_plus",
            "uncertainty_mean_MI", "lesions_n_lesions", "lesions_total_volume_mm3", "detection_F1",
            "detection_recall", "detection_precision"]
    summ = timer("summarise (12 variables, all/site/domain)", summary.summarise, table, cols, by=("site", "domain"))
    rc, _ = timer("patient_retention_table (3 x 2, all/site)", summary.patient_retention_table, table,
                  ["uncertainty_PSU", "uncertainty_PSU_plus", "uncertainty_mean_MI"], ["voxel_DSC", "voxel_nDSC"],
                  by="site")
    trav = travelling_lesions()
    icc = timer("icc_table (10 features, 60 lesions x 5 sites)", icc_table, trav, "lesion", "site",
                [f"f{j}" for j in range(10)])
    lesions = synthetic_lesions(args.lesions)
    feats = [c for c in lesions.columns if c not in ("LSU", "site")]
    reg = timer(f"uncertainty_drivers ({args.lesions} lesions, 12 features, small grid, 10 x 5-fold)",
                uncertainty_drivers, lesions, "LSU", feats, test_mask=lesions.site == "E")
    if args.full_grid:
        full = timer("uncertainty_drivers (full grid: 200 candidates, 10 x 5-fold)", uncertainty_drivers, lesions,
                     "LSU", feats, grid="full", test_mask=lesions.site == "E")
        print(f"    full grid CV R2 {full.summary['cv_r2_mean']:.3f} +- {full.summary['cv_r2_sd']:.3f}")
    if args.forest:
        rf = timer("uncertainty_drivers (random forest, small grid, 10 repeats)", uncertainty_drivers, lesions,
                   "LSU", feats, model="random_forest", test_mask=lesions.site == "E")
        print(f"    forest CV R2 {rf.summary['cv_r2_mean']:.3f}; top: {rf.importance.feature.head(3).tolist()}")
    if args.check_engine:
        small = lesions.iloc[:400]
        fast = timer("uncertainty_drivers fast engine (400 lesions, 2 repeats)", uncertainty_drivers, small, "LSU",
                     feats, n_repeats=2)
        slow = timer("uncertainty_drivers literal GridSearchCV (same)", uncertainty_drivers, small, "LSU", feats,
                     n_repeats=2, engine="sklearn")
        same = np.allclose(fast.per_repeat.to_numpy(), slow.per_repeat.to_numpy(), rtol=1e-9, atol=1e-12)
        print(f"    engines agree: {same}")
    total = sum(dt for name, dt in timer.rows if not name.startswith(("imports", "uncertainty_drivers (full",
                                                                        "uncertainty_drivers (random",
                                                                        "uncertainty_drivers fast",
                                                                        "uncertainty_drivers literal")))
    print(f"  {'TOTAL (default analyses)':<58s} {total:8.2f} s")
    pooled = res.pooled.set_index(["group_by", "group"])
    print(f"    pooled F1 all {pooled.loc[('all', 'all'), 'F1']:.3f}, in-domain "
          f"{pooled.loc[('domain', summary.IN_DOMAIN), 'F1']:.3f}, out-of-domain "
          f"{pooled.loc[('domain', summary.OUT_OF_DOMAIN), 'F1']:.3f}")
    dsc = summ[(summ.group_by == "all") & (summ.variable == "voxel_DSC")].iloc[0]
    print(f"    DSC {dsc['mean']:.3f} [{dsc['ci_low']:.3f}, {dsc['ci_high']:.3f}], SE {dsc['se']:.4f}; "
          f"{len(summ)} summary rows, {len(rc)} retention rows, median ICC(3,1) {icc.ICC3_1.median():.3f}")
    print(f"    regression CV R2 {reg.summary['cv_r2_mean']:.3f} +- {reg.summary['cv_r2_sd']:.3f}, test R2 "
          f"{reg.summary['test_r2_mean']:.3f}; top features {reg.importance.feature.head(3).tolist()}")


# --------------------------------------------------------------------------------------------
# per-lesion features on real data
# --------------------------------------------------------------------------------------------

def features_benchmark(args, timer: Timer) -> None:
    from bids_app.core import registration as R
    from bids_app.core.imageio import load_image
    from bids_app.core.lesions.features import FeatureOptions, lesion_features
    from bids_app.core.lesions.meshes import lesion_meshes, stl_bytes
    from bids_app.core.postprocess import label_components

    shared = Path(args.shared)
    base = shared / "open_ms_data" / "cross_sectional" / "MNI"
    tpl = shared / "templateflow" / "tpl-MNI152NLin2009cAsym"
    if not base.is_dir() or not tpl.is_dir():
        print(f"features: shared data not found under {shared}; skipped")
        return
    t1 = load_image(next((base / "patient07").glob("T1*")))
    flair = load_image(next((base / "patient07").glob("FLAIR*")))
    gold = load_image(next((base / "patient14").glob("GOLD*")), check_values=False)
    inst, n = label_components(gold.data > 0, 26)
    brain = t1.data > 0
    name = "tpl-MNI152NLin2009cAsym_"
    tpl_t1 = load_image(tpl / f"{name}res-02_T1w.nii.gz")
    tpl_mask = load_image(tpl / f"{name}res-02_desc-brain_mask.nii.gz", check_values=False).data > 0.5
    gm = load_image(tpl / f"{name}res-01_label-GM_probseg.nii.gz", check_values=False)
    atlas = load_image(tpl / f"{name}res-01_desc-HOparc_dseg.nii.gz", dtype=None, check_values=False)
    lut = pd.read_csv(tpl / f"{name}res-01_desc-HOparc_dseg.tsv", sep="\t", dtype=str)
    print(f"Per-lesion features: {t1.shape} grid, {n} lesions ({int((inst > 0).sum())} voxels), T1w + FLAIR")
    transform = timer("register_to_template (1 mm T1w -> 2 mm template, brain-to-brain)", R.register_to_template, t1,
                      tpl_t1, reference_mask=brain, template_mask=tpl_mask)
    gm_s = timer("warp_probability_to_subject (1 mm GM probseg)", R.warp_probability_to_subject, gm.data, gm.affine,
                 t1.shape, t1.affine, transform)
    atlas_s = timer("warp_labels_to_subject (1 mm HOparc dseg)", R.warp_labels_to_subject,
                    atlas.data.astype(np.int32), atlas.affine, t1.shape, t1.affine, transform)
    channels = {"T1w": t1.data, "FLAIR": flair.data}
    args_ = (inst, n, t1.affine, channels, brain, gm_s, atlas_s, lut)
    table = None
    for label, opts in [("lesion_features (all blocks)", FeatureOptions()),
                        ("lesion_features (no pyradiomics shape)", FeatureOptions(radiomics_shape=False)),
                        ("lesion_features (no shape blocks)", FeatureOptions(shape=False, radiomics_shape=False))]:
        best = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = lesion_features(*args_, opts, template_transform=transform)
            best.append(time.perf_counter() - t0)
        table = out if table is None else table
        timer.rows.append((label, float(np.median(best))))
        print(f"  {label:<58s} {np.median(best):8.2f} s (median of {args.repeats})")
    meshes = timer("lesion_meshes (all lesions)", lesion_meshes, inst, n, t1.affine)
    timer("stl_bytes (all lesions)", lambda: [stl_bytes(m) for m in meshes])
    print(f"    {table.shape[1]} columns; location classes {table.location_class.value_counts().to_dict()}")
    print(f"    cortical types {table.cortical_type.value_counts().to_dict()}")
    print(f"    registration metric {transform.metric:.3f}; mesh faces {sum(m.n_faces for m in meshes)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--participants", type=int, default=1000)
    ap.add_argument("--lesions", type=int, default=2000)
    ap.add_argument("--full-grid", action="store_true", help="also run the spec's 200-candidate grid")
    ap.add_argument("--forest", action="store_true", help="also run the random-forest option")
    ap.add_argument("--check-engine", action="store_true", help="compare the fast engine with GridSearchCV")
    ap.add_argument("--features", action="store_true", help="per-lesion features on real 1 mm data")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of lesion_features (median reported)")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = ap.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPU, {platform.processor() or platform.machine()}, Python "
          f"{platform.python_version()}, numpy {np.__version__}, pandas {pd.__version__}; load "
          f"{os.getloadavg()[0]:.1f}")
    timer = Timer()
    group_benchmark(args, timer)
    if args.features:
        features_benchmark(args, timer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
