"""The engine: every lesion of a network-space instance map explained on lesion-centred crops
(or the whole volume), batched across noise samples and lesions (``docs/explain.md``).

:func:`explain_network_space` runs these steps: the lesions' voxels and their crop lattice
(:mod:`bids_app.core.explain.crops`), the frozen normalisation statistics on each lesion's
window, the context margin, the crops grouped into buckets of one shape, per bucket and member
SmoothGrad (:func:`_smoothgrad_bucket`) and the CAMs (:func:`_cam_bucket`), and the maps cut to
the volume (:func:`_cut_to_volume`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from bids_app.core.explain.cam import cam_batch
from bids_app.core.explain.config import SMOOTHGRAD_MAPS, ExplainConfig
from bids_app.core.explain.crops import (
    CropLattice,
    buckets,
    context_margin,
    lesion_coordinates,
    norm_windows,
    record_window_stats,
)
from bids_app.core.explain.network import extract_box, prepare_networks, total_stride
from bids_app.core.explain.noise import counter_noise
from bids_app.core.explain.smoothgrad import group_map, smoothgrad_batch


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



@dataclass
class _Run:
    """What every bucket of one :func:`explain_network_space` call shares."""

    nets: list
    data: object  # torch.Tensor (K, n0, n1, n2) on the device
    cfg: ExplainConfig
    stats: list | None  # per member: {label: [(mean, var) per InstanceNorm]}, or None (live)
    sigma: float
    progress: Callable[[int, int], None] | None
    n_items_total: int
    done: int = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.n_items_total)

    def batch_stats(self, members, item_labels):
        """The frozen statistics of a batch of items, per member (None when live)."""
        import torch

        if self.stats is None:
            return None
        stats = self.stats
        return {k: [(torch.stack([stats[k][lab][i][0] for lab in item_labels]),
                     torch.stack([stats[k][lab][i][1] for lab in item_labels]))
                    for i in range(len(self.nets[k]._msx_norms))] for k in members}


@dataclass
class _Bucket:
    """Lesions whose crops share one shape, and their clean crops and voxel groups."""

    labels: list
    shape: tuple
    in_boxes: dict  # label -> the box the network sees
    clean: dict  # label -> torch.Tensor (K, *shape)
    gmaps: dict  # label -> torch.Tensor (*shape) of voxel groups 1..G (0 outside the lesion)
    batch: int  # items per forward pass


def explain_network_space(
    networks: Sequence,
    data,
    lesions: np.ndarray,
    lesion_classes: dict[int, int],
    config: ExplainConfig | None = None,
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
    config : ExplainConfig or None (the defaults)
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

    cfg = (config or ExplainConfig()).checked()
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
    coords_all = lesion_coordinates(lesions, labels)
    lattice = CropLattice.of(lesions.shape, total_stride(nets[0]), cfg.min_crop_stride_multiple)
    t = timings if timings is not None else {}

    # ---- frozen normalisation statistics: one clean window per lesion and member
    windows, window_shape = norm_windows(lattice, coords_all, cfg, spacing, patch_size)
    t0 = time.perf_counter()
    stats = None
    if cfg.norm_stats == "window" and any(net._msx_norms for net in nets):
        stats = record_window_stats(nets, data, windows, cfg.max_batch_voxels, cfg.max_batch)
    t["norm_stats_s"] = t.get("norm_stats_s", 0.0) + time.perf_counter() - t0

    # ---- context margin: given, or measured (effective receptive field of the largest lesions)
    margin = context_margin(nets, data, coords_all, lesion_classes, windows, window_shape, stats, cfg, spacing, t)

    # ---- crops, grouped into buckets of one shape
    groups = buckets([lattice.crop_shape(coords_all[lab], margin) for lab in labels])
    results = {}
    for bucket_shape, idxs in groups:
        for i in idxs:
            lab = labels[i]
            results[lab] = NetworkLesionMaps(label=lab, lesion_class=int(lesion_classes[lab]),
                                             box=lattice.box(coords_all[lab], bucket_shape),
                                             n_voxels=int(len(coords_all[lab])))
    if cfg.mode == "full":
        groups = [(tuple(lattice.full_shape), [i for _, idxs in groups for i in idxs])]

    run_members = [[k] for k in range(len(nets))] if cfg.members == "each" else [list(range(len(nets)))]
    want_sg = "smoothgrad" in cfg.methods
    cams = [m for m in cfg.methods if m != "smoothgrad"]
    run = _Run(nets=nets, data=data, cfg=cfg, stats=stats,
               sigma=float(cfg.noise_level) * float(data[0].max() - data[0].min()), progress=progress,
               n_items_total=len(labels) * (cfg.n_samples * want_sg + bool(cams)) * len(run_members))
    t.setdefault("smoothgrad_s", 0.0)
    t.setdefault("cam_s", 0.0)

    for bucket_shape, idxs in groups:
        bucket = _make_bucket(run, [labels[i] for i in idxs], tuple(bucket_shape), coords_all, results,
                              lattice.full_box)
        for members in run_members:
            suffix = "" if cfg.members == "mean" else f"@{names[members[0]]}"
            if want_sg:
                t0 = time.perf_counter()
                _smoothgrad_bucket(run, bucket, members, suffix, results)
                t["smoothgrad_s"] += time.perf_counter() - t0
            if cams:
                t0 = time.perf_counter()
                _cam_bucket(run, bucket, members, suffix, cams, results)
                t["cam_s"] += time.perf_counter() - t0
    _cut_to_volume(results, cfg.mode, lattice.full_box, lesions.shape)
    return [results[lab] for lab in labels]


def _make_bucket(run: _Run, blabs: list, crop_shape: tuple, coords_all: dict, results: dict,
                 full_box: list) -> _Bucket:
    """The clean crops and voxel groups of a bucket's lesions (fills their ``n_groups``)."""
    import torch

    cfg = run.cfg
    in_boxes = {lab: (results[lab].box if cfg.mode == "crop" else full_box) for lab in blabs}
    vox = int(np.prod(crop_shape))
    batch = max(1, min(cfg.max_batch, cfg.max_batch_voxels // vox))
    clean = {lab: extract_box(run.data, in_boxes[lab]) for lab in blabs}
    gmaps = {}
    for lab in blabs:
        gm, g = group_map(coords_all[lab], in_boxes[lab], crop_shape, cfg.max_groups)
        gmaps[lab] = torch.from_numpy(gm).to(run.data.device)
        results[lab].n_groups = g
    return _Bucket(labels=blabs, shape=crop_shape, in_boxes=in_boxes, clean=clean, gmaps=gmaps, batch=batch)


def _smoothgrad_bucket(run: _Run, bucket: _Bucket, members: list, suffix: str, results: dict) -> None:
    """SmoothGrad of a bucket's lesions for one member set: ``smoothgrad_mean`` / ``smoothgrad_max``
    (K, *shape), the mean and max aggregations averaged over the noise samples."""
    import torch

    cfg, data = run.cfg, run.data
    device, dtype = data.device, data.dtype
    crop_shape = bucket.shape
    K = data.shape[0]
    acc_mean = {lab: torch.zeros((K, *crop_shape), dtype=dtype, device=device) for lab in bucket.labels}
    acc_max = {lab: torch.zeros((K, *crop_shape), dtype=dtype, device=device) for lab in bucket.labels}
    items = [(lab, k) for lab in bucket.labels for k in range(cfg.n_samples)]
    for b0 in range(0, len(items), bucket.batch):
        chunk = items[b0:b0 + bucket.batch]
        x0 = torch.stack([bucket.clean[lab] for lab, _ in chunk])
        if run.sigma > 0:
            noise = torch.cat([counter_noise(cfg.seed, [k], K, [lo for lo, _ in bucket.in_boxes[lab]], crop_shape,
                                             device=device, dtype=dtype) for lab, k in chunk])
            x0 = x0 + run.sigma * noise
        cls = torch.tensor([results[lab].lesion_class for lab, _ in chunk], device=device)
        gm = torch.stack([bucket.gmaps[lab] for lab, _ in chunk])
        G = int(gm.max())
        g_mean, g_max = smoothgrad_batch(run.nets, members, x0, cls, gm, G, cfg.mirror_axes,
                                         run.batch_stats(members, [lab for lab, _ in chunk]))
        for bi, (lab, _) in enumerate(chunk):
            acc_mean[lab] += g_mean[bi]
            acc_max[lab] += g_max[bi]
        run.advance(len(chunk))
    for lab in bucket.labels:
        res_maps = results[lab].maps
        res_maps["smoothgrad_mean" + suffix] = (acc_mean[lab] / cfg.n_samples).float().cpu().numpy()
        res_maps["smoothgrad_max" + suffix] = (acc_max[lab] / cfg.n_samples).float().cpu().numpy()


def _cam_bucket(run: _Run, bucket: _Bucket, members: list, suffix: str, cams: list, results: dict) -> None:
    """The Grad-CAM-family maps of a bucket's lesions for one member set (clean input, no
    mirroring): (1, *shape) each."""
    import torch

    cfg = run.cfg
    device, dtype = run.data.device, run.data.dtype
    for b0 in range(0, len(bucket.labels), bucket.batch):
        chunk = bucket.labels[b0:b0 + bucket.batch]
        x0 = torch.stack([bucket.clean[lab] for lab in chunk])
        cls = torch.tensor([results[lab].lesion_class for lab in chunk], device=device)
        masks = torch.stack([(bucket.gmaps[lab] > 0) for lab in chunk]).to(dtype)
        layers = {m: cfg.cams[m][0] for m in cams}
        forms = {m: cfg.cams[m][1] for m in cams}
        bst = run.batch_stats(members, chunk)
        cam = cam_batch([run.nets[k] for k in members], x0, cls, masks, layers, bucket.shape, forms,
                        stats=None if bst is None else [bst[k] for k in members])
        for bi, lab in enumerate(chunk):
            for m in cams:
                results[lab].maps[m + suffix] = cam[m][bi][None].float().cpu().numpy()
        run.advance(len(chunk))


def _cut_to_volume(results: dict, mode: str, full_box: list, volume_shape) -> None:
    """Keep every lesion's crop-mode box, cut to the volume (padding carries no information):
    full mode thereby stores exactly what crop mode stores, and CAMs are normalised in that box.
    Sets each result's ``crop`` (the box the network saw) and ``box`` (cut to the volume)."""
    for res in results.values():
        src = res.box if mode == "crop" else full_box
        box = [(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(res.box, volume_shape)]
        sl = tuple(slice(lo - slo, hi - slo) for (lo, hi), (slo, _) in zip(box, src))
        for name in list(res.maps):
            arr = res.maps[name][(slice(None), *sl)]
            if name.split("@")[0] not in SMOOTHGRAD_MAPS:
                arr = _minmax_np(arr)
            res.maps[name] = np.ascontiguousarray(arr)
        res.crop = [tuple(b) for b in res.box]
        res.box = box


def _minmax_np(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / (hi - lo)).astype(np.float32) if hi > lo else np.zeros_like(x, dtype=np.float32)

