"""Input discovery with pybids: real layouts from bids-examples and datasets built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bids_app.bids.discovery import collect_session, discover, list_sessions, open_layout
from bids_app.errors import BadInputData, BIDSValidationError, MissingInput, NoMatchingInputs, UsageError
from bids_app.model.card import ModelCard
from bids_app.testing import need_shared

T1 = {"index": 0, "name": "T1w", "queries": [{"suffix": "UNIT1"}, {"suffix": "T1w"}]}
FLAIR = {"index": 1, "name": "FLAIR", "queries": [{"suffix": "FLAIR"}]}


def card(*channels) -> ModelCard:
    return ModelCard.from_dict({"id": "test", "channels": [dict(c, index=i) for i, c in enumerate(channels)],
                                "labels": {"1": {"name": "WML"}}, "members": [{"fold": "0", "sha256": "x"}]})


T1_ONLY = card(T1)
T1_FLAIR = card(T1, FLAIR)


def examples(name: str) -> Path:
    return need_shared("bids-examples", name)


def chosen(sessions, name="T1w"):
    return {s.name: Path(next(f.path for f in s.files if f.channel == name)).name for s in sessions}


# ---------------------------------------------------------------- every bids-examples layout
def test_qmri_mp2rage_prefers_unit1_over_inversions():
    ok, failed = discover(open_layout(examples("qmri_mp2rage")), T1_ONLY)
    assert chosen(ok) == {"sub-1": "sub-1_UNIT1.nii"} and not failed
    assert "query 1/2 (suffix=UNIT1)" in ok[0].files[0].reason


def test_qmri_mp2rage_without_flair_is_missing_input():
    ok, failed = discover(open_layout(examples("qmri_mp2rage")), T1_FLAIR)
    assert not ok and failed[0].error.exit_code == 66 and "no 'FLAIR' image" in failed[0].error.message


def test_genetics_ukbb_mprage_acq_and_flair():
    ok, failed = discover(open_layout(examples("genetics_ukbb")), T1_FLAIR)
    assert not failed and len(ok) >= 4
    s = ok[0]
    assert [Path(f.path).name for f in s.files] == [f"{s.name}_acq-MPRAGE_T1w.nii.gz", f"{s.name}_FLAIR.nii.gz"]
    assert "query 2/2 (suffix=T1w)" in s.files[0].reason  # no UNIT1: fell back to any T1w
    # inherited sidecar (dataset-level FLAIR.json) reaches the selection's metadata
    inherited = json.loads((examples("genetics_ukbb") / "FLAIR.json").read_text())
    key = next(iter(inherited))
    assert s.files[1].metadata.get(key) == inherited[key]


def test_ds000117_skips_meg_session_and_picks_mprage():
    ok, failed = discover(open_layout(examples("ds000117")), T1_ONLY)
    assert not failed
    assert all(s.session == "mri" for s in ok)
    assert chosen(ok)["sub-01_ses-mri"] == "sub-01_ses-mri_acq-mprage_T1w.nii.gz"


def test_ds051_two_runs_picks_the_highest():
    ok, _ = discover(open_layout(examples("ds051")), T1_ONLY)
    assert chosen(ok)["sub-01"] == "sub-01_run-02_T1w.nii.gz"
    assert "chose the highest run" in ok[0].files[0].reason


def test_ds051_run_filter_overrides():
    ok, _ = discover(open_layout(examples("ds051")), T1_ONLY, bids_filters={"t1w": {"run": 1}})
    assert chosen(ok)["sub-01"] == "sub-01_run-01_T1w.nii.gz"


def test_ds114_sessions_are_separate():
    ok, _ = discover(open_layout(examples("ds114")), T1_ONLY, participant_label=["01"])
    assert chosen(ok) == {"sub-01_ses-retest": "sub-01_ses-retest_T1w.nii.gz",
                          "sub-01_ses-test": "sub-01_ses-test_T1w.nii.gz"}
    ok, _ = discover(open_layout(examples("ds114")), T1_ONLY, participant_label=["01"], session_label=["test"])
    assert [s.name for s in ok] == ["sub-01_ses-test"]


def test_synthetic_uncompressed_nii_with_sessions():
    ok, _ = discover(open_layout(examples("synthetic")), T1_ONLY, participant_label=["01"])
    assert chosen(ok)["sub-01_ses-01"] == "sub-01_ses-01_T1w.nii"


def test_fmriprep_derivatives_as_input_is_ambiguous_with_a_hint():
    ok, failed = discover(open_layout(examples("ds000001-fmriprep")), T1_ONLY, participant_label=["10"])
    assert not ok and failed[0].error.exit_code == 65
    assert "ambiguous" in failed[0].error.message and "--bids-filter-file" in failed[0].error.hint
    ok, failed = discover(open_layout(examples("ds000001-fmriprep")), T1_ONLY, participant_label=["10"],
                          bids_filters={"t1w": {"space": None}})
    assert chosen(ok) == {"sub-10": "sub-10_desc-preproc_T1w.nii.gz"}


# ---------------------------------------------------------------- datasets built here
def build(root: Path, files: list[str], sidecars: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    for f in files:
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    for rel, content in (sidecars or {}).items():
        (root / rel).write_text(json.dumps(content))
    return root


def test_ambiguous_acquisitions(tmp_path):
    root = build(tmp_path / "ds", ["sub-01/anat/sub-01_acq-fast_FLAIR.nii.gz",
                                   "sub-01/anat/sub-01_acq-slow_FLAIR.nii.gz", "sub-01/anat/sub-01_T1w.nii.gz"])
    layout = open_layout(root)
    with pytest.raises(BadInputData, match="ambiguous: 2 candidates"):
        collect_session(layout, T1_FLAIR, "01", None)
    got = collect_session(layout, T1_FLAIR, "01", None, {"flair": {"acquisition": "slow"}})
    assert Path(got.files[1].path).name == "sub-01_acq-slow_FLAIR.nii.gz"


def test_phase_images_and_mp2rage_hint(tmp_path):
    root = build(tmp_path / "ds", ["sub-01/anat/sub-01_inv-1_part-mag_MP2RAGE.nii.gz",
                                   "sub-01/anat/sub-01_inv-2_part-mag_MP2RAGE.nii.gz",
                                   "sub-01/anat/sub-01_part-phase_T1w.nii.gz",
                                   "sub-01/anat/sub-01_FLAIR.nii.gz"])
    with pytest.raises(MissingInput) as info:
        collect_session(open_layout(root), T1_FLAIR, "01", None)
    assert "MP2RAGE inversion images" in info.value.hint and "UNIT1" in info.value.hint


def test_null_and_star_filters(tmp_path):
    root = build(tmp_path / "ds", ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_rec-norm_T1w.nii.gz"])
    layout = open_layout(root)
    got = collect_session(layout, T1_ONLY, "01", None, {"t1w": {"reconstruction": None}})
    assert Path(got.files[0].path).name == "sub-01_T1w.nii.gz"
    got = collect_session(layout, T1_ONLY, "01", None, {"t1w": {"reconstruction": "*"}})
    assert Path(got.files[0].path).name == "sub-01_rec-norm_T1w.nii.gz"


def test_filter_selecting_nothing(tmp_path):
    root = build(tmp_path / "ds", ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_FLAIR.nii.gz"])
    with pytest.raises(NoMatchingInputs, match="selects no image"):
        collect_session(open_layout(root), T1_FLAIR, "01", None, {"flair": {"acquisition": "nope"}})


def test_filter_keys_must_be_channels(tmp_path):
    root = build(tmp_path / "ds", ["sub-01/anat/sub-01_T1w.nii.gz"])
    with pytest.raises(UsageError, match="not channels"):
        discover(open_layout(root), T1_ONLY, bids_filters={"t2w": {"run": 1}})


def test_unknown_participant_and_session(tmp_path):
    root = build(tmp_path / "ds", ["sub-01/ses-a/anat/sub-01_ses-a_T1w.nii.gz"])
    layout = open_layout(root)
    with pytest.raises(NoMatchingInputs, match="sub-99"):
        list_sessions(layout, ["99"])
    with pytest.raises(NoMatchingInputs, match="ses-zz"):
        list_sessions(layout, ["01"], ["zz"])


def test_not_a_bids_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(BIDSValidationError, match="dataset_description.json"):
        open_layout(tmp_path / "folder")


def test_one_session_missing_flair_does_not_stop_the_other(tmp_path):
    root = build(tmp_path / "ds", ["sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_FLAIR.nii.gz",
                                   "sub-02/anat/sub-02_T1w.nii.gz"])
    ok, failed = discover(open_layout(root), T1_FLAIR)
    assert [s.name for s in ok] == ["sub-01"] and [f.name for f in failed] == ["sub-02"]
