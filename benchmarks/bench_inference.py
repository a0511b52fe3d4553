#!/usr/bin/env python
"""Per-member ensemble inference (msxplain) versus ``nnUNetv2_predict`` on the same model and image.

Both sides start from NIfTI files in a fresh process and end with the ensemble's class
probabilities and segmentation on disk:

* **reference**: ``nnUNetv2_predict -f <folds> -npp 0 -nps 0 --save_probabilities`` (nnU-Net's
  sequential, in-process mode; it averages the members' logits);
* **msxplain**: :class:`bids_app.core.segment.EnsemblePredictor` (one softmax per member, which
  deep-ensemble uncertainty needs), then the mean probability and its argmax saved.

Reported: wall time and peak RSS of each process (and peak GPU memory for msxplain), and the
ratio msxplain / nnU-Net (target <= 1.1). The model is either a small one (``--plans tiny``) or
nnU-Net's full-size default 3d_fullres for 1 mm brains (``--plans default``: PlainConvUNet,
6 stages, 32-320 features, patch 128^3) with random weights: the cost does not depend on the
weights.

    python benchmarks/bench_inference.py --plans tiny --members 3 --size 96 112 96 --device cpu
    python benchmarks/bench_inference.py --plans default --members 5 --image T1w.nii.gz FLAIR.nii.gz --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASET = "Dataset980_MsxplainBench"
TRAINER = "nnUNetTrainer"


def build_model(results: Path, plans_kind: str, members: int, n_channels: int = 2) -> Path:
    import torch

    from bids_app.core.segment import build_network
    from bids_app.training.plans import make_plans

    if plans_kind == "default":
        # what nnUNetv2_plan_experiment plans for 1 mm brains (measured with nnU-Net 2.8.1)
        plans = make_plans(DATASET, n_channels, (1.0, 1.0, 1.0), (128, 128, 128), (32, 64, 128, 256, 320, 320),
                           median_shape_xyz=(182, 218, 182), plans_name="nnUNetPlans")
    else:
        plans = make_plans(DATASET, n_channels, (1.0, 1.0, 1.0), (96, 96, 96), (8, 16, 32, 64, 96),
                           median_shape_xyz=(182, 218, 182), plans_name="nnUNetPlans")
    trainer_dir = results / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    trainer_dir.mkdir(parents=True, exist_ok=True)
    dataset = {"channel_names": {str(i): n for i, n in enumerate(["T1w", "FLAIR"][:n_channels])},
               "labels": {"background": 0, "WML": 1, "CL": 2}, "numTraining": 0, "file_ending": ".nii.gz",
               "overwrite_image_reader_writer": "NibabelIOWithReorient"}
    (trainer_dir / "plans.json").write_text(json.dumps(plans))
    (trainer_dir / "dataset.json").write_text(json.dumps(dataset))
    for k in range(members):
        torch.manual_seed(k)
        net = build_network(plans, "3d_fullres", n_channels, 3)
        net.apply(net.initialize)
        (trainer_dir / f"fold_{k}").mkdir(exist_ok=True)
        torch.save({"network_weights": net.state_dict(), "trainer_name": TRAINER,
                    "init_args": {"configuration": "3d_fullres", "fold": k},
                    "inference_allowed_mirroring_axes": (0, 1, 2)}, trainer_dir / f"fold_{k}" / "checkpoint_final.pth")
    return trainer_dir


def make_inputs(folder: Path, size, images: list[str] | None) -> list[Path]:
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    if images:
        for k, src in enumerate(images):
            img = nib.load(src)
            dst = folder / f"case_{k:04d}.nii.gz"
            nib.save(nib.as_closest_canonical(img), str(dst))
            out.append(dst)
        return out
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in size], indexing="ij"))
    brain = (grid ** 2).sum(0) < 0.9
    for k in range(2):
        data = (rng.normal(100 + 30 * k, 10, size) * brain).astype(np.float32)
        dst = folder / f"case_{k:04d}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(dst))
        out.append(dst)
    return out


def run_msxplain(trainer_dir: Path, inputs: list[Path], out: Path, members: int, tta: bool, device: str) -> dict:
    """Child-process body: msxplain's per-member inference, then the mean saved."""
    import nibabel as nib
    import torch

    from bids_app.core.segment import EnsemblePredictor, MemberInput
    from bids_app.model.checkpoints import load_checkpoint

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    members_in = []
    for k in range(members):
        ckpt = load_checkpoint(trainer_dir / f"fold_{k}" / "checkpoint_final.pth")
        members_in.append(MemberInput(str(k), ckpt["network_weights"], ckpt["inference_allowed_mirroring_axes"]))
    predictor = EnsemblePredictor(json.loads((trainer_dir / "plans.json").read_text()),
                                  json.loads((trainer_dir / "dataset.json").read_text()), members_in,
                                  device=torch.device(device), tta=tta)
    imgs = [nib.load(str(p)) for p in inputs]
    channels = np.stack([np.asarray(i.dataobj, dtype=np.float32) for i in imgs])
    zooms = imgs[0].header.get_zooms()[:3]
    probs = predictor.predict(channels, zooms)
    mean = probs.mean(axis=0)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "case.npz", probabilities=mean)
    nib.save(nib.Nifti1Image(mean.argmax(0).astype(np.uint8), imgs[0].affine), str(out / "case.nii.gz"))
    return {"seconds_in_process": time.perf_counter() - t0, "member_probs_shape": list(probs.shape)}


