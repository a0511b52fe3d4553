"""Issue 16 items 5 and 6: bad inputs refused before prediction, QC flags, no lesion silently lost.

One CLI run with a broken participant per case (``round2_run``), plus unit tests of the checks.
Each test fails on the code before issue 16: the filter file selected sub-02's FLAIR for
sub-01, ``-w`` inside the output was accepted, RGB/complex/huge images went to the network (or
crashed with a traceback), sheared/negative/T1w-as-FLAIR inputs passed with no flag, and a
lesion whose radiomics failed was dropped by ``--refine`` from the intercept alone.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.bids.discovery import check_filter_keys, collect_session, open_layout
from bids_app.core import conform
from bids_app.core.explain import SaliencyStore
from bids_app.core.explain import refiner as R
from bids_app.core.imageio import Image
from bids_app.core.lesions import features as F
from bids_app.core.lesions.dictionary import feature_dictionary
from bids_app.errors import UsageError
from bids_app.model.card import ModelCard
from bids_app.testing import make_bids, make_case, run_cli, write_nifti


# ------------------------------------------------------------------ filter files and -w
def _card() -> ModelCard:
    return ModelCard.from_dict({"id": "test", "channels": [
        {"index": 0, "name": "T1w", "queries": [{"suffix": "T1w"}]},
        {"index": 1, "name": "FLAIR", "queries": [{"suffix": "FLAIR"}]}],
        "labels": {"1": {"name": "WML"}}, "members": [{"fold": "0", "sha256": "x"}]})


@pytest.mark.parametrize("entry", [{"subject": "02"}, {"sub": "02"}, {"session": "b"}, {"ses": "b"}])
def test_filter_file_on_subject_or_session_is_a_usage_error(entry):
    with pytest.raises(UsageError, match=r"--bids-filter-file entry 'flair' filters on '(subject|sub|session|ses)': "
                                         r"each session takes its images from its own subject"):
        check_filter_keys(_card(), {"flair": entry})


def test_a_filter_can_never_select_another_subjects_image(tmp_path):
    """Even past check_filter_keys (e.g. a library caller), the session's subject wins."""
    bids = make_bids(tmp_path / "bids", subjects=("01", "02"))
    got = collect_session(open_layout(bids), _card(), "01", None, {"flair": {"subject": "02"}})
    assert [Path(f.path).name for f in got.files] == ["sub-01_T1w.nii.gz", "sub-01_FLAIR.nii.gz"]


def test_filter_file_selecting_another_subject_stops_before_inference(tiny_model, tmp_path, capsys):
    bids = make_bids(tmp_path / "bids", subjects=("01", "02"))
    filters = tmp_path / "f.json"
    filters.write_text(json.dumps({"flair": {"subject": "02"}}))
    out = tmp_path / "out"
    code = run_cli([bids, out, "participant", "--model", tiny_model, "-w", tmp_path / "work", "--skull-stripped",
                    "yes", "--no-tta", "--no-lesion-features", "--skip-bids-validation", "--participant-label", "01",
                    "--bids-filter-file", filters])
    assert code == 64
    assert "filters on 'subject'" in capsys.readouterr().err
    assert not (out / "sub-01").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_work_dir_equal_to_or_inside_the_output_is_refused(tmp_path, capsys, where):
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    out = tmp_path / "out"
    work = out if where == "same" else out / "work"
    assert run_cli([bids, out, "participant", "-w", work, "--skip-bids-validation"]) == 64
    err = capsys.readouterr().err
    assert "The work folder is the output folder or inside it" in err and str(work) in err
    assert "Fix: use a -w/--work-dir outside the output folder" in err
    assert not out.exists()


# ------------------------------------------------------------------ QC heuristics (pure)
def test_geometry_qc_flags_shear_and_implausible_fov():
    data = np.ones((40, 48, 40), np.float32)
    plain = conform.geometry_qc(Image(data, np.diag([2.0, 2.0, 2.0, 1.0])))
    assert not plain["sheared"] and not plain["implausible_fov"] and plain["fov_mm"] == [80.0, 96.0, 80.0]
    sheared = np.diag([2.0, 2.0, 2.0, 1.0])
    sheared[0, 1] = 0.5  # y axis leans 14 degrees towards x
    qc = conform.geometry_qc(Image(data, sheared))
    assert qc["sheared"] and qc["max_axis_cosine"] > 0.2
    rotated = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    rotated[:2, :2] = [[c, -s], [s, c]]  # a rotation is not a shear
    assert not conform.geometry_qc(Image(data, rotated @ np.diag([2.0, 2.0, 2.0, 1.0])))["sheared"]
    assert conform.geometry_qc(Image(data, np.diag([15.0, 2.0, 2.0, 1.0])))["implausible_fov"]  # 600 mm


