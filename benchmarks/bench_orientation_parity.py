#!/usr/bin/env python3
"""msxplain's per-member probabilities against ``nnUNetPredictor`` on a real FLAIR, with a
FLAMeS-shaped random-weight model (issue 21): the network must see what ``nnUNetv2_predict`` shows it
whatever the file's stored orientation.

    TEMPLATEFLOW_HOME=... python benchmarks/bench_orientation_parity.py [--flair FILE] [--crop 112 128 112] [--tta]

The model: FLAMeS' plans as published third-hand (docs/models.md): one FLAIR channel, two classes,
``SimpleITKIO``, ``transpose_forward [2, 0, 1]``, spacing 1.0 x 0.9 x 0.9 mm and patch 112 x 128 x 160
in the plans' axis order, z-score inside the non-zero mask, a PlainConvUNet of 5 stages (32-320
features; FLAMeS has 6), random weights with the last layer scaled x40 so that the softmax is far from
flat. The image: ``patient07``'s skull-stripped FLAIR (open_ms_data, MNI 1 mm), a central crop of
``--crop`` voxels, stored as given and re-stored LAS, LPS and PIL (axes permuted, as a sagittal
acquisition) with the same world geometry. For each: max and mean |difference| of P(lesion), and the
seconds of each side. Results: docs/benchmarks.md ("Orientation parity on a real FLAIR").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations as nio

from bids_app.model.card import CARD_NAME, pin_model_files, sha256_file
from bids_app.testing import shared_data_dir
from bids_app.training.plans import make_plans

PATIENT07 = (
    "open_ms_data/cross_sectional/MNI/patient07/FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz")


def flames_shaped_model(root: Path, seed: int = 0) -> Path:
    from bids_app.core.segment import build_network

    trainer_dir = root / "Dataset004_WML" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (trainer_dir / "fold_0").mkdir(parents=True)
    dataset = {"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "WML": 1}, "numTraining": 0,
               "file_ending": ".nii.gz"}
    # plans' axis order (after transpose_forward): spacing 1.0 x 0.9 x 0.9, patch 112 x 128 x 160
    plans = make_plans("Dataset004_WML", n_channels=1, spacing_xyz=(0.9, 0.9, 1.0), patch_size_xyz=(160, 128, 112),
                       features=(32, 64, 128, 256, 320), median_shape_xyz=(182, 218, 182))
    plans["image_reader_writer"] = "SimpleITKIO"
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    (trainer_dir / "plans.json").write_text(json.dumps(plans))
    (trainer_dir / "dataset.json").write_text(json.dumps(dataset))
    torch.manual_seed(seed)
    net = build_network(plans, "3d_fullres", 1, 2)
    net.apply(net.initialize)
    with torch.no_grad():
        for layer in net.decoder.seg_layers:
            layer.weight.mul_(40.0)
            layer.bias.zero_()
    n_params = sum(p.numel() for p in net.parameters())
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": (0, 1, 2)},
               trainer_dir / "fold_0" / "checkpoint_final.pth")
    card = {"card_version": 1, "id": "flames-shaped-random", "labels": {"1": "WML"}, "skull_stripped_input": False,
            "channels": [{"index": 0, "name": "FLAIR", "queries": [{"suffix": "FLAIR"}]}],
            "members": [{"fold": "0", "sha256": sha256_file(trainer_dir / "fold_0" / "checkpoint_final.pth")}],
            "files": pin_model_files(trainer_dir)}
    (trainer_dir / CARD_NAME).write_text(json.dumps(card))
    print(f"model: PlainConvUNet, {n_params / 1e6:.1f} M parameters, patch 112x128x160 (plans order)")
    return trainer_dir


def restore(img: nib.Nifti1Image, axcodes: str) -> nib.Nifti1Image:
    """The same image (same world geometry) stored with ``axcodes``."""
    transform = nio.ornt_transform(nio.io_orientation(img.affine), nio.axcodes2ornt(tuple(axcodes)))
    data = nio.apply_orientation(np.asarray(img.dataobj, np.float32), transform)
    affine = img.affine @ nio.inv_ornt_aff(transform, img.shape)
    out = nib.Nifti1Image(data, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flair", type=Path, default=None)
    ap.add_argument("--crop", type=int, nargs=3, default=(112, 128, 112))
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--orientations", nargs="+", default=["stored", "LAS", "LPS", "PIL"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from bids_app.interfaces.segment import PredictLesions

    flair = args.flair or shared_data_dir() / PATIENT07
    source = nib.load(str(flair))
    data = np.asarray(source.dataobj, np.float32)
    centre = [s // 2 for s in data.shape]
    box = tuple(slice(c - n // 2, c - n // 2 + n) for c, n in zip(centre, args.crop))
    start = np.array([b.start for b in box])
    affine = source.affine.copy()
    affine[:3, 3] = source.affine[:3, :3] @ start + source.affine[:3, 3]
    cropped = nib.Nifti1Image(data[box], affine)
    print(f"image: {flair.name}, stored {''.join(nio.aff2axcodes(source.affine))}, crop {data[box].shape}, "
          f"TTA {args.tta}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        trainer_dir = flames_shaped_model(tmp / "model")
        reference = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=args.tta, allow_tqdm=False)
        reference.initialize_from_trained_model_folder(str(trainer_dir), use_folds=(0,))
        print("stored\tmax|diff|\tmean|diff|\tmsxplain_s\tnnunet_s")
        for axcodes in args.orientations:
            img = cropped if axcodes == "stored" else restore(cropped, axcodes)
            work = tmp / axcodes
            work.mkdir()
            image = work / "flair.nii.gz"
            nib.save(img, str(image))
            mask = work / "mask.nii.gz"
            nib.save(nib.Nifti1Image((np.asarray(img.dataobj) != 0).astype(np.uint8), img.affine), str(mask))
            channels = work / "channels.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj, np.float32)[..., None], img.affine), str(channels))
            t0 = time.perf_counter()
            node = PredictLesions(channels_file=str(channels), mask_file=str(mask), model_dir=str(trainer_dir),
                                  members=["0"], device="cpu", tta=args.tta, num_threads=2,
                                  skull_stripped_input=False, input_orientation="auto")
            ours = np.load(node.run(cwd=str(work)).outputs.member_probs_file)[0, 1]
            t1 = time.perf_counter()
            array, properties = SimpleITKIO().read_images([str(image)])
            _, probs = reference.predict_single_npy_array(array, properties, None, None, True)
            theirs = np.asarray(probs, np.float32)[1].transpose(2, 1, 0)
            t2 = time.perf_counter()
            diff = np.abs(ours - theirs)
            print(f"{axcodes}\t{diff.max():.2e}\t{diff.mean():.2e}\t{t1 - t0:.1f}\t{t2 - t1:.1f}")


if __name__ == "__main__":
    main()
