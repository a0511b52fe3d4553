"""``msxplain-tools train-demo``: reproduce the bundled demo ensemble (see :mod:`bids_app.training.recipe`)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

NAME = "train-demo"
HELP = "train the demo nnU-Net ensemble on synthetic data (the recipe of the bundled model)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bids_app.training.recipe import RecipeConfig

    d = RecipeConfig(workdir=Path("."), out_model=Path("."))
    parser.add_argument("workdir", type=Path, help="scratch folder (nnU-Net raw/preprocessed/results, logs)")
    parser.add_argument("--out-model", type=Path, required=True, help="where the packaged model is written")
    parser.add_argument("--n-train", type=int, default=d.n_train)
    parser.add_argument("--n-val", type=int, default=d.n_val)
    parser.add_argument("--n-test", type=int, default=d.n_test)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--resolution", type=float, default=d.resolution_mm, help="synthetic voxel size, mm")
    parser.add_argument("--workers", type=int, default=d.workers, help="CPU processes for synthesis/preprocessing")
    parser.add_argument("--members", type=int, default=d.members)
    parser.add_argument("--train-seconds", type=float, default=d.train_seconds, help="wall-clock budget per member")
    parser.add_argument("--iterations-per-epoch", type=int, default=d.iterations_per_epoch)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=d.device)
    parser.add_argument("--features", type=int, nargs="+", default=list(d.features))
    parser.add_argument("--patch-size", type=int, nargs=3, default=list(d.patch_size))
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--da-workers", type=int, default=d.da_workers, help="augmentation processes per member")
    parser.add_argument("--min-member-dice", type=float, default=d.min_member_dice,
                        help="a member below this validation lesion Dice does not join the ensemble")
    parser.add_argument("--reuse-data", action="store_true",
                        help="reuse the synthetic data and plans already in WORKDIR (retrain the members only)")
    parser.add_argument("--templates", default=None, help="folder with tpl-MNI152NLin2009cAsym (else TemplateFlow)")
    parser.add_argument("--lesion-masks", default=None, help="open_ms_data cross_sectional/MNI folder")


def run(args) -> int:
    from bids_app.training.recipe import RecipeConfig, run_recipe

    logging.getLogger("bids_app").setLevel(logging.INFO)
    cfg = RecipeConfig(
        workdir=args.workdir.resolve(), out_model=args.out_model.resolve(), n_train=args.n_train, n_val=args.n_val,
        n_test=args.n_test, seed=args.seed, resolution_mm=args.resolution, workers=args.workers,
        members=args.members, train_seconds=args.train_seconds, iterations_per_epoch=args.iterations_per_epoch,
        device=args.device, features=tuple(args.features), patch_size=tuple(args.patch_size),
        batch_size=args.batch_size, da_workers=args.da_workers, templates_dir=args.templates,
        lesion_dir=args.lesion_masks, min_member_dice=args.min_member_dice,
        reuse_data=args.reuse_data)
    report = run_recipe(cfg)
    print(json.dumps({"model_dir": report["model_dir"], "tuning": {k: v for k, v in report["tuning"].items()
                                                                    if k != "grid_mean_F1"},
                      "test": {k: v for k, v in report["test"].items() if k != "per_case"},
                      "timings_s": report["timings_s"]}, indent=1))
    return 0
