"""A tiny nnU-Net v2 model built in seconds, for tests and CI smoke runs.

The model is real as far as inference is concerned: real nnU-Net plans (PlainConvUNet from
``dynamic_network_architectures``), nnU-Net's folder layout (``DatasetNNN_Name/
nnUNetTrainer__nnUNetPlans__3d_fullres/fold_K/checkpoint_final.pth``) and checkpoint format,
and an msxplain model card with checksums. Its members are trained for a few dozen Adam steps
on synthetic two-channel blobs (channel 1 "FLAIR" bright lesions = class 1, small lesions
dark on channel 0 "T1w" = class 2), each with its own seed, so that they detect blobs and
disagree a little, which is what the pipeline tests need. It says nothing about MS.

The same model exists in nnU-Net's other configurations (``configuration``): ``3d_lowres``
(the 3D network on a 4 mm grid), ``2d`` (a 2D network, trained on axial slices, that nnU-Net
runs slice by slice) and ``3d_cascade_fullres`` (a full-resolution cascade stage, without the
low-resolution stage it needs: for the refusal). Members may be named (``folds``, e.g.
``["all"]``) and may carry a ``checkpoint_best.pth`` beside ``checkpoint_final.pth`` (``best``,
pinned in the card as ``sha256_best``; docs/model-card.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bids_app.training.plans import add_cascade, make_plans

TINY_DATASET = "Dataset990_MsxplainTiny"
TINY_TRAINER_DIR = "nnUNetTrainer__nnUNetPlans__3d_fullres"
#: the configurations :func:`build_tiny_model` builds
TINY_CONFIGURATIONS = ("3d_fullres", "3d_lowres", "2d", "3d_cascade_fullres")


def blob_case(rng: np.random.Generator, shape=(32, 32, 32), n_big=(1, 4), n_small=(0, 3), r_big=(2.0, 4.0),
              r_small=(1.2, 2.0)) -> tuple[np.ndarray, np.ndarray]:
    """Two-channel T1w/FLAIR-like blobs (the tiny model's training data), any shape.

    Returns
    -------
    image : ndarray (2, X, Y, Z) float32, each channel z-scored
    labels : ndarray (X, Y, Z) uint8, 1 = big bright-on-FLAIR blobs, 2 = small subtle ones
    """
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    for cls, count, radius in ((1, rng.integers(*n_big), r_big), (2, rng.integers(*n_small), r_small)):
        for _ in range(int(count)):
            centre = rng.uniform(5, np.array(shape) - 5)
            r = rng.uniform(*radius, size=3)
            inside = (((grid - centre) / r) ** 2).sum(-1) <= 1.0
            labels[inside] = cls
    t1 = rng.normal(1.0, 0.08, shape).astype(np.float32)
    flair = rng.normal(1.0, 0.08, shape).astype(np.float32)
    flair[labels == 1] += 0.9
    t1[labels == 1] -= 0.3
    t1[labels == 2] -= 0.6
    flair[labels == 2] += 0.3
    image = np.stack([t1, flair])
    image = (image - image.mean(axis=(1, 2, 3), keepdims=True)) / image.std(axis=(1, 2, 3), keepdims=True)
    return image.astype(np.float32), labels


def tiny_plans(configuration: str = "3d_fullres") -> dict:
    """The tiny model's plans for one of :data:`TINY_CONFIGURATIONS` (2 mm grid, 32-voxel patches;
    ``3d_lowres``: 4 mm, 16 voxels; ``2d``: 2 mm in-plane, 32 x 32 slices)."""
    common = dict(n_channels=2, features=(4, 8, 16), median_shape_xyz=(48, 56, 48))
    fullres = make_plans(TINY_DATASET, spacing_xyz=(2.0, 2.0, 2.0), patch_size_xyz=(32, 32, 32), **common)
    lowres = make_plans(TINY_DATASET, spacing_xyz=(4.0, 4.0, 4.0), patch_size_xyz=(16, 16, 16),
                        configuration="3d_lowres", **common)
    if configuration == "3d_fullres":
        return fullres
    if configuration == "3d_lowres":
        return lowres
    if configuration == "2d":
        return make_plans(TINY_DATASET, spacing_xyz=(2.0, 2.0, 2.0), patch_size_xyz=(32, 32), configuration="2d",
                          batch_size=8, **common)
    if configuration == "3d_cascade_fullres":
        return add_cascade(fullres, lowres)
    raise ValueError(f"configuration must be one of {', '.join(TINY_CONFIGURATIONS)}")


def _train_member(plans: dict, seed: int, iterations: int, n_classes: int, configuration: str = "3d_fullres",
                  snapshot_at: int | None = None) -> tuple[dict, dict | None]:
    """Train one member; its final weights, and those after ``snapshot_at`` steps (or None)."""
    import torch

    from bids_app.core.segment import build_network

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # the cascade stage is refused before its weights are read: a 3d_fullres network stands in
    net = build_network(plans, "3d_fullres" if configuration == "3d_cascade_fullres" else configuration, 2,
                        n_classes)
    # build_network skips nnU-Net's init (allow_init=False) to load weights; init here
    net.apply(net.initialize) if hasattr(net, "initialize") else None
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    weights = torch.tensor([1.0, 3.0, 6.0][:n_classes])
    snapshot = None
    for step in range(iterations):
        if configuration == "2d":  # 8 axial slices of two cases, lesions first
            cases = [blob_case(rng) for _ in range(2)]
            xs, ys = [], []
            for image, labels in cases:
                order = np.argsort(-(labels > 0).sum(axis=(0, 1)))[:4]
                xs += [image[:, :, :, k] for k in order]
                ys += [labels[:, :, k] for k in order]
        elif configuration == "3d_lowres":  # the blobs of a 4 mm grid
            xs, ys = zip(*(blob_case(rng, shape=(16, 16, 16), r_big=(1.5, 2.5), r_small=(1.0, 1.5))
                           for _ in range(2)))
        else:
            xs, ys = zip(*(blob_case(rng) for _ in range(2)))
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        loss = torch.nn.functional.cross_entropy(net(x), y, weight=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if snapshot_at is not None and step + 1 == snapshot_at:
            snapshot = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.eval()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, snapshot


def build_tiny_model(out_dir: str | Path, n_members: int = 3, iterations: int = 40, seed: int = 0,
                     configuration: str = "3d_fullres", folds: list[str] | None = None,
                     best: bool = False) -> Path:
    """Write a tiny trained nnU-Net model + model card under ``out_dir``; return the trainer folder.

    Takes ~10-20 s on 2 CPU cores for 3 members x 40 iterations.

    Parameters
    ----------
    configuration : str
        One of :data:`TINY_CONFIGURATIONS`; the trainer folder is
        ``nnUNetTrainer__nnUNetPlans__<configuration>``.
    folds : list of str or None
        Member names (``fold_<name>`` folders); default ``0 .. n_members - 1``.
    best : bool
        Also write ``checkpoint_best.pth`` (the weights after half the iterations) and pin it in
        the card (``members[].sha256_best``).
    """
    import torch

    from bids_app.model.card import CARD_NAME, CARD_VERSION, pin_model_files, sha256_file

    out_dir = Path(out_dir)
    trainer_dir = out_dir / TINY_DATASET / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    trainer_dir.mkdir(parents=True, exist_ok=True)
    dataset_json = {
        "channel_names": {"0": "T1w", "1": "FLAIR"},
        "labels": {"background": 0, "WML": 1, "CL": 2},
        "numTraining": 0,
        "file_ending": ".nii.gz",
        "name": TINY_DATASET,
        "description": "tiny synthetic blobs model for msxplain tests",
    }
    plans = tiny_plans(configuration)
    (trainer_dir / "plans.json").write_text(json.dumps(plans, indent=1))
    (trainer_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    folds = [str(f) for f in folds] if folds is not None else [str(k) for k in range(n_members)]
    members = []
    for k, fold in enumerate(folds):
        weights, snapshot = _train_member(plans, seed=seed + 1000 * (k + 1), iterations=iterations, n_classes=3,
                                          configuration=configuration,
                                          snapshot_at=max(1, iterations // 2) if best else None)
        fold_dir = trainer_dir / f"fold_{fold}"
        fold_dir.mkdir(exist_ok=True)
        member = {"fold": fold}
        for name, state, key in (("checkpoint_final.pth", weights, "sha256"),
                                 ("checkpoint_best.pth", snapshot, "sha256_best")):
            if state is None:
                continue
            checkpoint = {
                "network_weights": state,
                "optimizer_state": None,
                "grad_scaler_state": None,
                "logging": {},
                "_best_ema": None,
                "current_epoch": iterations,
                "init_args": {"plans": plans, "configuration": configuration,
                              "fold": int(fold) if fold.isdigit() else fold,
                              "dataset_json": dataset_json, "device": "cpu"},
                "trainer_name": "nnUNetTrainer",
                "inference_allowed_mirroring_axes": (0, 1) if configuration == "2d" else (0, 1, 2),
            }
            torch.save(checkpoint, fold_dir / name)
            member[key] = sha256_file(fold_dir / name)
        member["seed"] = seed + 1000 * (k + 1)
        members.append(member)
    card = {
        "card_version": CARD_VERSION,
        "id": "msxplain-tiny-test",
        "name": "tiny test model (synthetic blobs; NOT for MS data)",
        "version": "1",
        "description": "A few-second model for tests: trained on synthetic blobs, it says nothing about MS lesions.",
        "demo": True,
        "nnunet": {"configuration": configuration, "checkpoint": "checkpoint_final.pth",
                   "trainer": "nnUNetTrainer", "plans": "nnUNetPlans"},
        "channels": [
            {"index": 0, "name": "T1w", "queries": [{"suffix": "UNIT1"}, {"suffix": "T1w"}]},
            {"index": 1, "name": "FLAIR", "queries": [{"suffix": "FLAIR"}]},
        ],
        "reference_channel": 0,
        "skull_stripped_input": True,
        "labels": {"1": {"name": "WML", "long_name": "white-matter lesion"},
                   "2": {"name": "CL", "long_name": "cortical lesion"}},
        "postprocessing": {"threshold": 0.5, "min_lesion_size": 3, "connectivity": 18},
        "reference_lesion_load": 0.001,
        "members": members,
        "files": pin_model_files(trainer_dir),
        "training": {"data": "synthetic blobs (bids_app.testing.tiny_model)", "iterations": iterations,
                     "optimizer": "Adam lr 3e-3, weighted cross-entropy"},
    }
    (trainer_dir / CARD_NAME).write_text(json.dumps(card, indent=1))
    return trainer_dir