def test_negative_values_qc():
    data = np.ones((10, 10, 10), np.float32)
    assert conform.negative_values_qc(data)["negative_voxels"] == 0
    data[:2] = -5
    qc = conform.negative_values_qc(data)
    assert qc["negative_voxels"] == 200 and qc["min_value"] == -5.0


def test_modality_contrast_flags_a_t1w_given_as_flair():
    image, _ = make_case(0)
    t1, flair = image[0], image[1]
    assert not conform.modality_contrast_qc(t1, flair)["looks_unlike_flair"]
    # a tissue phantom: WM bright / GM mid / CSF dark in the T1w; GM brighter than WM in the FLAIR
    rng = np.random.default_rng(0)
    tissue = rng.choice([0, 1, 2], size=(30, 30, 30), p=[0.15, 0.45, 0.40])  # CSF, GM, WM
    t1w = np.array([0.2, 0.7, 1.0])[tissue] + rng.normal(0, 0.03, tissue.shape)
    real_flair = np.array([0.2, 1.2, 1.0])[tissue] + rng.normal(0, 0.03, tissue.shape)
    ok = conform.modality_contrast_qc(t1w, real_flair)
    bad = conform.modality_contrast_qc(t1w, t1w * 1.7)  # the T1w given as FLAIR (rescaled)
    assert ok["wm_gm_ratio"] < 1.0 and not ok["looks_unlike_flair"]
    assert bad["wm_gm_ratio"] > 1.3 and bad["looks_unlike_flair"]


# ------------------------------------------------------------------ item 6: no silent drop
def _fail_the_second_shape_extraction(monkeypatch):
    """PyRadiomics' shape extraction raises for the second lesion it sees (a degenerate mask)."""
    from radiomics import shape as rshape

    real = rshape.RadiomicsShape.execute
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("simulated degenerate mask")
        return real(self)

    monkeypatch.setattr(rshape.RadiomicsShape, "execute", flaky)


def test_lesion_whose_radiomics_shape_fails_is_kept_and_flagged(monkeypatch):
    inst = np.zeros((20, 20, 20), np.int32)
    inst[3:7, 3:7, 3:7] = 1
    inst[12:16, 12:16, 12:16] = 2
    _fail_the_second_shape_extraction(monkeypatch)
    table = F.lesion_features(inst, 2, np.eye(4))
    assert list(table["label"]) == [1, 2]
    assert list(table["features_failed"]) == [0, 1]
    assert table.loc[1, "features_failed_reason"] == "radiomics_shape: ValueError: simulated degenerate mask"
    assert table.loc[0, "features_failed_reason"] is None
    assert np.isnan(table.loc[1, "radiomics_shape_MeshVolume"]) and table.loc[0, "radiomics_shape_MeshVolume"] > 0
    assert set(feature_dictionary(table.columns)) >= {"features_failed", "features_failed_reason"}


