"""``--skull-strip auto|learned|template|none`` (issue 13 item 4): which brain mask a session gets
(:func:`bids_app.core.brain_extraction.choose_brain_mask_method`), the BrainMask node on real
images (the learned mask, the whole field of view, the fallback to the template when a learned
mask is implausible), what the sidecars record, and the checks the run makes before it starts.
The node tests take about 30 s on 2 CPU cores; the end-to-end run on a real clinical scan is slow."""

from __future__ import annotations

import json
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest

from bids_app.core.brain_extraction import choose_brain_mask_method
from bids_app.errors import MissingInput, UsageError
from bids_app.testing import make_bids, need_shared, run_cli

PATIENT07 = ("open_ms_data", "cross_sectional", "MNI", "patient07")
RAW = ("open_ms_data", "longitudinal", "raw", "patient01")


@pytest.mark.parametrize("detected, stripped, strip, contrast, available, expected", [
    (True, "auto", "auto", "T1w", True, "support"),
    (True, "auto", "template", "T1w", True, "support"),
    (False, "yes", "learned", "T1w", True, "support"),           # the user says stripped: believe it
    (True, "no", "auto", "T1w", True, "learned"),                # the user says skull: strip anyway
    (False, "auto", "auto", "T1w", True, "learned"),
    (False, "auto", "auto", "FLAIR", True, "learned"),           # measured on FLAIR (docs/benchmarks.md)
    (False, "auto", "auto", "UNIT1", True, "template"),          # never measured: the template
    (False, "auto", "auto", "T1w", False, "template"),           # not installed: the template
    (False, "auto", "learned", "UNIT1", True, "learned"),        # asked for: any contrast
    (False, "auto", "template", "T1w", True, "template"),
    (False, "no", "none", "T1w", True, "none"),
])
def test_method_choice(detected, stripped, strip, contrast, available, expected):
    method, reason = choose_brain_mask_method(stripped_detected=detected, skull_stripped=stripped,
                                              skull_strip=strip, contrast=contrast, learned_available=available)
    assert method == expected
    assert reason  # a sentence for the QC file
    if expected == "template" and strip == "auto":
        assert ("not installed" in reason) == (not available)


def test_unknown_choices_are_usage_errors():
    with pytest.raises(UsageError, match="--skull-strip must be"):
        choose_brain_mask_method(stripped_detected=False, skull_strip="bet")
    with pytest.raises(UsageError, match="--skull-stripped must be"):
        choose_brain_mask_method(stripped_detected=False, skull_stripped="maybe")


def _bids_copy(src, dst_dir, name):
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / name
    shutil.copyfile(src, dst)
    return dst


def _run_brain_mask(tmp_path, reference, **inputs):
    from bids_app.interfaces.conform import BrainMask

    node_dir = tmp_path / "node"
    node_dir.mkdir(exist_ok=True)
    import os

    cwd = os.getcwd()
    os.chdir(node_dir)
    try:
        result = BrainMask(reference_file=str(reference), sources=[str(reference)], num_threads=2, **inputs).run()
    finally:
        os.chdir(cwd)
    qc = json.loads(open(result.outputs.qc_file).read())["brain_mask"]
    mask = np.asarray(nib.load(result.outputs.mask_file).dataobj).astype(bool)
    return mask, qc, result.outputs.derivatives[0]["metadata"]


@pytest.fixture(scope="module")
def flair07(tmp_path_factory):
    """patient07's skull-stripped FLAIR (MNI 1 mm) under a BIDS name; its non-zero support is its brain."""
    src = need_shared(*PATIENT07, "FLAIR_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz")
    return _bids_copy(src, tmp_path_factory.mktemp("p07"), "sub-07_FLAIR.nii.gz")


def test_learned_mask_in_the_node_keeps_the_brain(flair07, tmp_path):
    pytest.importorskip("deepbet")
    mask, qc, metadata = _run_brain_mask(tmp_path, flair07, skull_stripped="no", skull_strip="learned")
    truth = np.asarray(nib.load(flair07).dataobj) != 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice >= 0.97, dice
    assert qc["method_used"] == "learned" and qc["learned"]["contrast"] == "FLAIR"
    assert not qc["learned"]["contrast_in_training"]
    assert 1.0 <= qc["brain_volume_litres"] <= 1.8 and not qc["implausible_brain_volume"]
    assert metadata["SkullStrip"] == "learned" and metadata["SkullStripMethod"] == "learned"
    assert metadata["SkullStripTool"] == "deepbet" and metadata["SkullStripToolVersion"] == "1.0.2"
    assert metadata["SkullStripDevice"] == "cpu" and "deepbet" in metadata["Method"]


def test_none_is_the_whole_field_of_view(flair07, tmp_path):
    mask, qc, metadata = _run_brain_mask(tmp_path, flair07, skull_stripped="no", skull_strip="none")
    assert mask.all()
    assert qc["method_used"] == "none" and metadata["SkullStripMethod"] == "none"
    assert qc["implausible_brain_volume"]  # 7 L of field of view is no brain: said, not hidden


def test_stripped_input_keeps_its_support_whatever_the_method(flair07, tmp_path):
    mask, qc, metadata = _run_brain_mask(tmp_path, flair07, skull_strip="learned")
    truth = np.asarray(nib.load(flair07).dataobj) != 0
    assert qc["method_used"] == "support" and qc["skull_stripped_input"]
    assert (mask & truth).sum() == truth.sum()
    assert "SkullStripTool" not in metadata


