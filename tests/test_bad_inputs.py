"""The bad-input table of the README, row by row: message, exit code, nothing half-written,
the other participants still processed."""

from __future__ import annotations

import errno
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.testing import make_bids, run_cli, write_nifti


def _anat(bids: Path, sub: str) -> Path:
    return bids / f"sub-{sub}" / "anat"


def _derivative_files(out: Path, sub: str) -> list[Path]:
    anat = out / f"sub-{sub}" / "anat"
    return sorted(anat.glob("*")) if anat.is_dir() else []


def _error(out: Path, sub: str) -> dict:
    found = sorted((out / f"sub-{sub}" / "log").glob("*/*_error.json"))
    assert found, f"no error log for sub-{sub}"
    return json.loads(found[-1].read_text())


#: participant -> (how its data are broken, expected exit code, words the message must contain)
BROKEN = {
    "02": ("zero-byte T1w", 65, ["sub-02_T1w.nii.gz", "empty"]),
    "03": ("truncated FLAIR", 65, ["sub-03_FLAIR.nii.gz", "truncated"]),
    "04": ("4D T1w", 65, ["sub-04_T1w.nii.gz", "3D"]),
    "05": ("NaN voxels in the FLAIR", 65, ["sub-05_FLAIR.nii.gz", "NaN"]),
    "06": ("all-zero T1w", 65, ["sub-06_T1w.nii.gz", "all zeros"]),
    "07": ("singular affine", 65, ["sub-07_T1w.nii.gz", "singular"]),
    "08": ("absurd voxel size", 65, ["sub-08_FLAIR.nii.gz", "voxel size"]),
    "09": ("qform and sform disagree", 65, ["sub-09_T1w.nii.gz", "qform and sform"]),
    "10": ("FLAIR far from the T1w", 65, ["sub-10_FLAIR.nii.gz", "do not overlap"]),
    "11": ("no FLAIR", 66, ["sub-11", "FLAIR"]),
    "12": ("two FLAIR acquisitions and no rule", 65, ["sub-12", "ambiguous"]),
    "13": ("a 2D image", 65, ["sub-13_T1w.nii.gz", "volume"]),
    "14": ("reference mask on another grid", 65, ["sub-14", "another grid"]),
}


def _break(bids: Path) -> None:
    a = lambda s: _anat(bids, s)  # noqa: E731
    (a("02") / "sub-02_T1w.nii.gz").write_bytes(b"")
    raw = (a("03") / "sub-03_FLAIR.nii.gz").read_bytes()
    (a("03") / "sub-03_FLAIR.nii.gz").write_bytes(raw[: len(raw) // 3])
    img = nib.load(str(a("04") / "sub-04_T1w.nii.gz"))
    write_nifti(a("04") / "sub-04_T1w.nii.gz", np.stack([np.asarray(img.dataobj)] * 3, -1), img.affine)
    img = nib.load(str(a("05") / "sub-05_FLAIR.nii.gz"))
    data = np.asarray(img.dataobj).copy()
    data[5:8, 5:8, 5:8] = np.nan
    write_nifti(a("05") / "sub-05_FLAIR.nii.gz", data, img.affine)
    img = nib.load(str(a("06") / "sub-06_T1w.nii.gz"))
    write_nifti(a("06") / "sub-06_T1w.nii.gz", np.zeros(img.shape, np.float32), img.affine)
    # singular: zero the third row of the sform in the header bytes (nibabel refuses to write it)
    path = a("07") / "sub-07_T1w.nii.gz"
    img = nib.load(str(path))
    img.set_qform(None, code=0)
    nib.save(img, str(path))
    raw = bytearray(gzip.decompress(path.read_bytes()))
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
    hdr["srow_z"] = [0, 0, 0, 0]
    raw[:348] = hdr.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)))
    img = nib.load(str(a("08") / "sub-08_FLAIR.nii.gz"))
    write_nifti(a("08") / "sub-08_FLAIR.nii.gz", np.asarray(img.dataobj), np.diag([40.0, 2, 2, 1]))
    path = a("09") / "sub-09_T1w.nii.gz"
    img = nib.load(str(path))
    shifted = img.affine.copy()
    shifted[2, 3] += 25
    img.set_sform(shifted, code=1)
    nib.save(img, str(path))
    img = nib.load(str(a("10") / "sub-10_FLAIR.nii.gz"))
    far = img.affine.copy()
    far[:3, 3] += 900
    write_nifti(a("10") / "sub-10_FLAIR.nii.gz", np.asarray(img.dataobj), far)
    for f in a("11").glob("sub-11_FLAIR.*"):
        f.unlink()
    for f in a("12").glob("sub-12_FLAIR.*"):
        for acq in ("fast", "slow"):
            shutil.copy(f, f.with_name(f.name.replace("sub-12_", f"sub-12_acq-{acq}_")))
        f.unlink()
    write_nifti(a("13") / "sub-13_T1w.nii.gz", np.ones((40, 48, 1), np.float32))
    truth = bids / "derivatives" / "truth" / "sub-14" / "anat" / "sub-14_desc-lesions_dseg.nii.gz"
    write_nifti(truth, np.zeros((30, 30, 30), np.uint8))


