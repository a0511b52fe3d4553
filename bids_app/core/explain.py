"""Instance-level explanations of an nnU-Net ensemble: SmoothGrad and Grad-CAM per lesion.

What is explained (``docs/explain.md`` gives the reasons and the measurements):

* the **target scalar** of lesion ``l`` is ``S_l = sum_{v in V_l} z_c(v)``, the pre-softmax
  logit of the lesion's class ``c`` summed over the lesion's voxels (arXiv:2406.09335),
  computed by the network with **deep supervision off** (only the full-resolution head) and
  **without test-time mirroring** (the un-mirrored network; ``mirror_axes`` averages over
  flips for SmoothGrad when asked);
* the **ensemble mean** by default: every member runs on the same noisy input and the
  members' gradients are averaged (the gradient of the mean logit), or each member on its own
  (``members='each'``);
* **SmoothGrad** per input channel, raw (signed, logit per normalised-intensity unit), with
  ``n`` noise samples of ``sigma = noise_level * (max - min)`` of the first normalised
  channel (same sigma for all channels), aggregated by the **mean** (gradient of ``S_l``) and
  by the **max** (per input voxel the per-lesion-voxel gradient of largest ``|.|``, sign
  kept; lesion voxels are grouped into at most ``max_groups`` groups, exact when the lesion has
  no more voxels than that);
* **Grad-CAM** (channel-pooled, last decoder stage: a class map) and **Grad-CAM++** (no
  ``exp(score)`` factor; by default its weights kept per voxel on the half-resolution decoder
  stage, the formulation that localises the instance) on named layers, upsampled trilinearly,
  ReLU'd and min-max normalised to max 1 within each lesion's crop;
* InstanceNorm statistics **frozen per lesion** at their values on the clean, patch-sized window
  centred on the lesion (``norm_stats='window'``), so that saliency is local and crops agree with
  the whole volume.

Everything runs in nnU-Net's network space (the preprocessed ``(K, z', y', x')`` tensor of
:meth:`bids_app.core.segment.EnsemblePredictor.preprocess`), on **lesion-centred crops**
whose sides are multiples of the network's total stride, batched across noise samples and
lesions; ``mode='full'`` runs the network on the whole volume instead (validation). The
lesion instance map is mapped into network space and the maps back to the input grid with
:func:`instances_to_network` / :func:`network_to_input`, which replay nnU-Net's
transpose -> crop-to-non-zero -> resample chain exactly as its export reverts it.

Noise is a counter-based function of (seed, sample, channel, global network-space voxel), so
a lesion gets the same noisy inputs whatever the crop, the batch or the device: crop and full
mode see identical noise and results do not depend on the batching.

This module imports torch but not nnU-Net, never reads or writes files (see
:mod:`bids_app.formats.saliency_store`) and never modifies its inputs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage

#: maps and what they hold (the store keeps the same names)
SMOOTHGRAD_MAPS = ("smoothgrad_mean", "smoothgrad_max")
CAM_MAPS = ("gradcam", "gradcampp")
METHODS = ("smoothgrad", "gradcam", "gradcampp")
#: Grad-CAM family formulations known to :func:`cam_from_gradients`
CAM_FORMULATIONS = ("gradcam", "gradcampp", "gradcampp-elementwise", "hirescam", "layercam")
#: nnU-Net's anisotropy threshold for separate-z resampling (nnunetv2.configuration.ANISO_THRESHOLD)
ANISO_THRESHOLD = 3.0
#: default (layer, formulation) of each CAM map for nnU-Net's U-Nets (UNetDecoder:
#: PlainConvUNet, ResidualEncoderUNet); measured in docs/explain.md ("Which layer, which formula").
#: Channel-pooled Grad-CAM is the class-evidence map of the last decoder stage (all lesions of
#: the class, not the instance); Grad-CAM++ with its weights kept per voxel on the
#: half-resolution decoder stage is the formulation that localises the instance.
DEFAULT_CAMS = {"gradcam": ("decoder.stages[-1]", "gradcam"),
                "gradcampp": ("decoder.stages[-2]", "gradcampp-elementwise")}


# ==========================================================================================
# configuration
# ==========================================================================================

@dataclass(frozen=True)
class ExplainConfig:
    """Parameters of :func:`explain_case` (all recorded in the store's metadata).

    Attributes
    ----------
    n_samples : int
        SmoothGrad noise samples (spec: 50).
    noise_level : float
        ``sigma = noise_level * (max - min)`` of the first normalised channel (spec: 0.05).
        0 gives the plain gradient (``n_samples`` is then forced to 1).
    methods : tuple of str
        ``'smoothgrad'`` and/or CAM map names (keys of ``cams``: ``'gradcam'``,
        ``'gradcampp'`` by default).
    members : {'mean', 'each'}
        Explain the ensemble mean (members' gradients averaged on the same noisy inputs) or
        every member separately (maps named ``<map>@<fold>``).
    mode : {'crop', 'full'}
        Lesion-centred crops (default) or the whole volume (validation).
    context_mm : float
        Smallest context kept around a lesion, in mm (published finding: ~7 mm).
    margin_mm : float or None
        Context around the lesion's bounding box in the crop, in mm; None = automatic:
        ``max(context_mm, r)`` with ``r`` the largest radius (Chebyshev, around the lesion)
        that holds ``erf_mass`` of ``|dS/dx|`` on the clean window, over every member and up
        to ``erf_lesions`` probe lesions (the largest, the median and the smallest): the
        effective receptive field, at most half the window; a quarter of the theoretical
        receptive field without a patch size.
    erf_mass, erf_lesions : float, int
        See ``margin_mm``.
    min_crop_stride_multiple : int
        Crop sides are at least this many total strides (so that InstanceNorm at the
        bottleneck has more than one voxel per axis).
    max_groups : int
        Max aggregation: lesion voxels are split into at most this many spatially compact
        groups (k-d tree); each group costs one backward pass. Exact for lesions with no more
        voxels.
    cams : dict or None
        ``{map name: (layer, formulation)}`` for the CAM maps: module path
        (``decoder.stages[-2]`` style) and one of :data:`CAM_FORMULATIONS`; entries override
        :data:`DEFAULT_CAMS`. A map is computed when its name is in ``methods``.
    mirror_axes : tuple of int or None
        SmoothGrad of the mirror-averaged network over these network axes (x 2**len cost);
        None = the un-mirrored network (default). CAMs never mirror.
    max_batch_voxels : int or None
        Largest (items x crop voxels) of one forward pass; None: 2**21 on the CPU, 2**23 on a
        GPU.
    max_batch : int
        Largest number of items of one forward pass.
    norm_stats : {'window', 'live'}
        'window' (default): instance-normalisation statistics are computed once per lesion
        and member on the clean, patch-sized window centred on the lesion (what one
        sliding-window tile sees) and frozen for the crop, the noise samples and the
        backward pass, so crop logits equal the tile's and gradients are local (as for a
        BatchNorm network at inference). 'live': every (noisy) crop normalises itself.
    seed : int
        Noise seed.
    dtype : {'float32', 'float64'}
    """

    n_samples: int = 50
    noise_level: float = 0.05
    methods: tuple[str, ...] = METHODS
    members: str = "mean"
    mode: str = "crop"
    context_mm: float = 7.0
    margin_mm: float | None = None
    erf_mass: float = 0.99
    erf_lesions: int = 3
    min_crop_stride_multiple: int = 2
    max_groups: int = 8
    cams: dict | None = None
    mirror_axes: tuple[int, ...] | None = None
    max_batch_voxels: int | None = None
    max_batch: int = 64
    norm_stats: str = "window"
    seed: int = 0
    dtype: str = "float32"

    def checked(self) -> ExplainConfig:
        if self.members not in ("mean", "each"):
            raise ValueError(f"members must be 'mean' or 'each', got {self.members!r}")
        if self.mode not in ("crop", "full"):
            raise ValueError(f"mode must be 'crop' or 'full', got {self.mode!r}")
        cams = {k: (str(v[0]), str(v[1])) for k, v in DEFAULT_CAMS.items()}
        cams.update({k: (str(v[0]), str(v[1])) for k, v in (self.cams or {}).items()})
        bad = set(self.methods) - {"smoothgrad"} - set(cams)
        if bad:
            raise ValueError(f"unknown methods {sorted(bad)}; known: smoothgrad, {sorted(cams)}")
        for name, (_, form) in cams.items():
            if form not in CAM_FORMULATIONS:
                raise ValueError(f"CAM {name!r}: unknown formulation {form!r}; known: {CAM_FORMULATIONS}")
        if self.n_samples < 1 or self.max_groups < 1:
            raise ValueError("n_samples and max_groups must be >= 1")
        if self.noise_level < 0:
            raise ValueError("noise_level must be >= 0")
        if self.norm_stats not in ("window", "live"):
            raise ValueError(f"norm_stats must be 'window' or 'live', got {self.norm_stats!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError("dtype must be float32 or float64")
        n = 1 if self.noise_level == 0 else int(self.n_samples)
        return replace(self, cams=cams, n_samples=n, methods=tuple(self.methods),
                       mirror_axes=None if self.mirror_axes is None else tuple(int(a) for a in self.mirror_axes))


# ==========================================================================================
# geometry: input grid (X, Y, Z) <-> nnU-Net network space
# ==========================================================================================

@dataclass(frozen=True)
class NetworkGeometry:
    """How nnU-Net's preprocessing maps the input grid to network space.

    nnU-Net: nibabel ``(X, Y, Z)`` -> SimpleITK order ``(Z, Y, X)`` -> ``transpose_forward``
    -> crop to the non-zero bounding box -> resample to the plan spacing. Every step is a
    per-axis map, so network axis ``j`` is input axis ``axes[j]`` and its voxel ``e`` sits
    at input coordinate ``crop_start[j] + (e + 0.5) * crop_size[j] / network_shape[j] - 0.5``
    (skimage / scipy half-voxel convention of nnU-Net's resampling).

    Attributes
    ----------
    input_shape : (3,) int, (X, Y, Z)
    network_shape : (3,) int, the preprocessed tensor's spatial shape
    axes : (3,) int, input axis of each network axis
    crop_start, crop_size : (3,) int, per network axis, the non-zero bounding box on that
        input axis (``bbox_used_for_cropping``) and its size
    input_spacing : (3,) float, mm, per network axis (input voxel size along ``axes[j]``)
    network_spacing : (3,) float, mm, the plan spacing per network axis
    nearest_axis : int or None
        Network axis that nnU-Net's export resamples with nearest neighbour (separate-z,
        ``order_z = 0``), None when it resamples linearly along all axes.
    """

    input_shape: tuple[int, int, int]
    network_shape: tuple[int, int, int]
    axes: tuple[int, int, int]
    crop_start: tuple[int, int, int]
    crop_size: tuple[int, int, int]
    input_spacing: tuple[float, float, float]
    network_spacing: tuple[float, float, float]
    nearest_axis: int | None = None

    @property
    def scale(self) -> np.ndarray:
        """Input voxels per network voxel along each network axis."""
        return np.asarray(self.crop_size, float) / np.asarray(self.network_shape, float)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def geometry_from_properties(properties: dict, network_shape: Sequence[int], input_shape: Sequence[int],
                             transpose_forward: Sequence[int], network_spacing: Sequence[float],
                             export_kwargs: dict | None = None) -> NetworkGeometry:
    """Build a :class:`NetworkGeometry` from what nnU-Net's preprocessing returns.

    Parameters
    ----------
    properties : dict
        From :meth:`EnsemblePredictor.preprocess` (``spacing``, ``bbox_used_for_cropping``,
        ``shape_after_cropping_and_before_resampling``).
    network_shape : 3 ints, spatial shape of the preprocessed tensor
    input_shape : 3 ints, (X, Y, Z)
    transpose_forward : the plans' ``transpose_forward``
    network_spacing : the configuration's spacing (network axis order)
    export_kwargs : dict, optional
        ``configuration_manager.resampling_fn_probabilities_kwargs`` (``order_z``,
        ``force_separate_z``); decides the nearest-neighbour axis as nnU-Net's export does.
    """
    tf = [int(t) for t in transpose_forward]
    axes = tuple(2 - t for t in tf)  # SimpleITK axis t is nibabel axis 2 - t
    bbox = properties["bbox_used_for_cropping"]
    crop_start = tuple(int(b[0]) for b in bbox)
    crop_size = tuple(int(s) for s in properties["shape_after_cropping_and_before_resampling"])
    spacing_sitk = [float(s) for s in properties["spacing"]]
    input_spacing = tuple(spacing_sitk[t] for t in tf)
    net_spacing = tuple(float(s) for s in network_spacing)
    kwargs = dict(export_kwargs or {})
    nearest_axis = None
    if int(kwargs.get("order_z", 0)) == 0 and tuple(crop_size) != tuple(int(s) for s in network_shape):
        force = kwargs.get("force_separate_z", None)
        axis = None
        if force is not None:
            axis = _lowres_axis(net_spacing) if force else None
        elif max(net_spacing) / min(net_spacing) > ANISO_THRESHOLD:
            axis = _lowres_axis(net_spacing)
        elif max(input_spacing) / min(input_spacing) > ANISO_THRESHOLD:
            axis = _lowres_axis(input_spacing)
        nearest_axis = axis
    return NetworkGeometry(
        input_shape=tuple(int(s) for s in input_shape), network_shape=tuple(int(s) for s in network_shape),
        axes=axes, crop_start=crop_start, crop_size=crop_size, input_spacing=input_spacing,
        network_spacing=net_spacing, nearest_axis=nearest_axis,
    )


def _lowres_axis(spacing) -> int | None:
    spacing = np.asarray(spacing, float)
    axes = np.where(spacing.max() / spacing == 1)[0]
    return int(axes[0]) if len(axes) == 1 else None


def _input_index_of_network_voxels(geom: NetworkGeometry, j: int, e: np.ndarray) -> np.ndarray:
    """Nearest input voxel (on input axis ``axes[j]``) of network voxels ``e`` along axis j."""
    coord = (np.asarray(e, float) + 0.5) * geom.scale[j] - 0.5
    idx = np.floor(coord + 0.5).astype(np.int64)  # scipy's order-0 rounding (half up)
    return geom.crop_start[j] + np.clip(idx, 0, geom.crop_size[j] - 1)


def instances_to_network(instances: np.ndarray, geom: NetworkGeometry) -> np.ndarray:
    """Instance map on the input grid -> network space (nearest neighbour).

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)
    geom : NetworkGeometry

    Returns
    -------
    ndarray of int32, shape ``geom.network_shape``
        Lesions that nearest-neighbour sampling misses entirely (smaller than a network voxel)
        get the network voxel nearest to their centroid, unless another lesion holds it.
    """
    inst = np.asarray(instances)
    if inst.shape != tuple(geom.input_shape):
        raise ValueError(f"instance map shape {inst.shape} != input shape {geom.input_shape}")
    idx = [None, None, None]
    for j in range(3):
        idx[geom.axes[j]] = _input_index_of_network_voxels(geom, j, np.arange(geom.network_shape[j]))
    sub = inst[np.ix_(*idx)]  # input axis order
    net = np.ascontiguousarray(np.transpose(sub, geom.axes)).astype(np.int32)
    present = np.zeros(int(inst.max(initial=0)) + 1, bool)
    present[np.unique(net)] = True
    labels = np.unique(inst[inst > 0])
    missing = [int(lab) for lab in labels if not present[lab]]
    if missing:
        centres = ndimage.center_of_mass(inst > 0, inst, missing)
        for lab, c in zip(missing, centres):
            e = [int(np.clip(np.floor(input_to_network_coord(geom, j, c[geom.axes[j]]) + 0.5), 0,
                             geom.network_shape[j] - 1)) for j in range(3)]
            if net[tuple(e)] == 0:
                net[tuple(e)] = lab
    return net


def input_to_network_coord(geom: NetworkGeometry, j: int, a):
    """Input coordinate along input axis ``axes[j]`` -> continuous network coordinate on axis j."""
    return (np.asarray(a, float) - geom.crop_start[j] + 0.5) / geom.scale[j] - 0.5


def network_box_to_input_box(geom: NetworkGeometry, box) -> list[tuple[int, int]]:
    """Input-grid box (in input axis order) whose values a network-space box determines.

    ``box`` is ``[(lo, hi)] * 3`` in network axes, already inside the network volume.
    Input voxels outside nnU-Net's non-zero crop are excluded (their probability/saliency is
    not defined by the network).
    """
    out = [None, None, None]
    for j in range(3):
        lo, hi = box[j]
        start = geom.crop_start[j]
        stop = start + geom.crop_size[j]
        a_lo = math.ceil(start + (lo + 0.5) * geom.scale[j] - 0.5 - 1e-9) if lo > 0 else start
        a_hi = math.floor(start + (hi - 1 + 0.5) * geom.scale[j] - 0.5 + 1e-9) + 1 \
            if hi < geom.network_shape[j] else stop
        out[geom.axes[j]] = (max(start, a_lo), min(stop, max(a_lo, a_hi)))
    return out


def _interp_axis(x: np.ndarray, axis: int, coord: np.ndarray, nearest: bool) -> np.ndarray:
    n = x.shape[axis]
    if nearest:
        idx = np.clip(np.floor(coord + 0.5).astype(np.int64), 0, n - 1)
        return np.take(x, idx, axis=axis)
    i0 = np.floor(coord).astype(np.int64)
    w = (coord - i0).astype(x.dtype if x.dtype.kind == "f" else np.float64)
    i1 = np.clip(i0 + 1, 0, n - 1)
    i0 = np.clip(i0, 0, n - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return np.take(x, i0, axis=axis) * (1 - w) + np.take(x, i1, axis=axis) * w


def network_to_input(maps: np.ndarray, geom: NetworkGeometry, box=None, full: bool = False):
    """Maps on (a box of) network space -> the input grid, as nnU-Net's export does.

    Linear interpolation (nearest along ``geom.nearest_axis``), half-voxel convention, edge
    clamping, insertion into the non-zero crop, transposition back to ``(X, Y, Z)``.

    Parameters
    ----------
    maps : ndarray, shape (C, n0, n1, n2)
        Values on the network-space box ``box``.
    geom : NetworkGeometry
    box : sequence of 3 (lo, hi) or None
        Network-space box of ``maps`` (None: the whole network volume).
    full : bool
        Return the whole input grid (zeros outside) instead of the smallest input box.

    Returns
    -------
    values : ndarray of float32, shape (C, bx, by, bz) or (C, X, Y, Z) when ``full``
    input_box : list of 3 (start, stop) in input axis order (the whole grid when ``full``)
    """
    maps = np.asarray(maps)
    if maps.ndim != 4:
        raise ValueError(f"expected (C, n0, n1, n2) maps, got shape {maps.shape}")
    if box is None:
        box = [(0, s) for s in geom.network_shape]
    box = [(int(lo), int(hi)) for lo, hi in box]
    if tuple(hi - lo for lo, hi in box) != maps.shape[1:]:
        raise ValueError(f"maps shape {maps.shape[1:]} does not match the box {box}")
    in_box = network_box_to_input_box(geom, box)
    values = maps.astype(np.float32, copy=False)
    for j in range(3):
        a = np.arange(*in_box[geom.axes[j]])
        coord = input_to_network_coord(geom, j, a) - box[j][0]
        values = _interp_axis(values, j + 1, coord, nearest=geom.nearest_axis == j)
    # network axis j -> input axis axes[j]
    inv = np.argsort(geom.axes)
    values = np.ascontiguousarray(np.transpose(values, (0, *(inv + 1))), dtype=np.float32)
    if not full:
        return values, in_box
    out = np.zeros((maps.shape[0], *geom.input_shape), np.float32)
    out[(slice(None), *[slice(lo, hi) for lo, hi in in_box])] = values
    return out, [(0, s) for s in geom.input_shape]


# ==========================================================================================
# network helpers
# ==========================================================================================

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


def _set_norm_mode(norms: list, mode: str, stats: list | None = None) -> None:
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


class _Mirrored:
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


# ==========================================================================================
# counter-based Gaussian noise
# ==========================================================================================

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


# ==========================================================================================
# CAM formulations
# ==========================================================================================

def cam_from_gradients(activations, gradients, formulation: str):
    """One Grad-CAM-family map per batch item, at the layer's resolution (not normalised).

    Parameters
    ----------
    activations, gradients : torch.Tensor, shape (B, F, *S)
        Layer output ``A`` and ``dS/dA``.
    formulation : one of :data:`CAM_FORMULATIONS`
        * gradcam: ``w_k = mean_u g_k(u)``, ``ReLU(sum_k w_k A_k)``;
        * gradcampp: ``alpha = g^2 / (2 g^2 + sum_u A g^3)`` (1 where the denominator is 0),
          ``w_k = sum_u alpha ReLU(g)``, ``ReLU(sum_k w_k A_k)``; no ``exp(S)`` factor (it
          cancels in alpha and only rescales w);
        * gradcampp-elementwise: Grad-CAM++'s alpha kept per voxel instead of pooled (what
          LayerCAM does to Grad-CAM), on the positive gradients and activations its
          derivation assumes: ``g+ = ReLU(g)``,
          ``alpha = g+^2 / (2 g+^2 + sum_u ReLU(A) g+^3)`` (0 where g+ = 0),
          ``ReLU(sum_k alpha_k(u) g+_k(u) A_k(u))``; the denominator is >= 2 g+^2, so it never
          blows up;
        * hirescam: ``ReLU(sum_k g_k A_k)`` (element-wise);
        * layercam: ``ReLU(sum_k ReLU(g_k) A_k)`` (element-wise).

    Returns
    -------
    torch.Tensor, shape (B, *S), >= 0
    """
    import torch

    A, g = activations, gradients
    spatial = tuple(range(2, A.ndim))
    if formulation == "gradcam":
        w = g.mean(dim=spatial, keepdim=True)
        cam = (w * A).sum(1)
    elif formulation == "gradcampp":
        g2 = g * g
        g3 = g2 * g
        denom = 2 * g2 + (A * g3).sum(dim=spatial, keepdim=True)
        denom = torch.where(denom != 0, denom, torch.ones_like(denom))
        alpha = g2 / (denom + 1e-7)
        w = (alpha * torch.relu(g)).sum(dim=spatial, keepdim=True)
        cam = (w * A).sum(1)
    elif formulation == "gradcampp-elementwise":
        gp = torch.relu(g)
        g2 = gp * gp
        denom = 2 * g2 + (torch.relu(A) * g2 * gp).sum(dim=spatial, keepdim=True)
        alpha = torch.where(denom > 0, g2 / torch.where(denom > 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(denom))
        cam = (alpha * gp * A).sum(1)
    elif formulation == "hirescam":
        cam = (g * A).sum(1)
    elif formulation == "layercam":
        cam = (torch.relu(g) * A).sum(1)
    else:
        raise ValueError(f"unknown CAM formulation {formulation!r}; known: {CAM_FORMULATIONS}")
    return torch.relu(cam)


def _minmax(x, dims):
    """Min-max normalise to [0, 1] with max 1 over ``dims`` (all-constant maps give 0)."""
    import torch

    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    rng = hi - lo
    return torch.where(rng > 0, (x - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(x))


# ==========================================================================================
# the engine (network space)
# ==========================================================================================

@dataclass
class NetworkLesionMaps:
    """Maps of one lesion in network space.

    Attributes
    ----------
    label, lesion_class : int
    box : list of 3 (lo, hi)
        Network-space box of the maps: the lesion's crop, cut to the volume.
    maps : dict of name -> ndarray of float32, shape (K or 1, *box shape)
    n_voxels : int, lesion voxels in network space
    n_groups : int, voxel groups of the max aggregation
    crop : list of 3 (lo, hi), the crop the network saw (sides multiples of the total
        stride; may extend beyond the volume, where it is zero-padded)
    """

    label: int
    lesion_class: int
    box: list
    maps: dict = field(default_factory=dict)
    n_voxels: int = 0
    n_groups: int = 0
    crop: list = field(default_factory=list)


def _crop_shape(extent, margin, stride, min_side) -> tuple[int, ...]:
    out = []
    for e, m, s, ms in zip(extent, margin, stride, min_side):
        side = max(int(e) + 2 * int(m), int(ms))
        out.append(int(math.ceil(side / s) * s))
    return tuple(out)


def _buckets(shapes: list[tuple[int, ...]], waste: float = 2.0) -> list[tuple[tuple[int, ...], list[int]]]:
    """Group lesions whose crops can share one shape (at most ``waste`` x their own volume)."""
    order = sorted(range(len(shapes)), key=lambda i: -int(np.prod(shapes[i])))
    buckets: list[tuple[tuple[int, ...], list[int]]] = []
    for i in order:
        for shape, members in buckets:
            if all(a >= b for a, b in zip(shape, shapes[i])) and np.prod(shape) <= waste * np.prod(shapes[i]):
                members.append(i)
                break
        else:
            buckets.append((shapes[i], [i]))
    return buckets


def _extract(volume, box):
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


def _group_map(coords: np.ndarray, box, shape, max_groups: int) -> tuple[np.ndarray, int]:
    """Crop-shaped int map: 0 outside the lesion, 1..G spatially compact lesion voxel groups.

    Groups come from recursive median splits of the largest group along its longest extent
    (a k-d tree), so they are compact blobs of near-equal size; with at least as many groups
    as voxels every voxel is its own group (exact max aggregation).
    """
    n = len(coords)
    g = max(1, min(max_groups, n))
    groups = [np.arange(n)]
    while len(groups) < g:
        i = max(range(len(groups)), key=lambda k: len(groups[k]))
        idx = groups.pop(i)
        pts = coords[idx]
        axis = int(np.argmax(pts.max(0) - pts.min(0)))
        order = idx[np.lexsort((pts[:, (axis + 2) % 3], pts[:, (axis + 1) % 3], pts[:, axis]))]
        half = len(order) // 2
        groups += [order[:half], order[half:]]
    groups.sort(key=lambda a: int(a.min()))
    labels = np.zeros(n, np.int64)
    for k, idx in enumerate(groups):
        labels[idx] = k + 1
    gmap = np.zeros(shape, np.int64)
    local = coords - np.asarray([lo for lo, _ in box])
    gmap[tuple(local.T)] = labels
    return gmap, g


def _layer_outputs(net, layers: dict):
    """Register forward hooks that store the outputs of the named layers; returns (store, handles)."""
    store: dict[str, Any] = {}
    handles = []
    for key, name in layers.items():
        module = resolve_layer(net, name)

        def hook(m, i, o, key=key):
            store[key] = o

        handles.append(module.register_forward_hook(hook))
    return store, handles


def explain_network_space(
    networks: Sequence,
    data,
    lesions: np.ndarray,
    lesion_classes: dict[int, int],
    config: ExplainConfig = ExplainConfig(),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    device=None,
    member_names: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    timings: dict | None = None,
    patch_size: Sequence[int] | None = None,
) -> list[NetworkLesionMaps]:
    """Explain every lesion of a network-space instance map.

    Parameters
    ----------
    networks : sequence of torch.nn.Module
        The ensemble members (``(B, K, *S) -> (B, C, *S)`` logits). Copied, never modified.
    data : torch.Tensor or ndarray, shape (K, n0, n1, n2)
        The preprocessed (normalised, resampled) input.
    lesions : ndarray of int, shape (n0, n1, n2)
        Instance map in network space (0 background).
    lesion_classes : dict
        ``{label: class index}`` of the lesions to explain (in label order).
    config : ExplainConfig
    spacing : 3 floats, mm per network axis (for the context margin)
    device : torch.device or None (CPU)
    member_names : names of the members (``members='each'`` map suffixes)
    progress : callable or None, ``progress(done_items, total_items)``
    timings : dict or None, filled with seconds per phase
    patch_size : 3 ints or None
        The network's training patch (network axes): the window of the frozen normalisation
        statistics (``norm_stats='window'``); None uses each lesion's own crop.

    Returns
    -------
    list of NetworkLesionMaps, in label order
        Maps: ``smoothgrad_mean``/``smoothgrad_max`` (K, *S) raw gradients averaged over the
        samples; ``gradcam``/``gradcampp`` (1, *S) in [0, 1]. Empty list when there are no lesions.
    """
    import torch

    cfg = config.checked()
    device = torch.device("cpu") if device is None else torch.device(device)
    if cfg.max_batch_voxels is None:
        cfg = replace(cfg, max_batch_voxels=(1 << 23) if device.type == "cuda" else (1 << 21))
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    data = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
    data = data.to(device=device, dtype=dtype)
    nets = prepare_networks(networks, device, dtype)
    names = [str(n) for n in (member_names or range(len(nets)))]
    lesions = np.asarray(lesions)
    if lesions.shape != tuple(data.shape[1:]):
        raise ValueError(f"lesion map {lesions.shape} does not match the data {tuple(data.shape[1:])}")
    labels = sorted(int(k) for k in lesion_classes)
    if not labels:
        return []
    stride = total_stride(nets[0])
    coords_all = {}
    flat = np.flatnonzero(lesions)
    lab_flat = lesions.reshape(-1)[flat]
    order = np.argsort(lab_flat, kind="stable")
    flat, lab_flat = flat[order], lab_flat[order]
    starts = np.searchsorted(lab_flat, np.asarray(labels), side="left")
    stops = np.searchsorted(lab_flat, np.asarray(labels), side="right")
    for lab, a, b in zip(labels, starts, stops):
        coords_all[lab] = np.stack(np.unravel_index(flat[a:b], lesions.shape), axis=1)

    for lab in labels:
        if len(coords_all[lab]) == 0:
            raise ValueError(f"lesion {lab} has no voxel in network space")
    min_side = [cfg.min_crop_stride_multiple * s for s in stride]
    t = timings if timings is not None else {}

    # Every box lies on one stride lattice (the whole-volume box's), so that all crops see the
    # network's down-sampling grid in the same phase (a U-Net is shift-equivariant only by
    # multiples of its total stride) and full mode computes the same function.
    full_shape = [int(math.ceil(max(n, ms) / s) * s) for n, s, ms in zip(lesions.shape, stride, min_side)]
    full_box = [(-((fs - n) // 2), -((fs - n) // 2) + fs) for fs, n in zip(full_shape, lesions.shape)]

    def box_for(lab, shape):
        c = coords_all[lab]
        lo, hi = c.min(0), c.max(0) + 1
        box = []
        for j in range(3):
            f0, f1 = full_box[j]
            s_j = stride[j]
            want = (lo[j] + hi[j]) / 2.0 - shape[j] / 2.0
            start = f0 + int(round((want - f0) / s_j)) * s_j
            if shape[j] <= f1 - f0:  # inside the (stride-padded) volume when it fits
                start = min(max(start, f0), f1 - shape[j])
            else:  # centre the volume in the crop, on the lattice
                start = f0 - ((shape[j] - (f1 - f0)) // (2 * s_j)) * s_j
            box.append((int(start), int(start) + int(shape[j])))
        return box

    def crop_shape_for(lab, margin_vox):
        c = coords_all[lab]
        return _crop_shape(c.max(0) + 1 - c.min(0), margin_vox, stride, min_side)

    # ---- the window of each lesion: the training patch centred on it (its own crop without one)
    if patch_size is not None:
        wshape = _crop_shape((0, 0, 0), (0, 0, 0), stride, [max(int(p), m) for p, m in zip(patch_size, min_side)])
    else:
        wshape = None

    # ---- frozen normalisation statistics: one clean window per lesion and member (the patch,
    # or larger for a lesion that needs more than a patch with its context)
    m0 = np.ceil(max(float(cfg.margin_mm or 0.0), cfg.context_mm) / np.asarray(spacing, float)).astype(int)
    if wshape is None:
        win = {lab: box_for(lab, crop_shape_for(lab, m0)) for lab in labels}
    else:
        # a tile is never larger than the (stride-padded) volume unless the patch itself is
        win = {lab: box_for(lab, tuple(max(w, min(c, f)) for w, c, f in zip(wshape, crop_shape_for(lab, m0),
                                                                               full_shape)))
               for lab in labels}
    t0 = time.perf_counter()
    stats = None
    if cfg.norm_stats == "window" and any(net._msx_norms for net in nets):
        stats = _record_window_stats(nets, data, win, cfg.max_batch_voxels, cfg.max_batch)
    t["norm_stats_s"] = t.get("norm_stats_s", 0.0) + time.perf_counter() - t0

    # ---- context margin: given, or measured (effective receptive field of the largest lesions)
    erf_radius = None
    if cfg.margin_mm is None:
        t0 = time.perf_counter()
        if wshape is not None:
            by_size = sorted(labels, key=lambda lab: -len(coords_all[lab]))
            picks = [by_size[i] for i in (0, len(by_size) // 2, len(by_size) - 1)]
            probe = list(dict.fromkeys(picks))[:max(1, int(cfg.erf_lesions))]
            radii = []
            for k, net in enumerate(nets):
                for lab in probe:  # windows may differ in shape: one pass each
                    st = None if stats is None else [stats[k][lab]]
                    radii += _erf_radii(net, data, [(coords_all[lab], win[lab], lesion_classes[lab])], st,
                                        cfg.erf_mass)
            # never larger than what the window itself can show
            erf_radius = int(min(max(radii), min(wshape) // 2))
            margin_mm = np.maximum(cfg.context_mm, erf_radius * np.asarray(spacing, float))
        else:
            rf = np.asarray(receptive_field(nets[0]), float)
            margin_mm = np.maximum(cfg.context_mm, 0.5 * (rf - 1) / 2 * np.asarray(spacing, float))
        t["margin_s"] = time.perf_counter() - t0
    else:
        margin_mm = np.full(3, max(float(cfg.margin_mm), 0.0))
    margin = np.ceil(margin_mm / np.asarray(spacing, float) - 1e-9).astype(int)
    t["margin_vox"] = [int(v) for v in margin]
    t["erf_radius_vox"] = erf_radius

    # ---- crops, grouped into buckets of one shape
    shapes = [crop_shape_for(lab, margin) for lab in labels]
    buckets = _buckets(shapes)
    results = {}
    for bucket_shape, idxs in buckets:
        for i in idxs:
            lab = labels[i]
            results[lab] = NetworkLesionMaps(label=lab, lesion_class=int(lesion_classes[lab]),
                                             box=box_for(lab, bucket_shape), n_voxels=int(len(coords_all[lab])))
    if cfg.mode == "full":
        buckets = [(tuple(full_shape), [i for _, idxs in buckets for i in idxs])]

    def batch_stats(members, item_labels):
        if stats is None:
            return None
        return {k: [(torch.stack([stats[k][lab][i][0] for lab in item_labels]),
                     torch.stack([stats[k][lab][i][1] for lab in item_labels]))
                    for i in range(len(nets[k]._msx_norms))] for k in members}

    sigma = float(cfg.noise_level) * float(data[0].max() - data[0].min())
    run_members = [[k] for k in range(len(nets))] if cfg.members == "each" else [list(range(len(nets)))]
    want_sg = "smoothgrad" in cfg.methods
    cams = [m for m in cfg.methods if m != "smoothgrad"]
    n_items_total = len(labels) * (cfg.n_samples * want_sg + bool(cams)) * len(run_members)
    done = 0
    t.setdefault("smoothgrad_s", 0.0)
    t.setdefault("cam_s", 0.0)

    for bucket_shape, idxs in buckets:
        blabs = [labels[i] for i in idxs]
        crop_shape = tuple(bucket_shape)
        in_boxes = {lab: (results[lab].box if cfg.mode == "crop" else full_box) for lab in blabs}
        vox = int(np.prod(crop_shape))
        batch = max(1, min(cfg.max_batch, cfg.max_batch_voxels // vox))
        clean = {lab: _extract(data, in_boxes[lab]) for lab in blabs}
        gmaps = {}
        for lab in blabs:
            gm, g = _group_map(coords_all[lab], in_boxes[lab], crop_shape, cfg.max_groups)
            gmaps[lab] = torch.from_numpy(gm).to(device)
            results[lab].n_groups = g

        for members in run_members:
            suffix = "" if cfg.members == "mean" else f"@{names[members[0]]}"
            # ---------------- SmoothGrad
            if want_sg:
                t0 = time.perf_counter()
                K = data.shape[0]
                acc_mean = {lab: torch.zeros((K, *crop_shape), dtype=dtype, device=device) for lab in blabs}
                acc_max = {lab: torch.zeros((K, *crop_shape), dtype=dtype, device=device) for lab in blabs}
                items = [(lab, k) for lab in blabs for k in range(cfg.n_samples)]
                for b0 in range(0, len(items), batch):
                    chunk = items[b0:b0 + batch]
                    x0 = torch.stack([clean[lab] for lab, _ in chunk])
                    if sigma > 0:
                        noise = torch.cat([counter_noise(cfg.seed, [k], K, [lo for lo, _ in in_boxes[lab]], crop_shape,
                                                         device=device, dtype=dtype) for lab, k in chunk])
                        x0 = x0 + sigma * noise
                    cls = torch.tensor([results[lab].lesion_class for lab, _ in chunk], device=device)
                    gm = torch.stack([gmaps[lab] for lab, _ in chunk])
                    G = int(gm.max())
                    g_mean, g_max = _smoothgrad_batch(nets, members, x0, cls, gm, G, cfg.mirror_axes,
                                                      batch_stats(members, [lab for lab, _ in chunk]))
                    for bi, (lab, _) in enumerate(chunk):
                        acc_mean[lab] += g_mean[bi]
                        acc_max[lab] += g_max[bi]
                    done += len(chunk)
                    if progress is not None:
                        progress(done, n_items_total)
                for lab in blabs:
                    res_maps = results[lab].maps
                    res_maps["smoothgrad_mean" + suffix] = (acc_mean[lab] / cfg.n_samples).float().cpu().numpy()
                    res_maps["smoothgrad_max" + suffix] = (acc_max[lab] / cfg.n_samples).float().cpu().numpy()
                t["smoothgrad_s"] += time.perf_counter() - t0
            # ---------------- Grad-CAM family (clean input, no mirroring)
            if cams:
                t0 = time.perf_counter()
                for b0 in range(0, len(blabs), batch):
                    chunk = blabs[b0:b0 + batch]
                    x0 = torch.stack([clean[lab] for lab in chunk])
                    cls = torch.tensor([results[lab].lesion_class for lab in chunk], device=device)
                    masks = torch.stack([(gmaps[lab] > 0) for lab in chunk]).to(dtype)
                    layers = {m: cfg.cams[m][0] for m in cams}
                    forms = {m: cfg.cams[m][1] for m in cams}
                    bst = batch_stats(members, chunk)
                    cam = cam_batch([nets[k] for k in members], x0, cls, masks, layers, crop_shape, forms,
                                    stats=None if bst is None else [bst[k] for k in members])
                    for bi, lab in enumerate(chunk):
                        for m in cams:
                            results[lab].maps[m + suffix] = cam[m][bi][None].float().cpu().numpy()
                    done += len(chunk)
                    if progress is not None:
                        progress(done, n_items_total)
                t["cam_s"] += time.perf_counter() - t0

    # Keep every lesion's crop-mode box, cut to the volume (padding carries no information):
    # full mode thereby stores exactly what crop mode stores, and CAMs are normalised in that box.
    for lab in labels:
        res = results[lab]
        src = res.box if cfg.mode == "crop" else full_box
        box = [(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(res.box, lesions.shape)]
        sl = tuple(slice(lo - slo, hi - slo) for (lo, hi), (slo, _) in zip(box, src))
        for name in list(res.maps):
            arr = res.maps[name][(slice(None), *sl)]
            if name.split("@")[0] not in SMOOTHGRAD_MAPS:
                arr = _minmax_np(arr)
            res.maps[name] = np.ascontiguousarray(arr)
        res.crop = [tuple(b) for b in res.box]
        res.box = box
    return [results[lab] for lab in labels]


def _minmax_np(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(x, dtype=np.float32)


def _logit_of_class(out, cls):
    """(B, C, *S) logits, (B,) classes -> (B, *S) logit of each item's class."""
    idx = cls.view(-1, *([1] * (out.ndim - 1))).expand(-1, 1, *out.shape[2:])
    return out.gather(1, idx)[:, 0]


