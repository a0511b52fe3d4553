#!/usr/bin/env python3
"""Per-stage cost of one participant session (issue 17): wall time of every node in the real run,
then each node re-run alone in a fresh process for its own wall time and peak RSS.

    TEMPLATEFLOW_HOME=... python benchmarks/bench_participant.py --model demo [--tta] [--grid same|different]
    TEMPLATEFLOW_HOME=... python benchmarks/bench_participant.py --model full-size --members 1

The session: open_ms_data ``patient07`` (real, MNI 1 mm, skull-stripped T1w + FLAIR, expert mask
given as reference so that the evaluation node runs). ``--grid different`` re-stores the FLAIR
on a 0.9 x 0.9 x 3 mm grid moved by a known rigid motion (4 degrees about z, 2 about x, a
(3, -2, 4) mm shift), so that ``conform`` must co-register it; the error of the recovered
motion (mean and max displacement over the brain, mm) is printed.

``--model demo`` is the bundled ensemble; ``full-size`` a random-weight model with nnU-Net's
default 3d_fullres architecture for 1 mm brains (6 stages, 32-320 features, patch 128^3, two
channels) and ``--members`` members.

Per node: ``pipeline_s`` (Nipype's own runtime of the node in the run, ``--nprocs`` workers),
``alone_s`` and ``peak_rss_gb`` (the node's interface re-run from its pickled inputs in a new
Python process under ``/usr/bin/time``; includes about ``import_s`` of interpreter and imports,
printed once), and the share of ``predict``. Results: docs/benchmarks.md ("Per-stage cost of a
participant").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

PATIENT07 = ("open_ms_data", "cross_sectional", "MNI", "patient07")
T1 = "T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
FLAIR = "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"
GOLD = "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"
#: the known motion of --grid different: rotations (deg) about x, y, z and translation (mm)
MOTION_DEG = (2.0, 0.0, 4.0)
MOTION_MM = (3.0, -2.0, 4.0)

RERUN = r"""
import os, sys
from nipype.utils.filemanip import loadpkl
node = loadpkl(sys.argv[1])
os.chdir(sys.argv[2])
node.interface.run()
"""


def rigid_matrix(deg, mm) -> np.ndarray:
    """4x4 world transform: rotation about x, then y, then z (degrees), then translation (mm)."""
    ax, ay, az = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ ry @ rx
    out[:3, 3] = mm
    return out


def moved_flair(flair: nib.Nifti1Image) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The FLAIR as a scanner would store it after the head moved by ``motion``: the head's
    world position is ``motion @ x``; resampled (linear) on a 0.9 x 0.9 x 3 mm grid covering it."""
    from scipy import ndimage

    motion = rigid_matrix(MOTION_DEG, MOTION_MM)
    zooms = np.array([0.9, 0.9, 3.0])
    shape = np.ceil(np.array(flair.shape) * np.array(flair.header.get_zooms()[:3]) / zooms).astype(int)
    affine = flair.affine.copy()
    affine[:3, :3] = flair.affine[:3, :3] / np.array(flair.header.get_zooms()[:3]) * zooms
    # new voxel -> world (moved head) -> world before the motion -> old voxel
    new_to_old = np.linalg.inv(flair.affine) @ np.linalg.inv(motion) @ affine
    data = ndimage.affine_transform(np.asarray(flair.dataobj, np.float32), new_to_old[:3, :3], new_to_old[:3, 3],
                                    output_shape=tuple(shape), order=1)
    out = nib.Nifti1Image(data.astype(np.float32), affine)
    out.set_qform(affine, 1)
    out.set_sform(affine, 1)
    return out, motion


def make_session(root: Path, shared: Path, grid: str) -> tuple[Path, np.ndarray | None]:
    src = shared.joinpath(*PATIENT07)
    bids = root / "bids"
    anat = bids / "sub-p07" / "anat"
    anat.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "bench", "BIDSVersion": "1.10.0", "DatasetType": "raw", "Authors": ["msxplain benchmarks"]}))
    (bids / "README").write_text("patient07 of open_ms_data (CC-BY), for msxplain's benchmarks.\n")
    shutil.copyfile(src / T1, anat / "sub-p07_T1w.nii.gz")
    motion = None
    if grid == "same":
        shutil.copyfile(src / FLAIR, anat / "sub-p07_FLAIR.nii.gz")
    else:
        moved, motion = moved_flair(nib.load(str(src / FLAIR)))
        nib.save(moved, anat / "sub-p07_FLAIR.nii.gz")
    ref = root / "reference" / "sub-p07" / "anat"
    ref.mkdir(parents=True)
    (root / "reference" / "dataset_description.json").write_text(json.dumps(
        {"Name": "reference", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "open_ms_data consensus"}]}))
    gold = nib.load(str(src / GOLD))
    nib.save(nib.Nifti1Image((np.asarray(gold.dataobj) > 0).astype(np.uint8), gold.affine),
             ref / "sub-p07_label-lesion_mask.nii.gz")
    return bids, motion


