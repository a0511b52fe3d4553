"""Shared fixtures: offline TemplateFlow, the tiny nnU-Net model, small BIDS datasets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository (read-only in CI), or $MSXPLAIN_SHARED_DATA."""
    env = os.environ.get("MSXPLAIN_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO.parent / "shared" / "data", Path("/work/shared/data")]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


SHARED = shared_data_dir()


def need_shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def templateflow_home(tmp_path_factory) -> Path:
    """A writable copy of ../shared/data/templateflow as TEMPLATEFLOW_HOME (never downloads)."""
    home = tmp_path_factory.mktemp("templateflow")
    src = SHARED / "templateflow"
    if src.is_dir():
        shutil.copytree(src, home, dirs_exist_ok=True)
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    return home


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    os.environ["MSXPLAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("DENO_DIR", str(tmp_path_factory.mktemp("deno")))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Trainer folder of the tiny 3-member nnU-Net model (built once per test session)."""
    import torch

    from bids_app.testing.tiny_model import build_tiny_model

    torch.set_num_threads(2)
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), n_members=3, iterations=60)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
    return path


def make_case(seed: int, shape=(40, 48, 40)) -> tuple[np.ndarray, np.ndarray]:
    """(2, X, Y, Z) T1w/FLAIR-like float32 image, zero outside an ellipsoidal 'brain', and labels."""
    from bids_app.testing.tiny_model import _synthetic_case

    image, labels = _synthetic_case(np.random.default_rng(seed), shape)
    image = (image - image.min()) * 100.0
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid ** 2).sum(0) <= 0.95
    image = image * brain
    labels = labels * brain
    return image.astype(np.float32), labels.astype(np.uint8)


def make_bids(root: Path, subjects=("01", "02"), sessions=(None,), seed: int = 0, affine=None,
              flair_affine=None, extra_files: dict | None = None) -> Path:
    """A small raw BIDS dataset with T1w + FLAIR per session (and true labels in derivatives)."""
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


@pytest.fixture
def bids_factory(tmp_path):
    def factory(name="bids", **kwargs):
        return make_bids(tmp_path / name, **kwargs)

    return factory


def run_cli(argv: list[str]) -> int:
    """Run ``msxplain`` in this process and return its exit code."""
    from bids_app.cli.run import main

    return main([str(a) for a in argv])


#: module fixtures that run the whole participant pipeline (and the tests that use them are
#: full-pipeline tests: marked ``slow``, outside the default suite; CI runs them)
FULL_PIPELINE_FIXTURES = frozenset({"participant_run", "broken_run", "explain_run", "reference_run", "unit1_run"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if FULL_PIPELINE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