@pytest.fixture(scope="module")
def broken_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    subjects = ("01", *BROKEN)
    bids = make_bids(root / "bids", subjects=subjects)
    _break(bids)
    out = root / "out"
    code = run_cli([bids, out, "participant", "--model", tiny_model, "-w", root / "work", "--skull-stripped", "yes",
                    "--no-tta", "--no-lesion-features", "--skip-bids-validation", "--nprocs", "2",
                    "--reference-masks", bids / "derivatives" / "truth"])
    return {"code": code, "out": out, "bids": bids}


def test_first_failure_sets_the_exit_code(broken_run):
    assert broken_run["code"] == BROKEN["02"][1]


@pytest.mark.parametrize("sub", sorted(BROKEN))
def test_each_bad_input_is_reported_and_writes_nothing(broken_run, sub):
    what, code, words = BROKEN[sub]
    error = _error(broken_run["out"], sub)
    assert error["exit_code"] == code, (what, error)
    message = error["message"]
    assert "\n" not in message
    for word in words:
        assert word in message, (what, message)
    assert "Fix:" in message, message
    assert _derivative_files(broken_run["out"], sub) == [], f"{what}: partial derivatives were written"


def test_the_good_participant_is_still_processed(broken_run):
    files = {p.name for p in _derivative_files(broken_run["out"], "01")}
    assert "sub-01_lesions.tsv" in files and "sub-01_summary.json" in files
    assert not list(broken_run["out"].glob(".msxplain-staging-*"))
    assert (broken_run["out"] / "sub-01.html").is_file()
    # failed participants get a report that says why
    assert "failed (exit code 65)" in (broken_run["out"] / "sub-02.html").read_text()


# ------------------------------------------------------------------ failures before any processing
@pytest.fixture
def small(tmp_path):
    return make_bids(tmp_path / "bids", subjects=("01",))


def _run(tiny_model, bids, out, *extra):
    return run_cli([bids, out, "participant", "--model", tiny_model, "-w", out.parent / "work", "--skull-stripped",
                    "yes", "--no-tta", "--no-lesion-features", "--skip-bids-validation", *extra])


def test_unknown_participant_and_session(tiny_model, small, tmp_path, capsys):
    assert _run(tiny_model, small, tmp_path / "out", "--participant-label", "99") == 18
    assert "sub-99" in capsys.readouterr().err
    assert _run(tiny_model, small, tmp_path / "out", "--session-label", "zz") == 18


def test_filter_file_selecting_nothing(tiny_model, small, tmp_path, capsys):
    filters = tmp_path / "f.json"
    filters.write_text(json.dumps({"flair": {"acquisition": "nothing"}}))
    assert _run(tiny_model, small, tmp_path / "out", "--bids-filter-file", filters) == 18
    assert "selects no image" in capsys.readouterr().err


