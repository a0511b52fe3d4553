"""Output names and metadata: one naming rule per subject, every TSV column defined, Authors,
atlas provenance, readable validator messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bids_app.bids.derivatives import (
    dataset_authors,
    dataset_description,
    lookup_column_definitions,
    parse_bids_name,
    tsv_columns,
    undefined_tsv_columns,
    write_dataset_files,
)
from bids_app.bids.validation import ValidationResult, parse_report, require_valid, validate
from bids_app.testing import make_bids, need_shared, run_cli

#: validator codes that say a TSV column lacks (or contradicts) its definition
COLUMN_CODES = {"TSV_ADDITIONAL_COLUMNS_UNDEFINED", "TSV_COLUMN_TYPE_REDEFINED", "TSV_COLUMN_MISSING"}


def written_tsvs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.tsv") if "logs" not in p.parts and "log" not in p.parts)


def sidecar_of(tsv: Path) -> dict:
    return json.loads(tsv.with_name(tsv.name[: -len(".tsv")] + ".json").read_text())


@pytest.fixture(scope="module")
def unit1_run(tiny_model, tmp_path_factory):
    """An MP2RAGE-like subject: UNIT1 reference, FLAIR on another grid, lesion features with
    the desc-HOparc atlas, then the group level."""
    need_shared("templateflow", "tpl-MNI152NLin2009cAsym")
    root = tmp_path_factory.mktemp("names")
    flair_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    flair_affine[:3, 3] = [-41.0, -47.0, -40.0]
    bids = make_bids(root / "bids", subjects=("01",), flair_affine=flair_affine)
    anat = bids / "sub-01" / "anat"
    for ext in (".nii.gz", ".json"):
        (anat / f"sub-01_T1w{ext}").rename(anat / f"sub-01_UNIT1{ext}")
    out, work = root / "out", root / "work"
    argv = [bids, out, "participant", "--model", tiny_model, "-w", work, "--skull-stripped", "yes", "--no-tta",
            "--nprocs", "2", "--reference-masks", bids / "derivatives" / "truth"]
    code = run_cli(argv)
    group_code = run_cli([bids, out, "group"]) if code == 0 else None
    return {"code": code, "group_code": group_code, "bids": bids, "out": out}


def test_one_naming_rule_per_subject(unit1_run):
    assert unit1_run["code"] == 0
    anat = unit1_run["out"] / "sub-01" / "anat"
    names = sorted(p.name for p in anat.iterdir())
    spaces = {parse_bids_name(n)[0].get(k) for n in names for k in ("space", "from")} - {None}
    assert spaces == {"UNIT1"}, names
    assert "sub-01_from-UNIT1_to-FLAIR_mode-image_xfm.txt" in names
    assert "sub-01_from-UNIT1_to-MNI152NLin2009cAsym_mode-image_xfm.txt" in names
    assert "sub-01_space-UNIT1_desc-preproc_FLAIR.nii.gz" in names
    assert "sub-01_desc-preproc_UNIT1.nii.gz" in names
    xfm = json.loads((anat / "sub-01_from-UNIT1_to-MNI152NLin2009cAsym_mode-image_xfm.json").read_text())
    assert xfm["FromFile"] == "sub-01_UNIT1.nii.gz"
    # the group level still finds the template transform
    assert unit1_run["group_code"] == 0
    assert (unit1_run["out"] / "group" / "group_space-MNI152NLin2009cAsym_desc-lesionfrequency_probseg.nii.gz"
            ).is_file()


def test_every_tsv_column_is_defined_in_its_json(unit1_run):
    tsvs = written_tsvs(unit1_run["out"])
    names = {p.name for p in tsvs}
    assert {"sub-01_desc-lesions_dseg.tsv", "sub-01_desc-instances_dseg.tsv", "sub-01_lesions.tsv",
            "group_sessions.tsv", "group_lesions.tsv", "group_summary.tsv"} <= names, names
    for tsv in tsvs:
        columns = tsv_columns(tsv)
        assert columns, tsv
        assert undefined_tsv_columns(columns, sidecar_of(tsv)) == [], tsv.name
    instances = sidecar_of(unit1_run["out"] / "sub-01" / "anat" / "sub-01_desc-instances_dseg.tsv")
    assert "class" in instances and instances["index"]["Format"] == "integer"


def test_validator_finds_no_undefined_column_and_no_error(unit1_run):
    result = validate(unit1_run["out"])
    assert result.errors == [], result.error_lines(10)
    column_issues = [result.describe(i) for i in result.warnings if i.get("code") in COLUMN_CODES]
    assert column_issues == []
    # the tiny model's card names no authors: the tool alone is one author, which the validator
    # only hints at; nothing else is left
    assert {i.get("code") for i in result.warnings} <= {"TOO_FEW_AUTHORS"}, result.warning_lines(10)


def test_dataset_description_lists_authors(unit1_run):
    desc = json.loads((unit1_run["out"] / "dataset_description.json").read_text())
    assert desc["Authors"] == ["msxplain developers"]  # kept by the group level too


def test_atlas_provenance_is_stated_truthfully(unit1_run):
    anat = unit1_run["out"] / "sub-01" / "anat"
    atlas = json.loads((anat / "sub-01_summary.json").read_text())["features"]["atlas"]
    assert atlas["File"].endswith("_desc-HOparc_dseg.nii.gz")
    assert "Not a TemplateFlow file" in atlas["Description"] and "Harvard-Oxford" in atlas["Description"]
    assert "FSL" in atlas["License"]
    dictionary = json.loads((anat / "sub-01_lesions.json").read_text())
    assert dictionary["location_class"]["Atlas"] == atlas["File"]
    text = json.dumps(json.loads((anat / "sub-01_summary.json").read_text()))
    assert not re.search(r"TemplateFlow'?s desc-HOparc", text)


# ------------------------------------------------------------------ units (no workflow)
def test_dataset_authors_from_card_then_tool():
    assert dataset_authors(None) == ["msxplain developers"]
    assert dataset_authors({"authors": ["A. Author", "B. Author", "A. Author"]}) == [
        "A. Author", "B. Author", "msxplain developers"]
    assert dataset_authors({"authors": "A. Author; B. Author"}) == ["A. Author", "B. Author", "msxplain developers"]
    assert dataset_authors({"authors": [{"name": "C. Author"}]}) == ["C. Author", "msxplain developers"]
    assert dataset_description(Path("/data/bids"), "1.0", authors=["X"])["Authors"] == ["X"]


def test_group_level_keeps_the_authors_of_the_participant_level(tmp_path):
    bids, out = tmp_path / "bids", tmp_path / "out"
    bids.mkdir()
    write_dataset_files(out, bids, "1.0", authors=dataset_authors({"authors": ["A. Author"]}))
    write_dataset_files(out, bids, "1.0")  # the group level knows no model
    assert json.loads((out / "dataset_description.json").read_text())["Authors"] == [
        "A. Author", "msxplain developers"]


def test_lookup_columns_come_from_io_spec():
    defs = lookup_column_definitions("instance_dseg", ["index", "name", "class", "mapping"])
    assert defs["class"]["Description"] and defs["mapping"]["Format"] == "integer"
    with pytest.raises(ValueError, match="colour"):
        lookup_column_definitions("class_dseg", ["index", "colour"])


def test_validator_issue_without_detail_gets_the_code_message():
    report = {"issues": {"issues": [{"code": "MISSING_DATASET_DESCRIPTION", "severity": "error",
                                     "affects": ["/dataset_description.json"]}],
                         "codeMessages": {"MISSING_DATASET_DESCRIPTION": "A dataset_description.json file is "
                                                                         "required in the root of the dataset"}}}
    result = parse_report(report)
    assert result.error_lines() == ["MISSING_DATASET_DESCRIPTION: A dataset_description.json file is required in "
                                    "the root of the dataset (/dataset_description.json)"]
    assert "create dataset_description.json" in result.fix_hint()
    bare = ValidationResult(errors=[{"code": "SOME_NEW_CODE", "severity": "error"}], warnings=[])
    assert bare.error_lines() == ["SOME_NEW_CODE: some new code"]


def test_require_valid_message_on_a_folder_without_description(tmp_path):
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    from bids_app.errors import BIDSValidationError

    with pytest.raises(BIDSValidationError) as info:
        require_valid(tmp_path)
    text = info.value.one_line()
    assert "MISSING_DATASET_DESCRIPTION: A dataset_description.json file is required" in text, text
    assert not re.search(r"MISSING_DATASET_DESCRIPTION:\s*(;|$)", text)
    assert "shared" not in text and "Fix: create dataset_description.json" in text