def _erf_radii(net, data, lesions: list, stats: dict | None, mass: float) -> list[int]:
    """Chebyshev radius (voxels) around each lesion holding ``mass`` of ``|dS/dx|`` on its clean
    window (one batched forward/backward). ``lesions``: list of (coords, window box, class);
    ``stats``: frozen statistics per lesion index, or None (live)."""
    import torch

    x = torch.stack([_extract(data, box) for _, box, _ in lesions]).clone().requires_grad_(True)
    masks = np.zeros((len(lesions), *x.shape[2:]), bool)
    for i, (coords, box, _) in enumerate(lesions):
        local = coords - np.asarray([lo for lo, _ in box])
        masks[i][tuple(local.T)] = True
    if stats is not None:
        _set_norm_mode(net._msx_norms, "frozen", [
            (torch.stack([stats[i][k][0] for i in range(len(lesions))]),
             torch.stack([stats[i][k][1] for i in range(len(lesions))])) for k in range(len(net._msx_norms))])
    try:
        cls = torch.tensor([int(c) for _, _, c in lesions], device=x.device)
        with torch.enable_grad():
            z = _logit_of_class(net(x), cls)
            (g,) = torch.autograd.grad((z * torch.from_numpy(masks).to(z)).sum(), x)
    finally:
        _set_norm_mode(net._msx_norms, "live")
    a_all = g.abs().sum(1).double().cpu().numpy()
    out = []
    for i in range(len(lesions)):
        a = a_all[i]
        total = a.sum()
        if total <= 0:
            out.append(0)
            continue
        d = ndimage.distance_transform_cdt(~masks[i], metric="chessboard")
        cum = np.cumsum(np.bincount(d.ravel(), weights=a.ravel())) / total
        out.append(int(np.searchsorted(cum, mass - 1e-12)))
    return out


