#!/usr/bin/env python3
"""How much the two ensemble means differ: mean of member probabilities (msxplain's default, the
deep-ensemble convention) vs softmax of the mean logits (nnU-Net's ensembling).

    python benchmarks/bench_ensemble_mean.py WORK_DIR [--threshold 0.3] [--min-size 2] [--connectivity 18]

WORK_DIR is a participant run's work folder (``-w``): every ``predict/member_probs.npy`` in it is
one session's per-member probabilities (M, C, X, Y, Z). For each session it prints the mean and
maximum absolute difference of the lesion probability (1 - P(background)) inside the voxels
where either map exceeds 0.01, the voxels whose class differs after thresholding, the lesion
counts and the Dice of the two lesion masks. Defaults: the bundled demo model's card.
Results: docs/uncertainty.md ("Ensemble mean").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bids_app.core.metrics.overlap import dice
from bids_app.core.postprocess import segment_lesions
from bids_app.core.uncertainty import ensemble_mean


def compare(member_probs: np.ndarray, threshold: float, min_size: int, connectivity: int) -> dict:
    labels = list(range(1, member_probs.shape[1]))
    maps = {how: ensemble_mean(member_probs, how) for how in ("probabilities", "logits")}
    lesion = {how: 1.0 - p[0] for how, p in maps.items()}
    support = (lesion["probabilities"] > 0.01) | (lesion["logits"] > 0.01)
    diff = np.abs(lesion["probabilities"] - lesion["logits"])[support]
    segs = {how: segment_lesions(p, labels, threshold, min_size=min_size, connectivity=connectivity)
            for how, p in maps.items()}
    return {
        "members": member_probs.shape[0],
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "voxels_class_differs": int((segs["probabilities"].dseg != segs["logits"].dseg).sum()),
        "lesions_probabilities": segs["probabilities"].n_lesions,
        "lesions_logits": segs["logits"].n_lesions,
        "dice": dice(segs["logits"].dseg > 0, segs["probabilities"].dseg > 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--min-size", type=int, default=2)
    ap.add_argument("--connectivity", type=int, default=18)
    args = ap.parse_args()
    files = sorted(args.work_dir.rglob("predict/member_probs.npy"))
    if not files:
        raise SystemExit(f"no predict/member_probs.npy under {args.work_dir}")
    print("session\tM\tmean|dp|\tmax|dp|\tvoxels_differ\tlesions_prob\tlesions_logit\tDice")
    for path in files:
        row = compare(np.load(path), args.threshold, args.min_size, args.connectivity)
        print(f"{path.parent.parent.name}\t{row['members']}\t{row['mean_abs_diff']:.4f}\t{row['max_abs_diff']:.3f}\t"
              f"{row['voxels_class_differs']}\t{row['lesions_probabilities']}\t{row['lesions_logits']}\t"
              f"{row['dice']:.4f}")


if __name__ == "__main__":
    main()
