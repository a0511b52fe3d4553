"""Test-time mirroring in batches (issue 17): the tile and its mirrorings through the network in
one forward pass give what nnU-Net's one-pass-per-mirroring loop gives, in its order, with the
tile progress still counted. CUDA uses 8 per pass by default; here the CPU is made to batch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bids_app.core.segment import mirror_combinations, mirrored_prediction
from bids_app.model.ensemble import load_ensemble
from bids_app.model.resolve import resolve_model
from bids_app.testing import make_case


def test_combinations_are_nnunets_in_its_order():
    axes = [2, 3, 4]
    expected = [()] + [c for i in range(3) for c in itertools.combinations(axes, i + 1)]
    assert mirror_combinations((0, 1, 2)) == expected and len(expected) == 8
    assert mirror_combinations((1,)) == [(), (3,)]


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_batched_mirroring_equals_the_sequential_loop(batch):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.InstanceNorm3d(4),
                                  torch.nn.LeakyReLU(), torch.nn.Conv3d(4, 3, 3, padding=1)).eval()
    x = torch.randn(1, 2, 12, 10, 8)
    with torch.inference_mode():
        expected = network(x)
        for axes in mirror_combinations((0, 1, 2))[1:]:
            expected += torch.flip(network(torch.flip(x, axes)), axes)
        expected /= 8
        got = mirrored_prediction(network, x, (0, 1, 2), batch)
        single = mirrored_prediction(network, x, None, batch)
    assert got.shape == expected.shape == (1, 3, 12, 10, 8)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(single, network(x), atol=1e-7)
    # a flip is not a no-op here: the network is not mirror-symmetric
    assert not torch.allclose(got, network(x), atol=1e-3)


def test_ensemble_with_batched_mirroring_equals_the_default(tiny_model):
    image, _ = make_case(13, shape=(36, 44, 30))
    predictor = load_ensemble(resolve_model(str(tiny_model)), ["0", "1"], tta=True, num_threads=2).predictor
    assert predictor.mirror_batch == 1  # CPU default: nnU-Net's own loop, bit for bit
    sequential = predictor.predict(image, (1.7, 2.1, 2.6))
    predictor.mirror_batch = 8
    tiles = []
    batched = predictor.predict(image, (1.7, 2.1, 2.6), progress=lambda *a: tiles.append(a))
    # nnU-Net accumulates the tiles' logits in float16: a 1e-6 difference of one tile's logits
    # (another convolution blocking for a batch of 8) can flip the last float16 bit of the sum
    # (0.0005 at a logit of 7), hence 1e-3 on the probabilities and one voxel at most on the masks
    assert np.abs(batched - sequential).max() < 1e-3
    assert ((batched.argmax(1) != sequential.argmax(1)).sum()) <= 1
    assert tiles and tiles[-1][0] == 2 and tiles[-1][2] == tiles[-1][3]  # every tile of member 2 counted
    # the instance is left as it was: the next prediction without batching is nnU-Net's again
    predictor.mirror_batch = 1
    assert np.array_equal(predictor.predict(image, (1.7, 2.1, 2.6)), sequential)
