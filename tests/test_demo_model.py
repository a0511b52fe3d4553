"""The bundled demo model: checksums, loading, a synthetic subject and the real patient07."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from bids_app.testing import need_shared, run_cli, shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_data_dir()


def test_card_checksums_and_contents():
    from bids_app.model.card import sha256_file
    from bids_app.model.resolve import check_consistency, resolve_model, select_members, verify_members

    model = resolve_model("demo")
    card = model.card
    assert card.demo and card.id == "msxplain-demo-synth-v1"
    assert [c.name for c in card.channels] == ["T1w", "FLAIR"] and [lab.name for lab in card.labels] == ["WML", "CL"]
    assert len(card.members) >= 3
    check_consistency(model)
    digests = verify_members(model, select_members(model, None))
    for fold, digest in digests.items():
        assert digest == card.members[fold] == sha256_file(model.member_checkpoint(fold))
    raw = card.raw
    assert raw["training"]["stages"] and raw["performance"]["synthetic_test"]["F1"] > 0
    total = sum(p.stat().st_size for p in model.trainer_dir.rglob("*") if p.is_file())
    assert total <= 25 * 1024**2


def test_bundled_refiner_is_verified_and_sets_the_explain_defaults():
    from types import SimpleNamespace

    from bids_app.app.plan import explain_config
    from bids_app.core.explain.refiner import N_FEATURES, check_refiner
    from bids_app.model.resolve import model_refiner, resolve_model

    model = resolve_model("demo")
    path = model_refiner(model)  # checksum against the card
    refiner = check_refiner(json.loads(path.read_text()))
    assert len(refiner["feature_names"]) == N_FEATURES and any(refiner["coef"])
    trained = refiner["explain_config"]
    user = SimpleNamespace(explain_samples=None, explain_noise=None, explain_margin=None, explain_max_lesions=0)
    params = explain_config(user, refiner)
    assert params.n_samples == trained["n_samples"] and params.margin_mm == trained["margin_mm"]
    assert model.card.raw["refiner"]["performance"]["synthetic_test"]["after"]["F1"] > 0


@pytest.mark.slow
def test_demo_model_segments_a_synthetic_subject():
    import torch

    from bids_app.core.imageio import Image
    from bids_app.core.metrics.detection import lesion_detection
    from bids_app.core.postprocess import segment_lesions
    from bids_app.model.ensemble import load_ensemble
    from bids_app.model.resolve import resolve_model
    from bids_app.synth import generate_subject, sample_site
    from bids_app.training.dataset import conform_case

    torch.set_num_threads(2)
    lesions = need_shared("open_ms_data", "cross_sectional", "MNI")
    subject = generate_subject(123, sample_site(5, index=0), 1.0, skull_stripped=True, wml_load=25, cl_load=2,
                               lesion_dir=lesions)
    stack, labels, affine = conform_case([subject.t1w, subject.flair], 0, subject.lesion_dseg)
    model = resolve_model("demo")
    predictor = load_ensemble(model, list(model.card.members), tta=False).predictor
    probs = predictor.predict(stack, Image(stack[0], affine).zooms)
    card = model.card
    seg = segment_lesions(probs.mean(0), card.lesion_indices, card.threshold, card.min_lesion_size, card.connectivity)
    det = lesion_detection(seg.dseg > 0, labels > 0, "iou_adj", 0.1, card.connectivity)
    assert det["F1"] >= 0.35, det
    assert det["TPL"] >= 3


@pytest.mark.slow
def test_real_patient07_end_to_end(tmp_path):
    """The real patient (FLAIR + MPRAGE, expert consensus mask) through the whole participant level."""
    source = need_shared("open_ms_data", "cross_sectional", "MNI", "patient07")
    sys.path.insert(0, str(REPO / "scripts"))
    from patient07_bids import arrange

    bids = arrange(tmp_path / "bids", source)
    out = tmp_path / "out"
    code = run_cli([bids, out, "participant", "-w", tmp_path / "work", "--no-tta", "--reference-masks",
                    bids / "derivatives" / "reference", "--atlas",
                    SHARED / "templateflow" / "tpl-MNI152NLin2009cAsym" /
                    "tpl-MNI152NLin2009cAsym_res-01_desc-HOparc_dseg.nii.gz"])
    assert code == 0
    metrics = json.loads((out / "sub-p07" / "anat" / "sub-p07_desc-evaluation_metrics.json").read_text())["metrics"]
    # regression guard at the figures recorded in docs/demo-model.md (F1 0.33, DSC 0.44)
    assert metrics["all/F1"] > 0.25 and metrics["all/DSC"] > 0.35, metrics
    import pandas as pd

    table = pd.read_csv(out / "sub-p07" / "anat" / "sub-p07_lesions.tsv", sep="\t", na_values="n/a")
    assert {"location_class", "gm_fraction", "LSU", "lesion_type"} <= set(table.columns)
    # uncertainty is informative on real data: false positives are more uncertain than true ones
    assert table.loc[table.lesion_type == "FPL", "LSU"].mean() > table.loc[table.lesion_type == "TPL", "LSU"].mean()
    from bids_app.bids.validation import validate

    assert validate(out).errors == []
    assert np.isfinite(metrics["all/ECE"])
