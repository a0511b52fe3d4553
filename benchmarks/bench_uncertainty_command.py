#!/usr/bin/env python3
"""``msxplain-tools uncertainty`` (every measure, maps and table written) against a plain
per-lesion loop that computes only LSU and PSU from the same files (issue 17, point 2: the
command must be at least 2x faster than the loop).

    python benchmarks/bench_uncertainty_command.py [--lesions 190] [--members 5]

Data: :func:`bench_uncertainty.synthetic_ensemble` (a 182 x 218 x 182 volume, member lesion
probabilities that disagree), written as one NIfTI per member plus a brain mask. Both sides run
in a fresh Python process that reads the files (wall time of the process, imports included):

* the command: ``msxplain-tools uncertainty --member-probs ... --brain-mask ... --out-dir``;
* the loop: nibabel reads, ensemble mean >= 0.5, components of >= 4 voxels (18-connectivity,
  ``scipy.ndimage``), then for each ensemble lesion, inside its bounding box, each member's best
  IoU with one of its own lesions (LSU = 1 - mean best IoU; member lesions thresholded the same
  way), and PSU = 1 - mean IoU of the ensemble mask with each member's mask (arXiv:2311.08931,
  MS_WML_uncs). It writes nothing.

Results: docs/benchmarks.md ("Per-stage cost of a participant").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

LOOP = r"""
import sys
import nibabel as nib
import numpy as np
from scipy import ndimage

files, brain_file = sys.argv[1:-1], sys.argv[-1]
probs = np.stack([np.asarray(nib.load(f).dataobj, dtype=np.float32) for f in files])
structure = ndimage.generate_binary_structure(3, 2)  # 18-connectivity


def lesions(mask):
    labels, n = ndimage.label(mask, structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= 4
    keep[0] = False
    labels[~keep[labels]] = 0
    return labels, sizes


ens_labels, _ = lesions(probs.mean(0) >= 0.5)
members = [lesions(p >= 0.5) for p in probs]
lsu = {}
for k, box in enumerate(ndimage.find_objects(ens_labels), start=1):
    if box is None:
        continue
    lesion = ens_labels[box] == k
    best = []
    for labels, sizes in members:
        crop = labels[box]
        found = 0.0
        for lab in np.unique(crop[lesion]):
            if lab == 0:
                continue
            inter = np.count_nonzero(lesion & (crop == lab))
            # the member lesion may leave the box: its whole size comes from the full-volume count
            found = max(found, inter / (lesion.sum() + sizes[lab] - inter))
        best.append(found)
    lsu[k] = 1 - float(np.mean(best))
ens = ens_labels > 0
psu = 1 - np.mean([np.count_nonzero(ens & (m[0] > 0)) / max(np.count_nonzero(ens | (m[0] > 0)), 1)
                   for m in members])
print(f"loop: {len(lsu)} lesions, PSU {psu:.4f}, mean LSU {np.mean(list(lsu.values())):.4f}")
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{cmd[:3]} failed: {result.stderr[-2000:]}")
    return seconds, result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def main() -> None:
    from bench_uncertainty import synthetic_ensemble

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lesions", type=int, default=190, help="lesions drawn (190 give about 150 ensemble lesions)")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_unc_cmd_"))
    member_probs, brain = synthetic_ensemble(n_members=args.members, n_lesions=args.lesions)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    files = []
    for m in range(args.members):
        files.append(root / f"member{m}.nii.gz")
        nib.save(nib.Nifti1Image(member_probs[m, 1], affine), files[-1])
    brain_file = root / "brain.nii.gz"
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), brain_file)
    command = [sys.executable, "-c", "import sys; from bids_app.cli.tools import main; sys.exit(main(sys.argv[1:]))",
               "uncertainty", "--member-probs", *map(str, files),
               "--brain-mask", str(brain_file), "--threshold", "0.5", "--min-lesion-size", "4",
               "--connectivity", "18"]
    loop = [sys.executable, "-c", LOOP, *map(str, files), str(brain_file)]
    results = {"command": [], "loop": []}
    for r in range(args.repeats):  # alternate, so that a change of load hits both
        seconds, _ = timed(command + ["--out-dir", str(root / f"out{r}")])
        results["command"].append(seconds)
        seconds, line = timed(loop)
        results["loop"].append(seconds)
    print(line)
    n_outputs = len(list((root / "out0").rglob("*")))
    best_cmd, best_loop = min(results["command"]), min(results["loop"])
    print(f"msxplain-tools uncertainty: {', '.join(f'{s:.1f}' for s in results['command'])} s "
          f"({n_outputs} files written)")
    print(f"plain LSU+PSU loop: {', '.join(f'{s:.1f}' for s in results['loop'])} s")
    print(f"loop / command (best of {args.repeats}): {best_loop / best_cmd:.2f}x")


if __name__ == "__main__":
    main()
