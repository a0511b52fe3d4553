"""Per-lesion shape statistics: SimpleITK label-shape statistics and PyRadiomics 3D shape.

:func:`sitk_shape` runs one ``LabelShapeStatisticsImageFilter`` pass over the lesions' bounding
box (perimeter, Feret diameter and oriented bounding box on); :func:`radiomics_shape` computes
the 14 PyRadiomics shape features per lesion on its crop. ``docs/features.md`` defines every
feature (the ``sitk_*`` and ``radiomics_shape_*`` columns of
:func:`bids_app.core.lesions.features.lesion_features`); the crop helpers (:func:`voxel_sizes`,
:func:`bbox_slices`) serve the other feature blocks too.

All functions are pure: they never modify their inputs and never read or write files.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from bids_app.core.imageio import Image

#: SimpleITK LabelShapeStatistics features reported (scalar ones)
SITK_SCALAR: tuple[str, ...] = (
    "Perimeter", "PerimeterOnBorder", "PerimeterOnBorderRatio", "NumberOfPixelsOnBorder", "Roundness",
    "Elongation", "Flatness", "FeretDiameter", "EquivalentSphericalRadius", "EquivalentSphericalPerimeter",
)
#: SimpleITK vector features, reported as ``_1``..``_3`` columns
SITK_VECTOR: tuple[str, ...] = ("PrincipalMoments", "EquivalentEllipsoidDiameter", "OrientedBoundingBoxSize")
#: the 14 PyRadiomics 3D shape features (docs/features.md)
RADIOMICS_SHAPE: tuple[str, ...] = (
    "Elongation", "Flatness", "LeastAxisLength", "MajorAxisLength", "Maximum2DDiameterColumn",
    "Maximum2DDiameterRow", "Maximum2DDiameterSlice", "Maximum3DDiameter", "MeshVolume", "MinorAxisLength",
    "Sphericity", "SurfaceArea", "SurfaceVolumeRatio", "VoxelVolume",
)
#: relative size below which a principal moment counts as zero (degenerate lesion)
_DEGENERATE = 1e-9


# --------------------------------------------------------------------------------------------
# crop helpers
# --------------------------------------------------------------------------------------------

def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes (mm), shape (3,): the column norms of a (4, 4) affine's linear part."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def bbox_slices(mask: np.ndarray, pad: int = 0) -> tuple[slice, ...] | None:
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


# --------------------------------------------------------------------------------------------
# feature blocks
# --------------------------------------------------------------------------------------------

def sitk_shape(inst: np.ndarray, n: int, affine: np.ndarray) -> dict[str, np.ndarray]:
    """SimpleITK LabelShapeStatistics over the lesions' bounding box (image borders kept)."""
    import SimpleITK as sitk

    from bids_app.core.registration import to_sitk

    out = {f"sitk_{k}": np.full(n, np.nan) for k in SITK_SCALAR}
    for k in SITK_VECTOR:
        for i in (1, 2, 3):
            out[f"sitk_{k}_{i}"] = np.full(n, np.nan)
    box = bbox_slices(inst > 0, pad=1)
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


def radiomics_shape(inst: np.ndarray, n: int, affine: np.ndarray,
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

    spacing = [float(z) for z in voxel_sizes(affine)]
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
