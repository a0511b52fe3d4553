#!/usr/bin/env python
"""Second stage of the bundled demo ensemble, as it was actually built (docs/demo-model.md).

The GPU run of ``msxplain-tools train-demo`` (H100, 200 s per member) left one healthy member
(the other three collapsed to all-background and were rejected by the member check). With no
GPU time left, the ensemble was completed on CPU:

1. new validation and test subjects are synthesised with another seed (disjoint from every
   training subject of both stages);
2. members k = 1..3 are **fine-tuned from the GPU member** with nnU-Net
   (``-pretrained_weights``), each on its own bootstrap subset of the training subjects
   (bagging) with its own seed and nnU-Net's full augmentation, SGD restarted at lr 1e-2 with
   poly decay, on 64^3 patches (the network is fully convolutional; inference keeps the
   plans' 96^3 patch);
3. the member check, the threshold/minimum-size tuning and the test evaluation of the recipe
   run on the new subjects, and the model is packaged with its card.

Usage (the CPU stage, ~1-2 h on 2 cores)::

    python scripts/demo_model/finetune_cpu.py --workdir WORK --gpu-member MODEL_DIR --out-model OUT
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bids_app.training import recipe as R  # noqa: E402

LOG = logging.getLogger("finetune")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="recipe workdir with nnU-Net raw/preprocessed data")
    p.add_argument("--gpu-member", type=Path, required=True, help="trainer folder of the GPU-trained member")
    p.add_argument("--out-model", type=Path, required=True)
    p.add_argument("--members", type=int, default=3, help="members fine-tuned on CPU")
    p.add_argument("--seconds", type=float, default=600, help="wall-clock budget per fine-tuned member")
    p.add_argument("--bagging", type=float, default=0.8, help="fraction of training subjects per member")
    p.add_argument("--n-val", type=int, default=8)
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--eval-seed", type=int, default=4242, help="seed of the new validation/test subjects")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--templates", required=True)
    p.add_argument("--lesion-masks", required=True)
    p.add_argument("--skip", nargs="*", default=[], choices=("synth", "train"), help="steps already done")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    cfg = R.RecipeConfig(workdir=args.workdir.resolve(), out_model=args.out_model.resolve(), device="cpu",
                         workers=args.workers, n_val=args.n_val, n_test=args.n_test, seed=args.eval_seed,
                         members=args.members + 1, templates_dir=args.templates, lesion_dir=args.lesion_masks,
                         da_workers=1, iterations_per_epoch=25, val_iterations=2, train_seconds=args.seconds,
                         connectivity=18)
    raw = cfg.workdir / "nnUNet_raw" / cfg.dataset
    pre = cfg.workdir / "nnUNet_preprocessed" / cfg.dataset
    gpu_plans = json.loads((args.gpu_member / "plans.json").read_text())
    timings = {}

    # 1. new validation/test subjects (another seed: disjoint from all training subjects)
    cases_path = cfg.workdir / "cases_finetune.json"
    if "synth" not in args.skip or not cases_path.is_file():
        t = time.monotonic()
        from concurrent.futures import ProcessPoolExecutor

        jobs = []
        for tag, n in (("fval", args.n_val), ("ftest", args.n_test)):
            for i in range(n):
                jobs.append({"seed": args.eval_seed * 1_000_003 + len(jobs), "index": 10_000 + len(jobs),
                             "resolution": 1.0, "wml_load": cfg.wml_load, "cl_load": cfg.cl_load,
                             "templates_dir": args.templates, "lesion_dir": args.lesion_masks, "raw": str(raw),
                             "case": f"{tag}_{i:03d}", "split": "Ts"})
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            results = list(pool.map(R._synth_case, jobs))
        cases = {"val": [r for r in results if r["case"].startswith("fval")],
                 "test": [r for r in results if r["case"].startswith("ftest")]}
        cases_path.write_text(json.dumps(cases, indent=1))
        timings["synthesize_eval_subjects"] = round(time.monotonic() - t, 1)
    cases = json.loads(cases_path.read_text())
    train_cases = [c["case"] for c in json.loads((cfg.workdir / "cases.json").read_text())["train"]]

    # 2. fine-tuning plans: the GPU member's network, 64^3 training patches, same preprocessed data
    ft = json.loads(json.dumps(gpu_plans))
    ft["plans_name"] = "nnUNetPlansMsxplainFT"
    ft["configurations"]["3d_fullres"]["patch_size"] = [64, 64, 64]
    ft["configurations"]["3d_fullres"]["data_identifier"] = "nnUNetPlans_3d_fullres"
    (pre / "nnUNetPlansMsxplainFT.json").write_text(json.dumps(ft, indent=1))
    rng = np.random.default_rng(args.eval_seed)
    splits = [{"train": train_cases, "val": train_cases[:2]}]  # fold 0 = the GPU member (not retrained)
    for _ in range(args.members):
        subset = sorted(rng.choice(train_cases, size=int(round(args.bagging * len(train_cases))), replace=False))
        splits.append({"train": [str(s) for s in subset], "val": train_cases[:2]})
    (pre / "splits_final.json").write_text(json.dumps(splits, indent=1))

    results_dir = (cfg.workdir / "nnUNet_results" / cfg.dataset
                   / "nnUNetTrainerMsxplain__nnUNetPlansMsxplainFT__3d_fullres")
    ckpt = args.gpu_member / "fold_0" / "checkpoint_final.pth"
    if "train" not in args.skip:
        t = time.monotonic()
        env = cfg.env()
        env["MSXPLAIN_SEED"] = str(args.eval_seed)
        for fold in range(1, args.members + 1):
            log = cfg.workdir / "logs" / f"finetune_fold{fold}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [*R._entry("nnunetv2.run.run_training", "run_training_entry", "nnUNetv2_train"), str(cfg.dataset_id),
                   "3d_fullres", str(fold), "-tr", R.TRAINER, "-p", "nnUNetPlansMsxplainFT", "-device", "cpu",
                   "-pretrained_weights", str(ckpt)]
            with open(log, "w") as handle:
                code = subprocess.run(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
            LOG.info("fine-tuned fold %d: exit %d", fold, code)
        timings["finetune"] = round(time.monotonic() - t, 1)
    # the ensemble folder: GPU member as fold 0, fine-tuned members as 1..k, inference plans of the GPU run
    ens = cfg.workdir / "ensemble" / cfg.dataset / args.gpu_member.name
    if ens.exists():
        shutil.rmtree(ens)
    ens.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(args.gpu_member / name, ens / name)
    (ens / "fold_0").mkdir()
    shutil.copy(ckpt, ens / "fold_0" / "checkpoint_final.pth")
    for fold in range(1, args.members + 1):
        src = results_dir / f"fold_{fold}" / "checkpoint_final.pth"
        if src.is_file():
            (ens / f"fold_{fold}").mkdir()
            shutil.copy(src, ens / f"fold_{fold}" / "checkpoint_final.pth")
    folds = sorted(d.name[5:] for d in ens.glob("fold_*"))

    # 3. member check, tuning, test, package (the recipe's own steps, on the new subjects)
    cfg_eval = R.RecipeConfig(**{**cfg.__dict__, "timings": timings, "ensemble_dir": ens})
    t = time.monotonic()
    tuning = R.check_and_tune(cfg_eval, cases, folds)
    timings["check_and_tune"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    test = R.evaluate_test(cfg_eval, cases, tuning["kept_members"], tuning["threshold"], tuning["min_lesion_size"])
    timings["evaluate_test"] = round(time.monotonic() - t, 1)
    report = {"tuning": tuning, "test": test, "timings": timings, "folds": folds}
    (cfg.workdir / "finetune_report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"tuning": {k: v for k, v in tuning.items() if k != "grid_mean_F1"},
                      "test": {k: v for k, v in test.items() if k != "per_case"}, "timings": timings}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
