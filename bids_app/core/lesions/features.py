"""Per-lesion features: shape, intensity, cortical involvement, distances and location.

One call, :func:`lesion_features`, returns one row per lesion in label order (``label``
first), ready to be merged into the lesion table on ``label``; :data:`FEATURE_DICTIONARY` and
:func:`feature_dictionary` give the JSON data dictionary (Description, Units) of every column.
``docs/features.md`` defines every feature and rule.

Speed: whole-volume work is done once per subject (Euclidean distance transforms with the voxel
sizes as sampling, on the bounding box of the lesions and the target region; label-indexed
reductions with ``np.bincount``/``scipy.ndimage`` over the lesion voxels only; one
``LabelShapeStatisticsImageFilter`` pass over the lesions' bounding box). Per-lesion loops only
touch small crops (pyradiomics shape, perilesional shells).

All functions are pure: they never modify their inputs and never read or write files.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bids_app.core.imageio import Image
from bids_app.core.lesions.location import (
    AtlasLUT,
    LocationRules,
    atlas_assignment,
    cortical_type,
    location_class,
    parse_atlas_lut,
)
from bids_app.core.postprocess import lesion_geometry
from bids_app.core.registration import TemplateTransform

#: SimpleITK LabelShapeStatistics features reported (scalar ones)
SITK_SCALAR: tuple[str, ...] = (
    "Perimeter", "PerimeterOnBorder", "PerimeterOnBorderRatio", "NumberOfPixelsOnBorder", "Roundness",
    "Elongation", "Flatness", "FeretDiameter", "EquivalentSphericalRadius", "EquivalentSphericalPerimeter",
)
#: SimpleITK vector features, reported as ``_1``..``_3`` columns
SITK_VECTOR: tuple[str, ...] = ("PrincipalMoments", "EquivalentEllipsoidDiameter", "OrientedBoundingBoxSize")
#: the 14 PyRadiomics 3D shape features (algorithms.md §3.5)
RADIOMICS_SHAPE: tuple[str, ...] = (
    "Elongation", "Flatness", "LeastAxisLength", "MajorAxisLength", "Maximum2DDiameterColumn",
    "Maximum2DDiameterRow", "Maximum2DDiameterSlice", "Maximum3DDiameter", "MeshVolume", "MinorAxisLength",
    "Sphericity", "SurfaceArea", "SurfaceVolumeRatio", "VoxelVolume",
)
#: per-channel intensity statistics
INTENSITY_STATS: tuple[str, ...] = ("mean", "median", "sd", "p10", "p90")
#: per-channel contrast ratios (lesion mean / reference mean)
CONTRAST_REFERENCES: tuple[str, ...] = ("shell", "nawm", "brain")
#: relative size below which a principal moment counts as zero (degenerate lesion)
_DEGENERATE = 1e-9


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
# data dictionary
# --------------------------------------------------------------------------------------------

_SITK_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "Perimeter": ("Surface area of the lesion estimated by SimpleITK LabelShapeStatistics (3D 'perimeter').", "mm^2"),
    "PerimeterOnBorder": ("Part of the surface lying on the image border (SimpleITK).", "mm^2"),
    "PerimeterOnBorderRatio": ("PerimeterOnBorder / Perimeter (SimpleITK).", ""),
    "NumberOfPixelsOnBorder": ("Lesion voxels on the image border (SimpleITK).", "voxel"),
    "Roundness": ("Ratio of the equivalent-sphere surface to the surface (SimpleITK; 1 for a ball).", ""),
    "Elongation": ("sqrt(largest / second principal moment) (SimpleITK, >= 1); n/a for degenerate lesions "
                   "(a zero principal moment, e.g. 1-2 voxels or one-voxel-thick).", ""),
    "Flatness": ("sqrt(second / smallest principal moment) (SimpleITK, >= 1); n/a for degenerate lesions.", ""),
    "FeretDiameter": ("Largest distance between two boundary voxel centres (SimpleITK).", "mm"),
    "EquivalentSphericalRadius": ("Radius of the ball of the same volume (SimpleITK).", "mm"),
    "EquivalentSphericalPerimeter": ("Surface of the ball of the same volume (SimpleITK).", "mm^2"),
    "PrincipalMoments": ("Principal moment {i} (ascending) of the voxel coordinates (SimpleITK).", "mm^2"),
    "EquivalentEllipsoidDiameter": ("Diameter {i} of the ellipsoid with the same principal moments (SimpleITK).",
                                    "mm"),
    "OrientedBoundingBoxSize": ("Side {i} of the minimal oriented bounding box (SimpleITK).", "mm"),
}
_RADIOMICS_DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "Elongation": ("sqrt(minor / major principal component eigenvalue) (PyRadiomics, in [0, 1]).", ""),
    "Flatness": ("sqrt(least / major principal component eigenvalue) (PyRadiomics, in [0, 1]).", ""),
    "LeastAxisLength": ("4 sqrt(smallest eigenvalue) (PyRadiomics).", "mm"),
    "MajorAxisLength": ("4 sqrt(largest eigenvalue) (PyRadiomics).", "mm"),
    "Maximum2DDiameterColumn": ("Largest in-plane mesh-vertex distance in the row-slice planes (PyRadiomics).", "mm"),
    "Maximum2DDiameterRow": ("Largest in-plane mesh-vertex distance in the column-slice planes (PyRadiomics).", "mm"),
    "Maximum2DDiameterSlice": ("Largest in-plane mesh-vertex distance in the row-column (axial voxel) planes "
                               "(PyRadiomics).", "mm"),
    "Maximum3DDiameter": ("Largest distance between two mesh vertices (PyRadiomics).", "mm"),
    "MeshVolume": ("Volume enclosed by the marching-cubes mesh (PyRadiomics).", "mm^3"),
    "MinorAxisLength": ("4 sqrt(second eigenvalue) (PyRadiomics).", "mm"),
    "Sphericity": ("(36 pi V^2)^(1/3) / A of the mesh (PyRadiomics, 1 for a ball).", ""),
    "SurfaceArea": ("Area of the marching-cubes mesh (PyRadiomics).", "mm^2"),
    "SurfaceVolumeRatio": ("SurfaceArea / MeshVolume (PyRadiomics).", "mm^-1"),
    "VoxelVolume": ("Number of voxels times the voxel volume (PyRadiomics).", "mm^3"),
}

#: column -> {"Description", "Units"} for the fixed columns; channel columns are templates with
#: ``{channel}`` (resolve them with :func:`feature_dictionary`)
FEATURE_DICTIONARY: dict[str, dict[str, str]] = {
    "label": {"Description": "Lesion label in the instance map (1..n).", "Units": ""},
    "centroid_x_template_mm": {"Description": "Lesion centroid mapped to the template (MNI) space, x (RAS+).",
                               "Units": "mm"},
    "centroid_y_template_mm": {"Description": "Lesion centroid mapped to the template (MNI) space, y (RAS+).",
                               "Units": "mm"},
    "centroid_z_template_mm": {"Description": "Lesion centroid mapped to the template (MNI) space, z (RAS+).",
                               "Units": "mm"},
    "gm_fraction": {"Description": "Fraction of the lesion's voxels with GM probability > gm_threshold (GM overlap "
                                   "of algorithms.md §3.5; includes deep grey matter when the GM map does).",
                    "Units": ""},
    "cortex_fraction": {"Description": "Fraction of the lesion's voxels in the cortex (GM mask minus the atlas's deep "
                                       "grey, infratentorial and ventricle classes; the GM mask alone without an "
                                       "atlas; the atlas cortex class without a GM map).", "Units": ""},
    "cortical_type": {"Description": "Cortical involvement from cortex_fraction and distance_to_cortex_mm.",
                      "Levels": {"intracortical": "cortex_fraction >= 0.9",
                                 "leukocortical": "0.1 <= cortex_fraction < 0.9",
                                 "juxtacortical": "cortex_fraction < 0.1 and distance_to_cortex_mm <= 2 mm",
                                 "none": "none of the above (white matter)"}, "Units": ""},
    "distance_to_cortex_mm": {"Description": "Euclidean distance from the lesion's closest voxel to the closest cortex "
                                             "voxel (voxel centres; 0 when they overlap).", "Units": "mm"},
    "distance_to_ventricle_mm": {"Description": "Euclidean distance from the lesion's closest voxel to the closest "
                                                "voxel of an atlas ventricle label (0 when they overlap).",
                                 "Units": "mm"},
    "atlas_label": {"Description": "Majority atlas label over the lesion's voxels (0: none of the listed labels).",
                    "Units": ""},
    "atlas_name": {"Description": "Name of atlas_label in the atlas lookup table.", "Units": ""},
    "atlas_label_fraction": {"Description": "Fraction of the lesion's voxels carrying atlas_label.", "Units": ""},
    "atlas_class": {"Description": "Majority atlas location_class over the lesion's voxels.", "Units": ""},
    "atlas_class_fraction": {"Description": "Fraction of the lesion's voxels in atlas_class.", "Units": ""},
    "features_failed": {"Description": "1 when a feature computation failed for this lesion (its columns are "
                                       "n/a; the lesion is kept), else 0.", "Units": "",
                        "Levels": {"0": "all features computed",
                                   "1": "some features failed (see features_failed_reason)"}},
    "features_failed_reason": {"Description": "Which feature group failed and why (error type and message); n/a "
                                              "when none failed.", "Units": ""},
    "location_class": {"Description": "Location class: the first rule that holds, in the order infratentorial "
                                      "(majority atlas class infratentorial), cortical (intra- or leukocortical), "
                                      "periventricular (distance_to_ventricle_mm <= 3), juxtacortical, "
                                      "deep_white_matter (otherwise). n/a without an atlas.", "Units": ""},
}
for _name, (_desc, _units) in _SITK_DESCRIPTIONS.items():
    if _name in SITK_VECTOR:
        for _i in (1, 2, 3):
            FEATURE_DICTIONARY[f"sitk_{_name}_{_i}"] = {"Description": _desc.format(i=_i), "Units": _units}
    else:
        FEATURE_DICTIONARY[f"sitk_{_name}"] = {"Description": _desc, "Units": _units}
for _name, (_desc, _units) in _RADIOMICS_DESCRIPTIONS.items():
    FEATURE_DICTIONARY[f"radiomics_shape_{_name}"] = {"Description": _desc, "Units": _units}
_CHANNEL_TEMPLATES: dict[str, dict[str, str]] = {
    "{channel}_mean": {"Description": "Mean {channel} intensity inside the lesion.", "Units": "{channel} units"},
    "{channel}_median": {"Description": "Median {channel} intensity inside the lesion.", "Units": "{channel} units"},
    "{channel}_sd": {"Description": "Standard deviation (ddof 0) of {channel} inside the lesion.",
                     "Units": "{channel} units"},
    "{channel}_p10": {"Description": "10th percentile (linear interpolation) of {channel} inside the lesion.",
                      "Units": "{channel} units"},
    "{channel}_p90": {"Description": "90th percentile (linear interpolation) of {channel} inside the lesion.",
                      "Units": "{channel} units"},
    "{channel}_contrast_shell": {"Description": "{channel} lesion mean / mean over the perilesional shell (voxels "
                                                "within shell_voxels of the lesion, in the brain, outside every "
                                                "lesion).", "Units": ""},
    "{channel}_contrast_nawm": {"Description": "{channel} lesion mean / mean over normal-appearing white matter (WM "
                                              "mask in the brain, minus GM, lesions and their shells).", "Units": ""},
    "{channel}_contrast_brain": {"Description": "{channel} lesion mean / mean over the brain mask outside every "
                                               "lesion.", "Units": ""},
}
FEATURE_DICTIONARY.update(_CHANNEL_TEMPLATES)


def feature_dictionary(columns, channels=(), rules: LocationRules | None = None) -> dict[str, dict]:
    """Data-dictionary entries (``Description``, ``Units``, ``Levels``) of feature columns.

    Parameters
    ----------
    columns : iterable of str
        Column names of a :func:`lesion_features` table (unknown columns are skipped).
    channels : iterable of str
        Channel names used to resolve the ``{channel}_...`` columns.
    rules : LocationRules, optional
        The rules the table was computed with (default rules otherwise): the thresholds are
        written into the ``cortical_type`` levels and the ``location_class`` description.
    """
    rules = rules or LocationRules()
    out: dict[str, dict] = {}
    geometry = {"centroid_x_vox": ("Lesion centroid, voxel index x.", "voxel"),
                "centroid_y_vox": ("Lesion centroid, voxel index y.", "voxel"),
                "centroid_z_vox": ("Lesion centroid, voxel index z.", "voxel"),
                "centroid_x_mm": ("Lesion centroid, scanner x (RAS+).", "mm"),
                "centroid_y_mm": ("Lesion centroid, scanner y (RAS+).", "mm"),
                "centroid_z_mm": ("Lesion centroid, scanner z (RAS+).", "mm"),
                "n_voxels": ("Number of voxels of the lesion (= SimpleITK NumberOfPixels).", "voxel"),
                "volume_mm3": ("Lesion volume (= SimpleITK PhysicalSize).", "mm^3")}
    channels = list(channels)
    dynamic = {
        "cortical_type": {
            "Description": "Cortical involvement from cortex_fraction and distance_to_cortex_mm.", "Units": "",
            "Levels": {"intracortical": f"cortex_fraction >= {rules.intracortical_min:g}",
                       "leukocortical": f"{rules.leukocortical_min:g} <= cortex_fraction < {rules.intracortical_min:g}",
                       "juxtacortical": f"cortex_fraction < {rules.leukocortical_min:g} and distance_to_cortex_mm <= "
                                        f"{rules.juxtacortical_mm:g} mm",
                       "none": "none of the above (white matter)"}},
        "location_class": {
            "Description": "Location class: the first rule that holds, in the order " + ", ".join(rules.priority)
                           + f" (infratentorial: majority atlas class in {list(rules.infratentorial_classes)}; "
                           "cortical: intra- or leukocortical; periventricular: distance_to_ventricle_mm <= "
                           f"{rules.periventricular_mm:g}; juxtacortical: cortical_type juxtacortical; "
                           f"deep_grey_matter: majority atlas class in {list(rules.deep_grey_classes)}; "
                           "deep_white_matter: otherwise). n/a without an atlas.", "Units": ""},
        "gm_fraction": {"Description": f"Fraction of the lesion's voxels with GM probability > {rules.gm_threshold:g} "
                                       "(GM overlap of algorithms.md §3.5; includes deep grey matter when the GM map "
                                       "does).", "Units": ""},
    }
    for col in columns:
        if col in dynamic:
            out[col] = dynamic[col]
        elif col in FEATURE_DICTIONARY and "{channel}" not in col:
            out[col] = dict(FEATURE_DICTIONARY[col])
        elif col in geometry:
            out[col] = {"Description": geometry[col][0], "Units": geometry[col][1]}
        else:
            for ch in sorted(channels, key=len, reverse=True):
                if col.startswith(ch + "_"):
                    key = "{channel}_" + col[len(ch) + 1:]
                    if key in _CHANNEL_TEMPLATES:
                        tpl = _CHANNEL_TEMPLATES[key]
                        out[col] = {k: v.format(channel=ch) for k, v in tpl.items()}
                        break
    return out


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def _bbox_slices(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of a mask, padded and clipped to the array."""
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        out.append(slice(max(int(nz[0]) - pad, 0), min(int(nz[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(out)


def _crop_affine(affine: np.ndarray, slices: tuple[slice, ...]) -> np.ndarray:
    out = np.asarray(affine, dtype=np.float64).copy()
    out[:3, 3] = affine[:3, :3] @ np.array([s.start for s in slices], dtype=np.float64) + affine[:3, 3]
    return out


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

def _sitk_shape(inst: np.ndarray, n: int, affine: np.ndarray) -> dict[str, np.ndarray]:
    """SimpleITK LabelShapeStatistics over the lesions' bounding box (image borders kept)."""
    import SimpleITK as sitk

    from bids_app.core.registration import to_sitk

    out = {f"sitk_{k}": np.full(n, np.nan) for k in SITK_SCALAR}
    for k in SITK_VECTOR:
        for i in (1, 2, 3):
            out[f"sitk_{k}_{i}"] = np.full(n, np.nan)
    box = _bbox_slices(inst > 0, pad=1)
    if n == 0 or box is None:
        return out
    crop = np.ascontiguousarray(inst[box], dtype=np.uint32)
    image = to_sitk(Image(crop, _crop_affine(affine, box)), dtype=np.uint32)
    f = sitk.LabelShapeStatisticsImageFilter()
    f.ComputePerimeterOn()
    f.ComputeFeretDiameterOn()
    f.ComputeOrientedBoundingBoxOn()
    f.Execute(image)
    for lab in f.GetLabels():
        i = int(lab) - 1
        if not 0 <= i < n:
            continue
        for k in SITK_SCALAR:
            out[f"sitk_{k}"][i] = float(getattr(f, f"Get{k}")(lab))
        for k in SITK_VECTOR:
            vals = getattr(f, f"Get{k}")(lab)
            for j in range(3):
                out[f"sitk_{k}_{j + 1}"][i] = float(vals[j])
    # Elongation = sqrt(PM3 / PM2), Flatness = sqrt(PM2 / PM1): undefined when the denominator
    # is (numerically) zero; SimpleITK then returns 0 or a huge number from rounding noise
    pm = np.stack([out[f"sitk_PrincipalMoments_{j}"] for j in (1, 2, 3)], axis=1)
    scale = np.where(pm[:, 2] > 0, pm[:, 2], 1.0)
    out["sitk_Elongation"][pm[:, 1] <= _DEGENERATE * scale] = np.nan
    out["sitk_Flatness"][pm[:, 0] <= _DEGENERATE * scale] = np.nan
    return out


def _radiomics_shape(inst: np.ndarray, n: int, affine: np.ndarray,
                     failures: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    """The 14 PyRadiomics shape features, per lesion on its crop (padded by 1 voxel).

    A lesion whose extraction fails keeps NaN values and gets a line in ``failures``
    (0-based lesion index -> reason), so that it is counted and flagged, never silently lost.
    """
    import SimpleITK as sitk
    from scipy import ndimage

    out = {f"radiomics_shape_{k}": np.full(n, np.nan) for k in RADIOMICS_SHAPE}
    if n == 0:
        return out
    from radiomics import shape as rshape

    spacing = [float(z) for z in _zooms(affine)]
    logger = logging.getLogger("radiomics")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        for i, sl in enumerate(ndimage.find_objects(inst, max_label=n)):
            if sl is None:
                continue
            sl = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, dim)) for s, dim in zip(sl, inst.shape))
            m = (inst[sl] == i + 1).astype(np.uint8)
            mask = sitk.GetImageFromArray(np.ascontiguousarray(m.transpose(2, 1, 0)))
            mask.SetSpacing(spacing)
            image = sitk.GetImageFromArray(np.zeros(m.shape[::-1], dtype=np.float32))
            image.SetSpacing(spacing)
            try:
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore")
                    values = rshape.RadiomicsShape(image, mask, label=1).execute()
            except Exception as exc:  # noqa: BLE001 - pyradiomics raises plain Exceptions on degenerate masks
                if failures is not None:
                    failures[i] = f"radiomics_shape: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                continue
            for k in RADIOMICS_SHAPE:
                v = values.get(k)
                out[f"radiomics_shape_{k}"][i] = float(v) if v is not None else np.nan
    finally:
        logger.setLevel(level)
    return out


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
    box = _bbox_slices(target | lesions)
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
    zooms = _zooms(aff)

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
        cols.update(_sitk_shape(inst, n, aff))
    failures: dict[int, str] = {}
    if opts.radiomics_shape:
        cols.update(_radiomics_shape(inst, n, aff, failures))

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
