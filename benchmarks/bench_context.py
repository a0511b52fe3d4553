"""The perilesional-context experiment ("7 mm", arXiv:2406.09335 §4.6) as a benchmark.

For true-positive lesions of a size range, the network input is masked to the lesion dilated by
``i`` voxels (18-connected structuring element at the network's resolution, ``i = 0..N``):
``x * dilate(L, i)`` in nnU-Net's normalised space, so everything farther away is 0, the mean
after z-scoring. The ensemble is re-run (nnU-Net's own sliding window, no mirroring) and, per
step, the mean lesion probability inside the original lesion (``score``) and whether any lesion
voxel reaches the threshold (``detected``) are recorded. The curve (mean and sd of the score,
number detected, against ``distance_mm = i * spacing``) says how much context the network needs;
the published U-Net needed about 7 mm.

Cases: ``--synthetic N`` synthetic two-channel cases (the tiny model's blobs, 2 mm), or
``--bids DIR``: every ``sub-*/[ses-*/]anat`` with the model's channels (matched by suffix, e.g.
``_T1w``, ``_FLAIR``) and a reference ``derivatives/*/sub-*/.../*_dseg.nii.gz`` or
``*_mask.nii.gz`` (non-zero = lesion; the first match). Lesions: ensemble mean >= threshold,
``--min-lesion-size`` (IES drops <= 5 voxels), 18-connectivity, TP = overlaps the reference, and
size (input-grid voxels) within ``--size-range``.

Usage::

    python benchmarks/bench_context.py                                  # tiny model, 8 synthetic cases
    python benchmarks/bench_context.py --model TRAINER_DIR --bids DIR --size-range 91 119 --steps 34
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from bids_app.core import explain as E
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bids_app.core import explain as E


def synthetic_case(seed: int, shape=(48, 56, 48)):
    """(2, X, Y, Z) image (zero outside an ellipsoidal brain), labels and 2 mm zooms (bids_app.testing.make_case)."""
    from bids_app.testing import make_case

    image, labels = make_case(seed, shape)
    return image, labels, (2.0, 2.0, 2.0)


def bids_cases(root: Path, channel_names: list[str]):
    """(name, channels, reference, zooms) for every anat folder with all channels and a reference."""
    from bids_app.core.imageio import load_image

    for anat in sorted(root.glob("sub-*/**/anat")):
        files = []
        for ch in channel_names:
            hits = sorted(p for p in anat.glob(f"*_{ch}.nii*"))
            if not hits:
                break
            files.append(hits[0])
        if len(files) != len(channel_names):
            continue
        prefix = files[0].name.split(f"_{channel_names[0]}")[0]
        refs = sorted((root / "derivatives").rglob(f"{prefix}*_dseg.nii*")) + \
            sorted((root / "derivatives").rglob(f"{prefix}*_mask.nii*"))
        refs = [r for r in refs if "brain" not in r.name]
        if not refs:
            continue
        imgs = [load_image(f) for f in files]
        ref = load_image(refs[0], check_values=False)
        yield prefix, np.stack([i.data for i in imgs]), ref.data > 0, imgs[0].zooms


def ensemble_lesion_prob(predictor, data, lesion_class: int) -> np.ndarray:
    """Ensemble mean softmax probability of one class on the preprocessed grid."""
    import torch

    out = None
    with torch.inference_mode():
        for m in predictor.members:
            p = torch.softmax(predictor.member_logits(m, data).float(), 0)[lesion_class].numpy()
            out = p if out is None else out + p
    return out / len(predictor.members)


def main(argv=None) -> int:
    import torch
    from scipy import ndimage

    from bids_app.core.postprocess import segment_lesions

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="nnU-Net trainer folder (default: build the tiny model)")
    ap.add_argument("--folds", nargs="+", default=None, help="members (default: all of the model card)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--bids", type=Path, default=None, help="BIDS dataset with reference masks in derivatives/")
    src.add_argument("--synthetic", type=int, default=8, help="number of synthetic cases (default 8)")
    ap.add_argument("--size-range", type=int, nargs=2, default=(30, 400), metavar=("MIN", "MAX"),
                    help="TP lesion sizes in input voxels (default 30 400; the paper: 91 119 at 1 mm)")
    ap.add_argument("--steps", type=int, default=10, help="dilation steps i = 0..N (default 10)")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--min-lesion-size", type=int, default=6)
    ap.add_argument("--max-lesions", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bids_app.model.ensemble import load_ensemble
    from bids_app.model.resolve import resolve_model, select_members

    tmp = None
    model_dir = args.model
    if model_dir is None:
        from bids_app.testing.tiny_model import build_tiny_model

        tmp = tempfile.TemporaryDirectory()
        model_dir = build_tiny_model(tmp.name, n_members=3, iterations=60)
    model = resolve_model(str(model_dir))
    folds = select_members(model, args.folds)
    predictor = load_ensemble(model, folds, tta=False, num_threads=args.threads).predictor
    channel_names = [predictor.dataset_json["channel_names"][k] for k in sorted(predictor.dataset_json["channel_names"],
                                                                                key=int)]
    spacing = np.asarray(predictor.configuration_manager.spacing, float)
    if args.bids is not None:
        cases = bids_cases(args.bids, channel_names)
    else:
        cases = ((f"synthetic-{k}", *synthetic_case(100 + k)) for k in range(args.synthetic))
        cases = ((name, img, lab > 0, z) for name, img, lab, z in cases)

    struct = ndimage.generate_binary_structure(3, 2)  # 18-connected
    scores, detected, sizes, names = [], [], [], []
    t0 = time.perf_counter()
    for name, channels, reference, zooms in cases:
        probs = predictor.predict(channels, zooms).mean(0)
        seg = segment_lesions(probs, list(range(1, probs.shape[0])), args.threshold, args.min_lesion_size, 18)
        data, props = predictor.preprocess(channels, zooms)
        geom = E.predictor_geometry(predictor, props, tuple(data.shape[1:]), channels.shape[1:])
        net_inst = E.instances_to_network(seg.instances, geom)
        for i, cls in enumerate(seg.instance_class):
            lab = i + 1
            mask_in = seg.instances == lab
            size = int(mask_in.sum())
            if not (args.size_range[0] <= size <= args.size_range[1]) or not reference[mask_in].any():
                continue
            if len(scores) >= args.max_lesions:
                break
            L = net_inst == lab
            row_s, row_d = [], []
            for step in range(args.steps + 1):
                keep = ndimage.binary_dilation(L, structure=struct, iterations=step) if step else L
                masked = data * torch.from_numpy(keep.astype(np.float32))[None]
                p = ensemble_lesion_prob(predictor, masked, int(cls))
                row_s.append(float(p[L].mean()))
                row_d.append(bool((p[L] >= args.threshold).any()))
            p = ensemble_lesion_prob(predictor, data, int(cls))  # the whole image
            row_s.append(float(p[L].mean()))
            row_d.append(bool((p[L] >= args.threshold).any()))
            scores.append(row_s)
            detected.append(row_d)
            sizes.append(size)
            names.append(f"{name}:{lab}")
    elapsed = time.perf_counter() - t0
    if not scores:
        print("no TP lesion in the size range; widen --size-range")
        return 1
    S = np.asarray(scores)
    D = np.asarray(detected)
    step_mm = float(spacing.min())
    dist = [i * step_mm for i in range(args.steps + 1)]
    full_score = S[:, -1].mean()
    n_cases = len(set(n.split(":")[0] for n in names))
    print(f"{len(scores)} TP lesions ({min(sizes)}-{max(sizes)} voxels) from {n_cases} "
          f"cases; network spacing {spacing.tolist()} mm; {elapsed:.1f} s")
    print("distance_mm  mean_score  sd_score  n_detected")
    for i, d in enumerate(dist):
        print(f"{d:11.1f}  {S[:, i].mean():10.3f}  {S[:, i].std():8.3f}  {int(D[:, i].sum()):10d}")
    print(f"{'whole image':>11}  {full_score:10.3f}  {S[:, -1].std():8.3f}  {int(D[:, -1].sum()):10d}")
    reach = next((d for i, d in enumerate(dist) if S[:, i].mean() >= 0.9 * full_score), None)
    print(f"context for 90% of the whole-image score: {reach} mm")
    if args.json:
        args.json.write_text(json.dumps({
            "model": str(model_dir), "folds": folds, "cases": "bids" if args.bids else f"synthetic x{args.synthetic}",
            "size_range": list(args.size_range), "threshold": args.threshold, "network_spacing_mm": spacing.tolist(),
            "distance_mm": dist, "mean_score": S[:, :-1].mean(0).tolist(), "sd_score": S[:, :-1].std(0).tolist(),
            "n_detected": D[:, :-1].sum(0).tolist(), "n_lesions": len(scores), "whole_image_score": float(full_score),
            "context_for_90pct_mm": reach, "lesions": names, "elapsed_s": elapsed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
