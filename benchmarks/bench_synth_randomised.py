"""Domain-randomised generator (issue 14 item 1): lesion loads, timing and intensities vs real data.

Usage::

    export TEMPLATEFLOW_HOME=/path/to/templateflow-copy
    python benchmarks/bench_synth_randomised.py load [--draws 300] [--subjects 5] [--resolution 1]
    python benchmarks/bench_synth_randomised.py intensity [--subjects 6] [--resolution 1] [--real DIR]

``load`` prints the analytic and sampled quantiles of the total-WML-volume distribution, the
volumes actually placed for ``--draws`` subjects (2 mm template, placement only: fast), their
confluent share and location mix, the real library's per-patient loads (patient07 left out)
and, for ``--subjects`` full subjects at ``--resolution``, seconds per subject and the labelled
volumes after deformation.

``intensity`` measures, with one estimator, the real patient07 images (FLAIR, T1, consensus
mask; skull-stripped 1 mm MNI; *looked at, never trained on*) and ``--subjects`` synthetic
subjects drawn with realistic orderings: 3-class k-means on T1 inside the brain, intersected
with a tissue prior (template probabilities sampled at the patient's MNI coordinates for the
real case, the generator's true tissues for the synthetic ones), lesions dilated by 3 voxels
left out; it prints GM/WM, CSF/WM and lesion/WM median ratios and the robust WM coefficient of
variation for both channels, real value against synthetic 10th/50th/90th percentiles.
docs/synth.md ("Domain-randomised mode (issue 14)") quotes both outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MASKS = ROOT.parent / "shared" / "data" / "open_ms_data" / "cross_sectional" / "MNI"


def _q(values, qs=(10, 50, 90)) -> str:
    v = np.asarray(values, dtype=np.float64)
    return " / ".join(f"{np.percentile(v, q):7.2f}" for q in qs)


def bench_load(args) -> None:
    from bids_app.synth import load_lesion_library, load_templates
    from bids_app.synth.lesion_load import LOCATIONS, LoadDistribution, place_wml, sample_wml_volume_ml
    from bids_app.synth.randomised import generate_randomised_subject

    dist = LoadDistribution()
    print(f"load distribution: log-normal median {dist.median_ml} mL, sigma {dist.sigma_log}, "
          f"clipped to [{dist.min_ml}, {dist.max_ml}] mL")
    print(f"  analytic  q10/q50/q90 = {dist.quantile(0.1):.2f} / {dist.quantile(0.5):.2f} / "
          f"{dist.quantile(0.9):.2f} mL,"
          f" P(>50 mL) = {100 * dist.exceedance(50.0):.1f} %")
    v = sample_wml_volume_ml(np.random.default_rng(0), dist, size=100_000)
    print(f"  100k draws q10/q50/q90 = {_q(v)} mL, P(>50 mL) = {100 * np.mean(v > 50):.1f} %, "
          f"P(>30 mL) = {100 * np.mean(v > 30):.1f} %, P(<2 mL) = {100 * np.mean(v < 2):.1f} %")

    library = load_lesion_library(args.lesion_masks)
    per_patient = {}
    for p, vol in zip(library.patient, library.volumes_mm3):
        per_patient[p] = per_patient.get(p, 0.0) + vol / 1000.0
    lib = np.array(list(per_patient.values()))
    print(f"real library ({len(lib)} patients, {', '.join(library.excluded) or 'none'} excluded, components >= 3 vox): "
          f"q10/q50/q90 = {_q(lib)} mL, max {lib.max():.1f} mL, {int((lib > 50).sum())} above 50 mL")

    templates = load_templates(2.0)
    rng = np.random.default_rng(1)
    placed, conf, counts, n_les = [], [], np.zeros(len(LOCATIONS)), []
    start = time.perf_counter()
    for _ in range(args.draws):
        draw = place_wml(rng, library, templates, sample_wml_volume_ml(rng, dist), min_volume_mm3=2.5)
        placed.append(draw.volume_ml)
        conf.append(draw.confluent)
        n_les.append(len(draw.lesions))
        counts += [draw.summary()["placed_per_location"][k] for k in LOCATIONS]
    took = (time.perf_counter() - start) / args.draws
    placed = np.array(placed)
    print(f"placement ({args.draws} subjects, 2 mm template, 1 mm lesion lattice; {took:.2f} s each after the cache):")
    print(f"  placed volume q10/q50/q90 = {_q(placed)} mL, max {placed.max():.1f}, P(>50 mL) = "
          f"{100 * np.mean(placed > 50):.1f} %, confluent {100 * np.mean(conf):.1f} %")
    print(f"  lesions placed per subject q10/q50/q90 = {_q(n_les)}; location share: "
          + ", ".join(f"{k} {100 * c / counts.sum():.1f} %" for k, c in zip(LOCATIONS, counts)))

    if args.subjects:
        templates = load_templates(args.resolution)
        start = time.perf_counter()
        generate_randomised_subject(10_000, templates, library)
        print(f"full subjects at {args.resolution} mm: first (fills the caches) {time.perf_counter() - start:.1f} s")
        secs, vols = [], []
        for seed in range(args.subjects):
            start = time.perf_counter()
            s = generate_randomised_subject(seed, templates, library)
            secs.append(time.perf_counter() - start)
            vols.append(s.params["volumes"]["wml_mm3"] / 1000.0)
            print(f"  seed {seed}: {secs[-1]:5.1f} s, target {s.params['lesions']['target_ml']:6.2f} mL, "
                  f"labelled {vols[-1]:6.2f} mL, {s.params['volumes']['n_wml']} WML / "
                  f"{s.params['volumes']['n_cl']} CL, "
                  f"T1w {s.params['intensities']['T1w']['mode']}, FLAIR {s.params['intensities']['FLAIR']['mode']}")
        print(f"  seconds per subject: median {np.median(secs):.1f}, min {min(secs):.1f}, max {max(secs):.1f}")


def _kmeans3(x: np.ndarray) -> np.ndarray:
    c = np.percentile(x, [10, 50, 90]).astype(np.float64)
    for _ in range(50):
        a = np.argmin(np.abs(x[:, None] - c[None]), axis=1)
        c = np.array([x[a == k].mean() if np.any(a == k) else c[k] for k in range(3)])
    return np.sort(c)


def measure(t1, flair, lesion, brain, csf_prior, gm_prior, wm_prior) -> dict:
    """Median ratios to WM and WM robust CV per channel (see the module docstring)."""
    near = ndi.binary_dilation(lesion, iterations=3)
    centres = _kmeans3(t1[brain & ~near].astype(np.float64))
    cls = np.zeros(t1.shape, np.int8)
    cls[brain] = 1 + np.argmin(np.abs(t1[brain][:, None] - centres[None]), axis=1)
    masks = {"CSF": (cls == 1) & csf_prior & ~near, "GM": (cls == 2) & gm_prior & ~near,
             "WM": (cls == 3) & wm_prior & ~near, "lesion": lesion}
    out = {}
    for name, img in (("T1w", t1), ("FLAIR", flair)):
        wm = np.median(img[masks["WM"]])
        q1, q3 = np.percentile(img[masks["WM"]], [25, 75])
        out[f"{name} WM robust CV"] = (q3 - q1) / 1.349 / wm
        for k in ("GM", "CSF", "lesion"):
            if masks[k].any():
                out[f"{name} {k}/WM"] = float(np.median(img[masks[k]]) / wm)
    return out


def bench_intensity(args) -> None:
    import nibabel as nib

    from bids_app.synth import load_lesion_library, load_templates
    from bids_app.synth.anatomy import sample_points
    from bids_app.synth.randomised import RandomisationParams, generate_randomised_subject

    real_dir = Path(args.real)
    def first(pattern):
        return nib.load(str(sorted(real_dir.glob(pattern))[0]))
    fl_img, t1_img, gt_img = first("FLAIR*"), first("T1_*"), first("GOLD*")
    flair = np.asarray(fl_img.dataobj, np.float32)
    t1 = np.asarray(t1_img.dataobj, np.float32)
    lesion = np.asarray(gt_img.dataobj) > 0
    brain = (flair > 0) & (t1 > 0)
    tpl = load_templates(1.0)
    ijk = np.argwhere(brain)
    world = ijk @ fl_img.affine[:3, :3].T + fl_img.affine[:3, 3]
    priors = []
    for prob, thr in ((tpl.csf, 0.3), (tpl.gm, 0.5), (tpl.wm, 0.7)):
        m = np.zeros(brain.shape, bool)
        m[brain] = sample_points(prob, tpl.affine, world) >= thr
        priors.append(m)
    real = measure(t1, flair, lesion, brain, *priors)

    templates = load_templates(args.resolution)
    library = load_lesion_library(args.lesion_masks)
    params = RandomisationParams(p_realistic=1.0)
    synth = []
    for seed in range(args.subjects):
        s = generate_randomised_subject(seed, templates, library, params=params, return_tissues=True)
        b = s.brain_mask > 0
        synth.append(measure(s.images["T1w"], s.images["FLAIR"], s.labels == 1, b,
                             s.tissues == 1, s.tissues == 2, s.tissues == 3))
    print(f"real = patient07 (FLAIR, T1, consensus mask); synthetic = {args.subjects} subjects at "
          f"{args.resolution} mm with realistic orderings (p_realistic = 1)")
    print(f"{'statistic':<26s} {'real':>8s}   synthetic q10 / q50 / q90")
    for key in real:
        values = [d[key] for d in synth if key in d]
        print(f"{key:<26s} {real[key]:8.3f}   {_q(values) if values else '-'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    load = sub.add_parser("load", help="lesion-load distribution and timing")
    load.add_argument("--draws", type=int, default=300)
    load.add_argument("--subjects", type=int, default=5)
    load.add_argument("--resolution", type=float, default=1.0)
    inten = sub.add_parser("intensity", help="intensity statistics against patient07")
    inten.add_argument("--subjects", type=int, default=6)
    inten.add_argument("--resolution", type=float, default=1.0)
    inten.add_argument("--real", default=str(DEFAULT_MASKS / "patient07"))
    for p in (load, inten):
        p.add_argument("--lesion-masks", default=str(DEFAULT_MASKS) if DEFAULT_MASKS.is_dir() else None)
    args = parser.parse_args()
    if not os.environ.get("TEMPLATEFLOW_HOME"):
        print("set TEMPLATEFLOW_HOME to a TemplateFlow copy", file=sys.stderr)
        return 2
    os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
    print(f"cpus: {os.cpu_count()}, numpy {np.__version__}")
    (bench_load if args.what == "load" else bench_intensity)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