def _refine_inputs(tmp_path: Path):
    from bids_app.formats.saliency_store import save_store

    shape = (24, 22, 18)
    rng = np.random.default_rng(0)
    inst = np.zeros(shape, np.int32)
    inst[3:8, 3:8, 3:8] = 1
    inst[14:19, 12:17, 9:14] = 2
    maps, crops, bbox = [], [], []
    for lab in (1, 2):
        where = np.argwhere(inst == lab)
        lo, hi = np.maximum(where.min(0) - 3, 0), np.minimum(where.max(0) + 4, shape)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        m = rng.normal(size=(2, *inst[sl].shape)).astype(np.float32) * 0.02
        m[:, inst[sl] == lab] += 0.8
        maps.append(m)
        crops.append(inst[sl].copy())
        bbox.append([lo, hi])
    store = SaliencyStore(shape=shape, zooms=(1.0, 1.0, 1.0), labels=np.array([1, 2], np.int32),
                          classes=np.ones(2, np.int32), bbox=np.asarray(bbox, np.int32),
                          maps={"smoothgrad_max": maps}, instances=crops, channel_names=["T1w", "FLAIR"])
    store_file = save_store(tmp_path / "store.npz", store, np.eye(4))
    inst_file = write_nifti(tmp_path / "inst.nii.gz", inst.astype(np.int16))
    lesions_file = tmp_path / "lesions.json"
    lesions_file.write_text(json.dumps({"label": [1, 2], "class_index": [1, 1]}))
    names = R.feature_names()
    n = len(names)
    # every lesion with features scores ~1 (first-order mean of a positive map); the intercept
    # alone gives sigmoid(-0.45) = 0.39, under the 0.5 threshold: the old code dropped on it
    refiner = {"format": R.REFINER_FORMAT, "version": 1, "feature_names": names, "scaler_mean": [0.0] * n,
               "scaler_scale": [1.0] * n, "coef": [0.0] * n, "intercept": -0.45, "threshold": 0.5,
               "importance": [0.0] * n}
    refiner["coef"][names.index("original_firstorder_Maximum")] = 5.0
    refiner_file = tmp_path / "refiner.json"
    refiner_file.write_text(json.dumps(refiner))
    return store_file, inst_file, lesions_file, refiner_file


def test_refine_keeps_and_flags_a_lesion_it_could_not_score(tmp_path, monkeypatch, caplog):
    from bids_app.formats.lesion_table import read_tsv
    from bids_app.interfaces.explain import RefineLesions

    store_file, inst_file, lesions_file, refiner_file = _refine_inputs(tmp_path)
    extractor = R._extractor()
    real = extractor.execute
    calls = {"n": 0}

    def flaky(image, mask, label=1):
        calls["n"] += 1
        if calls["n"] == 3:  # the second lesion (the first call lists the feature names)
            raise IndexError("simulated PyRadiomics failure")
        return real(image, mask, label=label)

    monkeypatch.setattr(extractor, "execute", flaky)
    monkeypatch.chdir(tmp_path)
    node = RefineLesions(store_file=str(store_file), instances_file=str(inst_file), lesions_file=str(lesions_file),
                         refiner_file=str(refiner_file), refine=True, label_indices=[1], label_names=["WML"],
                         sources=[str(tmp_path / "sub-01_T1w.nii.gz")])
    with caplog.at_level(logging.WARNING, logger="bids_app.refine"):
        result = node.run()
    table = read_tsv(result.outputs.lesions_file)
    assert list(table["refined_keep"]) == [1, 1]
    assert list(table["refiner_scored"]) == [1, 0]
    assert table.loc[0, "p_true_lesion"] > 0.5 and np.isnan(table.loc[1, "p_true_lesion"])
    assert table.loc[1, "refiner_unscored_reason"] == "PyRadiomics IndexError: simulated PyRadiomics failure"
    summary = json.loads(Path(result.outputs.summary_file).read_text())
    assert summary["refinement"]["n_dropped"] == 0 and summary["refinement"]["n_features_failed"] == 1
    assert summary["refinement"]["features_failed_labels"] == [2]
    assert summary["qc_flags"] == ["refiner_features_failed"]
    refined = np.asarray(nib.load(str([r["file"] for r in result.outputs.derivatives
                                       if r["key"] == "refined_lesion_mask"][0])).dataobj)
    assert refined[16, 14, 11] == 1  # the unscored lesion is still in the refined segmentation
    assert "could not score 1 of 2 lesions (labels 2" in caplog.text
    dictionary = json.loads(Path(result.outputs.lesions_dictionary).read_text())
    assert {"refiner_scored", "refiner_unscored_reason"} <= set(dictionary)


def test_refine_never_drops_an_unscored_lesion():
    assert list(R.refine(np.array([0.1, np.nan, 0.9]), 0.5)) == [False, True, True]
    model = {"coef": [0.0, 1.0, 0.0]}
    X = np.array([[1.0, 2.0, 3.0], [1.0, np.nan, 3.0], [np.nan] * 3])
    assert list(R.scorable(model, X)) == [True, False, False]


