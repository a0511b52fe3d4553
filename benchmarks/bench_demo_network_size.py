#!/usr/bin/env python
"""Two network sizes for the demo model v2 (issue 14 item 2: "a network large enough for 1 mm
brains (measure, do not guess: compare two sizes)").

For each feature configuration (default: today's demo network ``8 16 32 64 96`` and a wider
``16 32 64 128 256``, both 5-stage ``PlainConvUNet`` as :func:`bids_app.training.plans.make_plans`
writes them, the architecture nnU-Net v2 plans; Isensee et al., Nature Methods 2021,
doi:10.1038/s41592-020-01008-z), each measurement runs in a fresh process so that its peak
memory is its own:

* **parameters** of the network;
* **training**: seconds per iteration of nnU-Net's training step (forward with deep supervision,
  Dice + CE loss, backward, gradient clipping, SGD with Nesterov momentum 0.99) on random data,
  ``--batch`` patches of ``--patch`` voxels, ``--threads`` torch threads; the first
  ``--warmup`` iterations are not timed. Data augmentation is not included (it runs in other
  processes in nnU-Net and costs the same for both sizes);
* **inference**: seconds for one ``--volume`` (182 x 218 x 182 = a 1 mm MNI brain) through
  msxplain's :class:`~bids_app.core.segment.EnsemblePredictor` (one member, no TTA, sliding
  window with step 0.5, the plans' patch);
* **peak memory**: the process's peak resident set size (``ru_maxrss``) in each mode.

Results are in ``docs/demo-model.md``, section "v2 training infrastructure (issue 14)".

    python benchmarks/bench_demo_network_size.py --threads 2 --iterations 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {"small": (8, 16, 32, 64, 96), "large": (16, 32, 64, 128, 256)}


def _plans(features, patch):
    from bids_app.training.plans import make_plans

    return make_plans("Dataset999_Bench", 2, patch_size_xyz=patch, features=features, batch_size=2)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_training(features, patch, batch: int, iterations: int, warmup: int, threads: int) -> dict:
    """Seconds per training iteration of nnU-Net's step on random data (see the module docstring)."""
    import numpy as np
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from bids_app.core.segment import build_network

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_network(_plans(features, patch), "3d_fullres", 2, 3)
    net.decoder.deep_supervision = True
    net.train()
    n_params = sum(p.numel() for p in net.parameters())
    n_out = len(features) - 1
    weights = np.array([1 / (2 ** i) for i in range(n_out)])
    weights[-1] = 0
    loss = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                       weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss),
        weights / weights.sum())
    opt = torch.optim.SGD(net.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    shape = tuple(reversed(patch))
    x = torch.randn(batch, 2, *shape)
    full = torch.randint(0, 3, (batch, 1, *shape)).float()
    targets = [full if i == 0 else torch.nn.functional.interpolate(full, scale_factor=0.5 ** i, mode="nearest")
               for i in range(n_out)]
    times = []
    for i in range(warmup + iterations):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = net(x)
        value = loss(out, targets)
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return {"parameters": int(n_params), "s_per_iteration": float(np.median(times)),
            "s_per_iteration_all": [round(v, 3) for v in times], "peak_rss_mb": round(_peak_mb(), 1)}


def measure_inference(features, patch, volume, threads: int) -> dict:
    """Seconds for one volume through EnsemblePredictor (one member, no TTA)."""
    import numpy as np
    import torch

    from bids_app.core.segment import EnsemblePredictor, MemberInput, build_network
    from bids_app.training.plans import make_plans

    plans = make_plans("Dataset999_Bench", 2, patch_size_xyz=patch, features=features, batch_size=2,
                       median_shape_xyz=volume)
    dataset = {"channel_names": {"0": "T1w", "1": "FLAIR"}, "labels": {"background": 0, "WML": 1, "CL": 2},
               "numTraining": 1, "file_ending": ".nii.gz"}
    torch.manual_seed(0)
    net = build_network(plans, "3d_fullres", 2, 3)
    member = MemberInput("0", net.state_dict(), (0, 1, 2))
    predictor = EnsemblePredictor(plans, dataset, [member], device="cpu", tta=False, num_threads=threads)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, *volume)).astype(np.float32)
    image[:, :8] = 0  # a background margin as in a skull-stripped brain
    t = time.perf_counter()
    probs = predictor.predict(image, (1.0, 1.0, 1.0))
    seconds = time.perf_counter() - t
    return {"inference_s": round(seconds, 2), "output_shape": list(probs.shape), "peak_rss_mb": round(_peak_mb(), 1)}


def _worker(args) -> int:
    features = tuple(args.features)
    if args.mode == "train":
        out = measure_training(features, tuple(args.patch), args.batch, args.iterations, args.warmup, args.threads)
    else:
        out = measure_inference(features, tuple(args.patch), tuple(args.volume), args.threads)
    print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"names among {sorted(CONFIGS)}")
    p.add_argument("--patch", type=int, nargs=3, default=[96, 96, 96])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--volume", type=int, nargs=3, default=[182, 218, 182])
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--json", type=Path, help="write the results here too")
    # internal: one measurement in this process
    p.add_argument("--mode", choices=("train", "infer"), help=argparse.SUPPRESS)
    p.add_argument("--features", type=int, nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        return _worker(args)
    results = {"patch": args.patch, "batch": args.batch, "threads": args.threads, "volume": args.volume,
               "configs": {}}
    for name in args.configs:
        features = CONFIGS[name]
        row = {"features": list(features)}
        for mode in ("train",) + (() if args.skip_inference else ("infer",)):
            cmd = [sys.executable, __file__, "--mode", mode, "--features", *map(str, features),
                   "--patch", *map(str, args.patch), "--batch", str(args.batch), "--iterations", str(args.iterations),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--volume", *map(str, args.volume)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(name, mode, json.dumps(row[mode]), flush=True)
        results["configs"][name] = row
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
