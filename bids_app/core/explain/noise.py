"""Counter-based Gaussian noise: a pure function of (seed, sample, channel, global network-space
voxel), so a lesion gets the same noisy inputs whatever the crop, the batch or the device
(``docs/explain.md``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

_GOLD = 0x9E3779B97F4A7C15 - (1 << 64)
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_OFFSET = 1 << 19  # network-space coordinates may be negative (padding) or up to 2**19


def _lshr(x, s: int):
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z):
    z = (z ^ _lshr(z, 30)) * _M1
    z = (z ^ _lshr(z, 27)) * _M2
    return z ^ _lshr(z, 31)


def _wrap64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= (1 << 63) else v


def _key(seed: int, sample: int, channel: int) -> int:
    """splitmix64 of (seed, sample, channel) as a python int in int64 range."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + sample * 0xD1B54A32D192ED03 + channel * 0xABC98388FB8FAC03 + 1) & mask
    for s, m in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        z = ((z ^ (z >> s)) * m) & mask
    z ^= z >> 31
    return _wrap64(z)


def counter_noise(seed: int, samples: Sequence[int], n_channels: int, origin: Sequence[int], shape: Sequence[int],
                  device=None, dtype=None):
    """Standard normal noise as a pure function of (seed, sample, channel, voxel).

    Parameters
    ----------
    seed : int
    samples : sequence of int, length B
        Sample index of each batch item.
    n_channels : int
    origin : 3 ints, network-space coordinate of the box's first voxel
    shape : 3 ints, box shape

    Returns
    -------
    torch.Tensor of shape (B, n_channels, *shape)
        Box-Muller of two splitmix64 hashes of the voxel's global index: the same voxel of
        the same sample gets the same value in every crop, batch and device.
    """
    import torch

    dtype = dtype or torch.float32
    axes = [torch.arange(int(o), int(o) + int(s), device=device, dtype=torch.int64) + _OFFSET
            for o, s in zip(origin, shape)]
    idx = ((axes[0][:, None, None] << 40) + (axes[1][None, :, None] << 20) + axes[2][None, None, :])
    ctr = (idx * 2) * _GOLD
    out = torch.empty((len(samples), n_channels, *[int(s) for s in shape]), device=device, dtype=dtype)
    for b, k in enumerate(samples):
        for c in range(n_channels):
            key = _key(seed, int(k), c)
            h1 = _mix(ctr + key)
            h2 = _mix(ctr + _wrap64(key + _GOLD))
            u1 = (_lshr(h1, 40).to(torch.float64) + 0.5) * (1.0 / (1 << 24))
            u2 = _lshr(h2, 40).to(torch.float64) * (1.0 / (1 << 24))
            out[b, c] = (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(dtype)
    return out
