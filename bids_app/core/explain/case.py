"""The case-level entry point: the input grid in, a :class:`SaliencyStore` out
(:func:`explain_case`), and the store on another voxel order of the same grid
(:func:`reorient_store`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bids_app.core.explain.config import SMOOTHGRAD_MAPS, ExplainConfig
from bids_app.core.explain.engine import explain_network_space
from bids_app.core.explain.geometry import instances_to_network, network_to_input, predictor_geometry
from bids_app.core.explain.network import canonical_layer_name, receptive_field, total_stride


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


def explain_case(
    predictor,
    channels: np.ndarray,
    zooms: Sequence[float],
    instances: np.ndarray,
    instance_class: np.ndarray,
    config: ExplainConfig | None = None,
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
    config : ExplainConfig or None (the defaults)
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

    cfg = (config or ExplainConfig()).checked()
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
