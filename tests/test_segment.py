"""The nnU-Net adapter against nnU-Net's own predictor, and its safety checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bids_app.core.segment import build_network, resolve_device
from bids_app.errors import BadInputData, UsageError
from bids_app.model.ensemble import load_ensemble
from bids_app.model.resolve import resolve_model, select_members
from bids_app.testing import make_case


def _predictor(trainer_dir, members, tta=True):
    return load_ensemble(resolve_model(str(trainer_dir)), members, tta=tta, num_threads=2).predictor


@pytest.mark.parametrize("fold, tta", [("1", True), ("2", False)])
def test_member_probabilities_equal_nnunet_predictor(tiny_model, fold, tta):
    """Per-member output == nnUNetPredictor run with that single fold (within 1e-4), on an input
    that triggers nnU-Net's crop-to-nonzero and resampling (anisotropic spacing != plans)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    image, _ = make_case(11, shape=(36, 44, 30))
    zooms = (1.7, 2.1, 2.6)
    ours = _predictor(tiny_model, [fold], tta).predict(image, zooms)[0]

    reference = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=tta, allow_tqdm=False)
    reference.initialize_from_trained_model_folder(str(tiny_model), use_folds=(int(fold),))
    _, probs = reference.predict_single_npy_array(
        np.ascontiguousarray(image.transpose(0, 3, 2, 1)), {"spacing": [zooms[2], zooms[1], zooms[0]]},
        None, None, True)
    ref = probs.transpose(0, 3, 2, 1)
    assert ours.shape == ref.shape == (3, 36, 44, 30)
    assert np.abs(ours - ref).max() < 1e-4


def test_members_differ_and_sum_to_one(tiny_model):
    image, _ = make_case(12, shape=(32, 32, 32))
    probs = _predictor(tiny_model, ["0", "1", "2"], tta=False).predict(image, (2.0, 2.0, 2.0))
    assert probs.shape == (3, 3, 32, 32, 32) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(probs[0] - probs[1]).max() > 1e-3  # independent members disagree somewhere


def test_rerun_is_bitwise_identical_on_cpu(tiny_model):
    image, _ = make_case(13, shape=(32, 32, 32))
    predictor = _predictor(tiny_model, ["0"], tta=False)
    a = predictor.predict(image, (2.0, 2.0, 2.0))
    b = predictor.predict(image, (2.0, 2.0, 2.0))
    assert np.array_equal(a, b)


def test_channel_count_mismatch(tiny_model):
    with pytest.raises(BadInputData, match="expects 2 input channel"):
        _predictor(tiny_model, ["0"], tta=False).predict(np.ones((1, 32, 32, 32), np.float32), (2, 2, 2))


def test_plans_naming_a_foreign_class_are_refused(tiny_model):
    plans = json.loads((tiny_model / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    with pytest.raises(BadInputData, match="not an nnU-Net network"):
        build_network(plans, "3d_fullres", 2, 3)
    plans = json.loads((tiny_model / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "subprocess.Popen"
    with pytest.raises(BadInputData, match="not an nnU-Net network"):
        build_network(plans, "3d_fullres", 2, 3)


def test_cuda_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_select_members(tiny_model):
    model = resolve_model(str(tiny_model))
    assert select_members(model, None) == ["0", "1", "2"]
    assert select_members(model, ["2"]) == ["2"]
    with pytest.raises(UsageError):
        select_members(model, ["7"])
