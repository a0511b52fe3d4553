"""Small synthetic images and BIDS datasets for tests (as :mod:`numpy.testing` helps numpy's tests).

Nothing here is used by the BIDS App itself; the test suite, the benchmarks and the container
smoke test build their inputs with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def shared_data_dir() -> Path:
    """The project's shared real data: ``$MSXPLAIN_SHARED_DATA``, else ``../shared/data`` beside the
    source checkout (read-only in CI). The folder may be missing: tests that need it skip."""
    env = os.environ.get("MSXPLAIN_SHARED_DATA")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    candidates = [checkout.parent / "shared" / "data", Path("/work/shared/data")]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def need_shared(*parts: str) -> Path:
    """The path of ``parts`` under :func:`shared_data_dir`; skips the calling test when it is missing."""
    import pytest

    path = shared_data_dir().joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``data`` as NIfTI-1 with qform and sform code 1 (scanner); creates the folder."""
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def make_case(seed: int, shape=(40, 48, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A two-channel case of the tiny model's kind.

    Returns
    -------
    image : ndarray, shape (2, X, Y, Z), float32
        T1w-/FLAIR-like intensities (arbitrary units), zero outside an ellipsoidal "brain".
    labels : ndarray, shape (X, Y, Z), uint8
        0 background, 1 and 2 the two lesion classes of :mod:`bids_app.testing.tiny_model`.
    """
    from bids_app.testing.tiny_model import blob_case

    image, labels = blob_case(np.random.default_rng(seed), shape)
    image = (image - image.min()) * 100.0
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) <= 0.95
    image = image * brain
    labels = labels * brain
    return image.astype(np.float32), labels.astype(np.uint8)


def make_bids(root: Path, subjects=("01", "02"), sessions=(None,), seed: int = 0, affine=None,
              flair_affine=None, extra_files: dict | None = None) -> Path:
    """A small raw BIDS dataset with T1w + FLAIR per session, and the true labels in
    ``derivatives/truth`` (2 mm voxels, 40 x 48 x 40, unless ``affine`` says otherwise).

    ``extra_files`` maps paths relative to ``root`` to text or bytes written as they are.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "msxplain test", "BIDSVersion": "1.10.0", "DatasetType": "raw", "Authors": ["msxplain tests"]}))
    (root / "README").write_text("Synthetic test dataset for msxplain.\n")
    (root / "participants.tsv").write_text("participant_id\tsite\n" + "".join(
        f"sub-{s}\tsiteA\n" for s in subjects))
    if affine is None:
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        affine[:3, 3] = [-40, -48, -40]
    k = 0
    for sub in subjects:
        for ses in sessions:
            image, labels = make_case(seed + k)
            k += 1
            prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
            anat = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            write_nifti(anat / f"{prefix}_T1w.nii.gz", image[0], affine)
            write_nifti(anat / f"{prefix}_FLAIR.nii.gz", image[1], flair_affine if flair_affine is not None else affine)
            for suffix in ("T1w", "FLAIR"):
                (anat / f"{prefix}_{suffix}.json").write_text(json.dumps({"MagneticFieldStrength": 3}))
            truth = root / "derivatives" / "truth" / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "anat"
            write_nifti(truth / f"{prefix}_desc-lesions_dseg.nii.gz", labels.astype(np.uint8), affine)
    for rel, content in (extra_files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    if (root / "derivatives" / "truth").is_dir():
        (root / "derivatives" / "truth" / "dataset_description.json").write_text(json.dumps(
            {"Name": "truth", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
             "GeneratedBy": [{"Name": "msxplain tests"}]}))
    return root


def run_cli(argv: list) -> int:
    """Run ``msxplain`` in this process with ``argv`` (paths allowed) and return its exit code."""
    from bids_app.cli.run import main

    return main([str(a) for a in argv])
