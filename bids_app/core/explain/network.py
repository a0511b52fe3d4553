"""Network helpers of the explanations: strides, receptive field, layer names, InstanceNorm
statistics that can be frozen, prepared (frozen, deep-supervision-off) copies of the members,
test-time mirroring, and zero-padded crops of a network-space volume."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np


def total_stride(network) -> tuple[int, int, int]:
    """Product of the encoder strides per axis (1 for networks without ``encoder.strides``)."""
    strides = getattr(getattr(network, "encoder", None), "strides", None)
    if strides is None:
        return (1, 1, 1)
    out = np.ones(3, int)
    for s in strides:
        out *= np.broadcast_to(np.asarray(s, int), (3,))
    return tuple(int(v) for v in out)


def receptive_field(network) -> tuple[int, int, int]:
    """Theoretical receptive field (voxels per axis) of an nnU-Net UNetDecoder network.

    Walks the convolutions of the deepest path (encoder stages, then decoder transposed
    convolutions and stages): ``r += (k - 1) * jump``, ``jump *= stride``; a transposed
    convolution with kernel = stride divides the jump. Normalisation layers are ignored
    (InstanceNorm couples the whole patch, which a theoretical receptive field cannot say).
    Networks without this structure give the receptive field of all their convolutions in
    registration order.
    """
    import torch

    r = np.ones(3)
    jump = np.ones(3)

    def convs(module):
        for m in module.modules():
            if isinstance(m, torch.nn.modules.conv._ConvNd):
                yield m

    def walk(m):
        nonlocal r, jump
        k = np.broadcast_to(np.asarray(m.kernel_size), (3,))
        s = np.broadcast_to(np.asarray(m.stride), (3,))
        if isinstance(m, torch.nn.modules.conv._ConvTransposeNd):
            jump = jump / s
            return
        r = r + (k - 1) * jump
        jump = jump * s

    enc = getattr(network, "encoder", None)
    dec = getattr(network, "decoder", None)
    if enc is not None and dec is not None and hasattr(dec, "stages") and hasattr(dec, "transpconvs"):
        if getattr(enc, "stem", None) is not None:
            for m in convs(enc.stem):
                walk(m)
        for stage in enc.stages:
            for m in convs(stage):
                if m.kernel_size == (1, 1, 1) or m.kernel_size == 1:
                    continue  # residual 1x1 skip projections do not widen the field
                walk(m)
        for t, stage in zip(dec.transpconvs, dec.stages):
            walk(t)
            for m in convs(stage):
                walk(m)
    else:
        for m in convs(network):
            walk(m)
    return tuple(int(round(v)) for v in r)


def resolve_layer(network, name: str):
    """``'decoder.stages[-2]'`` / ``'decoder.stages.2'`` -> the submodule."""
    obj = network
    for part in name.replace("]", "").replace("[", ".").split("."):
        if part == "":
            continue
        if part.lstrip("-").isdigit():
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


def canonical_layer_name(network, name: str) -> str:
    """``decoder.stages[-2]`` -> ``decoder.stages.1`` (the name in ``named_modules``)."""
    target = resolve_layer(network, name)
    for n, m in network.named_modules():
        if m is target:
            return n
    return name


def _freezable_norm_class():
    import torch

    class FreezableInstanceNorm(torch.nn.Module):
        """InstanceNorm whose per-(item, channel) statistics can be recorded and frozen.

        mode 'live': the wrapped InstanceNorm; 'record': live, and the statistics are kept
        (detached) in ``recorded``; 'frozen': ``(x - mean) / sqrt(var + eps)`` (then the
        affine) with ``stats = (mean, var)`` of shape (B, C) treated as constants.
        """

        def __init__(self, norm):
            super().__init__()
            self.norm = norm
            self.mode = "live"
            self.stats = None
            self.recorded = None

        def forward(self, x):
            if self.mode == "live":
                return self.norm(x)
            dims = tuple(range(2, x.ndim))
            if self.mode == "record":
                mean = x.mean(dim=dims)
                var = x.var(dim=dims, unbiased=False)
                self.recorded = (mean.detach(), var.detach())
            else:
                mean, var = self.stats
            shape = (*mean.shape, *([1] * len(dims)))
            y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + self.norm.eps)
            if self.norm.affine:
                wshape = (1, -1, *([1] * len(dims)))
                y = y * self.norm.weight.reshape(wshape) + self.norm.bias.reshape(wshape)
            return y

    return FreezableInstanceNorm


def _wrap_instance_norms(net) -> list:
    """Replace every InstanceNorm of ``net`` (in place) by a freezable wrapper; return them in order."""
    import torch

    cls = _freezable_norm_class()
    wrappers: dict[int, Any] = {}
    order = []
    for _, module in list(net.named_modules()):
        if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm) and id(module) not in wrappers:
            wrappers[id(module)] = cls(module)
            order.append(wrappers[id(module)])
    if not wrappers:
        return []
    for parent in list(net.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in wrappers and not isinstance(parent, cls):
                parent._modules[child_name] = wrappers[id(child)]
    return order


def set_norm_mode(norms: list, mode: str, stats: list | None = None) -> None:
    for i, n in enumerate(norms):
        n.mode = mode
        n.stats = None if stats is None else stats[i]


def prepare_networks(networks, device, dtype) -> list:
    """Copies of the networks in eval mode, on ``device``/``dtype``, parameters frozen, deep
    supervision off; every InstanceNorm is wrapped so its statistics can be frozen (the list of
    wrappers is ``net._msx_norms``)."""
    out = []
    for net in networks:
        net = copy.deepcopy(net).to(device=device, dtype=dtype)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        dec = getattr(net, "decoder", None)
        if dec is not None and hasattr(dec, "deep_supervision"):
            dec.deep_supervision = False
        net._msx_norms = _wrap_instance_norms(net)
        out.append(net)
    return out


class Mirrored:
    """Callable: mean over flips of ``net`` (nnU-Net's test-time mirroring of logits)."""

    def __init__(self, net, axes: tuple[int, ...]):
        import itertools

        self.net = net
        self.flips = [c for k in range(len(axes) + 1) for c in itertools.combinations(axes, k)]

    def __call__(self, x):
        out = 0
        for f in self.flips:
            dims = [a + 2 for a in f]
            y = self.net(x.flip(dims) if dims else x)
            out = out + (y.flip(dims) if dims else y)
        return out / len(self.flips)


def extract_box(volume, box):
    """Crop ``volume`` (K, *S) to ``box`` with zero padding outside -> (K, *box shape)."""
    import torch

    shape = [hi - lo for lo, hi in box]
    out = torch.zeros((volume.shape[0], *shape), dtype=volume.dtype, device=volume.device)
    src, dst = [], []
    for (lo, hi), n in zip(box, volume.shape[1:]):
        a, b = max(lo, 0), min(hi, n)
        src.append(slice(a, b))
        dst.append(slice(a - lo, b - lo))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


def logit_of_class(out, cls):
    """(B, C, *S) logits, (B,) classes -> (B, *S) logit of each item's class."""
    idx = cls.view(-1, *([1] * (out.ndim - 1))).expand(-1, 1, *out.shape[2:])
    return out.gather(1, idx)[:, 0]