def test_filter_file_not_json(tiny_model, small, tmp_path):
    filters = tmp_path / "f.json"
    filters.write_text("flair: acquisition=x")
    assert _run(tiny_model, small, tmp_path / "out", "--bids-filter-file", filters) == 64


def test_output_inside_input(tiny_model, small, capsys):
    assert _run(tiny_model, small, small / "sub-01" / "out") == 64
    assert "inside the input" in capsys.readouterr().err


def test_output_is_a_file(tiny_model, small, tmp_path):
    (tmp_path / "out").write_text("not a folder")
    assert _run(tiny_model, small, tmp_path / "out") == 73


def test_not_bids_and_missing_dataset(tiny_model, tmp_path):
    (tmp_path / "plain").mkdir()
    assert _run(tiny_model, tmp_path / "plain", tmp_path / "out") == 16
    assert _run(tiny_model, tmp_path / "nowhere", tmp_path / "out") == 66


@pytest.mark.parametrize("exc_errno, code", [(errno.EROFS, 73), (errno.ENOSPC, 74)])
def test_read_only_or_full_output_leaves_nothing(tiny_model, small, tmp_path, monkeypatch, exc_errno, code):
    """Simulated: the final renames into the output folder fail (read-only or full disk).
    The Linear plugin runs the nodes in this process so the simulation reaches them."""
    import os

    from bids_app.bids import commit

    out = tmp_path / "out"
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(out) in str(dst) and "sub-01" in str(dst):
            raise OSError(exc_errno, os.strerror(exc_errno), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(commit.os, "replace", failing_replace)
    assert _run(tiny_model, small, out, "--plugin", "Linear") == code
    assert _derivative_files(out, "01") == []
    assert not list(out.glob(".msxplain-staging-*"))


def test_work_directory_on_another_file_system(tiny_model, small, tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    import tempfile

    work = Path(tempfile.mkdtemp(dir=shm, prefix="msxplain-work-"))
    try:
        out = tmp_path / "out"
        assert run_cli([small, out, "participant", "--model", tiny_model, "-w", work, "--skull-stripped", "yes",
                        "--no-tta", "--no-lesion-features", "--skip-bids-validation"]) == 0
        assert (out / "sub-01" / "anat" / "sub-01_lesions.tsv").is_file()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ model problems
@pytest.fixture
def model_copy(tiny_model, tmp_path):
    dest = tmp_path / "model" / tiny_model.parent.name / tiny_model.name
    shutil.copytree(tiny_model, dest)
    return dest


def test_model_with_a_missing_fold(model_copy, small, tmp_path, capsys):
    shutil.rmtree(model_copy / "fold_1")
    assert _run(model_copy, small, tmp_path / "out") == 66
    assert "fold_1" in capsys.readouterr().err


def test_model_with_a_wrong_checksum(model_copy, small, tmp_path, capsys):
    ckpt = model_copy / "fold_2" / "checkpoint_final.pth"
    ckpt.write_bytes(ckpt.read_bytes() + b"tampered")
    assert _run(model_copy, small, tmp_path / "out") == 65
    err = capsys.readouterr().err
    assert "Checksum mismatch for fold_2" in err and "Fix:" in err
    assert not (tmp_path / "out" / "sub-01").exists()


def test_model_with_another_channel_count(model_copy, small, tmp_path, capsys):
    card = json.loads((model_copy / "msxplain_model.json").read_text())
    card["channels"] = card["channels"][:1]
    (model_copy / "msxplain_model.json").write_text(json.dumps(card))
    assert _run(model_copy, small, tmp_path / "out") == 65
    assert "network takes 2" in capsys.readouterr().err


def test_malicious_model_archive(small, tmp_path, capsys):
    import zipfile

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../../escape.txt", b"x")
    assert _run(evil, small, tmp_path / "out") == 65
    assert "outside the extraction folder" in capsys.readouterr().err
    assert not (tmp_path.parent / "escape.txt").exists()
