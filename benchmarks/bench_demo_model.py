#!/usr/bin/env python3
"""The installed model on real and held-out synthetic sessions through the full pipeline
(issue 14, point 4): lesion F1, DSC, nDSC, precision, recall, the USL/FPL/FNL counts, and the
same per lesion-size bin.

    TEMPLATEFLOW_HOME=... python benchmarks/bench_demo_model.py [--model demo] [--synthetic 10] [--tta]

Sessions: open_ms_data ``patient07`` (real, MNI 1 mm, skull-stripped T1w + FLAIR, consensus mask;
never used to train or tune the demo model) and ``--synthetic N`` held-out subjects of the
domain-randomised generator (``bids_app.synth.generate_randomised_subject``, seeds from
``--seed``, far from the training seeds of ``train-demo``) at 1 mm. One ``msxplain ...
participant`` run with ``--reference-masks``; the written union mask ``label-lesion_mask`` is
scored here against the reference with the detection rule of arXiv:2507.12092 (``iou_adj``,
t = 0.1, ``--connectivity``, default 26) and nDSC with the model card's reference lesion load.

Size bins (mm^3: < 10, 10-100, > 100): a predicted lesion's TPL/USL/FPL counts in the bin of
its own volume, a missed reference lesion (FNL) in the bin of the reference lesion's volume;
per bin, F1 = 2 TPL / (2 TPL + FPL + USL + FNL), precision = TPL / (TPL + FPL + USL), recall
= TPL / (TPL + FNL of the bin's reference lesions). Results: docs/demo-model.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

BINS_MM3 = ((0.0, 10.0, "<10"), (10.0, 100.0, "10-100"), (100.0, np.inf, ">100"))


def synthetic_sessions(bids: Path, reference: Path, n: int, seed: int) -> list[str]:
    """Write ``n`` randomised held-out subjects (T1w, FLAIR, true lesion mask) into the datasets."""
    from bids_app.synth import generate_randomised_subject, load_lesion_library, load_templates

    templates, library = load_templates(1.0), load_lesion_library()
    names = []
    for k in range(n):
        subject = generate_randomised_subject(seed + k, templates, library)
        name = f"syn{k:02d}"
        anat = bids / f"sub-{name}" / "anat"
        anat.mkdir(parents=True)
        for channel in ("T1w", "FLAIR"):
            nib.save(nib.Nifti1Image(subject.images[channel], subject.affine), anat / f"sub-{name}_{channel}.nii.gz")
        ref = reference / f"sub-{name}" / "anat"
        ref.mkdir(parents=True)
        nib.save(nib.Nifti1Image((subject.labels > 0).astype(np.uint8), subject.affine),
                 ref / f"sub-{name}_label-lesion_mask.nii.gz")
        names.append(name)
    return names


def scores(pred: np.ndarray, ref: np.ndarray, voxel_mm3: float, connectivity: int, ndsc_r: float) -> dict:
    from bids_app.core.metrics.detection import classify_lesions, detection_scores
    from bids_app.core.metrics.overlap import dice, ndsc

    types = classify_lesions(pred, ref, "iou_adj", 0.1, connectivity)
    out = {**detection_scores(**{k.lower(): v for k, v in types.counts.items()}), **types.counts,
           "DSC": dice(pred, ref), "nDSC": ndsc(pred, ref, ndsc_r),
           "pred_mL": float(pred.sum() * voxel_mm3 / 1000), "ref_mL": float(ref.sum() * voxel_mm3 / 1000)}
    pred_size = np.bincount(types.pred_labels.ravel())[1:] * voxel_mm3
    ref_size = np.bincount(types.ref_labels.ravel())[1:] * voxel_mm3
    for lo, hi, name in BINS_MM3:
        in_pred = (pred_size >= lo) & (pred_size < hi)
        in_ref = (ref_size >= lo) & (ref_size < hi)
        counts = {t: int(np.count_nonzero(types.pred_type[in_pred] == t)) for t in ("TPL", "FPL", "USL")}
        counts["FNL"] = int(np.count_nonzero(~types.ref_detected[in_ref]))
        out[f"bin {name}"] = {**detection_scores(counts["TPL"], counts["FPL"], counts["USL"], counts["FNL"]),
                              **counts, "n_ref": int(in_ref.sum()), "n_pred": int(in_pred.sum())}
    return out


def main() -> None:
    from bench_participant import make_session

    from bids_app.testing import shared_data_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--synthetic", type=int, default=0, help="held-out randomised subjects to add")
    ap.add_argument("--seed", type=int, default=990_000, help="first seed of the synthetic subjects")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--connectivity", type=int, default=26)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_demo_model_"))
    root.mkdir(parents=True, exist_ok=True)
    bids, _ = make_session(root, shared_data_dir(), "same")
    names = ["p07"] + synthetic_sessions(bids, root / "reference", args.synthetic, args.seed)
    out = root / "out"
    cmd = [sys.executable, "-m", "bids_app", str(bids), str(out), "participant", "--model", args.model,
           "-w", str(root / "work"), "--nprocs", str(args.nprocs), "--reference-masks", str(root / "reference"),
           "--skip-bids-validation", "--no-lesion-features", *([] if args.tta else ["--no-tta"])]
    code = subprocess.run(cmd, env=dict(os.environ), stdout=open(root / "run.log", "w"),
                          stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"msxplain exited {code}; see {root / 'run.log'}")
    card = json.loads(next(out.rglob("sub-p07_*label-lesion_mask.json")).read_text())
    ndsc_r = float(card.get("msxplain", {}).get("Parameters", {}).get("nDSCReferenceLesionLoad", 0.001))
    results = {}
    for name in names:
        pred_img = nib.load(next(out.rglob(f"sub-{name}_label-lesion_mask.nii.gz")))
        ref_img = nib.load(next((root / "reference").rglob(f"sub-{name}_label-lesion_mask.nii.gz")))
        pred = np.asarray(pred_img.dataobj) > 0
        ref = np.asarray(ref_img.dataobj) > 0
        results[name] = scores(pred, ref, float(abs(np.linalg.det(pred_img.affine[:3, :3]))), args.connectivity,
                               ndsc_r)
    keys = ("F1", "DSC", "nDSC", "precision", "recall", "TPL", "FPL", "USL", "FNL", "pred_mL", "ref_mL")
    print("session\t" + "\t".join(keys))
    for name, r in results.items():
        print(name + "\t" + "\t".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    synthetic = [r for n, r in results.items() if n != "p07"]
    if synthetic:
        print("synthetic mean\t" + "\t".join(f"{np.mean([r[k] for r in synthetic]):.3f}" for k in keys))
    print("size bins (patient07; synthetic summed):")
    for _, _, b in BINS_MM3:
        real = results["p07"][f"bin {b}"]
        line = f"  {b} mm3: patient07 F1 {real['F1']:.3f} P {real['precision']:.3f} R {real['recall']:.3f} " \
               f"(TPL {real['TPL']} FPL {real['FPL']} USL {real['USL']} FNL {real['FNL']}, {real['n_ref']} ref)"
        if synthetic:
            from bids_app.core.metrics.detection import detection_scores

            summed = {t: sum(r[f"bin {b}"][t] for r in synthetic) for t in ("TPL", "FPL", "USL", "FNL")}
            s = detection_scores(summed["TPL"], summed["FPL"], summed["USL"], summed["FNL"])
            line += f"; synthetic F1 {s['F1']:.3f} P {s['precision']:.3f} R {s['recall']:.3f} {summed}"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    print(f"folders: {root}")


if __name__ == "__main__":
    main()