def test_auto_without_a_template_for_an_unmeasured_contrast_says_what_to_do(flair07, tmp_path):
    unit1 = _bids_copy(flair07, tmp_path / "in", "sub-07_UNIT1.nii.gz")
    with pytest.raises(MissingInput, match="template") as err:
        _run_brain_mask(tmp_path, unit1, skull_stripped="no", skull_strip="auto")
    assert "--skull-strip learned" in err.value.one_line()


def test_an_implausible_learned_mask_falls_back_to_the_template_in_auto(tmp_path, monkeypatch):
    """A learned mask of 0.01 L (here: deepbet's output replaced by a small cube) is not a brain:
    ``auto`` registers the template instead and records why; ``learned`` keeps it, flagged."""
    from bids_app.bids.templates import brain_mask_template
    from bids_app.core import brain_extraction

    src = need_shared(*PATIENT07, "T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz")
    image = nib.load(src)
    small = nib.Nifti1Image(np.asarray(image.dataobj, np.float32)[::2, ::2, ::2],
                            image.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    reference = tmp_path / "in" / "sub-07_T1w.nii.gz"
    reference.parent.mkdir()
    nib.save(small, reference)

    def cube(data, affine, **kwargs):
        mask = np.zeros(data.shape, bool)
        mask[40:51, 50:61, 40:51] = True
        return mask, {"method": "a cube", "tool": "deepbet", "tool_version": "1.0.2", "device": "cpu",
                      "contrast": "T1w", "contrast_in_training": True,
                      "brain_volume_litres": round(mask.sum() * 8e-6, 4)}

    monkeypatch.setattr(brain_extraction, "learned_brain_mask", cube)
    monkeypatch.setattr(brain_extraction, "tool_available", lambda: True)
    template_t1w, template_mask = brain_mask_template()
    mask, qc, metadata = _run_brain_mask(tmp_path, reference, skull_stripped="no", skull_strip="auto",
                                         template_t1w=str(template_t1w), template_mask=str(template_mask))
    assert qc["method_used"] == "template" and "0.011 L" in qc["learned_rejected"]
    assert 0.9 <= qc["brain_volume_litres"] <= 1.8 and metadata["SkullStripMethod"] == "template"
    mask, qc, _ = _run_brain_mask(tmp_path, reference, skull_stripped="no", skull_strip="learned",
                                  template_t1w=str(template_t1w), template_mask=str(template_mask))
    assert qc["method_used"] == "learned" and qc["implausible_brain_volume"] and mask.sum() == 11 ** 3


def test_option_reaches_the_config(tmp_path):
    from bids_app.app.config import Config
    from bids_app.cli.parser import parse_args

    bids = make_bids(tmp_path / "bids", subjects=("01",))
    ns = parse_args([str(bids), str(tmp_path / "out"), "participant", "--skull-strip", "template",
                     "--skull-stripped", "no"])
    config = Config.from_args(ns)
    assert config.model.skull_strip == "template" and config.model.skull_stripped == "no"
    default = Config.from_args(parse_args([str(bids), str(tmp_path / "out"), "participant"]))
    assert default.model.skull_strip == "auto"
    with pytest.raises(SystemExit) as err:
        parse_args([str(bids), str(tmp_path / "out"), "participant", "--skull-strip", "bet"])
    assert err.value.code == 64


def test_learned_asked_for_but_not_installed_fails_before_processing(tiny_model, tmp_path, monkeypatch, capsys):
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    monkeypatch.setitem(sys.modules, "deepbet", None)
    out = tmp_path / "out"
    code = run_cli([bids, out, "participant", "--model", tiny_model, "-w", tmp_path / "work",
                    "--skull-stripped", "no", "--skull-strip", "learned"])
    err = capsys.readouterr().err
    assert code == 66, err
    assert "deepbet" in err and "--skull-strip template" in err
    assert not out.exists() or not any(out.rglob("*.nii.gz"))


@pytest.mark.slow
def test_participant_run_on_a_raw_clinical_scan_with_learned_extraction(tiny_model, tmp_path):
    """The raw clinical T1W and FLAIR of open_ms_data's longitudinal patient01 (skull on, 0.72 x 0.72
    x 3-4 mm): the run detects the skull, strips it with deepbet, and records it in the sidecars."""
    pytest.importorskip("deepbet")
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    anat = bids / "sub-01" / "anat"
    for suffix, name in (("T1w", "study1_T1W.nii.gz"), ("FLAIR", "study1_FLAIR.nii.gz")):
        shutil.copyfile(need_shared(*RAW, name), anat / f"sub-01_{suffix}.nii.gz")
    shutil.rmtree(bids / "derivatives")
    out = tmp_path / "out"
    code = run_cli([bids, out, "participant", "--model", tiny_model, "-w", tmp_path / "work", "--no-tta",
                    "--no-lesion-features", "--nprocs", "2"])
    assert code == 0
    sidecar = json.loads(next(out.rglob("sub-01_*desc-brain_mask.json")).read_text())
    assert sidecar["SkullStrip"] == "auto" and sidecar["SkullStripMethod"] == "learned"
    assert sidecar["SkullStripTool"] == "deepbet"
    mask_file = next(out.rglob("sub-01_*desc-brain_mask.nii.gz"))
    mask = nib.load(mask_file)
    litres = np.asarray(mask.dataobj).astype(bool).sum() * abs(np.linalg.det(mask.affine[:3, :3])) / 1e6
    assert 1.0 <= litres <= 1.8, litres
    probseg = json.loads(next(out.rglob("sub-01_*probseg.json")).read_text())
    assert probseg["msxplain"]["Parameters"]["SkullStrip"] == "auto"
