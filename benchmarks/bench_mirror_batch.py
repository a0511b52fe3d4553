#!/usr/bin/env python3
"""Test-time mirroring one pass per mirroring (nnU-Net's loop) against the 8 mirrorings of a tile
in one batch (issue 17, point 3): seconds per member and agreement of the segmentations.

    python benchmarks/bench_mirror_batch.py --device cuda --members 5 --size 182 218 182
    python benchmarks/bench_mirror_batch.py --device cpu --members 1 --size 64 72 64 --features 8 16 32 64 96

The model: random weights in nnU-Net's default 3d_fullres architecture for 1 mm brains
(``benchmarks/bench_participant.py``'s full-size model: 6 stages, 32-320 features, patch 128^3,
two channels) unless ``--features`` shrinks it; the image: a synthetic two-channel volume of
``--size`` voxels at 1 mm (``bids_app.testing.make_case``). Both runs use the same predictor,
only ``mirror_batch`` changes; on CUDA also a float32 run (nnU-Net's ``torch.autocast`` switched
off), the reference. Prints seconds per member (after one warm-up member on CUDA), the largest
difference of the ensemble mean, and the Dice of the top-1 % masks per class (random weights give
no lesions at 0.5) against the reference.
Results: docs/benchmarks.md ("Per-stage cost of a participant").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    from bench_participant import full_size_model

    from bids_app.model.ensemble import load_ensemble
    from bids_app.model.resolve import resolve_model
    from bids_app.testing import make_case

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=3, default=(182, 218, 182))
    ap.add_argument("--features", type=int, nargs="+", default=None, help="smaller network (CPU trials)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_mirror_"))
    trainer_dir = full_size_model(root, args.members, features=tuple(args.features) if args.features else None)
    predictor = load_ensemble(resolve_model(str(trainer_dir)), [str(k) for k in range(args.members)],
                              device=args.device, tta=True, num_threads=args.threads).predictor
    image, _ = make_case(5, shape=tuple(args.size))
    zooms = (1.0, 1.0, 1.0)
    if predictor.device.type == "cuda":  # cuDNN picks its algorithms on the first pass
        predictor.mirror_batch = 8
        predictor.members, members = predictor.members[:1], predictor.members
        predictor.predict(image, zooms)
        predictor.members = members
    runs = [("loop", 1, True), ("batched", 8, True)]
    if predictor.device.type == "cuda":  # nnU-Net runs CUDA under float16 autocast; float32 is the reference
        runs.append(("float32 loop", 1, False))
    results = {}
    for name, batch, autocast in runs:
        predictor.mirror_batch = batch
        with _autocast_allowed(autocast):
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            probs = predictor.predict(image, zooms)
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if predictor.device.type == "cuda" else float("nan")
        results[name] = probs.mean(0)
        print(f"{name} (mirror_batch {batch}): {seconds:.1f} s for {args.members} member(s) "
              f"({seconds / args.members:.1f} s each), peak GPU memory {peak:.2f} GiB", flush=True)
    reference = results["float32 loop" if "float32 loop" in results else "loop"]
    for name, mean in results.items():
        # random weights give no lesions at 0.5: compare the top 1 % of each class's probability,
        # with the reference's cut-off, as the mask a threshold would make
        dices = []
        for c in range(1, mean.shape[0]):
            cut = np.percentile(reference[c], 99)
            x, y = reference[c] >= cut, mean[c] >= cut
            dices.append(2 * (x & y).sum() / max(x.sum() + y.sum(), 1))
        print(f"{name}: max |dP| vs reference {np.abs(mean - reference).max():.2e}, Dice of the top-1% masks "
              + ", ".join(f"class {c + 1} {d:.5f}" for c, d in enumerate(dices)))


class _autocast_allowed:
    """``enabled=False``: nnU-Net's ``torch.autocast`` blocks do nothing (the float32 path on CUDA)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        import contextlib

        import torch

        self._saved = torch.autocast
        if not self.enabled:
            torch.autocast = lambda *args, **kwargs: contextlib.nullcontext()

    def __exit__(self, *exc):
        import torch

        torch.autocast = self._saved
        return False

if __name__ == "__main__":
    main()
