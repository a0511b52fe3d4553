"""``msxplain-tools uncertainty`` and ``msxplain-tools evaluate`` end to end on small NIfTI files."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.cli.tools import evaluate as tool_evaluate
from bids_app.cli.tools import uncertainty as tool_uncertainty
from bids_app.errors import BadInputData, MissingInput, UsageError

AFFINE = np.array([[1.0, 0, 0, -20], [0, 1.2, 0, -30], [0, 0, 1.5, 10], [0, 0, 0, 1]])


def _run(module, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def _save(path: Path, data: np.ndarray, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


def _members(tmp_path: Path, four_d: bool = False) -> list[str]:
    rng = np.random.default_rng(0)
    shape = (24, 20, 16)
    paths = []
    for m in range(3):
        p = rng.uniform(0, 0.05, shape).astype(np.float32)
        p[3:8, 3:8, 3:7] = 0.8 + 0.05 * m  # seen by all
        p[14 + m:18 + m, 10:14, 8:12] = 0.7  # seen by all, shifted
        if m == 0:
            p[4:7, 14:17, 10:13] = 0.95  # seen by member 0 only (mean 0.35)
        if four_d:
            cl = np.zeros(shape, np.float32)
            cl[18:21, 3:6, 3:6] = 0.9 - 0.1 * m  # a second lesion class
            bg = 1 - p - cl
            data = np.stack([bg, p, cl], axis=-1).clip(0, 1)
        else:
            data = p
        paths.append(_save(tmp_path / f"member{m}.nii.gz", data))
    return paths


def test_uncertainty_tool_writes_maps_table_summary_and_parameters(tmp_path):
    members = _members(tmp_path)
    brain = np.ones((24, 20, 16), np.uint8)
    brain[:2] = 0
    out = tmp_path / "out"
    code = _run(tool_uncertainty, ["--member-probs", *members, "--out-dir", str(out), "--threshold", "0.3",
                                   "--min-lesion-size", "2", "--connectivity", "26", "--brain-mask",
                                   _save(tmp_path / "brain.nii.gz", brain), "--member-thresholds", "0.3", "0.4", "0.5",
                                   "--lesion-maps"])
    assert code == 0
    for name in ("NC", "EoE", "ExE", "MI", "EPKL", "RMI"):
        img = nib.load(out / f"voxel_{name}.nii.gz")
        assert img.shape == (24, 20, 16) and img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.affine, AFFINE)
    labels = np.asarray(nib.load(out / "lesion_instances.nii.gz").dataobj)
    rows = list(csv.DictReader(open(out / "lesions.tsv"), delimiter="\t"))
    header = open(out / "lesions.tsv").readline().rstrip("\n").split("\t")
    assert header[:2] == ["label", "class"]
    assert {"centroid_x_vox", "centroid_x_mm", "n_voxels", "volume_mm3", "LSU", "LSU+", "ddu_adj", "ddu_fast", "srmi",
            "smi", "seoe", "vvc", "avg_pwdice", "global_iou", "mean_NC", "logsum_EoE"} <= set(header)
    assert [int(r["label"]) for r in rows] == list(range(1, labels.max() + 1)) and len(rows) == 3
    one_member = [r for r in rows if r["n_members_matched"] == "1"]
    assert len(one_member) == 1 and float(one_member[0]["LSU"]) == pytest.approx(2 / 3)
    assert float(rows[0]["volume_mm3"]) == pytest.approx(int(rows[0]["n_voxels"]) * 1.8)
    assert (out / "lesion_LSUplus.nii.gz").is_file()
    patient = json.loads((out / "patient.json").read_text())  # strict JSON: NaN written as null
    assert patient["n_lesions"] == 3 and "PSU+" in patient and patient["brain_mask_given"] is True
    params = json.loads((out / "parameters.json").read_text())
    assert params["threshold"] == 0.3 and params["min_lesion_size_voxels"] == 2 and params["connectivity"] == 26
    assert params["eps_voxel"] == 1e-10 and params["eps_struct"] == 1e-5
    assert params["member_thresholds"] == [0.3, 0.4, 0.5]
    assert [len(r["sha256"]) for r in params["inputs"]["member_probs"]] == [64, 64, 64]
    assert params["inputs"]["brain_mask"]["sha256"]


def test_uncertainty_tool_four_d_class_probabilities(tmp_path):
    members = _members(tmp_path, four_d=True)
    out = tmp_path / "out4d"
    assert _run(tool_uncertainty, ["--member-probs", *members, "--out-dir", str(out), "--threshold", "0.3"]) == 0
    rows = list(csv.DictReader(open(out / "lesions.tsv"), delimiter="\t"))
    assert {r["class"] for r in rows} == {"1", "2"}
    params = json.loads((out / "parameters.json").read_text())
    assert params["lesion_labels"] == [1, 2] and params["n_classes"] == 3 and params["connectivity"] == 18


def test_uncertainty_tool_user_errors(tmp_path):
    members = _members(tmp_path)
    out = str(tmp_path / "o")
    with pytest.raises(UsageError):
        _run(tool_uncertainty, ["--member-probs", members[0], "--out-dir", out])
    with pytest.raises(UsageError):
        _run(tool_uncertainty, ["--member-probs", *members, "--out-dir", out, "--member-thresholds", "0.5"])
    with pytest.raises(MissingInput):
        _run(tool_uncertainty, ["--member-probs", members[0], str(tmp_path / "nope.nii.gz"), "--out-dir", out])
    other = _save(tmp_path / "small.nii.gz", np.zeros((10, 10, 10), np.float32))
    with pytest.raises(BadInputData, match="differs"):
        _run(tool_uncertainty, ["--member-probs", members[0], other, "--out-dir", out])
    shifted = _save(tmp_path / "shifted.nii.gz", np.zeros((24, 20, 16), np.float32), AFFINE + np.diag([0, 0, 0, 0]) +
                    np.array([[0, 0, 0, 2.0], [0] * 4, [0] * 4, [0] * 4]))
    with pytest.raises(BadInputData, match="grid"):
        _run(tool_uncertainty, ["--member-probs", members[0], shifted, "--out-dir", out])
    logits = _save(tmp_path / "logits.nii.gz", np.full((24, 20, 16), 3.0, np.float32))
    with pytest.raises(BadInputData, match=r"\[0, 1\]"):
        _run(tool_uncertainty, ["--member-probs", members[0], logits, "--out-dir", out])


def _masks(tmp_path: Path):
    shape = (20, 20, 12)
    ref = np.zeros(shape, np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[10:12, 10:12, 4:6] = 1  # missed
    pred = np.zeros(shape, np.uint8)
    pred[3:6, 2:6, 2:6] = 1
    pred[15:18, 15:18, 8:10] = 1  # false positive
    prob = np.where(pred > 0, 0.8, 0.05).astype(np.float32)
    unc = np.where(pred != ref, 0.9, 0.1).astype(np.float32)
    return {k: _save(tmp_path / f"{k}.nii.gz", v) for k, v in dict(pred=pred, ref=ref, prob=prob, unc=unc).items()}


def test_evaluate_tool_flat_json(tmp_path):
    f = _masks(tmp_path)
    out = tmp_path / "metrics.json"
    code = _run(tool_evaluate, ["--pred", f["pred"], "--ref", f["ref"], "--prob", f["prob"], "--uncertainty", f["unc"],
                                "--method", "iou", "--detection-threshold", "0.5", "--connectivity", "6",
                                "--ndsc-r", "0.01", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert (res["TPL"], res["FPL"], res["USL"], res["FNL"]) == (1, 1, 0, 1)
    assert res["F1"] == pytest.approx(2 / 4) and res["precision"] == 0.5 and res["recall"] == 0.5
    assert res["DSC"] == pytest.approx(2 * 48 / (48 + 18 + 64 + 8))
    for key in ("nDSC", "TPRvox", "FPRvox", "FDRvox", "CE", "ECE", "MCE", "Brier", "voxel_RC_DSC_AUC",
                "voxel_RC_DSC_AAC", "voxel_RC_nDSC_AUC", "voxel_RC_nDSC_AAC"):
        assert isinstance(res[key], float), key
    assert res["voxel_RC_DSC_AUC"] + res["voxel_RC_DSC_AAC"] == pytest.approx(1.0)
    assert (res["method"], res["detection_threshold"], res["connectivity"], res["ndsc_r"]) == ("iou", 0.5, 6, 0.01)
    assert res["n_bins"] == 30 and res["rc_points"] == 400
    assert len(res["inputs"]["uncertainty"]["sha256"]) == 64


def test_evaluate_tool_defaults_and_empty_reference(tmp_path):
    f = _masks(tmp_path)
    empty = _save(tmp_path / "empty.nii.gz", np.zeros((20, 20, 12), np.uint8))
    out = tmp_path / "m.json"
    assert _run(tool_evaluate, ["--pred", f["pred"], "--ref", empty, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    settings = (res["method"], res["detection_threshold"], res["connectivity"], res["ndsc_r"])
    assert settings == ("iou_adj", 0.1, 26, 0.001)
    assert res["FPL"] == 2 and res["F1"] == 0.0 and res["recall"] == 1.0
    assert res["TPRvox"] is None  # undefined for an empty reference: NaN -> null
    bad = _save(tmp_path / "bad.nii.gz", np.zeros((20, 20, 10), np.uint8))
    with pytest.raises(BadInputData):
        _run(tool_evaluate, ["--pred", f["pred"], "--ref", bad, "--out", str(out)])


def test_tools_main_exit_codes(tmp_path):
    pytest.importorskip("bids_app.cli.tools.synth")  # msxplain-tools imports every registered tool
    from bids_app.cli.tools import main

    f = _masks(tmp_path)
    assert main(["evaluate", "--pred", f["pred"], "--ref", f["ref"], "--out", str(tmp_path / "x.json")]) == 0
    assert main(["uncertainty", "--member-probs", f["prob"], "--out-dir", str(tmp_path / "u")]) == UsageError.exit_code
    assert main(["evaluate", "--pred", f["pred"], "--ref", str(tmp_path / "missing.nii.gz"),
                 "--out", str(tmp_path / "y.json")]) == MissingInput.exit_code
