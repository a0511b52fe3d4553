"""The participant level end to end on CPU with the tiny model: outputs, validator, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.bids.derivatives import io_spec, parse_bids_name
from bids_app.bids.validation import validate
from bids_app.testing import make_bids, run_cli

REPO = Path(__file__).resolve().parents[1]

EXPECTED = REPO / "tests" / "data" / "expected_outputs.txt"


def listing(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and p.parts[len(out.parts)] not in ("logs",) and "/log/" not in str(p))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def participant_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    bids = make_bids(root / "bids", subjects=("01", "02"), sessions=("a",))
    out, work = root / "out", root / "work"
    argv = [bids, out, "participant", "--model", tiny_model, "-w", work, "--skull-stripped", "yes", "--no-tta",
            "--nprocs", "2", "--reference-masks", bids / "derivatives" / "truth", "--save-member-probabilities",
            "--no-lesion-features"]
    code = run_cli(argv)
    return {"code": code, "bids": bids, "out": out, "work": work, "argv": argv}


def test_participant_level_succeeds_and_writes_the_expected_files(participant_run):
    assert participant_run["code"] == 0
    files = listing(participant_run["out"])
    expected = EXPECTED.read_text().split()
    assert files == expected, "\n".join(sorted(set(files) ^ set(expected)))


def test_derivatives_pass_the_bids_validator(participant_run):
    result = validate(participant_run["out"])
    assert result.errors == [], result.error_lines(10)


def test_every_file_has_a_sidecar_with_sources_model_and_parameters(participant_run):
    out = participant_run["out"]
    images = [p for p in out.rglob("*.nii.gz")]
    assert images
    for image in images:
        sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Sources"], image
        for uri in sidecar["Sources"]:
            kind, _, rel = uri.partition(":")[2].partition(":")
            root = participant_run["bids"] if kind == "raw" else out
            assert (root / rel).is_file(), f"{image.name}: source {uri} does not resolve"
        block = sidecar["msxplain"]
        assert block["Model"]["Id"] == "msxplain-tiny-test"
        assert all(len(m["SHA256"]) == 64 for m in block["Model"]["Members"])
        assert block["Parameters"]["Threshold"] == 0.5 and block["Parameters"]["Connectivity"] == 18
        assert block["Software"]["nnunetv2"] and block["Version"]
        assert sidecar["SpatialReference"].startswith("bids:raw:")


def test_dataset_description(participant_run):
    desc = json.loads((participant_run["out"] / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    from bids_app import __version__

    assert desc["GeneratedBy"][0]["Name"] == "msxplain" and desc["GeneratedBy"][0]["Version"] == __version__
    assert desc["SourceDatasets"][0]["URL"].startswith("file://")


def test_outputs_on_the_reference_grid_with_dtypes_by_suffix(participant_run):
    out = participant_run["out"] / "sub-01" / "ses-a" / "anat"
    raw = nib.load(str(participant_run["bids"] / "sub-01" / "ses-a" / "anat" / "sub-01_ses-a_T1w.nii.gz"))
    for f in out.glob("*.nii.gz"):
        img = nib.load(str(f))
        assert img.shape[:3] == raw.shape and np.allclose(img.affine, raw.affine, atol=1e-4), f.name
        suffix = parse_bids_name(f)[1]
        expected = {"mask": np.uint8, "dseg": np.int16, "probseg": np.float32}.get(suffix)
        if expected:
            assert img.get_data_dtype() == expected, f.name


def test_lesion_table_matches_instance_map(participant_run):
    out = participant_run["out"] / "sub-01" / "ses-a" / "anat"
    import pandas as pd

    table = pd.read_csv(out / "sub-01_ses-a_lesions.tsv", sep="\t", na_values="n/a")
    instances = np.asarray(nib.load(str(out / "sub-01_ses-a_desc-instances_dseg.nii.gz")).dataobj)
    assert list(table.columns[:2]) == ["label", "class"]
    assert list(table["label"]) == list(range(1, instances.max() + 1))
    counts = np.bincount(instances.ravel())[1:]
    assert list(table["n_voxels"]) == list(counts)
    assert {"LSU", "mean_MI", "lesion_type", "iou_score"} <= set(table.columns)
    assert set(table["lesion_type"].dropna()) <= {"TPL", "USL", "FPL"}
    dictionary = json.loads((out / "sub-01_ses-a_lesions.json").read_text())
    assert "Description" in dictionary["LSU"] and dictionary["volume_mm3"]["Units"] == "mm^3"


def test_summary_has_uncertainty_evaluation_and_provenance(participant_run):
    summary = json.loads((participant_run["out"] / "sub-02" / "ses-a" / "anat" / "sub-02_ses-a_summary.json")
                         .read_text())
    assert summary["participant_id"] == "sub-02" and summary["session_id"] == "ses-a"
    assert 0.0 <= summary["uncertainty"]["PSU"] <= 1.0
    assert "all/F1" in summary["evaluation"] and "all/DSC" in summary["evaluation"]
    assert summary["evaluation"]["method"] == "iou_adj" and summary["evaluation"]["detection_threshold"] == 0.1
    assert summary["provenance"]["Model"]["Id"] == "msxplain-tiny-test"
    assert "seconds_inference" not in json.dumps(summary)  # run-to-run volatile values stay in the logs


def test_rerun_resumes_without_recomputing_and_gives_identical_outputs(participant_run):
    work, out = participant_run["work"], participant_run["out"]
    predict_results = sorted(work.rglob("predict/result_predict.pklz"))
    assert len(predict_results) == 2
    before = {p: p.stat().st_mtime_ns for p in predict_results}
    hashes = {f: digest(out / f) for f in listing(out)}
    assert run_cli(participant_run["argv"]) == 0
    assert {p: p.stat().st_mtime_ns for p in predict_results} == before
    assert {f: digest(out / f) for f in listing(out)} == hashes
    assert not list(out.glob(".msxplain-staging-*"))


def test_group_level_after_participant_level(participant_run):
    assert run_cli([participant_run["bids"], participant_run["out"], "group"]) == 0
    import pandas as pd

    group = participant_run["out"] / "group"
    table = pd.read_csv(group / "group_sessions.tsv", sep="\t")
    assert list(table["participant_id"]) == ["sub-01", "sub-02"]
    assert list(table["session_id"]) == ["ses-a", "ses-a"]
    assert list(table.columns[:3]) == ["participant_id", "session_id", "site"]
    assert "eval_all_F1" in table.columns and "unc_PSU" in table.columns
    lesions = pd.read_csv(group / "group_lesions.tsv", sep="\t")
    assert set(lesions["participant_id"]) <= {"sub-01", "sub-02"}
    assert (group / "group_detection.tsv").is_file() and (group / "group_summary.tsv").is_file()
    # the group/ folder is .bidsignore'd in a form the validator honours (a trailing "/" is not)
    result = validate(participant_run["out"])
    assert result.errors == [], result.error_lines(10)


def test_io_spec_covers_every_written_suffix(participant_run):
    suffixes = {spec["suffix"] for spec in io_spec()["outputs"].values()}
    for f in listing(participant_run["out"]):
        if f.startswith("sub-") and "/anat/" in f:
            suffix = parse_bids_name(f)[1]
            assert suffix in suffixes or suffix in ("T1w", "FLAIR"), f


def test_graph_marks_prediction_as_gpu_node(tiny_model, tmp_path):
    from bids_app.bids.discovery import SelectedFile, SessionInputs
    from bids_app.workflows.base import PipelineSettings, init_msxplain_wf

    bids = make_bids(tmp_path / "bids", subjects=("01",))
    session = SessionInputs("01", None, (
        SelectedFile("T1w", str(bids / "sub-01/anat/sub-01_T1w.nii.gz"), "test"),
        SelectedFile("FLAIR", str(bids / "sub-01/anat/sub-01_FLAIR.nii.gz"), "test")))
    settings = PipelineSettings(bids_dir=bids, output_dir=tmp_path / "out", trainer_dir=tiny_model,
                                card_file=tiny_model / "msxplain_model.json", label_indices=(1, 2),
                                label_names=("WML", "CL"), label_entities=("WML", "CL"), reference_channel=0,
                                skull_stripped_input=True,
                                members=("0",),
                                device="cuda", tta=False, threshold=0.5, min_lesion_size=3, connectivity=18,
                                save_member_probabilities=False, omp_nthreads=1)
    wf = init_msxplain_wf([session], settings, base_dir=tmp_path / "work")
    predict = wf.get_node("sub_01_wf.predict")
    assert predict.is_gpu_node() and predict.n_procs == 1
    cpu = init_msxplain_wf([session], PipelineSettings(**{**settings.__dict__, "device": "cpu"}),
                           base_dir=tmp_path / "work2")
    assert not cpu.get_node("sub_01_wf.predict").is_gpu_node()
    assert wf.get_node("sub_01_wf.evaluation") is None  # no reference masks given


def test_reports_render_offline_in_headless_chromium(participant_run, tmp_path):
    from chromium import is_blank, render

    # control: the check does see a page's own request (else it could never fail)
    control = tmp_path / "control.html"
    control.write_text('<html><body><p>control</p><img src="http://example.invalid/x.png"></body></html>')
    assert render(control)[1] == ["http://example.invalid/x.png"]
    for page in (participant_run["out"] / "sub-01.html", participant_run["out"] / "group" / "group_report.html"):
        assert page.is_file(), page
        shot, requests = render(page)
        assert requests == [], f"{page.name} requested {requests}"
        assert not is_blank(shot)
        text = page.read_text()
        assert "http://" not in text and "https://" not in text and "<script" not in text


def test_reports_only_rebuilds_the_reports(participant_run):
    out = participant_run["out"]
    page = out / "sub-02.html"
    before = page.read_text()
    page.unlink()
    assert run_cli([participant_run["bids"], out, "participant", "--reports-only", "--participant-label", "02",
                    "--skip-bids-validation"]) == 0
    assert page.read_text() == before
