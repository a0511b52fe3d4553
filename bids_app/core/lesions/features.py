"""Per-lesion features: shape, intensity, cortical involvement, distances and location.

One call, :func:`lesion_features`, returns one row per lesion in label order (``label``
first), ready to be merged into the lesion table on ``label``. The shape statistics are
computed in :mod:`bids_app.core.lesions.shape`; :mod:`bids_app.core.lesions.dictionary` gives
the JSON data dictionary (Description, Units) of every column. ``docs/features.md`` defines
every feature and rule.

Speed: whole-volume work is done once per subject (Euclidean distance transforms with the voxel
sizes as sampling, on the bounding box of the lesions and the target region; label-indexed
reductions with ``np.bincount``/``scipy.ndimage`` over the lesion voxels only; one
``LabelShapeStatisticsImageFilter`` pass over the lesions' bounding box). Per-lesion loops only
touch small crops (pyradiomics shape, perilesional shells).

All functions are pure: they never modify their inputs and never read or write files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bids_app.core.lesions.location import (
    AtlasLUT,
    LocationRules,
    atlas_assignment,
    cortical_type,
    location_class,
    parse_atlas_lut,
)
from bids_app.core.lesions.shape import bbox_slices, radiomics_shape, sitk_shape, voxel_sizes
from bids_app.core.postprocess import lesion_geometry
from bids_app.core.registration import TemplateTransform

#: per-channel intensity statistics
INTENSITY_STATS: tuple[str, ...] = ("mean", "median", "sd", "p10", "p90")
#: per-channel contrast ratios (lesion mean / reference mean)
CONTRAST_REFERENCES: tuple[str, ...] = ("shell", "nawm", "brain")


@dataclass(frozen=True)
class FeatureOptions:
    """What :func:`lesion_features` computes.

    Attributes
    ----------
    shape : bool
        SimpleITK ``LabelShapeStatisticsImageFilter`` features (perimeter, Feret diameter and
        oriented bounding box on).
    radiomics_shape : bool
        The 14 PyRadiomics shape features, per lesion on its crop.
    intensity : bool
        Per-channel statistics and contrast ratios (needs ``channels``).
    shell_voxels : int
        Radius (voxels, Euclidean ball) of the perilesional shell used by ``contrast_shell`` and
        excluded from the NAWM reference.
    include_geometry : bool
        Prepend :func:`~bids_app.core.postprocess.lesion_geometry`'s centroid, ``n_voxels`` and
        ``volume_mm3`` columns (the lesion table usually has them already).
    rules : LocationRules
        Thresholds of GM, cortical types and location classes.
    """

    shape: bool = True
    radiomics_shape: bool = True
    intensity: bool = True
    shell_voxels: int = 2
    include_geometry: bool = False
    rules: LocationRules = field(default_factory=LocationRules)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _ball(radius: int) -> np.ndarray:
    r = int(radius)
    g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (g ** 2).sum(axis=0) <= r * r


@dataclass(frozen=True)
class _Voxels:
    """The lesion voxels, sorted by label (C order inside each label)."""

    flat: np.ndarray   # int64 flat indices
    label: np.ndarray  # int64 labels 1..n
    size: np.ndarray   # float64 (n,)
    start: np.ndarray  # int64 (n,) offset of each label's first voxel in ``flat``


def _gather(inst: np.ndarray, n: int) -> _Voxels:
    flat = np.flatnonzero(inst)
    lab = inst.reshape(-1)[flat].astype(np.int64)
    order = np.argsort(lab, kind="stable")
    flat, lab = flat[order], lab[order]
    size = np.bincount(lab, minlength=n + 1)[1:n + 1]
    start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    return _Voxels(flat, lab, size.astype(np.float64), start)


def _label_mean(vox: _Voxels, values: np.ndarray, n: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.bincount(vox.label - 1, weights=values, minlength=n)[:n] / vox.size



# --------------------------------------------------------------------------------------------
# feature blocks
# --------------------------------------------------------------------------------------------

def _shell_voxels(inst: np.ndarray, n: int, radius: int, brain: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Perilesional shell of every lesion: (lesion label, flat index) pairs.

    The shell of lesion k is the set of voxels within ``radius`` voxels (Euclidean ball) of k,
    outside every lesion and inside the brain; shells of neighbouring lesions may share voxels.
    """
    from scipy import ndimage

    if n == 0 or radius <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ball = _ball(radius)
    labels: list[np.ndarray] = []
    flats: list[np.ndarray] = []
    for i, sl in enumerate(ndimage.find_objects(inst, max_label=n)):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - radius, 0), min(s.stop + radius, dim)) for s, dim in zip(sl, inst.shape))
        crop = inst[sl]
        grown = ndimage.binary_dilation(crop == i + 1, structure=ball)
        shell = grown & (crop == 0)
        if brain is not None:
            shell &= brain[sl]
        local = np.nonzero(shell)
        coords = tuple(c + s.start for c, s in zip(local, sl))
        flats.append(np.ravel_multi_index(coords, inst.shape).astype(np.int64))
        labels.append(np.full(flats[-1].size, i + 1, dtype=np.int64))
    if not flats:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(labels), np.concatenate(flats)


