"""``msxplain-tools train-demo``: train the demo ensemble on synthetic data.

Two modes (``docs/demo-model.md``):

* **staged, resumable** (default; :mod:`bids_app.training.staged`): stages recorded in
  ``WORKDIR/state.json``, a wall-clock ``--budget-seconds`` per run, ``--resume`` continues
  (members from their ``checkpoint_latest.pth``, the learning-rate schedule kept);
* **one-shot, legacy** (``--train-seconds S``; :func:`bids_app.training.recipe.run_recipe`):
  the v1 recipe, every member trained once with the schedule stretched to ``S`` seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

NAME = "train-demo"
HELP = "train the demo nnU-Net ensemble on synthetic data (resumable across sessions, or the v1 one-shot recipe)"

#: CLI dest -> StagedConfig field, for options whose names differ
_FIELD = {"n_train": "n_pool", "resolution": "resolution_mm", "templates": "templates_dir",
          "lesion_masks": "lesion_dir"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bids_app.training.generators import GENERATORS
    from bids_app.training.state import MEMBER_DATA_MODES, STAGES, StagedConfig

    d = StagedConfig(workdir=Path("."), out_model=Path("."))
    parser.add_argument("workdir", type=Path,
                        help="state folder (state.json, nnU-Net raw/preprocessed/results, logs, finished members); "
                             "for the real training use .train-state/<name> (git-ignored)")
    parser.add_argument("--out-model", type=Path, default=None,
                        help="where the packaged model is written (default WORKDIR/model)")
    parser.add_argument("--resume", action="store_true",
                        help="continue WORKDIR/state.json: finished stages are skipped, members continue from "
                             "checkpoint_latest.pth; options not given are taken from the stored run")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="wall-clock budget of this run in s (0 = none); training stops cleanly before it "
                             "(within about one epoch), later stages start only while budget is left")
    parser.add_argument("--stop-before", choices=STAGES, default=None,
                        help="stop before this stage (e.g. check_and_tune: train only)")
    g = parser.add_argument_group("data (fixed at the first run)")
    g.add_argument("--generator", choices=sorted(GENERATORS), default=None,
                   help=f"synthetic data generator (default {d.generator}; toy = tiny test volumes)")
    g.add_argument("--n-train", "--n-pool", dest="n_train", type=int, default=None,
                   help=f"training pool subjects (default {d.n_pool})")
    g.add_argument("--n-val", type=int, default=None, help=f"validation subjects (default {d.n_val})")
    g.add_argument("--n-test", type=int, default=None, help=f"test subjects (default {d.n_test})")
    g.add_argument("--seed", type=int, default=None,
                   help=f"base seed (default {d.seed}): cases, member k seed+k, data seed seed+10000+k")
    g.add_argument("--resolution", type=float, default=None,
                   help=f"synthetic voxel size, mm (default {d.resolution_mm})")
    g.add_argument("--templates", default=None, help="folder with tpl-MNI152NLin2009cAsym (else TemplateFlow)")
    g.add_argument("--lesion-masks", default=None, help="open_ms_data cross_sectional/MNI folder")
    m = parser.add_argument_group("members (fixed at the first run)")
    m.add_argument("--members", type=int, default=None, help=f"ensemble members (default {d.members})")
    m.add_argument("--member-data", choices=MEMBER_DATA_MODES, default=None,
                   help="each member's data draw: subset = its own random --member-fraction of the pool, "
                        f"disjoint = its own part of the pool (default {d.member_data})")
    m.add_argument("--member-fraction", type=float, default=None, help=f"default {d.member_fraction}")
    target = m.add_mutually_exclusive_group()
    target.add_argument("--target-iterations", type=int, default=None,
                        help=f"training iterations per member (default {d.target_iterations})")
    target.add_argument("--target-epochs", type=int, default=None, help="or: epochs per member")
    m.add_argument("--iterations-per-epoch", type=int, default=None, help=f"default {d.iterations_per_epoch}")
    m.add_argument("--val-iterations", type=int, default=None,
                   help=f"pseudo-Dice batches per epoch (default {d.val_iterations})")
    m.add_argument("--features", type=int, nargs="+", default=None,
                   help=f"features per stage (default {' '.join(map(str, d.features))})")
    m.add_argument("--patch-size", type=int, nargs=3, default=None,
                   help=f"training patch x y z (default {' '.join(map(str, d.patch_size))})")
    m.add_argument("--batch-size", type=int, default=None, help=f"default {d.batch_size}")
    m.add_argument("--oversample-fg", type=float, default=None,
                   help=f"fraction of patches forced onto a lesion (default {d.oversample_fg})")
    m.add_argument("--min-member-dice", type=float, default=None,
                   help=f"a member below this validation lesion Dice does not join (default {d.min_member_dice})")
    r = parser.add_argument_group("machine (may change between runs)")
    r.add_argument("--device", choices=("cuda", "cpu"), default=None, help=f"default {d.device}")
    r.add_argument("--workers", type=int, default=None,
                   help=f"processes for synthesis/preprocessing/tuning (default {d.workers})")
    r.add_argument("--da-workers", type=int, default=None,
                   help=f"augmentation processes per member (default {d.da_workers})")
    r.add_argument("--torch-threads", type=int, default=None,
                   help=f"torch threads per member (default {d.torch_threads})")
    r.add_argument("--parallel", type=int, default=None, help=f"members trained at once (default {d.parallel})")
    r.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop each member after this many epochs in this run (smoke tests)")
    legacy = parser.add_argument_group("one-shot v1 recipe")
    legacy.add_argument("--train-seconds", type=float, default=None,
                        help="run the v1 recipe instead: one run, wall-clock budget per member, the learning-rate "
                             "schedule stretched to it (not resumable)")
    legacy.add_argument("--reuse-data", action="store_true",
                        help="(v1 recipe) reuse the synthetic data and plans in WORKDIR, retrain the members")


def _given(args) -> dict:
    """The StagedConfig fields given on the command line (None = not given)."""
    from bids_app.training.state import StagedConfig

    names = {f.name for f in fields(StagedConfig)}
    out = {}
    for dest, value in vars(args).items():
        key = _FIELD.get(dest, dest)
        if key in names and value is not None:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def run(args) -> int:
    logging.getLogger("bids_app").setLevel(logging.INFO)
    if args.train_seconds is not None:
        return _run_legacy(args)
    from bids_app.training.staged import run_staged
    from bids_app.training.state import StagedConfig, config_from_json, read_state

    workdir = args.workdir.resolve()
    given = _given(args)
    given["workdir"] = workdir
    if args.out_model is not None:
        given["out_model"] = args.out_model.resolve()
    stored = read_state(workdir) if args.resume else None
    if stored is not None:
        base = dict(stored["config"])
        if args.target_epochs is not None:
            given["target_iterations"] = args.target_epochs * given.get(
                "iterations_per_epoch", base.get("iterations_per_epoch"))
        for key in ("stop_after_epochs",):  # a smoke-test limit is not carried over to later runs
            base.pop(key, None)
        cfg = config_from_json(base, **given)
    else:
        given.setdefault("out_model", workdir / "model")
        if args.target_epochs is not None:
            default = StagedConfig(workdir=workdir, out_model=workdir).iterations_per_epoch
            given["target_iterations"] = args.target_epochs * given.get("iterations_per_epoch", default)
        cfg = StagedConfig(**given)
    try:
        state = run_staged(cfg, resume=args.resume, stop_before=args.stop_before)
    except RuntimeError as exc:
        print(f"train-demo: {exc}", file=sys.stderr)
        return 2
    summary = {"stopped": state["runs"][-1]["stopped"], "seconds": state["runs"][-1]["seconds"],
               "stages_done": [s for s, v in state["stages"].items() if v.get("done")],
               "members": {k: {"epochs": m.get("epochs_done"), "iterations": m.get("iterations_done"),
                               "done": m.get("done")} for k, m in state["members"].items()},
               "model_dir": state["results"].get("model_dir")}
    print(json.dumps(summary, indent=1))
    return 0


def _run_legacy(args) -> int:
    from bids_app.training.recipe import RecipeConfig, run_recipe

    d = RecipeConfig(workdir=Path("."), out_model=Path("."))
    if args.out_model is None:
        print("train-demo: --train-seconds (the v1 recipe) needs --out-model", file=sys.stderr)
        return 2

    def pick(value, default):
        return default if value is None else value

    cfg = RecipeConfig(
        workdir=args.workdir.resolve(), out_model=args.out_model.resolve(), n_train=pick(args.n_train, d.n_train),
        n_val=pick(args.n_val, d.n_val), n_test=pick(args.n_test, d.n_test), seed=pick(args.seed, d.seed),
        resolution_mm=pick(args.resolution, d.resolution_mm), workers=pick(args.workers, d.workers),
        members=pick(args.members, d.members), train_seconds=args.train_seconds,
        iterations_per_epoch=pick(args.iterations_per_epoch, d.iterations_per_epoch),
        device=pick(args.device, d.device), features=tuple(pick(args.features, d.features)),
        patch_size=tuple(pick(args.patch_size, d.patch_size)), batch_size=pick(args.batch_size, d.batch_size),
        da_workers=pick(args.da_workers, d.da_workers), templates_dir=args.templates, lesion_dir=args.lesion_masks,
        min_member_dice=pick(args.min_member_dice, d.min_member_dice), reuse_data=args.reuse_data)
    report = run_recipe(cfg)
    print(json.dumps({"model_dir": report["model_dir"], "tuning": {k: v for k, v in report["tuning"].items()
                                                                    if k != "grid_mean_F1"},
                      "test": {k: v for k, v in report["test"].items() if k != "per_case"},
                      "timings_s": report["timings_s"]}, indent=1))
    return 0