# ------------------------------------------------------------------ one run, a participant per case
#: participant -> (case, exit code, words of the message) for inputs refused before prediction
REFUSED = {
    "02": ("RGB24 T1w", 65, ["sub-02_T1w.nii.gz", "record type (R, G, B)", "Fix: give the scanner's greyscale"]),
    "03": ("complex FLAIR", 65, ["sub-03_FLAIR.nii.gz", "complex (complex64)", "Fix: give the magnitude image"]),
    "04": ("T1w near the float32 maximum", 65, ["sub-04_T1w.nii.gz", "float32 normalisation would overflow",
                                                "Fix: rescale the image"]),
    "05": ("116-byte header claiming 4000^3 float32", 65,
           ["sub-05_T1w.nii.gz", "Image too large: the header declares 4000 x 4000 x 4000",
            "MSXPLAIN_MAX_IMAGE_BYTES"]),
}
#: participant -> (case, QC flag it must get) for inputs processed with a flag
FLAGGED = {
    "06": ("sheared affine (sform only)", "sheared_affine_T1w"),
    "07": ("the T1w given as FLAIR", "modality_mismatch_FLAIR"),
    "08": ("negative T1w values", "negative_values_T1w"),
}


def _anat(bids: Path, sub: str) -> Path:
    return bids / f"sub-{sub}" / "anat"


def _break(bids: Path) -> None:
    a = lambda s: _anat(bids, s)  # noqa: E731
    t1 = nib.load(str(a("02") / "sub-02_T1w.nii.gz"))
    rgb = np.zeros(t1.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = np.clip(np.asarray(t1.dataobj) / 4, 0, 255).astype(np.uint8)
    nib.save(nib.Nifti1Image(rgb, t1.affine), str(a("02") / "sub-02_T1w.nii.gz"))
    fl = nib.load(str(a("03") / "sub-03_FLAIR.nii.gz"))
    write_nifti(a("03") / "sub-03_FLAIR.nii.gz", (np.asarray(fl.dataobj) * (1 + 1j)).astype(np.complex64), fl.affine)
    t1 = nib.load(str(a("04") / "sub-04_T1w.nii.gz"))
    data = np.asarray(t1.dataobj, np.float64)
    write_nifti(a("04") / "sub-04_T1w.nii.gz", (data / data.max() * 3.0e38).astype(np.float32), t1.affine)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 4000))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(t1.affine, code=1)
    hdr.set_sform(t1.affine, code=1)
    (a("05") / "sub-05_T1w.nii.gz").write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4))
    for suffix in ("T1w", "FLAIR"):  # the same sheared grid for both channels (sform only, as many tools write)
        path = a("06") / f"sub-06_{suffix}.nii.gz"
        img = nib.load(str(path))
        sheared = img.affine.copy()
        sheared[0, 1] = 0.4
        out = nib.Nifti1Image(np.asarray(img.dataobj), sheared)
        out.set_qform(None, code=0)
        out.set_sform(sheared, code=1)
        nib.save(out, str(path))
    shutil.copy(a("07") / "sub-07_T1w.nii.gz", a("07") / "sub-07_FLAIR.nii.gz")
    t1 = nib.load(str(a("08") / "sub-08_T1w.nii.gz"))
    data = np.asarray(t1.dataobj).copy()
    data[18:22, 20:24, 18:22] = -25.0
    write_nifti(a("08") / "sub-08_T1w.nii.gz", data, t1.affine)


@pytest.fixture(scope="module")
def round2_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("round2")
    subjects = ("01", *REFUSED, *FLAGGED)
    bids = make_bids(root / "bids", subjects=subjects)
    _break(bids)
    out = root / "out"
    code = run_cli([bids, out, "participant", "--model", tiny_model, "-w", root / "work", "--skull-stripped", "yes",
                    "--no-tta", "--no-lesion-features", "--skip-bids-validation", "--nprocs", "2"])
    return {"code": code, "out": out}


def _summary(out: Path, sub: str) -> dict:
    return json.loads((out / f"sub-{sub}" / "anat" / f"sub-{sub}_summary.json").read_text())


