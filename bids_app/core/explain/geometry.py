"""The input grid ``(X, Y, Z)`` <-> nnU-Net network space: :class:`NetworkGeometry` replays
nnU-Net's transpose -> crop-to-non-zero -> resample chain exactly as its export reverts it
(``docs/explain.md``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

ANISO_THRESHOLD = 3.0


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


def predictor_geometry(predictor, properties: dict, network_shape, input_shape) -> NetworkGeometry:
    """:class:`NetworkGeometry` of one case preprocessed by ``predictor``."""
    cm = predictor.configuration_manager
    kwargs = getattr(cm, "resampling_fn_probabilities_kwargs", None)
    if kwargs is None:
        kwargs = cm.configuration.get("resampling_fn_probabilities_kwargs", {})
    return geometry_from_properties(properties, network_shape, input_shape,
                                    predictor.plans_manager.transpose_forward, cm.spacing, kwargs)