def full_size_model(root: Path, members: int, seed: int = 0, features: tuple[int, ...] | None = None) -> Path:
    """A random-weight nnU-Net model of the default 3d_fullres size for 1 mm brains (T1w + FLAIR);
    ``features`` gives a smaller network for trials (patch 96^3 then)."""
    import torch

    from bids_app.core.segment import build_network
    from bids_app.model.card import CARD_NAME, pin_model_files, sha256_file
    from bids_app.training.plans import make_plans

    trainer_dir = root / "Dataset990_FullSize" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    plans = make_plans("Dataset990_FullSize", n_channels=2, spacing_xyz=(1.0, 1.0, 1.0),
                       patch_size_xyz=(128, 128, 128) if features is None else (96, 96, 96),
                       features=features or (32, 64, 128, 256, 320, 320),
                       median_shape_xyz=(182, 218, 182))
    plans["image_reader_writer"] = "NibabelIOWithReorient"
    trainer_dir.mkdir(parents=True)
    (trainer_dir / "plans.json").write_text(json.dumps(plans))
    (trainer_dir / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1w", "1": "FLAIR"}, "labels": {"background": 0, "WML": 1}, "numTraining": 0,
         "file_ending": ".nii.gz"}))
    card_members = []
    for k in range(members):
        torch.manual_seed(seed + k)
        net = build_network(plans, "3d_fullres", 2, 2)
        net.apply(net.initialize)
        with torch.no_grad():  # a softmax far from flat: lesions exist, the later stages have work
            for layer in net.decoder.seg_layers:
                layer.weight.mul_(40.0)
        (trainer_dir / f"fold_{k}").mkdir()
        path = trainer_dir / f"fold_{k}" / "checkpoint_final.pth"
        torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
                   path)
        card_members.append({"fold": str(k), "sha256": sha256_file(path)})
    card = {"card_version": 1, "id": "full-size-random", "labels": {"1": "WML"}, "skull_stripped_input": True,
            "channels": [{"index": 0, "name": "T1w", "queries": [{"suffix": "T1w"}]},
                         {"index": 1, "name": "FLAIR", "queries": [{"suffix": "FLAIR"}]}],
            "postprocessing": {"threshold": 0.5, "min_lesion_size": 3, "connectivity": 18},
            "members": card_members, "files": pin_model_files(trainer_dir)}
    (trainer_dir / CARD_NAME).write_text(json.dumps(card))
    return trainer_dir


def _timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float, int]:
    """(wall s, peak RSS GB, exit code) of ``cmd`` under GNU time."""
    with open(log, "w") as handle:
        start = time.perf_counter()
        code = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *cmd], env=env, stdout=handle,
                              stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - start
    rss = [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("MAXRSS_KB")]
    return wall, (rss[-1] / 1024 ** 2 if rss else float("nan")), code


def node_results(work: Path) -> dict[str, dict]:
    """Node name -> {'pipeline_s', 'node_file'} from the work folder's Nipype results."""
    from nipype.utils.filemanip import loadpkl

    out = {}
    for result in sorted(work.rglob("result_*.pklz")):
        name = result.parent.name
        res = loadpkl(result)
        duration = getattr(res.runtime, "duration", None) if res is not None else None
        out[name] = {"pipeline_s": float(duration) if duration is not None else float("nan"),
                     "node_file": result.parent / "_node.pklz"}
    return out