@pytest.mark.slow  # the whole participant pipeline (round2_run)
@pytest.mark.parametrize("sub", sorted(REFUSED))
def test_each_refused_input_has_its_message_and_code(round2_run, sub):
    what, code, words = REFUSED[sub]
    found = sorted((round2_run["out"] / f"sub-{sub}" / "log").glob("*/*_error.json"))
    assert found, f"{what}: no error log"
    error = json.loads(found[-1].read_text())
    assert error["exit_code"] == code, (what, error)
    for word in words:
        assert word in error["message"], (what, error["message"])
    assert "\n" not in error["message"]
    anat = round2_run["out"] / f"sub-{sub}" / "anat"
    assert not anat.exists() or not list(anat.iterdir()), f"{what}: derivatives written"
    # refused by the conform node, the first one, before the network ran
    crashes = [c.name for c in found[-1].parent.glob("crash-*")]
    assert crashes and all("-conform-" in c for c in crashes), crashes


@pytest.mark.slow  # the whole participant pipeline (round2_run)
@pytest.mark.parametrize("sub", sorted(FLAGGED))
def test_each_suspicious_input_is_processed_with_a_qc_flag(round2_run, sub):
    what, flag = FLAGGED[sub]
    summary = _summary(round2_run["out"], sub)
    assert flag in summary["qc_flags"], (what, summary["qc_flags"])
    assert flag in (round2_run["out"] / f"sub-{sub}.html").read_text(), f"{what}: flag not in the report"


@pytest.mark.slow  # the whole participant pipeline (round2_run)
def test_a_plain_participant_gets_no_new_flag(round2_run):
    flags = _summary(round2_run["out"], "01")["qc_flags"]
    assert not [f for f in flags if f.startswith(("sheared", "implausible_field", "negative", "modality"))], flags
    assert round2_run["code"] == 65


def test_lesion_features_node_counts_and_flags_failed_lesions(tmp_path, monkeypatch, caplog):
    """The node around the features: the count in its summary part, a QC flag, a warning."""
    from bids_app.bids.templates import template_file
    from bids_app.formats.lesion_table import read_tsv
    from bids_app.interfaces.features import LesionFeatures

    image, _ = make_case(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-40, -48, -40]
    inst = np.zeros(image.shape[1:], np.int16)
    inst[12:16, 14:18, 12:16] = 1
    inst[24:28, 28:32, 22:26] = 2
    files = {"instances_file": write_nifti(tmp_path / "inst.nii.gz", inst, affine),
             "channels_file": write_nifti(tmp_path / "channels.nii.gz", np.moveaxis(image, 0, -1), affine),
             "mask_file": write_nifti(tmp_path / "mask.nii.gz", (image[0] > 0).astype(np.uint8), affine),
             "reference_file": write_nifti(tmp_path / "sub-01_T1w.nii.gz", image[0], affine),
             "template_t1w": template_file(resolution=2, suffix="T1w"),
             "template_mask": template_file(resolution=2, suffix="mask", desc="brain"),
             "template_gm": template_file(resolution=2, suffix="probseg", label="GM")}
    _fail_the_second_shape_extraction(monkeypatch)
    monkeypatch.chdir(tmp_path)
    node = LesionFeatures(**{k: str(v) for k, v in files.items()}, channel_names=["T1w", "FLAIR"],
                          sources=[str(files["reference_file"])])
    with caplog.at_level(logging.WARNING, logger="bids_app.features"):
        result = node.run()
    table = read_tsv(result.outputs.lesions_file)
    assert list(table["label"]) == [1, 2] and list(table["features_failed"]) == [0, 1]
    part = json.loads(Path(result.outputs.summary_file).read_text())
    assert part["features"]["n_features_failed"] == 1 and part["features"]["features_failed_labels"] == [2]
    assert part["qc_flags"] == ["lesion_features_failed"]
    assert "features failed for 1 of 2 lesions (labels 2)" in caplog.text


def test_session_summary_gathers_the_qc_flags_of_every_part(tmp_path, monkeypatch):
    from bids_app.interfaces.derivatives import SessionSummary

    parts = []
    for i, (key, flags) in enumerate([("conform", ["sheared_affine_T1w"]), ("features", ["lesion_features_failed"]),
                                      ("refinement", ["refiner_features_failed"])]):
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps({key: {"x": i}, "qc_flags": flags}))
    monkeypatch.chdir(tmp_path)
    result = SessionSummary(parts=[str(p) for p in parts], participant_id="sub-01", inputs=[], sources=[],
                            provenance={}).run()
    summary = json.loads(Path(result.outputs.summary_file).read_text())
    assert summary["qc_flags"] == ["sheared_affine_T1w", "lesion_features_failed", "refiner_features_failed"]
    assert summary["features"] == {"x": 1}