def run_reference(argv: list[str]) -> dict:
    """Child-process body: nnUNetv2_predict's own entry point, in this process (-npp 0 -nps 0)."""
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    sys.argv = ["nnUNetv2_predict", *argv]
    t0 = time.perf_counter()
    predict_entry_point()
    return {"seconds_in_process": time.perf_counter() - t0}


def timed_child(cmd: list[str], env: dict) -> dict:
    """Run one side in a fresh process; wall time from here, peak RSS as the child reports it."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def _child_report(result: dict) -> None:
    import torch

    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(result))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", choices=("tiny", "default"), default="tiny")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--size", type=int, nargs=3, default=(96, 112, 96), help="synthetic input size (1 mm voxels)")
    p.add_argument("--image", nargs="+", help="input NIfTI files (one per channel) instead of a synthetic image")
    p.add_argument("--no-tta", dest="tta", action="store_false")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--child-ref", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # msxplain side, in its own process
        trainer_dir, inputs, out, members = args.child
        _child_report(run_msxplain(Path(trainer_dir), [Path(x) for x in inputs.split(",")], Path(out),
                                   int(members), args.tta, args.device))
        return 0
    if args.child_ref is not None:  # nnU-Net side, in its own process
        _child_report(run_reference(args.child_ref))
        return 0

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_inference_"))
    results = work / "results"
    trainer_dir = build_model(results, args.plans, args.members)
    inputs = make_inputs(work / "input", tuple(args.size), args.image)
    env = dict(os.environ, nnUNet_results=str(results), nnUNet_raw=str(work / "raw"),
               nnUNet_preprocessed=str(work / "pre"), nnUNet_compile="f",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    folds = [str(k) for k in range(args.members)]
    rows = {"msxplain": [], "nnUNetv2_predict": []}
    for r in range(args.repeats):
        ref = [sys.executable, __file__, "--child-ref", "-i", str(work / "input"), "-o", str(work / f"ref_out{r}"),
               "-d", DATASET, "-c", "3d_fullres",
               "-tr", TRAINER, "-p", "nnUNetPlans", "-f", *folds, "-device", args.device, "-npp", "0", "-nps", "0",
               "--save_probabilities"] + ([] if args.tta else ["--disable_tta"])
        rows["nnUNetv2_predict"].append(timed_child(ref, env))
        ours = [sys.executable, __file__, "--device", args.device] + ([] if args.tta else ["--no-tta"]) + [
            "--child", str(trainer_dir), ",".join(str(x) for x in inputs), str(work / f"ours_out{r}"),
            str(args.members)]
        rows["msxplain"].append(timed_child(ours, env))
    best = {k: min(v, key=lambda x: x["wall_s"]) for k, v in rows.items()}
    ratio = best["msxplain"]["wall_s"] / best["nnUNetv2_predict"]["wall_s"]
    import nibabel as nib

    shape = nib.load(str(inputs[0])).shape
    summary = {"plans": args.plans, "members": args.members, "tta": args.tta, "device": args.device,
               "image_shape": list(shape), "wall_s": {k: round(v["wall_s"], 2) for k, v in best.items()},
               "ratio_msxplain_over_nnunet": round(ratio, 3),
               "peak_rss_gib": {k: round(v["peak_rss_gib"], 2) for k, v in best.items()},
               "peak_gpu_gib": {k: v.get("peak_gpu_gib") for k, v in best.items()},
               "runs": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
