"""The recipe of the bundled demo ensemble (``msxplain-tools train-demo``).

Steps, all recorded in the report and the model card:

1. **Data**: synthetic subjects from :mod:`bids_app.synth` (real lesion shapes, many random
   sites), skull-stripped, conformed like the app conforms its inputs
   (:func:`bids_app.training.dataset.conform_case`), written in nnU-Net's raw format; three
   disjoint sets: train, validation (member check and post-processing tuning) and test.
2. **Plans**: ``nnUNetv2_plan_and_preprocess`` (3d_fullres), then the network is shrunk through
   the plans (:func:`bids_app.training.plans.reduce_plans`); spacing and normalisation stay
   nnU-Net's.
3. **Members**: a *deep ensemble*: every member trains on the full training set (nnU-Net's
   docs warn that cross-validation folds are not a deep ensemble), with its own seed, in
   parallel, with :class:`~bids_app.training.trainers.nnUNetTrainerMsxplain.nnUNetTrainerMsxplain`
   and a wall-clock budget. The validation cases are the same held-out set for every member.
4. **Member check**: each member predicts the validation cases alone; a member whose lesion Dice
   is below ``RecipeConfig.min_member_dice`` (e.g. one collapsed to all-background, as seen in a CPU
   trial) does not join the ensemble.
5. **Post-processing**: threshold and minimum lesion size chosen for the mean lesion-wise F1
   (iou_adj, t = 0.1) of the ensemble on the validation cases.
6. **Test**: lesion-wise F1, precision, recall and DSC on the held-out synthetic test cases.
7. **Package**: plans, dataset.json, weights-only checkpoints and the model card (SHA-256 of
   each checkpoint and of plans.json and dataset.json, channels -> BIDS queries, labels,
   thresholds, recipe, measured figures).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LOGGER = logging.getLogger("bids_app.training.recipe")

TRAINER = "nnUNetTrainerMsxplain"
PLANS = "nnUNetPlansMsxplain"
CONFIGURATION = "3d_fullres"
CHANNELS = ("T1w", "FLAIR")
LABELS = {1: "WML", 2: "CL"}
THRESHOLD_GRID = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
MIN_SIZE_GRID = (1, 2, 3, 4, 6, 8, 10)


@dataclass
class RecipeConfig:
    workdir: Path
    out_model: Path
    dataset_id: int = 501
    dataset_name: str = "MsxplainSynth"
    n_train: int = 80
    n_val: int = 12
    n_test: int = 10
    seed: int = 2026
    resolution_mm: float = 1.0
    workers: int = 4
    members: int = 5
    train_seconds: float = 300.0
    max_epochs: int = 1000
    iterations_per_epoch: int = 100
    val_iterations: int = 10
    device: str = "cuda"
    features: tuple[int, ...] = (8, 16, 32, 64, 96)
    patch_size: tuple[int, int, int] = (96, 96, 96)
    batch_size: int = 2
    da_workers: int = 3
    wml_load: tuple[float, float] = (8.0, 35.0)
    cl_load: tuple[float, float] = (1.0, 6.0)
    templates_dir: str | None = None
    lesion_dir: str | None = None
    connectivity: int = 18
    detection_threshold: float = 0.1
    min_member_dice: float = 0.2
    reuse_data: bool = False
    #: evaluate/package an ensemble assembled elsewhere instead of the recipe's own results
    ensemble_dir: Path | None = None
    timings: dict = field(default_factory=dict)

    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "nnUNet_raw": str(self.workdir / "nnUNet_raw"),
            "nnUNet_preprocessed": str(self.workdir / "nnUNet_preprocessed"),
            "nnUNet_results": str(self.workdir / "nnUNet_results"),
            "nnUNet_extTrainer": str(Path(__file__).resolve().parent / "trainers"),
            "nnUNet_compile": "f",
            "nnUNet_n_proc_DA": str(self.da_workers),
            "nnUNet_def_n_proc": str(max(1, self.workers)),
            "MSXPLAIN_ITERATIONS_PER_EPOCH": str(self.iterations_per_epoch),
            "MSXPLAIN_VAL_ITERATIONS": str(self.val_iterations),
            "MSXPLAIN_MAX_EPOCHS": str(self.max_epochs),
            "MSXPLAIN_TRAIN_SECONDS": str(self.train_seconds),
            "MSXPLAIN_SEED": str(self.seed),
        })
        return env

    @property
    def trainer_dir(self) -> Path:
        if self.ensemble_dir is not None:
            return self.ensemble_dir
        return self.workdir / "nnUNet_results" / self.dataset / f"{TRAINER}__{PLANS}__{CONFIGURATION}"


# --------------------------------------------------------------------------------------
# 1. data
# --------------------------------------------------------------------------------------
def _synth_case(job: dict) -> dict:
    """Make, conform and write one case with the generator ``job["generator"]`` (default
    ``"classic"``; :mod:`bids_app.training.generators`)."""
    from bids_app.training.dataset import conform_case, write_case
    from bids_app.training.generators import generate_case

    channels, lesions, info = generate_case(job.get("generator", "classic"), job["seed"], job["index"],
                                            job["resolution"], job["wml_load"], job["cl_load"],
                                            templates_dir=job["templates_dir"], lesion_dir=job["lesion_dir"])
    stack, labels, affine = conform_case(channels, 0, lesions)
    write_case(Path(job["raw"]), job["case"], stack, labels, affine, job["split"])
    brain = stack[0] != 0
    return {"case": job["case"], "split": job["split"], **info,
            "lesion_fraction": float((labels > 0).sum() / max(brain.sum(), 1))}


def case_jobs(cfg, raw: Path, n_train: int, **extra) -> list[dict]:
    """One synthesis job per case: training (``train_###``), validation (``val_###``, also in
    nnU-Net's imagesTr) and test (``test_###``, imagesTs) cases, each with its own seed
    ``cfg.seed * 1_000_003 + index``; ``extra`` keys are added to every job."""
    jobs = []
    for split, n, tag in (("Tr", n_train, "train"), ("Tr", cfg.n_val, "val"), ("Ts", cfg.n_test, "test")):
        for i in range(n):
            index = len(jobs)
            jobs.append({"seed": cfg.seed * 1_000_003 + index, "index": index, "resolution": cfg.resolution_mm,
                         "wml_load": cfg.wml_load, "cl_load": cfg.cl_load, "templates_dir": cfg.templates_dir,
                         "lesion_dir": cfg.lesion_dir, "raw": str(raw), "case": f"{tag}_{i:03d}", "split": split,
                         **extra})
    return jobs


def synthesize(cfg: RecipeConfig) -> dict[str, list[dict]]:
    from bids_app.training.dataset import write_dataset_json

    raw = cfg.workdir / "nnUNet_raw" / cfg.dataset
    raw.mkdir(parents=True, exist_ok=True)
    jobs = case_jobs(cfg, raw, cfg.n_train)
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        results = list(pool.map(_synth_case, jobs))
    cases = {"train": [], "val": [], "test": []}
    for r in results:
        cases[r["case"].split("_")[0]].append(r)
    write_dataset_json(raw, CHANNELS, LABELS, cfg.n_train + cfg.n_val,
                       description="msxplain synthetic MS lesions (bids_app.synth), skull-stripped, RAS+")
    (cfg.workdir / "cases.json").write_text(json.dumps(cases, indent=1))
    return cases


# --------------------------------------------------------------------------------------
# 2. plans
# --------------------------------------------------------------------------------------
def plan_and_preprocess(cfg: RecipeConfig) -> dict:
    from bids_app.training.plans import reduce_plans

    cmd = [*_entry("nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "plan_and_preprocess_entry",
                   "nnUNetv2_plan_and_preprocess"), "-d", str(cfg.dataset_id),
           "-c", CONFIGURATION, "-np", str(max(1, cfg.workers)), "-npfp", str(max(1, cfg.workers))]
    _run(cmd, cfg, cfg.workdir / "logs" / "plan_and_preprocess.log")
    pre = cfg.workdir / "nnUNet_preprocessed" / cfg.dataset
    default = json.loads((pre / "nnUNetPlans.json").read_text())
    small = reduce_plans(default, features=cfg.features, patch_size_xyz=cfg.patch_size, plans_name=PLANS,
                         batch_size=cfg.batch_size)
    (pre / f"{PLANS}.json").write_text(json.dumps(small, indent=1))
    return {"default_3d_fullres": _plan_summary(default), "used": _plan_summary(small)}


def _plan_summary(plans: dict) -> dict:
    c = plans["configurations"][CONFIGURATION]
    kw = c["architecture"]["arch_kwargs"]
    return {"spacing_zyx": c["spacing"], "patch_size_zyx": c["patch_size"], "batch_size": c["batch_size"],
            "features_per_stage": kw["features_per_stage"], "n_stages": kw["n_stages"],
            "normalization": c["normalization_schemes"]}


def write_splits(cfg: RecipeConfig, cases: dict) -> None:
    """Every member ("fold") trains on all training cases and validates on the same held-out set."""
    train = [c["case"] for c in cases["train"]]
    val = [c["case"] for c in cases["val"]]
    splits = [{"train": train, "val": val} for _ in range(cfg.members)]
    pre = cfg.workdir / "nnUNet_preprocessed" / cfg.dataset
    (pre / "splits_final.json").write_text(json.dumps(splits, indent=1))


# --------------------------------------------------------------------------------------
# 3. members
# --------------------------------------------------------------------------------------
def train_members(cfg: RecipeConfig) -> dict:
    logs = cfg.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for fold in range(cfg.members):
        log = open(logs / f"train_fold{fold}.log", "w")
        cmd = [*_entry("nnunetv2.run.run_training", "run_training_entry", "nnUNetv2_train"), str(cfg.dataset_id),
               CONFIGURATION, str(fold), "-tr", TRAINER, "-p", PLANS, "-device", cfg.device]
        procs.append((fold, subprocess.Popen(cmd, env=cfg.env(), stdout=log, stderr=subprocess.STDOUT), log))
    status = {}
    for fold, proc, log in procs:
        code = proc.wait()
        log.close()
        status[str(fold)] = code
    return status


# --------------------------------------------------------------------------------------
# 4-6. checks, tuning, evaluation (in-process, msxplain's own predictor)
# --------------------------------------------------------------------------------------
def _load_case(raw: Path, case: str, split: str):
    import nibabel as nib

    chans = [np.asarray(nib.load(str(raw / f"images{split}" / f"{case}_{k:04d}.nii.gz")).dataobj, dtype=np.float32)
             for k in range(len(CHANNELS))]
    img = nib.load(str(raw / f"labels{split}" / f"{case}.nii.gz"))
    return np.stack(chans), np.asarray(img.dataobj).astype(np.uint8), img.affine


def predict_cases(cfg: RecipeConfig, folds: list[str], cases: list[dict]):
    """Yield (case, member_probs (M, C, X, Y, Z), labels) for each case."""
    import torch

    from bids_app.core.segment import EnsemblePredictor, MemberInput
    from bids_app.model.checkpoints import load_checkpoint

    trainer_dir = cfg.trainer_dir
    members = []
    for f in folds:
        ckpt = load_checkpoint(trainer_dir / f"fold_{f}" / "checkpoint_final.pth")
        members.append(MemberInput(f, ckpt["network_weights"], ckpt.get("inference_allowed_mirroring_axes")))
    predictor = EnsemblePredictor(json.loads((trainer_dir / "plans.json").read_text()),
                                  json.loads((trainer_dir / "dataset.json").read_text()), members,
                                  device=torch.device(cfg.device if cfg.device != "cuda" or torch.cuda.is_available()
                                                      else "cpu"), tta=False,
                                  num_threads=max(1, cfg.workers))
    raw = cfg.workdir / "nnUNet_raw" / cfg.dataset
    for c in cases:
        image, labels, affine = _load_case(raw, c["case"], c["split"])
        probs = predictor.predict(image, np.sqrt((affine[:3, :3] ** 2).sum(0)))
        yield c, probs, labels


def _scores(pred_classes: np.ndarray, ref_classes: np.ndarray, connectivity: int, t: float) -> dict:
    from bids_app.core.metrics.detection import lesion_detection
    from bids_app.core.metrics.overlap import dice

    det = lesion_detection(pred_classes > 0, ref_classes > 0, "iou_adj", t, connectivity)
    return {"F1": det["F1"], "precision": det["precision"], "recall": det["recall"], "DSC": dice(pred_classes > 0,
                                                                                                   ref_classes > 0),
            "TPL": det["TPL"], "FPL": det["FPL"], "USL": det["USL"], "FNL": det["FNL"]}


def _lesion_box(probs: np.ndarray, labels: np.ndarray, margin: int = 3) -> tuple[slice, ...]:
    """Bounding box of every voxel that is lesion in the reference or has lesion probability
    above 0.001 in some member (tuning only needs that region; far faster than the volume)."""
    interest = (labels > 0) | (probs[:, 0] < 0.999).any(axis=0)
    if not interest.any():
        return tuple(slice(0, 1) for _ in labels.shape)
    idx = np.argwhere(interest)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, labels.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _member_dice(probs: np.ndarray, labels: np.ndarray, connectivity: int) -> list[float]:
    from bids_app.core.postprocess import segment_lesions

    out = []
    for m in range(probs.shape[0]):
        seg = segment_lesions(probs[m], list(LABELS), 0.5, 1, connectivity)
        inter = np.logical_and(seg.dseg > 0, labels > 0).sum()
        out.append(float(2 * inter / max((seg.dseg > 0).sum() + (labels > 0).sum(), 1)))
    return out


def _grid_f1(mean: np.ndarray, labels: np.ndarray, connectivity: int, t: float) -> dict:
    from bids_app.core.postprocess import segment_lesions

    return {(th, size): _scores(segment_lesions(mean, list(LABELS), th, size, connectivity).dseg, labels,
                                connectivity, t)["F1"]
            for th in THRESHOLD_GRID for size in MIN_SIZE_GRID}


def check_and_tune(cfg: RecipeConfig, cases: dict, folds: list[str]) -> dict:
    """Member check and post-processing tuning on the validation cases (cases in parallel)."""
    cropped = []
    for _, probs, labels in predict_cases(cfg, folds, cases["val"]):
        box = _lesion_box(probs, labels)
        cropped.append((np.ascontiguousarray(probs[(slice(None), slice(None)) + box]),
                        np.ascontiguousarray(labels[box])))
    with ProcessPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        dices = list(pool.map(_member_dice, [p for p, _ in cropped], [lab for _, lab in cropped],
                              [cfg.connectivity] * len(cropped)))
        member_dice = {f: [d[i] for d in dices] for i, f in enumerate(folds)}
        kept = [f for f in folds if np.mean(member_dice[f]) >= cfg.min_member_dice]
        if not kept:
            raise RuntimeError(f"no member reaches a validation lesion Dice of {cfg.min_member_dice}: "
                               f"{ {f: round(float(np.mean(v)), 3) for f, v in member_dice.items()} }")
        idx = [folds.index(f) for f in kept]
        grids = list(pool.map(_grid_f1, [p[idx].mean(axis=0) for p, _ in cropped], [lab for _, lab in cropped],
                              [cfg.connectivity] * len(cropped), [cfg.detection_threshold] * len(cropped)))
    grid = {key: [g[key] for g in grids] for key in grids[0]}
    best = max(grid, key=lambda k: (np.mean(grid[k]), -k[1]))
    return {"member_val_dice": {f: float(np.mean(v)) for f, v in member_dice.items()},
            "kept_members": kept, "excluded_members": [f for f in folds if f not in kept],
            "threshold": best[0], "min_lesion_size": best[1], "val_mean_F1": float(np.mean(grid[best])),
            "grid_mean_F1": {f"{t}/{s}": float(np.mean(v)) for (t, s), v in grid.items()}}


def evaluate_test(cfg: RecipeConfig, cases: dict, folds: list[str], threshold: float, min_size: int) -> dict:
    from bids_app.core.postprocess import segment_lesions

    rows = []
    for _, probs, labels in predict_cases(cfg, folds, cases["test"]):
        seg = segment_lesions(probs.mean(axis=0), list(LABELS), threshold, min_size, cfg.connectivity)
        row = _scores(seg.dseg, labels, cfg.connectivity, cfg.detection_threshold)
        for index, name in LABELS.items():
            row[f"{name}_DSC"] = float(2 * np.logical_and(seg.dseg == index, labels == index).sum()
                                       / max((seg.dseg == index).sum() + (labels == index).sum(), 1))
        rows.append(row)
    keys = rows[0].keys() if rows else []
    return {"n_cases": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in keys},
            "per_case": rows}


# --------------------------------------------------------------------------------------
# 7. package
# --------------------------------------------------------------------------------------
def package(cfg: RecipeConfig, kept: list[str], tuning: dict, test: dict, cases: dict, plans_info: dict,
            hardware: dict) -> Path:
    import torch

    from bids_app.model.card import CARD_NAME, CARD_VERSION, pin_model_files, sha256_file
    from bids_app.model.checkpoints import load_checkpoint

    src = cfg.trainer_dir
    dest = cfg.out_model / cfg.dataset / src.name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(src / name, dest / name)
    members = []
    for new_index, fold in enumerate(kept):
        ckpt = load_checkpoint(src / f"fold_{fold}" / "checkpoint_final.pth")
        slim = {k: ckpt[k] for k in ("network_weights", "init_args", "trainer_name",
                                     "inference_allowed_mirroring_axes", "current_epoch") if k in ckpt}
        (dest / f"fold_{new_index}").mkdir()
        torch.save(slim, dest / f"fold_{new_index}" / "checkpoint_final.pth")
        members.append({"fold": str(new_index), "trained_as_fold": fold,
                        "sha256": sha256_file(dest / f"fold_{new_index}" / "checkpoint_final.pth"),
                        "seed": cfg.seed + int(fold), "epochs": int(ckpt.get("current_epoch", 0)),
                        "val_lesion_dice": tuning["member_val_dice"][fold]})
    train_fraction = [c["lesion_fraction"] for c in cases["train"]]
    card = {
        "card_version": CARD_VERSION,
        "id": "msxplain-demo-synth-v1",
        "name": "msxplain demo ensemble (trained on synthetic data only)",
        "version": "1",
        "description": ("A small nnU-Net v2 deep ensemble trained only on synthetic MS data built from real lesion "
                        "shapes. It exists so that msxplain runs out of the box; it is NOT clinically validated."),
        "demo": True,
        "nnunet": {"configuration": CONFIGURATION, "checkpoint": "checkpoint_final.pth", "trainer": TRAINER,
                   "plans": PLANS},
        "channels": [
            {"index": 0, "name": "T1w", "queries": [{"suffix": "UNIT1"}, {"suffix": "T1w"}]},
            {"index": 1, "name": "FLAIR", "queries": [{"suffix": "FLAIR"}]},
        ],
        "reference_channel": 0,
        "skull_stripped_input": True,
        "orientation": "RAS",
        "labels": {"1": {"name": "WML", "long_name": "white-matter lesion"},
                   "2": {"name": "CL", "long_name": "cortical lesion"}},
        "postprocessing": {"threshold": tuning["threshold"], "min_lesion_size": tuning["min_lesion_size"],
                           "connectivity": cfg.connectivity,
                           "tuned_for": f"mean lesion-wise F1 (iou_adj, t={cfg.detection_threshold}) on "
                                        f"{len(cases['val'])} held-out synthetic validation subjects"},
        "reference_lesion_load": float(np.mean(train_fraction)) if train_fraction else 0.001,
        "members": members,
        "files": pin_model_files(dest),
        "training": {
            "data": {"generator": "bids_app.synth (msxplain-tools synth)", "n_train": cfg.n_train,
                     "n_val": cfg.n_val, "n_test": cfg.n_test, "resolution_mm": cfg.resolution_mm,
                     "skull_stripped": True, "wml_load_range": list(cfg.wml_load), "cl_load_range": list(cfg.cl_load),
                     "seed": cfg.seed,
                     "lesion_shapes": "open_ms_data cross-sectional expert masks (Lesjak et al. 2017, CC-BY), "
                                      "patient07 excluded (real test case)"},
            "ensemble": "deep ensemble: every member trained on the full training set with its own seed",
            "plans": plans_info,
            "trainer": {"name": TRAINER, "iterations_per_epoch": cfg.iterations_per_epoch,
                        "wall_clock_budget_s": cfg.train_seconds, "batch_size": cfg.batch_size,
                        "loss": "nnU-Net default (Dice + CE, deep supervision)",
                        "augmentation": "nnU-Net default"},
            "member_check": {"min_val_lesion_dice": cfg.min_member_dice, "excluded": tuning["excluded_members"]},
            "hardware": hardware,
            "timings_s": cfg.timings,
        },
        "performance": {
            "synthetic_validation": {"mean_lesion_F1": tuning["val_mean_F1"]},
            "synthetic_test": {k: v for k, v in test.items() if k != "per_case"},
        },
    }
    (dest / CARD_NAME).write_text(json.dumps(card, indent=1))
    return dest


# --------------------------------------------------------------------------------------
def _entry(module: str, function: str, prog: str) -> list[str]:
    """Run an nnU-Net console entry point with this interpreter (works where the console
    scripts are not on PATH, e.g. packages installed with ``pip --target``)."""
    code = f"import sys; sys.argv[0] = {prog!r}; from {module} import {function} as main; sys.exit(main())"
    return [sys.executable, "-c", code]


def _run(cmd: list[str], cfg: RecipeConfig, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        code = subprocess.run(cmd, env=cfg.env(), stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}; see {log}")


def hardware_info(device: str) -> dict:
    import platform

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["torch"] = torch.__version__
    return info


def run_recipe(cfg: RecipeConfig) -> dict:
    """All steps; returns the report (also written to ``workdir/report.json``)."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}}

    def step(name, fn, *args):
        t = time.monotonic()
        LOGGER.info("recipe: %s ...", name)
        out = fn(*args)
        cfg.timings[name] = round(time.monotonic() - t, 1)
        LOGGER.info("recipe: %s done in %.0f s", name, cfg.timings[name])
        (cfg.workdir / "report.json").write_text(json.dumps(report, indent=1, default=str))
        return out

    pre = cfg.workdir / "nnUNet_preprocessed" / cfg.dataset
    if cfg.reuse_data and (cfg.workdir / "cases.json").is_file() and (pre / f"{PLANS}.json").is_file():
        cases = json.loads((cfg.workdir / "cases.json").read_text())
        plans_info = {"used": _plan_summary(json.loads((pre / f"{PLANS}.json").read_text())),
                      "default_3d_fullres": _plan_summary(json.loads((pre / "nnUNetPlans.json").read_text()))}
        shutil.rmtree(cfg.workdir / "nnUNet_results", ignore_errors=True)
    else:
        cases = step("synthesize", synthesize, cfg)
        plans_info = step("plan_and_preprocess", plan_and_preprocess, cfg)
    write_splits(cfg, cases)
    report["train_status"] = step("train", train_members, cfg)
    folds = [f for f, code in report["train_status"].items()
             if code == 0 and (cfg.trainer_dir / f"fold_{f}" / "checkpoint_final.pth").is_file()]
    if not folds:
        raise RuntimeError("no member finished training; see the logs")
    tuning = step("check_and_tune", check_and_tune, cfg, cases, folds)
    report["tuning"] = tuning
    test = step("evaluate_test", evaluate_test, cfg, cases, tuning["kept_members"], tuning["threshold"],
                tuning["min_lesion_size"])
    report["test"] = test
    report["model_dir"] = str(package(cfg, tuning["kept_members"], tuning, test, cases, plans_info,
                                      hardware_info(cfg.device)))
    report["timings_s"] = cfg.timings
    (cfg.workdir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report
