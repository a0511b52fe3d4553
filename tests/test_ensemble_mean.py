"""--ensemble-mean probabilities|logits (issue 21 item 2): the option reaches the post-processing
node, which thresholds the chosen map, writes it as the probseg and says which in the sidecars."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_app.app.config import Config
from bids_app.cli.parser import build_parser
from bids_app.core.uncertainty import ensemble_mean
from bids_app.interfaces.postprocess import PostProcess


def test_the_option_and_its_default(tmp_path):
    (tmp_path / "bids").mkdir()
    argv = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant"]
    assert Config.from_args(build_parser().parse_args(argv)).postprocess.ensemble_mean == "probabilities"
    chosen = Config.from_args(build_parser().parse_args([*argv, "--ensemble-mean", "logits"]))
    assert chosen.postprocess.ensemble_mean == "logits"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--ensemble-mean", "median"])


@pytest.mark.parametrize("how", ["probabilities", "logits"])
def test_postprocess_thresholds_and_writes_the_chosen_mean(tmp_path, monkeypatch, how):
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 3.0, (3, 2, 12, 12, 12))
    logits[:, 1, 3:7, 3:7, 3:7] += 4.0  # one lesion
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.save(tmp_path / "member_probs.npy", probs.astype(np.float32))
    nib.Nifti1Image(np.zeros((12, 12, 12), np.float32), np.eye(4)).to_filename(tmp_path / "ref.nii.gz")
    monkeypatch.chdir(tmp_path)
    node = PostProcess(member_probs_file=str(tmp_path / "member_probs.npy"),
                       reference_file=str(tmp_path / "ref.nii.gz"),
                       label_indices=[1], label_names=["lesion"], label_entities=["lesionClass"],
                       members=["0", "1", "2"], threshold=0.5, min_lesion_size=1, connectivity=26,
                       ensemble_mean=how, sources=["sub-01_FLAIR.nii.gz"])
    result = node.run().outputs
    expected = ensemble_mean(probs.astype(np.float32), how)[1]
    records = {(r["key"], r.get("entities", {}).get("label")): r for r in result.derivatives}
    probseg = records[("probseg", "lesionClass")]
    assert np.array_equal(np.asarray(nib.load(probseg["file"]).dataobj), expected.astype(np.float32))
    mask = np.asarray(nib.load(records[("class_mask", "lesionClass")]["file"]).dataobj)
    assert np.array_equal(mask > 0, expected >= 0.5)
    assert probseg["metadata"]["LabelName"] == "lesion"
    assert ("logits" in probseg["metadata"]["Aggregation"]) == (how == "logits")
    summary = json.loads(open(result.summary_file).read())
    assert summary["parameters"]["EnsembleMean"] == how