def _record_window_stats(nets, data, windows: dict, max_voxels: int, max_batch: int) -> list[dict]:
    """Per member, per lesion: the (mean, var) of every InstanceNorm on the lesion's clean window."""
    import torch

    out = []
    labs = list(windows)
    by_shape: dict[tuple, list] = {}
    for lab in labs:
        by_shape.setdefault(tuple(hi - lo for lo, hi in windows[lab]), []).append(lab)
    for net in nets:
        per_lab: dict[int, list] = {}
        _set_norm_mode(net._msx_norms, "record")
        try:
            for shape, group in by_shape.items():
                batch = max(1, min(max_batch, max_voxels // int(np.prod(shape))))
                for b0 in range(0, len(group), batch):
                    chunk = group[b0:b0 + batch]
                    x = torch.stack([_extract(data, windows[lab]) for lab in chunk])
                    with torch.no_grad():
                        net(x)
                    for bi, lab in enumerate(chunk):
                        per_lab[lab] = [(n.recorded[0][bi], n.recorded[1][bi]) for n in net._msx_norms]
        finally:
            _set_norm_mode(net._msx_norms, "live")
            for n in net._msx_norms:
                n.recorded = None
        out.append(per_lab)
    return out


def _smoothgrad_batch(nets, members, x0, cls, gmap, n_groups, mirror_axes, stats=None):
    """Mean- and max-aggregated gradients of one batch of (noisy) inputs.

    ``gmap`` (B, *S) holds the voxel groups 1..G of each item's lesion (0 elsewhere). For
    each member the logits are computed once and one backward pass per group gives
    ``g_{item, group}``; the mean aggregation is the sum over groups (= dS/dx), the max
    aggregation keeps, per input voxel, the member-averaged group gradient of largest |.|.
    """
    import torch

    M = len(members)
    acc = None
    if n_groups > 1 and M > 1:
        acc = torch.zeros((n_groups, *x0.shape), dtype=x0.dtype, device=x0.device)
    g_sum = torch.zeros_like(x0)
    g_max = torch.zeros_like(x0)
    masks = [(gmap == g + 1).to(x0.dtype) for g in range(n_groups)]
    for k in members:
        if stats is not None:
            _set_norm_mode(nets[k]._msx_norms, "frozen", stats[k])
        net = nets[k] if not mirror_axes else _Mirrored(nets[k], mirror_axes)
        x = x0.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            z = _logit_of_class(net(x), cls)
            for g in range(n_groups):
                (grad,) = torch.autograd.grad(z, x, grad_outputs=masks[g], retain_graph=g < n_groups - 1)
                g_sum += grad / M
                if n_groups == 1:
                    continue
                if acc is not None:
                    acc[g] += grad / M
                else:
                    _update_signed_max(g_max, grad)
        del z, x
        _set_norm_mode(nets[k]._msx_norms, "live")
    if n_groups == 1:
        g_max = g_sum.clone()
    elif acc is not None:
        for g in range(n_groups):
            _update_signed_max(g_max, acc[g])
    return g_sum, g_max


def _update_signed_max(running, new):
    import torch

    take = new.abs() > running.abs()
    running.copy_(torch.where(take, new, running))


def cam_batch(nets, x0, cls, masks, layers: dict, out_shape, formulations: dict | None = None, stats=None):
    """Grad-CAM-family maps of a batch of clean crops, averaged over members.

    Parameters
    ----------
    nets : list of networks (already prepared: eval, frozen)
    x0 : torch.Tensor (B, K, *S)
    cls : torch.Tensor (B,) lesion classes
    masks : torch.Tensor (B, *S) lesion footprints (1 inside the lesion)
    layers : dict ``{map name: layer path}``
    out_shape : the crop shape *S (CAMs are upsampled trilinearly to it)
    formulations : dict ``{map name: formulation}``; default: the map name itself
    stats : list (per network) of frozen InstanceNorm statistics, or None (live)

    Returns
    -------
    dict of map name -> torch.Tensor (B, *S), min-max normalised per item (max 1), the
    mean over members of the per-member normalised maps, renormalised.
    """
    import torch
    import torch.nn.functional as F

    formulations = formulations or {m: m for m in layers}
    sums = {m: 0 for m in layers}
    dims = tuple(range(1, 1 + len(out_shape)))
    for ni, net in enumerate(nets):
        store, handles = _layer_outputs(net, layers)
        if stats is not None and getattr(net, "_msx_norms", None):
            _set_norm_mode(net._msx_norms, "frozen", stats[ni])
        try:
            x = x0.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = net(x)
                score = (_logit_of_class(out, cls) * masks).sum()
                keys = list(layers)
                acts = [store[m] for m in keys]
                grads = torch.autograd.grad(score, acts)
        finally:
            for h in handles:
                h.remove()
            if getattr(net, "_msx_norms", None):
                _set_norm_mode(net._msx_norms, "live")
        for m, A, g in zip(keys, acts, grads):
            cam = cam_from_gradients(A.detach(), g, formulations[m])
            cam = F.interpolate(cam[:, None], size=tuple(out_shape), mode="trilinear", align_corners=False)[:, 0]
            sums[m] = sums[m] + _minmax(torch.relu(cam), dims)
    return {m: _minmax(s / len(nets), dims) for m, s in sums.items()}


# ==========================================================================================
# the case-level entry point (input grid in, store out)
# ==========================================================================================

@dataclass
class SaliencyStore:
    """Per-lesion saliency crops on the input grid (what :mod:`bids_app.formats.saliency_store` saves).

    Attributes
    ----------
    shape : (3,) int, the input grid (X, Y, Z)
    zooms : (3,) float, voxel size in mm along X, Y, Z
    labels : ndarray of int32 (L,), lesion labels of the instance map, ascending
    classes : ndarray of int32 (L,), model label index of each lesion
    bbox : ndarray of int32 (L, 2, 3), ``[start, stop)`` of each lesion's crop on the input
        grid, (X, Y, Z) order
    maps : dict of name -> list of L ndarrays of float32, each (Kc, sx, sy, sz)
        ``smoothgrad_mean`` / ``smoothgrad_max`` (Kc = channels), ``gradcam`` /
        ``gradcampp`` (Kc = 1); per-member maps are named ``<map>@<fold>``.
    instances : list of L ndarrays of int32 (sx, sy, sz), the instance map inside each crop
    channel_names : list of str (K,)
    meta : dict, parameters and provenance (JSON-able)
    """

    shape: tuple[int, int, int]
    zooms: tuple[float, float, float]
    labels: np.ndarray
    classes: np.ndarray
    bbox: np.ndarray
    maps: dict
    instances: list
    channel_names: list
    meta: dict = field(default_factory=dict)

    @property
    def n_lesions(self) -> int:
        return int(len(self.labels))

    def slices(self, i: int) -> tuple[slice, slice, slice]:
        return tuple(slice(int(a), int(b)) for a, b in zip(self.bbox[i, 0], self.bbox[i, 1]))

    def map_channels(self, name: str) -> list[str]:
        """Channel names of a map: the input channels for SmoothGrad, ``['cam']`` for CAMs."""
        return list(self.channel_names) if name.split("@")[0] in SMOOTHGRAD_MAPS else ["cam"]


def member_networks(predictor) -> tuple[list, list[str]]:
    """One network per member of an :class:`~bids_app.core.segment.EnsemblePredictor`."""
    return predictor.member_networks()


def predictor_geometry(predictor, properties: dict, network_shape, input_shape) -> NetworkGeometry:
    """:class:`NetworkGeometry` of one case preprocessed by ``predictor``."""
    cm = predictor.configuration_manager
    kwargs = getattr(cm, "resampling_fn_probabilities_kwargs", None)
    if kwargs is None:
        kwargs = cm.configuration.get("resampling_fn_probabilities_kwargs", {})
    return geometry_from_properties(properties, network_shape, input_shape,
                                    predictor.plans_manager.transpose_forward, cm.spacing, kwargs)


def explain_case(
    predictor,
    channels: np.ndarray,
    zooms: Sequence[float],
    instances: np.ndarray,
    instance_class: np.ndarray,
    config: ExplainConfig = ExplainConfig(),
    channel_names: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    labels: Sequence[int] | None = None,
) -> SaliencyStore:
    """Explain every predicted lesion of one case (the function the workflow calls).

    Parameters
    ----------
    predictor : bids_app.core.segment.EnsemblePredictor
        Its members are explained on its device.
    channels : ndarray of float32, shape (K, X, Y, Z)
        The input channels exactly as given to ``predictor.predict``.
    zooms : 3 floats, mm along X, Y, Z
    instances : ndarray of int, shape (X, Y, Z)
        Lesion instance map (0 background, labels 1..n), e.g. ``LesionSegmentation.instances``.
    instance_class : ndarray of int, shape (n,)
        Class index of lesion ``i + 1`` (``LesionSegmentation.instance_class``).
    config : ExplainConfig
    channel_names : K names (default ``ch0..``)
    progress : callable or None
    labels : ints or None
        Explain only these lesion labels (default: all); the others stay in the instance
        crops (as neighbours) and are listed in ``meta['not_selected_labels']``.

    Returns
    -------
    SaliencyStore
        Lesions in label order; no lesion gives an empty store.
    """
    import torch

    cfg = config.checked()
    instances = np.asarray(instances)
    channels = np.asarray(channels)
    shape = tuple(int(s) for s in channels.shape[1:])
    if instances.shape != shape:
        raise ValueError(f"instance map {instances.shape} and channels {shape} differ")
    instance_class = np.asarray(instance_class, dtype=np.int32).reshape(-1)
    K = channels.shape[0]
    names = [str(n) for n in (channel_names or [f"ch{k}" for k in range(K)])]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data, properties = predictor.preprocess(channels, zooms)
    geom = predictor_geometry(predictor, properties, tuple(data.shape[1:]), shape)
    lesions_net = instances_to_network(instances, geom)
    timings["preprocess_s"] = time.perf_counter() - t0
    present = set(int(v) for v in np.unique(lesions_net)) - {0}
    wanted = set(range(1, len(instance_class) + 1)) if labels is None else {int(v) for v in labels}
    lesion_classes = {int(lab): int(instance_class[lab - 1]) for lab in range(1, len(instance_class) + 1)
                      if lab in present and lab in wanted}
    nets, member_names = member_networks(predictor)
    net_results = explain_network_space(
        nets, data, lesions_net, lesion_classes, cfg, spacing=geom.network_spacing, device=predictor.device,
        member_names=member_names, progress=progress, timings=timings,
        patch_size=tuple(int(v) for v in predictor.configuration_manager.patch_size),
    )
    del nets
    t0 = time.perf_counter()
    labels, classes, bboxes, inst_crops = [], [], [], []
    maps: dict[str, list] = {}
    for res in net_results:
        inner = [(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(res.box, geom.network_shape)]
        sl = tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(inner, res.box))
        in_box = None
        for name, arr in res.maps.items():
            vals, in_box = network_to_input(arr[(slice(None), *sl)], geom, inner)
            if name.split("@")[0] not in SMOOTHGRAD_MAPS:
                vals = np.clip(vals, 0, None)
                hi = vals.max()
                vals = vals / hi if hi > 0 else vals
            maps.setdefault(name, []).append(vals.astype(np.float32))
        labels.append(res.label)
        classes.append(res.lesion_class)
        bboxes.append([[a for a, _ in in_box], [b for _, b in in_box]])
        inst_crops.append(instances[tuple(slice(a, b) for a, b in in_box)].astype(np.int32))
    timings["map_back_s"] = time.perf_counter() - t0
    device = predictor.device if hasattr(predictor, "device") else torch.device("cpu")
    meta = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "target": "sum over the lesion's voxels of the pre-softmax logit of its class (network space)",
        "members": member_names,
        "explained": "ensemble mean of the members' gradients" if cfg.members == "mean" else "each member",
        "mirroring": None if cfg.mirror_axes is None else list(cfg.mirror_axes),
        "deep_supervision": False,
        "cams": {m: {"layer": canonical_layer_name(predictor.network, cfg.cams[m][0]),
                     "layer_path": cfg.cams[m][0], "formulation": cfg.cams[m][1]}
                 for m in cfg.methods if m != "smoothgrad"},
        "sigma": float(cfg.noise_level) * float(data[0].max() - data[0].min()),
        "network_stride": list(total_stride(predictor.network)),
        "receptive_field_vox": list(receptive_field(predictor.network)),
        "geometry": geom.to_dict(),
        "lesions_network_voxels": {str(r.label): r.n_voxels for r in net_results},
        "max_groups_used": {str(r.label): r.n_groups for r in net_results},
        "network_crops": {str(r.label): [list(b) for b in r.crop] for r in net_results},
        "skipped_labels": sorted((set(range(1, len(instance_class) + 1)) & wanted) - set(lesion_classes)),
        "not_selected_labels": sorted(set(range(1, len(instance_class) + 1)) - wanted),
        "margin_vox": timings.pop("margin_vox", None),
        "erf_radius_vox": timings.pop("erf_radius_vox", None),
        "device": str(device),
        "timings_s": timings,
    }
    return SaliencyStore(
        shape=shape, zooms=tuple(float(z) for z in zooms),
        labels=np.asarray(labels, np.int32), classes=np.asarray(classes, np.int32),
        bbox=np.asarray(bboxes, np.int32).reshape(-1, 2, 3), maps=maps, instances=inst_crops,
        channel_names=names, meta=meta,
    )


def reorient_store(store: SaliencyStore, ornt: np.ndarray) -> SaliencyStore:
    """The same store on another voxel order of the same grid (a flip/permutation).

    The workflow explains on the canonical (RAS+) grid the network was trained on and writes
    derivatives on the reference image's own grid; this maps the crops, their boxes, the
    shape and the voxel sizes exactly (no interpolation).

    Parameters
    ----------
    store : SaliencyStore
        On the grid of ``ornt``'s input axes.
    ornt : ndarray, shape (3, 2)
        nibabel orientation transform (``nibabel.orientations.ornt_transform``): input axis
        ``i`` becomes output axis ``ornt[i, 0]``, reversed when ``ornt[i, 1] == -1``.
    """
    import nibabel.orientations as nio

    ornt = np.asarray(ornt, float)
    dest = ornt[:, 0].astype(int)
    flip = ornt[:, 1] < 0
    shape = [0, 0, 0]
    zooms = [0.0, 0.0, 0.0]
    for i in range(3):
        shape[dest[i]] = int(store.shape[i])
        zooms[dest[i]] = float(store.zooms[i])
    bbox = np.zeros_like(np.asarray(store.bbox, np.int32).reshape(-1, 2, 3))
    for n, box in enumerate(np.asarray(store.bbox).reshape(-1, 2, 3)):
        for i in range(3):
            lo, hi = int(box[0, i]), int(box[1, i])
            if flip[i]:
                lo, hi = store.shape[i] - hi, store.shape[i] - lo
            bbox[n, 0, dest[i]], bbox[n, 1, dest[i]] = lo, hi

    def crop3(a):
        return np.ascontiguousarray(nio.apply_orientation(a, ornt))

    maps = {name: [np.stack([crop3(c) for c in crop]) for crop in crops] for name, crops in store.maps.items()}
    meta = dict(store.meta)
    meta["reoriented_from_grid"] = {"shape": [int(v) for v in store.shape], "ornt": ornt.tolist()}
    return SaliencyStore(shape=tuple(shape), zooms=tuple(zooms), labels=np.asarray(store.labels, np.int32),
                         classes=np.asarray(store.classes, np.int32), bbox=bbox, maps=maps,
                         instances=[crop3(c) for c in store.instances], channel_names=list(store.channel_names),
                         meta=meta)


# ==========================================================================================
# viewer maps and lesion-table summaries from a store
# ==========================================================================================

def summary_maps(store: SaliencyStore, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Whole-grid maps for viewers, one per map name (all channels).

    Each voxel takes the value of the lesion it belongs to; elsewhere the value of largest
    ``|.|`` among the lesions whose crops cover it (0 where none does).

    Returns
    -------
    dict of name -> ndarray of float32, shape (Kc, X, Y, Z)
    """
    names = list(store.maps) if names is None else list(names)
    out = {}
    for name in names:
        crops = store.maps[name]
        kc = crops[0].shape[0] if crops else 1
        best = np.zeros((kc, *store.shape), np.float32)
        owned = np.zeros(store.shape, bool)
        for i, crop in enumerate(crops):
            sl = store.slices(i)
            region = best[(slice(None), *sl)]
            mine = store.instances[i] == store.labels[i]
            take = (np.abs(crop) > np.abs(region)) & ~owned[sl][None]
            take |= mine[None]
            region[take] = crop[take]
            owned[sl] |= mine
        out[name] = best
    return out


def _shell(mask: np.ndarray, width: int = 2) -> np.ndarray:
    return ndimage.maximum_filter(mask, size=2 * width + 1) & ~mask


def lesion_summaries(store: SaliencyStore, names: Sequence[str] | None = None,
                     rim_width: int = 2) -> dict[str, np.ndarray]:
    """Per-lesion saliency summaries for the lesion table.

    For each map and channel (column prefix ``<map>_<channel>_``):

    * ``peak_in`` / ``peak_out``: the signed value of largest ``|s|`` inside the lesion /
      inside its crop outside the lesion;
    * ``mean_in``: mean of ``s`` inside the lesion (signed);
    * ``rim_ratio``: mean ``|s|`` in the ``rim_width``-voxel shell (5x5x5 cube dilation minus
      the lesion) / mean ``|s|`` inside (NaN when the inside is all zero);
    * ``mass_in``: fraction of the crop's ``|s|`` mass inside the lesion (NaN for an all-zero map).

    Returns
    -------
    dict of column -> ndarray (L,), ``label`` first
    """
    names = list(store.maps) if names is None else list(names)
    cols: dict[str, np.ndarray] = {"label": np.asarray(store.labels, np.int64)}
    L = store.n_lesions
    for name in names:
        chans = store.map_channels(name)
        for c, cname in enumerate(chans):
            pref = f"{name}_{cname}" if name.split("@")[0] in SMOOTHGRAD_MAPS else name
            vals = {k: np.full(L, np.nan) for k in ("peak_in", "peak_out", "mean_in", "rim_ratio", "mass_in")}
            for i in range(L):
                s = store.maps[name][i][c].astype(np.float64)
                inside = store.instances[i] == store.labels[i]
                shell = _shell(inside, rim_width)
                a = np.abs(s)
                if inside.any():
                    vin = s[inside]
                    vals["peak_in"][i] = vin[np.argmax(np.abs(vin))]
                    vals["mean_in"][i] = vin.mean()
                    mean_abs_in = a[inside].mean()
                    if mean_abs_in > 0 and shell.any():
                        vals["rim_ratio"][i] = a[shell].mean() / mean_abs_in
                if (~inside).any():
                    vout = s[~inside]
                    vals["peak_out"][i] = vout[np.argmax(np.abs(vout))]
                total = a.sum()
                if total > 0:
                    vals["mass_in"][i] = a[inside].sum() / total
            for k, v in vals.items():
                cols[f"{pref}_{k}"] = v
    return cols
