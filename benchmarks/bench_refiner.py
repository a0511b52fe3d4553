"""Saliency refiner: train it on synthetic subjects, then lesion F1 before/after refinement.

The whole published recipe (arXiv:2409.03772) with the real pipeline, end to end:

1. ``msxplain-tools synth``: training and held-out synthetic datasets (true masks known);
2. ``msxplain ... participant --explain`` on the training subjects (saliency stores);
3. ``msxplain-tools train-refiner`` on those stores and the true masks;
4. ``msxplain ... participant --explain --refiner R --refine`` on the held-out subjects (and,
   with ``--bids``, on a real dataset with reference masks, e.g. ``patient07`` arranged by
   ``scripts/patient07_bids.py``);
5. ``msxplain-tools evaluate`` of the unrefined and the refined lesion masks against the
   references: lesion-wise F1 (iou_adj, t = 0.1, the model's connectivity), per subject and pooled.

Also reports the explanation time per lesion from the sessions' summaries. Writes a JSON
report (``--json``) and, with ``--bundle DIR``, copies the refiner beside a model card.

    python benchmarks/bench_refiner.py WORK --train 8 --test 4 --samples 8 --margin 10 \\
        --bids /tmp/p07/bids --bids-references /tmp/p07/bids/derivatives/reference --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def sh(*args, log: Path | None = None) -> float:
    """Run a command (a failure stops the benchmark); returns its wall time in seconds."""
    t0 = time.perf_counter()
    cmd = [str(a) for a in args]
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") if log else open(os.devnull, "w") as handle:
        subprocess.run(cmd, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def synth(out: Path, n: int, seed: int, shared: Path, log: Path) -> None:
    if (out / "dataset_description.json").is_file():
        return
    args = [BIN / "msxplain-tools", "synth", out, "--n-subjects", n, "--seed", seed, "--sites", 2,
            "--resolution", "1.0", "--skull-stripped"]
    masks = shared / "open_ms_data" / "cross_sectional" / "MNI"
    if masks.is_dir():
        args += ["--lesion-masks", masks]
    sh(*args, log=log)


def participant(bids: Path, out: Path, work: Path, references: Path, args, extra, log: Path) -> float:
    return sh(BIN / "msxplain", bids, out, "participant", "-w", work, "--no-tta", "--nprocs", args.nprocs,
              "--explain", "--explain-samples", args.samples, "--explain-margin", args.margin,
              "--no-lesion-features", "--reference-masks", references, *extra, log=log)


def evaluate(pred: Path, ref: Path, out: Path, connectivity: int) -> dict:
    sh(BIN / "msxplain-tools", "evaluate", "--pred", pred, "--ref", ref, "--method", "iou_adj",
       "--detection-threshold", "0.1", "--connectivity", connectivity, "--out", out)
    return json.loads(out.read_text())


def counts(metrics: dict) -> dict:
    """TPL/FPL/FNL and F1/DSC from an evaluate JSON (whatever its nesting)."""
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                flat[f"{prefix}{k}"] = v

    walk(metrics)

    def find(name):
        keys = [k for k in flat if k.split("/")[-1] == name]
        return flat[sorted(keys, key=len)[0]] if keys else None

    return {k: find(k) for k in ("TPL", "FPL", "FNL", "USL", "F1", "precision", "recall", "DSC")}


def reference_of(ref_root: Path, subject: str) -> Path:
    files = sorted((ref_root / f"sub-{subject}").rglob(f"sub-{subject}*_dseg.nii.gz")) + \
        sorted((ref_root / f"sub-{subject}").rglob(f"sub-{subject}*_mask.nii.gz"))
    if not files:
        raise SystemExit(f"no reference mask for sub-{subject} under {ref_root}")
    return files[0]


def score_dataset(out: Path, ref_root: Path, work: Path, connectivity: int) -> dict:
    rows = []
    for subdir in sorted(out.glob("sub-*")):
        if not subdir.is_dir():
            continue
        sub = subdir.name[4:]
        anat = subdir / "anat"
        ref = reference_of(ref_root, sub)
        before = counts(evaluate(anat / f"sub-{sub}_label-lesion_mask.nii.gz", ref, work / f"{sub}_before.json",
                                 connectivity))
        after = counts(evaluate(anat / f"sub-{sub}_label-lesion_desc-refined_mask.nii.gz", ref,
                                work / f"{sub}_after.json", connectivity))
        summary = json.loads((anat / f"sub-{sub}_summary.json").read_text())
        expl = summary.get("explanations", {})
        rows.append({"subject": sub, "before": before, "after": after,
                     "n_explained": expl.get("n_explained"), "explain_seconds": expl.get("seconds_total"),
                     "n_dropped": (summary.get("refinement") or {}).get("n_dropped")})

    def pooled(key):
        tp = sum(r[key]["TPL"] or 0 for r in rows)
        fp = sum(r[key]["FPL"] or 0 for r in rows)
        fn = sum(r[key]["FNL"] or 0 for r in rows)
        p = tp / (tp + fp) if tp + fp else float("nan")
        r = tp / (tp + fn) if tp + fn else float("nan")
        return {"TPL": tp, "FPL": fp, "FNL": fn, "precision": p, "recall": r,
                "F1": 2 * p * r / (p + r) if p + r else float("nan"),
                "mean_subject_F1": sum(x[key]["F1"] for x in rows) / len(rows)}

    lesions = sum(r["n_explained"] or 0 for r in rows)
    seconds = sum(r["explain_seconds"] or 0 for r in rows)
    return {"subjects": rows, "before": pooled("before"), "after": pooled("after"),
            "explain_seconds_per_lesion": seconds / lesions if lesions else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--train", type=int, default=8, help="synthetic training subjects")
    ap.add_argument("--test", type=int, default=4, help="held-out synthetic subjects")
    ap.add_argument("--train-seed", type=int, default=5151)
    ap.add_argument("--test-seed", type=int, default=6161)
    ap.add_argument("--samples", type=int, default=8, help="SmoothGrad samples")
    ap.add_argument("--margin", type=float, default=10.0, help="crop context in mm")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--connectivity", type=int, default=18)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--bids", type=Path, default=None, help="a real BIDS dataset with reference masks")
    ap.add_argument("--bids-references", type=Path, default=None, help="its reference-mask derivatives folder")
    ap.add_argument("--refiner", type=Path, default=None, help="skip training: evaluate this refiner")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    shared = Path(os.environ.get("MSXPLAIN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    t_all = time.perf_counter()

    refiner = args.refiner
    if refiner is None:
        train = work / "train"
        synth(train / "bids", args.train, args.train_seed, shared, log)
        report["train_participant_seconds"] = participant(
            train / "bids", train / "out", train / "work", train / "bids" / "derivatives" / "lesions", args,
            ["--refiner", "none"], log)
        refiner = work / "refiner.json"
        sh(BIN / "msxplain-tools", "train-refiner", refiner, "--inputs", train / "out", "--reference-dir",
           train / "bids" / "derivatives" / "lesions", "--C", args.C, "--threshold", args.threshold,
           "--save-table", work / "train_table.tsv", log=log)
    model = json.loads(Path(refiner).read_text())
    report["refiner"] = {"path": str(refiner), "n_train": model.get("n_train"),
                         "features_kept": sum(1 for c in model["coef"] if c),
                         "training_fit": model.get("training_fit")}

    test = work / "test"
    synth(test / "bids", args.test, args.test_seed, shared, log)
    refs = test / "bids" / "derivatives" / "lesions"
    report["test_participant_seconds"] = participant(test / "bids", test / "out", test / "work", refs, args,
                                                     ["--refiner", refiner, "--refine"], log)
    report["synthetic_test"] = score_dataset(test / "out", refs, test, args.connectivity)
    if args.bids:
        real = work / "real"
        real.mkdir(exist_ok=True)
        refs = args.bids_references or args.bids / "derivatives" / "reference"
        report["real_participant_seconds"] = participant(args.bids, real / "out", real / "work", refs, args,
                                                         ["--refiner", refiner, "--refine"], log)
        report["real"] = score_dataset(real / "out", refs, real, args.connectivity)
    report["total_seconds"] = time.perf_counter() - t_all
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