def registration_error(work: Path, motion: np.ndarray, reference: nib.Nifti1Image) -> tuple[float, float]:
    """Mean and max displacement (mm) over the brain between the recovered and the true motion."""
    import SimpleITK as sitk

    files = sorted(work.rglob("xfm_*_FLAIR.txt"))
    if not files:
        return float("nan"), float("nan")
    transform = sitk.ReadTransform(str(files[0]))
    data = np.asarray(reference.dataobj)
    idx = np.argwhere(data > 0)[::50]
    world = nib.affines.apply_affine(reference.affine, idx)  # RAS+ mm
    lps = world * np.array([-1, -1, 1])  # ITK's physical space is LPS
    # the transform maps reference points to the moving (FLAIR) image: the true one is ``motion`` in RAS
    recovered = np.array([transform.TransformPoint(tuple(map(float, p))) for p in lps]) * np.array([-1, -1, 1])
    truth = nib.affines.apply_affine(motion, world)
    error = np.linalg.norm(recovered - truth, axis=1)
    return float(error.mean()), float(error.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("demo", "full-size"), default="demo")
    ap.add_argument("--members", type=int, default=1, help="members of the full-size model")
    ap.add_argument("--features", type=int, nargs="+", default=None,
                    help="a smaller 'full-size' network (trial runs of the GPU script on a CPU)")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--grid", choices=("same", "different"), default="same")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more msxplain options")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run's folders here")
    ap.add_argument("--no-rerun", action="store_true", help="skip the per-node re-runs (times only)")
    args = ap.parse_args()

    from bids_app.testing import shared_data_dir

    root = Path(tempfile.mkdtemp(prefix="bench_participant_")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    bids, motion = make_session(root, shared_data_dir(), args.grid)
    model = "demo" if args.model == "demo" else str(full_size_model(
        root / "model", args.members, features=tuple(args.features) if args.features else None))
    out, work = root / "out", root / "work"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "bids_app", str(bids), str(out), "participant", "--model", model, "-w", str(work),
           "--nprocs", str(args.nprocs), "--reference-masks", str(root / "reference"), "--skull-stripped", "yes",
           "--skip-bids-validation", *([] if args.tta else ["--no-tta"]), *args.extra]
    wall, rss, code = _timed(cmd, env, root / "run.log")
    print(f"session: patient07, grid {args.grid}, model {args.model}"
          f"{f' ({args.members} members)' if args.model == 'full-size' else ''}, TTA {args.tta}, "
          f"--nprocs {args.nprocs}")
    print(f"whole run: {wall:.1f} s, peak RSS {rss:.2f} GB, exit {code}")
    if code:
        print((root / "run.log").read_text()[-3000:])
        sys.exit(code)
    nodes = node_results(work)
    import_s, import_rss, _ = _timed([sys.executable, "-c", "import nipype, torch, nnunetv2, bids_app.interfaces"],
                                     env, root / "import.log")
    print(f"fresh process with imports: {import_s:.1f} s, {import_rss:.2f} GB")
    rows = []
    for name, info in nodes.items():
        row = {"node": name, "pipeline_s": info["pipeline_s"]}
        if not args.no_rerun and info["node_file"].is_file():
            scratch = root / "rerun" / name
            scratch.mkdir(parents=True, exist_ok=True)
            row["alone_s"], row["peak_rss_gb"], row["rerun_exit"] = _timed(
                [sys.executable, "-c", RERUN, str(info["node_file"]), str(scratch)], env, scratch / "log.txt")
        rows.append(row)
    predict = next((r["pipeline_s"] for r in rows if r["node"] == "predict"), float("nan"))
    print("node\tpipeline_s\tshare_of_predict\talone_s\tpeak_rss_gb")
    for r in sorted(rows, key=lambda r: -r["pipeline_s"]):
        print(f"{r['node']}\t{r['pipeline_s']:.1f}\t{r['pipeline_s'] / predict:.2f}\t"
              f"{r.get('alone_s', float('nan')):.1f}\t{r.get('peak_rss_gb', float('nan')):.2f}")
    outside = sum(r["pipeline_s"] for r in rows if r["node"] not in ("predict", "explain"))
    print(f"outside predict and explain: {outside:.1f} s = {outside / predict:.2f} x predict")
    if motion is not None:
        src = shared_data_dir().joinpath(*PATIENT07)
        mean, worst = registration_error(work, motion, nib.load(str(src / T1)))
        print(f"co-registration error vs the known motion: mean {mean:.2f} mm, max {worst:.2f} mm")
    (root / "bench.json").write_text(json.dumps({"wall_s": wall, "peak_rss_gb": rss, "nodes": rows}, default=str,
                                                indent=1))
    print(f"folders: {root}")


if __name__ == "__main__":
    main()
