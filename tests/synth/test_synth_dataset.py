"""The written BIDS dataset: validator-clean, deterministic, sessions, CLI errors.

Its runtime is a benchmark figure (benchmarks/bench_synth.py), not a test.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.cli.tools import main as tools_main


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _participants(root: Path) -> list[dict]:
    with open(root / "participants.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_layout_and_metadata(cli_dataset):
    root, _ = cli_dataset
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.10.0" and desc["DatasetType"] == "raw"
    assert desc["GeneratedBy"][0]["Name"] == "msxplain-tools synth"
    assert "seed=11" in desc["GeneratedBy"][0]["Description"]
    rows = _participants(root)
    assert [r["participant_id"] for r in rows] == ["sub-001", "sub-002", "sub-003"]
    assert set(rows[0]) >= {"participant_id", "site", "scanner", "t1_contrast", "age", "n_wml", "n_cl"}
    assert [r["site"] for r in rows] == ["site01", "site02", "site01"]
    assert rows[0]["scanner"] != rows[1]["scanner"]  # sites draw different scanners
    deriv = root / "derivatives" / "lesions"
    assert json.loads((deriv / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    tsv = (deriv / "dseg.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["index", "name", "abbreviation", "color", "mapping"]
    assert tsv[1].split("\t")[:3] == ["1", "WhiteMatterLesion", "WML"]
    assert tsv[2].split("\t")[:3] == ["2", "CorticalLesion", "CL"]
    for row in rows:
        sub = row["participant_id"]
        anat = root / sub / "anat"
        suffix = "acq-MPRAGE_T1w" if row["t1_contrast"] == "MPRAGE" else "UNIT1"
        t1 = nib.load(anat / f"{sub}_{suffix}.nii.gz")
        flair = nib.load(anat / f"{sub}_FLAIR.nii.gz")
        dseg = nib.load(deriv / sub / "anat" / f"{sub}_desc-lesions_dseg.nii.gz")
        assert dseg.shape == t1.shape and np.allclose(dseg.affine, t1.affine)
        assert flair.shape != t1.shape or not np.allclose(flair.affine, t1.affine)  # FLAIR on its own grid
        labels = np.asarray(dseg.dataobj)
        assert set(np.unique(labels)) <= {0, 1, 2}
        wml = np.asarray(nib.load(deriv / sub / "anat" / f"{sub}_label-WML_mask.nii.gz").dataobj)
        cl = np.asarray(nib.load(deriv / sub / "anat" / f"{sub}_label-CL_mask.nii.gz").dataobj)
        assert np.array_equal(wml > 0, labels == 1) and np.array_equal(cl > 0, labels == 2)
        side = json.loads((deriv / sub / "anat" / f"{sub}_desc-lesions_dseg.json").read_text())
        assert side["Manual"] is False
        assert side["SpatialReference"] == f"bids:raw:{sub}/anat/{sub}_{suffix}.nii.gz"
        mask_side = json.loads((deriv / sub / "anat" / f"{sub}_label-WML_mask.json").read_text())
        assert mask_side["Type"] == "Lesion"
        t1_side = json.loads((anat / f"{sub}_{suffix}.json").read_text())
        assert t1_side["Manufacturer"] in row["scanner"] and t1_side["MagneticFieldStrength"] > 0
        # world space: FLAIR and T1w fields of view overlap around the same head centre
        c_t1 = t1.affine @ np.r_[(np.array(t1.shape) - 1) / 2.0, 1.0]
        c_fl = flair.affine @ np.r_[(np.array(flair.shape) - 1) / 2.0, 1.0]
        assert np.linalg.norm(c_t1[:3] - c_fl[:3]) < 40.0


def test_validator_zero_errors(cli_dataset, validate):
    root, _ = cli_dataset
    errors, warnings, report = validate(root)
    assert errors == []
    assert "/derivatives/lesions/" in (report.get("derivativesSummary") or {})  # the derivative was validated too
    print(f"\nvalidator warnings ({len(warnings)}): " + "; ".join(sorted(set(warnings))))


def test_same_seed_gives_byte_identical_files(cli_dataset, tmp_path, lesion_dir):
    """Writing again with the same seed reproduces the files byte for byte.

    Subject streams do not depend on how many subjects are written, so a 1-subject run must
    reproduce every file of sub-001 (raw and derivative) of the 3-subject CLI run.
    """
    from bids_app.synth import write_dataset

    root, _ = cli_dataset
    again = tmp_path / "again"
    write_dataset(again, 1, 11, sites=2, resolution_mm=2.0, lesion_dir=lesion_dir)
    first, second = _tree(root), _tree(again)
    subject_files = [name for name in second if "sub-001" in name]
    assert len(subject_files) == 12  # T1w + FLAIR with sidecars; 4 derivative images with sidecars
    assert [name for name in subject_files if first.get(name) != second[name]] == []
    assert first["derivatives/lesions/dseg.tsv"] == second["derivatives/lesions/dseg.tsv"]
    assert first["participants.tsv"].splitlines()[:2] == second["participants.tsv"].splitlines()[:2]


def test_sessions_and_mp2rage(tmp_path, synth_templateflow_home, lesion_dir, validate):
    from bids_app.synth import write_dataset

    root = tmp_path / "ds"
    write_dataset(root, 1, 5, sites=1, sessions=2, resolution_mm=2.0, t1_contrast="mp2rage", lesion_dir=lesion_dir,
                  skull_stripped=True, orientation="ras")
    for ses in ("01", "02"):
        anat = root / "sub-001" / f"ses-{ses}" / "anat"
        assert (anat / f"sub-001_ses-{ses}_UNIT1.nii.gz").is_file()
        assert (anat / f"sub-001_ses-{ses}_FLAIR.nii.gz").is_file()
        deriv = root / "derivatives" / "lesions" / "sub-001" / f"ses-{ses}" / "anat"
        assert (deriv / f"sub-001_ses-{ses}_desc-lesions_dseg.nii.gz").is_file()
        side = json.loads((deriv / f"sub-001_ses-{ses}_desc-lesions_dseg.json").read_text())
        assert side["Sources"][0] == f"bids:raw:sub-001/ses-{ses}/anat/sub-001_ses-{ses}_UNIT1.nii.gz"
    sessions = (root / "sub-001" / "sub-001_sessions.tsv").read_text().splitlines()
    assert sessions[0].startswith("session_id\tn_wml\tn_cl") and len(sessions) == 3
    # follow-up sessions only add lesions: the lesion sources of ses-01 are a subset of ses-02's
    prov = json.loads((root / "code" / "msxplain_synth.json").read_text())
    placed = [{json.dumps(lesion, sort_keys=True) for lesion in entry["lesions_placed"]} for entry in prov["sessions"]]
    assert len(placed) == 2 and placed[0] <= placed[1]
    errors, _, _ = validate(root)
    assert errors == []


def test_cli_errors(tmp_path, synth_templateflow_home, lesion_dir, monkeypatch, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    common = ["--n-subjects", "1", "--lesion-masks", str(lesion_dir)]
    assert tools_main(["synth", str(busy), *common, "--resolution", "2"]) == 73
    assert (busy / "keep.txt").read_text() == "user data"
    assert tools_main(["synth", str(tmp_path / "a"), *common, "--resolution", "9"]) == 64
    assert tools_main(["synth", str(tmp_path / "a")]) == 64  # --n-subjects missing
    assert tools_main(["synth", str(tmp_path / "a"), "--n-subjects", "x"]) == 64
    assert tools_main(["synth", str(tmp_path / "a"), "--n-subjects", "0"]) == 64
    assert tools_main(["synth", str(tmp_path / "b"), *common, "--flair-slice-thickness", "4", "2"]) == 64
    assert tools_main(["synth", str(tmp_path / "c"), *common, "--no-cl", "--cl-load", "2"]) == 64
    monkeypatch.delenv("TEMPLATEFLOW_HOME")
    assert tools_main(["synth", str(tmp_path / "d"), *common, "--resolution", "2"]) == 66
    assert "TEMPLATEFLOW_HOME" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert tools_main(["synth", str(tmp_path / "e"), *common, "--lesion-masks", str(tmp_path / "nowhere")]) == 66


def test_cli_explicit_templates_folder(tmp_path, synth_templateflow_home, lesion_dir, monkeypatch):
    monkeypatch.delenv("TEMPLATEFLOW_HOME")
    out = tmp_path / "ds"
    rc = tools_main(["synth", str(out), "--n-subjects", "1", "--resolution", "2", "--templates",
                     str(synth_templateflow_home), "--lesion-masks", str(lesion_dir), "--no-cl", "--misalign-mm", "2",
                     "--orientation", "ras", "--t1-contrast", "mprage", "--skull-stripped"])
    assert rc == 0
    t1 = nib.load(out / "sub-001" / "anat" / "sub-001_acq-MPRAGE_T1w.nii.gz")
    assert nib.aff2axcodes(t1.affine) == ("R", "A", "S")
    rows = _participants(out)
    assert rows[0]["n_cl"] == "0"
    assert os.environ.get("TEMPLATEFLOW_HOME") is None
