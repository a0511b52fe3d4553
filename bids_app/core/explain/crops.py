"""Where each lesion's crop lies in network space: the lesions' voxels, the stride lattice of the
crop boxes, the windows of the frozen normalisation statistics and the context margin (the
effective receptive field), as described in ``docs/explain.md``."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bids_app.core.explain.config import ExplainConfig
from bids_app.core.explain.network import extract_box, logit_of_class, receptive_field, set_norm_mode


def crop_shape(extent, margin, stride, min_side) -> tuple[int, ...]:
    out = []
    for e, m, s, ms in zip(extent, margin, stride, min_side):
        side = max(int(e) + 2 * int(m), int(ms))
        out.append(int(math.ceil(side / s) * s))
    return tuple(out)


def buckets(shapes: list[tuple[int, ...]], waste: float = 2.0) -> list[tuple[tuple[int, ...], list[int]]]:
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


def lesion_coordinates(lesions: np.ndarray, labels: Sequence[int]) -> dict[int, np.ndarray]:
    """Network-space voxel coordinates of each lesion.

    Parameters
    ----------
    lesions : ndarray of int, shape (n0, n1, n2), the instance map in network space
    labels : ascending labels

    Returns
    -------
    dict of label -> ndarray of int64, shape (n_voxels, 3), in C order of the voxels

    Raises
    ------
    ValueError
        A label without any voxel.
    """
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
    return coords_all


@dataclass(frozen=True)
class CropLattice:
    """Crop boxes on one stride lattice, the whole-volume box's.

    All crops then see the network's down-sampling grid in the same phase (a U-Net is
    shift-equivariant only by multiples of its total stride), and full mode computes the same
    function.

    Attributes
    ----------
    stride : 3 ints, the network's total stride
    min_side : 3 ints, smallest crop side (``min_crop_stride_multiple`` strides)
    full_shape : 3 ints, the volume's shape rounded up to the lattice (at least ``min_side``)
    full_box : 3 (lo, hi), the whole-volume box, the volume centred in it
    """

    stride: tuple[int, int, int]
    min_side: list
    full_shape: list
    full_box: list

    @classmethod
    def of(cls, volume_shape: Sequence[int], stride: Sequence[int], min_stride_multiple: int) -> CropLattice:
        min_side = [min_stride_multiple * s for s in stride]
        full_shape = [int(math.ceil(max(n, ms) / s) * s) for n, s, ms in zip(volume_shape, stride, min_side)]
        full_box = [(-((fs - n) // 2), -((fs - n) // 2) + fs) for fs, n in zip(full_shape, volume_shape)]
        return cls(tuple(stride), min_side, full_shape, full_box)

    def box(self, coords: np.ndarray, shape: Sequence[int]) -> list[tuple[int, int]]:
        """Box of ``shape`` centred on the lesion ``coords`` (n, 3), on the lattice, inside the
        (stride-padded) volume when it fits."""
        lo, hi = coords.min(0), coords.max(0) + 1
        box = []
        for j in range(3):
            f0, f1 = self.full_box[j]
            s_j = self.stride[j]
            want = (lo[j] + hi[j]) / 2.0 - shape[j] / 2.0
            start = f0 + int(round((want - f0) / s_j)) * s_j
            if shape[j] <= f1 - f0:  # inside the (stride-padded) volume when it fits
                start = min(max(start, f0), f1 - shape[j])
            else:  # centre the volume in the crop, on the lattice
                start = f0 - ((shape[j] - (f1 - f0)) // (2 * s_j)) * s_j
            box.append((int(start), int(start) + int(shape[j])))
        return box

    def crop_shape(self, coords: np.ndarray, margin_vox) -> tuple[int, ...]:
        """Crop shape of the lesion ``coords`` with ``margin_vox`` (3,) voxels of context."""
        return crop_shape(coords.max(0) + 1 - coords.min(0), margin_vox, self.stride, self.min_side)


def norm_windows(lattice: CropLattice, coords_all: dict, cfg: ExplainConfig, spacing: Sequence[float],
                 patch_size: Sequence[int] | None) -> tuple[dict, tuple[int, ...] | None]:
    """The window of each lesion's frozen normalisation statistics.

    The training patch centred on the lesion (larger for a lesion that needs more than a patch
    with its context, never larger than the stride-padded volume unless the patch itself is);
    without a patch size, the lesion's own crop with ``max(margin_mm, context_mm)`` of context.

    Returns
    -------
    windows : dict of label -> 3 (lo, hi), network-space boxes
    window_shape : 3 ints (the patch on the lattice), or None without a patch size
    """
    labels = list(coords_all)
    if patch_size is not None:
        wshape = crop_shape((0, 0, 0), (0, 0, 0), lattice.stride,
                            [max(int(p), m) for p, m in zip(patch_size, lattice.min_side)])
    else:
        wshape = None
    m0 = np.ceil(max(float(cfg.margin_mm or 0.0), cfg.context_mm) / np.asarray(spacing, float)).astype(int)
    if wshape is None:
        win = {lab: lattice.box(coords_all[lab], lattice.crop_shape(coords_all[lab], m0)) for lab in labels}
    else:
        win = {}
        for lab in labels:
            own = lattice.crop_shape(coords_all[lab], m0)
            win[lab] = lattice.box(coords_all[lab],
                                   tuple(max(w, min(c, f)) for w, c, f in zip(wshape, own, lattice.full_shape)))
    return win, wshape


def context_margin(nets, data, coords_all: dict, lesion_classes: dict, windows: dict, window_shape, stats,
                   cfg: ExplainConfig, spacing: Sequence[float], timings: dict) -> np.ndarray:
    """Context around each lesion's bounding box, in voxels per network axis (3,) int.

    ``cfg.margin_mm`` when given; else ``max(context_mm, r)`` with ``r`` the effective receptive
    field measured on up to ``erf_lesions`` probe lesions (the largest, the median and the
    smallest) over every member, at most half the window; a quarter of the theoretical receptive
    field without a window shape. Fills ``timings`` with ``margin_s`` (when measured),
    ``margin_vox`` and ``erf_radius_vox``.
    """
    erf_radius = None
    if cfg.margin_mm is None:
        t0 = time.perf_counter()
        if window_shape is not None:
            by_size = sorted(coords_all, key=lambda lab: -len(coords_all[lab]))
            picks = [by_size[i] for i in (0, len(by_size) // 2, len(by_size) - 1)]
            probe = list(dict.fromkeys(picks))[:max(1, int(cfg.erf_lesions))]
            radii = []
            for k, net in enumerate(nets):
                for lab in probe:  # windows may differ in shape: one pass each
                    st = None if stats is None else [stats[k][lab]]
                    radii += erf_radii(net, data, [(coords_all[lab], windows[lab], lesion_classes[lab])], st,
                                       cfg.erf_mass)
            # never larger than what the window itself can show
            erf_radius = int(min(max(radii), min(window_shape) // 2))
            margin_mm = np.maximum(cfg.context_mm, erf_radius * np.asarray(spacing, float))
        else:
            rf = np.asarray(receptive_field(nets[0]), float)
            margin_mm = np.maximum(cfg.context_mm, 0.5 * (rf - 1) / 2 * np.asarray(spacing, float))
        timings["margin_s"] = time.perf_counter() - t0
    else:
        margin_mm = np.full(3, max(float(cfg.margin_mm), 0.0))
    margin = np.ceil(margin_mm / np.asarray(spacing, float) - 1e-9).astype(int)
    timings["margin_vox"] = [int(v) for v in margin]
    timings["erf_radius_vox"] = erf_radius
    return margin


def erf_radii(net, data, lesions: list, stats: dict | None, mass: float) -> list[int]:
    """Chebyshev radius (voxels) around each lesion holding ``mass`` of ``|dS/dx|`` on its clean
    window (one batched forward/backward). ``lesions``: list of (coords, window box, class);
    ``stats``: frozen statistics per lesion index, or None (live)."""
    import torch

    x = torch.stack([extract_box(data, box) for _, box, _ in lesions]).clone().requires_grad_(True)
    masks = np.zeros((len(lesions), *x.shape[2:]), bool)
    for i, (coords, box, _) in enumerate(lesions):
        local = coords - np.asarray([lo for lo, _ in box])
        masks[i][tuple(local.T)] = True
    if stats is not None:
        set_norm_mode(net._msx_norms, "frozen", [
            (torch.stack([stats[i][k][0] for i in range(len(lesions))]),
             torch.stack([stats[i][k][1] for i in range(len(lesions))])) for k in range(len(net._msx_norms))])
    try:
        cls = torch.tensor([int(c) for _, _, c in lesions], device=x.device)
        with torch.enable_grad():
            z = logit_of_class(net(x), cls)
            (g,) = torch.autograd.grad((z * torch.from_numpy(masks).to(z)).sum(), x)
    finally:
        set_norm_mode(net._msx_norms, "live")
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


def record_window_stats(nets, data, windows: dict, max_voxels: int, max_batch: int) -> list[dict]:
    """Per member, per lesion: the (mean, var) of every InstanceNorm on the lesion's clean window."""
    import torch

    out = []
    labs = list(windows)
    by_shape: dict[tuple, list] = {}
    for lab in labs:
        by_shape.setdefault(tuple(hi - lo for lo, hi in windows[lab]), []).append(lab)
    for net in nets:
        per_lab: dict[int, list] = {}
        set_norm_mode(net._msx_norms, "record")
        try:
            for shape, group in by_shape.items():
                batch = max(1, min(max_batch, max_voxels // int(np.prod(shape))))
                for b0 in range(0, len(group), batch):
                    chunk = group[b0:b0 + batch]
                    x = torch.stack([extract_box(data, windows[lab]) for lab in chunk])
                    with torch.no_grad():
                        net(x)
                    for bi, lab in enumerate(chunk):
                        per_lab[lab] = [(n.recorded[0][bi], n.recorded[1][bi]) for n in net._msx_norms]
        finally:
            set_norm_mode(net._msx_norms, "live")
            for n in net._msx_norms:
                n.recorded = None
        out.append(per_lab)
    return out