def _quantiles(vox: _Voxels, values: np.ndarray, n: int, qs) -> list[np.ndarray]:
    """Per-label quantiles (numpy's 'linear' method) from one lexsort of the lesion voxels."""
    order = np.lexsort((values, vox.label))
    s = values[order]
    cnt = vox.size.astype(np.int64)
    out = []
    for q in qs:
        res = np.full(n, np.nan)
        ok = cnt > 0
        pos = q * (cnt[ok] - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, cnt[ok] - 1)
        frac = pos - lo
        base = vox.start[ok]
        a, b = s[base + lo], s[base + hi]
        res[ok] = a + frac * (b - a)
        out.append(res)
    return out


def _intensity(vox: _Voxels, n: int, channels: Mapping[str, np.ndarray], shell: tuple[np.ndarray, np.ndarray],
               brain: np.ndarray, nawm: np.ndarray | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    shell_lab, shell_flat = shell
    shell_size = np.bincount(shell_lab - 1, minlength=n)[:n].astype(np.float64) if n else np.zeros(0)
    outside = brain.copy()
    outside.reshape(-1)[vox.flat] = False
    for name, data in channels.items():
        flat_data = np.asarray(data).reshape(-1)
        v = flat_data[vox.flat].astype(np.float64)
        mean = _label_mean(vox, v, n)
        dev = v - (mean[vox.label - 1] if n else 0.0)
        sd = np.sqrt(_label_mean(vox, dev * dev, n))
        p10, median, p90 = _quantiles(vox, v, n, (0.10, 0.50, 0.90))
        with np.errstate(divide="ignore", invalid="ignore"):
            shell_mean = np.bincount(shell_lab - 1, weights=flat_data[shell_flat].astype(np.float64),
                                     minlength=n)[:n] / shell_size if n else np.zeros(0)
            brain_mean = float(np.mean(np.asarray(data)[outside], dtype=np.float64)) if outside.any() else np.nan
            nawm_mean = (float(np.mean(np.asarray(data)[nawm], dtype=np.float64))
                         if nawm is not None and nawm.any() else np.nan)
            out[f"{name}_mean"] = mean
            out[f"{name}_median"] = median
            out[f"{name}_sd"] = sd
            out[f"{name}_p10"] = p10
            out[f"{name}_p90"] = p90
            out[f"{name}_contrast_shell"] = mean / shell_mean
            out[f"{name}_contrast_nawm"] = mean / nawm_mean
            out[f"{name}_contrast_brain"] = mean / brain_mean
    return out


def _min_distance(vox: _Voxels, n: int, target: np.ndarray | None, lesions: np.ndarray,
                  zooms: np.ndarray) -> np.ndarray:
    """Distance (mm) from each lesion's closest voxel to the closest ``target`` voxel.

    The distance transform runs on the bounding box of the target and the lesions: every target
    voxel and every lesion voxel lies inside it, so the distances are exact.
    """
    from scipy import ndimage

    out = np.full(n, np.nan)
    if n == 0 or target is None or not target.any():
        return out
    box = bbox_slices(target | lesions)
    dist = ndimage.distance_transform_edt(~target[box], sampling=zooms)
    coords = np.unravel_index(vox.flat, lesions.shape)
    local = tuple(c - s.start for c, s in zip(coords, box))
    d = dist[local]
    out[:] = np.inf
    np.minimum.at(out, vox.label - 1, d)
    return out


# --------------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------------

def lesion_features(
    instances: np.ndarray,
    n_lesions: int,
    affine: np.ndarray,
    channels: Mapping[str, np.ndarray] | None = None,
    brain_mask: np.ndarray | None = None,
    gm_prob: np.ndarray | None = None,
    atlas_labels: np.ndarray | None = None,
    atlas_lut: pd.DataFrame | AtlasLUT | None = None,
    options: FeatureOptions | None = None,
    *,
    wm_prob: np.ndarray | None = None,
    template_transform: TemplateTransform | None = None,
) -> pd.DataFrame:
    """Per-lesion shape, intensity, cortical-involvement, distance and location features.

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)
        Lesion instance map: 0 background, ``1..n_lesions`` lesions.
    n_lesions : int
    affine : ndarray, shape (4, 4)
        Voxel -> scanner RAS+ mm of the instance grid.
    channels : dict of str -> ndarray of float, shape (X, Y, Z), optional
        Images on the instance grid (e.g. ``{"T1w": ..., "FLAIR": ...}``); the names prefix the
        intensity columns.
    brain_mask : ndarray of bool, shape (X, Y, Z), optional
        Brain voxels (default: the whole field of view).
    gm_prob : ndarray of float, shape (X, Y, Z), optional
        Grey-matter probability on the instance grid (e.g. the template GM probseg warped with
        :func:`bids_app.core.registration.warp_probability_to_subject`).
    atlas_labels : ndarray of int, shape (X, Y, Z), optional
        Atlas dseg on the instance grid (:func:`bids_app.core.registration.warp_labels_to_subject`).
    atlas_lut : DataFrame (columns index, name, location_class) or AtlasLUT, optional
        Needed with ``atlas_labels``.
    options : FeatureOptions, optional
    wm_prob : ndarray of float, shape (X, Y, Z), optional
        White-matter probability; defines the NAWM reference (``> gm_threshold``) instead of
        the atlas's white-matter classes.
    template_transform : TemplateTransform, optional
        Subject -> template transform; adds the centroid in template mm.

    Returns
    -------
    DataFrame
        One row per lesion in label order: ``label``; with ``include_geometry`` the
        :func:`~bids_app.core.postprocess.lesion_geometry` columns; ``centroid_{x,y,z}_template_mm``
        (with a transform); ``sitk_*`` shape statistics; ``radiomics_shape_*``;
        ``{channel}_{mean,median,sd,p10,p90,contrast_shell,contrast_nawm,contrast_brain}``;
        ``gm_fraction``, ``cortex_fraction``, ``cortical_type``, ``distance_to_cortex_mm``,
        ``distance_to_ventricle_mm``, ``atlas_label``, ``atlas_name``, ``atlas_label_fraction``,
        ``atlas_class``, ``atlas_class_fraction``, ``location_class``, ``features_failed`` (0/1)
        and ``features_failed_reason`` (str or None): a lesion whose extraction fails is kept,
        with NaN in the failed columns and the reason. Undefined values are NaN
        (numbers) or None (strings): no GM map and no atlas -> NaN GM/cortex columns; no atlas ->
        NaN ventricle distance and None atlas/location columns. With no lesions: zero rows, same
        columns.
    """
    opts = options or FeatureOptions()
    rules = opts.rules
    inst = np.asarray(instances)
    if inst.ndim != 3:
        raise ValueError(f"instances must be 3D, got shape {inst.shape}")
    if not np.issubdtype(inst.dtype, np.integer):
        raise ValueError(f"instances must be an integer array, got {inst.dtype}")
    shape = inst.shape
    n = int(n_lesions)
    aff = np.asarray(affine, dtype=np.float64)
    zooms = voxel_sizes(aff)

    def check(a, name, dtype=None):
        if a is None:
            return None
        arr = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
        if arr.shape != shape:
            raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
        return arr

    channels = {str(k): check(v, f"channel {k}") for k, v in (channels or {}).items()}
    brain = check(brain_mask, "brain_mask", bool)
    brain_all = brain if brain is not None else np.ones(shape, dtype=bool)
    gm_p = check(gm_prob, "gm_prob")
    wm_p = check(wm_prob, "wm_prob")
    atlas = check(atlas_labels, "atlas_labels")
    lut = None
    if atlas is not None:
        if atlas_lut is None:
            raise ValueError("atlas_labels needs atlas_lut")
        lut = atlas_lut if isinstance(atlas_lut, AtlasLUT) else parse_atlas_lut(atlas_lut)

    lesions = inst > 0
    vox = _gather(inst, n)
    if vox.label.size and vox.label.max() > n:
        raise ValueError(f"instances holds labels above n_lesions={n}")
    cols: dict[str, object] = {"label": np.arange(1, n + 1, dtype=np.int64)}

    geometry = lesion_geometry(inst, n, aff)
    if opts.include_geometry:
        cols.update({k: v for k, v in geometry.items() if k != "label"})
    if template_transform is not None:
        centroids = np.stack([geometry[f"centroid_{a}_mm"] for a in "xyz"], axis=1)
        mni = template_transform.subject_to_template(centroids) if n else np.zeros((0, 3))
        for j, a in enumerate("xyz"):
            cols[f"centroid_{a}_template_mm"] = mni[:, j]

    if opts.shape:
        cols.update(sitk_shape(inst, n, aff))
    failures: dict[int, str] = {}
    if opts.radiomics_shape:
        cols.update(radiomics_shape(inst, n, aff, failures))

    # tissue masks (once per subject)
    gm_mask = None if gm_p is None else (gm_p > rules.gm_threshold) & brain_all
    if gm_mask is not None and lut is not None:
        cortex = gm_mask & ~lut.mask_of(atlas, rules.non_cortical_gm_classes)
    elif gm_mask is not None:
        cortex = gm_mask
    elif lut is not None:
        cortex = lut.mask_of(atlas, rules.cortex_classes) & brain_all
    else:
        cortex = None
    ventricles = lut.mask_of(atlas, rules.ventricle_classes) if lut is not None else None

    if opts.intensity and channels:
        shell = _shell_voxels(inst, n, opts.shell_voxels, brain)
        nawm = None
        if wm_p is not None:
            nawm = (wm_p > rules.gm_threshold) & brain_all
        elif lut is not None:
            nawm = lut.mask_of(atlas, rules.white_matter_classes) & brain_all
        if nawm is not None:
            nawm = nawm.copy()
            nawm.reshape(-1)[vox.flat] = False
            nawm.reshape(-1)[shell[1]] = False
            if gm_mask is not None:
                nawm &= ~gm_mask
        cols.update(_intensity(vox, n, channels, shell, brain_all, nawm))

    nan = np.full(n, np.nan)
    cols["gm_fraction"] = _label_mean(vox, gm_mask.reshape(-1)[vox.flat].astype(np.float64), n) \
        if gm_mask is not None else nan.copy()
    cortex_fraction = _label_mean(vox, cortex.reshape(-1)[vox.flat].astype(np.float64), n) \
        if cortex is not None else nan.copy()
    dist_cortex = _min_distance(vox, n, cortex, lesions, zooms)
    dist_vent = _min_distance(vox, n, ventricles, lesions, zooms)
    cols["cortex_fraction"] = cortex_fraction
    ctype = cortical_type(cortex_fraction, dist_cortex, rules)
    cols["cortical_type"] = ctype
    cols["distance_to_cortex_mm"] = dist_cortex
    cols["distance_to_ventricle_mm"] = dist_vent

    if lut is not None:
        assign = atlas_assignment(inst, n, atlas, lut)
        cols["atlas_label"] = assign.label
        cols["atlas_name"] = assign.name
        cols["atlas_label_fraction"] = assign.label_fraction
        cols["atlas_class"] = assign.location_class
        cols["atlas_class_fraction"] = assign.class_fraction
        # a lesion outside every listed atlas label still gets a class from the other rules
        majority = np.array([c if c is not None else "n/a" for c in assign.location_class], dtype=object)
        cols["location_class"] = location_class(majority, ctype, dist_vent, rules)
    else:
        cols["atlas_label"] = np.zeros(n, dtype=np.int64)
        cols["atlas_name"] = np.full(n, None, dtype=object)
        cols["atlas_label_fraction"] = nan.copy()
        cols["atlas_class"] = np.full(n, None, dtype=object)
        cols["atlas_class_fraction"] = nan.copy()
        cols["location_class"] = np.full(n, None, dtype=object)
    cols["features_failed"] = np.array([int(i in failures) for i in range(n)], dtype=np.int64)
    cols["features_failed_reason"] = np.array([failures.get(i) for i in range(n)], dtype=object)
    return pd.DataFrame(cols)
