"""The same ensemble on a GPU gives the CPU's probabilities (``gpu`` marker: needs a CUDA device).

CI machines have no GPU, so these tests are skipped there; on a machine with one,
``./scripts/test.sh -m gpu tests/test_devices.py`` runs them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_app.model.ensemble import load_ensemble
from bids_app.model.resolve import resolve_model
from bids_app.testing import make_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _probabilities(trainer_dir, device: str, tta: bool) -> np.ndarray:
    image, _ = make_case(21, shape=(36, 44, 30))
    ensemble = load_ensemble(resolve_model(str(trainer_dir)), ["0", "1", "2"], device=device, tta=tta,
                             num_threads=2)
    return ensemble.predictor.predict(image, (1.7, 2.1, 2.6))


@pytest.mark.parametrize("tta", [False, True])
def test_cuda_probabilities_equal_cpu(tiny_model, tta):
    """Per-member softmax on CUDA == on CPU within 1e-3 (cuDNN convolutions are not bitwise
    those of the CPU; a larger difference means a device bug, e.g. a tensor left on the CPU)."""
    cpu = _probabilities(tiny_model, "cpu", tta)
    cuda = _probabilities(tiny_model, "cuda", tta)
    assert cuda.shape == cpu.shape == (3, 3, 36, 44, 30)
    assert np.abs(cuda - cpu).max() < 1e-3
    # the thresholded segmentation moves by at most a handful of boundary voxels
    assert ((cuda.mean(0)[1:].max(0) >= 0.5) != (cpu.mean(0)[1:].max(0) >= 0.5)).sum() <= 5


def test_auto_device_picks_cuda(tiny_model):
    ensemble = load_ensemble(resolve_model(str(tiny_model)), ["0"], device="auto", tta=False)
    assert ensemble.predictor.device.type == "cuda"


def test_learned_brain_mask_on_cuda_equals_cpu():
    """deepbet on the GPU (the BrainMask node's device under --device cuda) gives the CPU's mask,
    up to a few boundary voxels, on a real head (open_ms_data raw T1W, skull on)."""
    pytest.importorskip("deepbet")
    from bids_app.core.brain_extraction import learned_brain_mask
    from bids_app.core.imageio import load_image
    from bids_app.testing import need_shared

    image = load_image(need_shared("open_ms_data", "longitudinal", "raw", "patient01", "study2_T1W.nii.gz"))
    cpu, _ = learned_brain_mask(image.data, image.affine, device="cpu")
    cuda, info = learned_brain_mask(image.data, image.affine, device="cuda")
    assert info["device"] == "cuda"
    dice = 2 * (cpu & cuda).sum() / (cpu.sum() + cuda.sum())
    assert dice >= 0.999, dice
