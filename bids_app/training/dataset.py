"""Training cases in nnU-Net's raw format, conformed exactly as the app conforms its inputs.

A model only generalises to what the app will feed it, so training cases go through the same
steps as a participant run: secondary channels brought onto the reference channel's grid
(:mod:`bids_app.core.conform`), optional skull stripping with a brain mask, and reorientation
to RAS+ (the orientation :class:`~bids_app.core.segment.EnsemblePredictor` sees).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bids_app.core import conform
from bids_app.core.imageio import Image, save_image
from bids_app.errors import BadInputData


def conform_case(channels: Sequence[Image], reference_index: int = 0, labels: Image | None = None,
                 brain_mask: np.ndarray | None = None, coregister: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Bring the channels of one case onto the reference grid, mask and reorient them.

    Parameters
    ----------
    channels : sequence of Image
        In the model's channel order.
    reference_index : int
    labels : Image or None
        Lesion classes on the reference grid.
    brain_mask : ndarray of bool, shape of the reference, or None
        Voxels outside are set to 0 in every channel (skull stripping).
    coregister : bool
        Rigidly register secondary channels (else they are resampled through their headers,
        right for data that share world space, e.g. ``msxplain-tools synth`` without
        ``--misalign-mm``).

    Returns
    -------
    stack : ndarray of float32, shape (K, X, Y, Z)
        Channels in RAS+ voxel order.
    labels : ndarray of uint8, shape (X, Y, Z), or None
    affine : ndarray, shape (4, 4)
        Of the canonical grid.
    """
    reference = channels[reference_index]
    arrays = []
    for i, image in enumerate(channels):
        if i == reference_index or conform.same_grid(reference, image):
            data = np.asarray(image.data, dtype=np.float32)
        else:
            transform = conform.register_rigid(reference, image) if coregister else None
            data = conform.resample_to(reference, image, transform, "linear")  # header-only: scipy
        if brain_mask is not None:
            data = data * brain_mask
        arrays.append(conform.to_canonical(Image(data, reference.affine))[0].data)
    canonical_affine = conform.to_canonical(Image(np.asarray(reference.data), reference.affine))[0].affine
    label_array = None
    if labels is not None:
        if labels.shape != reference.shape or not np.allclose(labels.affine, reference.affine, atol=1e-3):
            raise BadInputData("Training labels are not on the reference image's grid.", path=labels.path,
                               hint="resample the lesion mask onto the reference (T1w) image.")
        label_array = conform.to_canonical(Image(np.asarray(labels.data).astype(np.uint8), labels.affine))[0].data
    return np.stack(arrays).astype(np.float32), label_array, canonical_affine


def write_case(raw_dir: Path, case_id: str, stack: np.ndarray, labels: np.ndarray | None, affine: np.ndarray,
               split: str = "Tr") -> None:
    """Write ``images{split}/{case}_{k:04d}.nii.gz`` (and ``labels{split}/{case}.nii.gz``)."""
    images = raw_dir / f"images{split}"
    images.mkdir(parents=True, exist_ok=True)
    for k, channel in enumerate(stack):
        save_image(images / f"{case_id}_{k:04d}.nii.gz", channel.astype(np.float32), affine)
    if labels is not None:
        label_dir = raw_dir / f"labels{split}"
        label_dir.mkdir(parents=True, exist_ok=True)
        save_image(label_dir / f"{case_id}.nii.gz", labels.astype(np.uint8), affine)


def write_dataset_json(raw_dir: Path, channel_names: Sequence[str], label_names: dict[int, str], n_training: int,
                       description: str = "", extra: dict | None = None) -> Path:
    """nnU-Net's ``dataset.json`` (channels in order, labels with background 0)."""
    data = {
        "channel_names": {str(i): name for i, name in enumerate(channel_names)},
        "labels": {"background": 0, **{name: int(i) for i, name in sorted(label_names.items())}},
        "numTraining": int(n_training),
        "file_ending": ".nii.gz",
        # the app feeds RAS+ arrays; NibabelIOWithReorient reads the files the same way
        "overwrite_image_reader_writer": "NibabelIOWithReorient",
        "name": raw_dir.name,
        "description": description,
        **(extra or {}),
    }
    path = raw_dir / "dataset.json"
    path.write_text(json.dumps(data, indent=2))
    return path
