"""nnU-Net's configurations and checkpoints (issue 21 item 4): ``2d`` and ``3d_lowres`` models give
nnU-Net's per-member probabilities and run end to end, a cascade stage is refused with what is
missing, ``fold_all`` is a member like any other, and ``--checkpoint best`` loads the pinned
``checkpoint_best.pth`` or is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bids_app.errors import BadInputData
from bids_app.model.card import CARD_NAME
from bids_app.model.ensemble import load_ensemble
from bids_app.model.resolve import resolve_model, select_checkpoint, verify_members
from bids_app.testing import make_bids, make_case, run_cli
from bids_app.testing.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models per configuration (2 briefly trained members), a fold_all model with
    checkpoint_best.pth, and a cascade stage without its first stage."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("configurations")
    built = {c: build_tiny_model(root / c, n_members=2, iterations=40, configuration=c) for c in ("2d", "3d_lowres")}
    built["all"] = build_tiny_model(root / "all", iterations=20, folds=["all"], best=True)
    built["3d_cascade_fullres"] = build_tiny_model(root / "cascade", n_members=1, iterations=1,
                                                   configuration="3d_cascade_fullres")
    return built


def _nnunet_probabilities(trainer_dir, fold, tta, image, zooms, checkpoint="checkpoint_final.pth"):
    """nnUNetPredictor run with one fold on the same array (nnU-Net's (z, y, x) order and back)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    reference = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=tta, allow_tqdm=False)
    reference.initialize_from_trained_model_folder(str(trainer_dir), use_folds=(fold,), checkpoint_name=checkpoint)
    _, probs = reference.predict_single_npy_array(
        np.ascontiguousarray(image.transpose(0, 3, 2, 1)), {"spacing": [zooms[2], zooms[1], zooms[0]]},
        None, None, True)
    return probs.transpose(0, 3, 2, 1)


@pytest.mark.parametrize("configuration", ["2d", "3d_lowres"])
@pytest.mark.parametrize("fold, tta", [("1", True), ("0", False)])
def test_member_probabilities_equal_nnunet_predictor(models, configuration, fold, tta):
    """Per-member output == nnUNetPredictor with that fold (within 1e-4), on an input that
    nnU-Net crops and resamples (a 2d model: slice by slice, nnU-Net's own sliding window)."""
    image, _ = make_case(11, shape=(36, 44, 30))
    zooms = (1.7, 2.1, 2.6)
    model = resolve_model(str(models[configuration]))
    assert model.card.configuration == configuration
    ours = load_ensemble(model, [fold], tta=tta, num_threads=2).predictor.predict(image, zooms)[0]
    ref = _nnunet_probabilities(models[configuration], int(fold), tta, image, zooms)
    assert ours.shape == ref.shape == (3, 36, 44, 30)
    assert np.abs(ours - ref).max() < 1e-4


def test_2d_network_sees_slices(models):
    predictor = load_ensemble(resolve_model(str(models["2d"])), ["0"], tta=True, num_threads=2).predictor
    assert len(predictor.configuration_manager.patch_size) == 2
    assert predictor.mirroring_axes == (0, 1)
    assert isinstance(predictor.network.encoder.stages[0][0].convs[0].conv, torch.nn.Conv2d)


# ------------------------------------------------------------------ fold_all and checkpoint_best.pth
def test_fold_all_is_a_member(models):
    model = resolve_model(str(models["all"]))
    assert list(model.card.members) == ["all"]
    image, _ = make_case(12, shape=(32, 36, 30))
    ours = load_ensemble(model, ["all"], tta=False, num_threads=2).predictor.predict(image, (2.0, 2.0, 2.0))[0]
    ref = _nnunet_probabilities(models["all"], "all", False, image, (2.0, 2.0, 2.0))
    assert np.abs(ours - ref).max() < 1e-4


def test_checkpoint_best_is_loaded_when_the_card_pins_it(models):
    model = resolve_model(str(models["all"]))
    best = select_checkpoint(model, "best")
    assert best.card.checkpoint == "checkpoint_best.pth" and best.member_checkpoint("all").name == best.card.checkpoint
    assert verify_members(best, ["all"])["all"] == model.card.checkpoint_pins["checkpoint_best.pth"]["all"]
    assert select_checkpoint(model, "final") is model and select_checkpoint(model, "auto") is model
    image, _ = make_case(13, shape=(32, 36, 30))
    ours = load_ensemble(best, ["all"], tta=False, num_threads=2).predictor.predict(image, (2.0, 2.0, 2.0))[0]
    final = load_ensemble(model, ["all"], tta=False, num_threads=2).predictor.predict(image, (2.0, 2.0, 2.0))[0]
    ref = _nnunet_probabilities(models["all"], "all", False, image, (2.0, 2.0, 2.0), "checkpoint_best.pth")
    assert np.abs(ours - ref).max() < 1e-4
    assert np.abs(ours - final).max() > 1e-3  # another checkpoint, other weights


def test_checkpoint_best_of_a_replaced_file_is_refused(models, tmp_path):
    model_dir = tmp_path / models["all"].parent.name / models["all"].name
    shutil.copytree(models["all"], model_dir)
    ckpt = model_dir / "fold_all" / "checkpoint_best.pth"
    ckpt.write_bytes(ckpt.read_bytes() + b"tampered")
    best = select_checkpoint(resolve_model(str(model_dir)), "best")
    with pytest.raises(BadInputData, match="Checksum mismatch for fold_all"):
        verify_members(best, ["all"])


def test_checkpoint_best_unpinned_by_the_card_is_refused(models, tmp_path):
    model_dir = tmp_path / models["all"].parent.name / models["all"].name
    shutil.copytree(models["all"], model_dir)
    card = json.loads((model_dir / CARD_NAME).read_text())
    for member in card["members"]:
        del member["sha256_best"]
    (model_dir / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(BadInputData, match=r"pins no SHA-256 for checkpoint_best\.pth of fold_all") as info:
        select_checkpoint(resolve_model(str(model_dir)), "best")
    assert "sha256_best" in info.value.hint
    # a folder without a card: the checksums are computed now, as for checkpoint_final.pth
    (model_dir / CARD_NAME).unlink()
    inferred = select_checkpoint(resolve_model(str(model_dir)), "best")
    assert inferred.card.inferred and inferred.card.checkpoint == "checkpoint_best.pth"
    assert verify_members(inferred, ["all"])["all"] == inferred.card.members["all"]


def test_a_checkpoint_of_a_trainer_not_installed_runs_when_its_weights_fit(models, tmp_path):
    from bids_app.model.card import sha256_file

    model_dir = tmp_path / models["all"].parent.name / models["all"].name
    shutil.copytree(models["all"], model_dir)
    ckpt = model_dir / "fold_all" / "checkpoint_final.pth"
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer_NotInstalledAnywhere"
    torch.save(checkpoint, ckpt)
    card = json.loads((model_dir / CARD_NAME).read_text())
    card["nnunet"]["trainer"] = "nnUNetTrainer_NotInstalledAnywhere"
    card["members"][0]["sha256"] = sha256_file(ckpt)
    (model_dir / CARD_NAME).write_text(json.dumps(card))
    image, _ = make_case(14, shape=(32, 36, 30))
    ensemble = load_ensemble(resolve_model(str(model_dir)), ["all"], tta=False, num_threads=2)
    ours = ensemble.predictor.predict(image, (2.0, 2.0, 2.0))[0]
    original = load_ensemble(resolve_model(str(models["all"])), ["all"], tta=False, num_threads=2)
    assert np.array_equal(ours, original.predictor.predict(image, (2.0, 2.0, 2.0))[0])


def test_card_pins_of_the_same_file_must_agree(models, tmp_path):
    from bids_app.model.card import ModelCard

    card = json.loads((models["all"] / CARD_NAME).read_text())
    card["members"][0]["sha256_final"] = "0" * 64
    with pytest.raises(BadInputData, match=r"members\[0\]\.sha256_final"):
        ModelCard.from_dict(card)
    card["members"][0]["sha256_final"] = card["members"][0]["sha256"]
    card["members"][0]["sha256_best"] = "not a checksum"
    with pytest.raises(BadInputData, match=r"members\[0\]\.sha256_best"):
        ModelCard.from_dict(card)


# ------------------------------------------------------------------ runs
def _run(model, bids, out, *extra):
    return run_cli([bids, out, "participant", "--model", model, "-w", out.parent / "work", "--skull-stripped", "yes",
                    "--no-tta", "--nprocs", "1", "--no-lesion-features", "--skip-bids-validation", *extra])


def test_cascade_without_its_first_stage_exits_65(models, tmp_path, capsys):
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    assert _run(models["3d_cascade_fullres"], bids, tmp_path / "out") == 65
    err = capsys.readouterr().err
    assert "3d_cascade_fullres" in err and "cascade" in err and "'3d_lowres'" in err
    assert "nnUNetPlans__3d_lowres" in err and "Fix:" in err
    assert not (tmp_path / "out" / "sub-01").exists()


def test_checkpoint_best_unpinned_exits_65(models, tmp_path, capsys):
    model_dir = tmp_path / "model" / models["all"].parent.name / models["all"].name
    shutil.copytree(models["all"], model_dir)
    card = json.loads((model_dir / CARD_NAME).read_text())
    del card["members"][0]["sha256_best"]
    (model_dir / CARD_NAME).write_text(json.dumps(card))
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    assert _run(model_dir, bids, tmp_path / "out", "--checkpoint", "best") == 65
    assert "pins no SHA-256 for checkpoint_best.pth" in capsys.readouterr().err


def test_explanations_of_a_2d_network_are_refused(models, tmp_path, capsys):
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    assert _run(models["2d"], bids, tmp_path / "out", "--explain") == 64
    assert "--explain needs a 3D network" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("configuration", ["2d", "3d_lowres"])
def test_configuration_runs_end_to_end(models, tmp_path, configuration):
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    out = tmp_path / "out"
    assert _run(models[configuration], bids, out) == 0
    probseg = sorted((out / "sub-01" / "anat").glob("*_probseg.nii.gz"))
    assert probseg and (out / "sub-01" / "anat" / "sub-01_lesions.tsv").is_file()
    sidecar = json.loads(probseg[0].with_name(probseg[0].name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["msxplain"]["Model"]["Configuration"] == configuration


@pytest.mark.slow
def test_fold_all_with_checkpoint_best_runs_end_to_end(models, tmp_path):
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    out = tmp_path / "out"
    assert _run(models["all"], bids, out, "--checkpoint", "best") == 0
    probseg = sorted((out / "sub-01" / "anat").glob("*_probseg.nii.gz"))
    sidecar = json.loads(probseg[0].with_name(probseg[0].name.replace(".nii.gz", ".json")).read_text())
    members = sidecar["msxplain"]["Model"]["Members"]
    best = json.loads((models["all"] / CARD_NAME).read_text())["members"][0]["sha256_best"]
    assert members == [{"Fold": "all", "Checkpoint": "fold_all/checkpoint_best.pth", "SHA256": best}]
