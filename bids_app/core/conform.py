"""Conforming the inputs: canonical orientation, co-registration, brain mask.

* **Orientation.** Every channel is put on the reference image's grid, in its stored voxel
  order. A model read with nnU-Net's ``NibabelIOWithReorient`` sees it in RAS+ voxel order
  (:func:`to_canonical`), one read with ``SimpleITKIO``/``NibabelIO`` in that stored order
  (``bids_app.interfaces.segment.network_channels``, card field ``input_orientation``);
  reorientation is an exact permutation/flip of the voxel grid, so outputs are mapped back to
  the raw reference image's own voxel order with :func:`from_canonical` and land on exactly the
  grid the user gave.
* **Co-registration.** Secondary channels (e.g. FLAIR) are rigidly registered to the
  reference channel (e.g. T1w) with SimpleITK, Mattes mutual information, a 3-level pyramid
  and a geometry-centred start, single-threaded with a fixed sampling seed so that reruns are
  bit-identical. When both images share one grid (same shape and affine), they are taken as
  already aligned and nothing is resampled.
* **Brain mask.** Skull-stripped input is recognised from its support (exact zeros outside a
  brain-sized volume); otherwise the MNI152NLin2009cAsym template is registered (affine, MI)
  to the reference image and its brain mask is carried over.

Every function is pure (arrays in, arrays out); SimpleITK images only live inside them. The
SimpleITK bridge and the registration set-up shared with the template registration are
:mod:`bids_app.core.registration`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel import orientations as nio

from bids_app.core.imageio import Image
from bids_app.core.registration import (
    mattes_registration,
    moments_start,
    resample,
    single_threaded_itk,
    to_sitk,
)
from bids_app.errors import BadInputData

#: a skull-stripped brain occupies this many litres (adult brain ~1.1-1.7 L; a head 3-5 L)
BRAIN_VOLUME_LITRES = (0.6, 2.4)
#: ... and at least this fraction of the field of view is exactly zero
STRIPPED_MIN_ZERO_FRACTION = 0.2
#: FLAIR and T1w must share at least this fraction of the reference field of view
MIN_FOV_OVERLAP = 0.3


# --------------------------------------------------------------------------------------
# Orientation
# --------------------------------------------------------------------------------------
def to_canonical(image: Image) -> tuple[Image, np.ndarray]:
    """Reorient to RAS+ voxel order.

    Returns
    -------
    canonical : Image
        Same voxels, permuted/flipped so that axes point to R, A, S.
    ornt : ndarray, shape (3, 2)
        nibabel orientation of the original image (input to :func:`from_canonical`).
    """
    ornt = nio.io_orientation(image.affine)
    transform = nio.ornt_transform(ornt, nio.axcodes2ornt("RAS"))
    data = nio.apply_orientation(image.data, transform)
    affine = image.affine @ nio.inv_ornt_aff(transform, image.data.shape)
    return Image(np.ascontiguousarray(data), affine, image.path), ornt


def from_canonical(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Map an array on the canonical (RAS+) grid back to the original voxel order.

    Parameters
    ----------
    data : ndarray, shape (..., X, Y, Z)
        Leading axes (e.g. members, classes) are kept.
    ornt : ndarray, shape (3, 2)
        As returned by :func:`to_canonical`.
    """
    transform = nio.ornt_transform(nio.axcodes2ornt("RAS"), ornt)
    lead = data.ndim - 3
    if lead == 0:
        return np.ascontiguousarray(nio.apply_orientation(data, transform))
    flat = data.reshape((-1,) + data.shape[lead:])
    out = np.stack([nio.apply_orientation(v, transform) for v in flat])
    return np.ascontiguousarray(out.reshape(data.shape[:lead] + out.shape[1:]))


def same_grid(a: Image, b: Image, tol_mm: float = 1e-3) -> bool:
    """True when two images share shape and voxel-to-world mapping."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=tol_mm)


# --------------------------------------------------------------------------------------
# Field of view
# --------------------------------------------------------------------------------------
def fov_overlap(reference: Image, moving: Image) -> float:
    """Fraction of the reference field of view (world bounding box) covered by the moving one."""

    def bbox(img: Image):
        shape = np.array(img.shape) - 1
        corners = np.array([[i, j, k, 1] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])], float)
        world = corners @ img.affine.T
        return world[:, :3].min(0), world[:, :3].max(0)

    (a0, a1), (b0, b1) = bbox(reference), bbox(moving)
    inter = np.clip(np.minimum(a1, b1) - np.maximum(a0, b0), 0, None)
    volume = np.prod(np.maximum(a1 - a0, 1e-6))
    return float(np.prod(inter) / volume)


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RigidTransform:
    """A rigid transform from reference (fixed) space to moving space, in ITK's LPS convention.

    ``parameters`` are Euler3DTransform's (3 angles in rad, 3 translations in mm) and
    ``fixed_parameters`` its centre (mm), exactly as SimpleITK writes them to a ``.txt``
    transform file, so the file can be read by ANTs and ITK-SNAP.
    """

    parameters: tuple[float, ...]
    fixed_parameters: tuple[float, ...]
    metric_before: float
    metric_after: float
    identity: bool

    def to_sitk(self):
        import SimpleITK as sitk

        t = sitk.Euler3DTransform()
        t.SetFixedParameters(self.fixed_parameters)
        t.SetParameters(self.parameters)
        return t

    @property
    def translation_mm(self) -> float:
        return float(np.linalg.norm(self.parameters[3:6]))

    @property
    def rotation_deg(self) -> float:
        return float(np.degrees(np.max(np.abs(self.parameters[:3]))))


def _normalised_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if mask.sum() < 10:
        return 0.0
    x = a[mask].astype(np.float64)
    y = b[mask].astype(np.float64)
    x -= x.mean()
    y -= y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def register_rigid(reference: Image, moving: Image, *, max_iterations: int = 200) -> RigidTransform:
    with single_threaded_itk():
        return _register_rigid(reference, moving, max_iterations)


def _register_rigid(reference: Image, moving: Image, max_iterations: int) -> RigidTransform:
    """Rigidly register ``moving`` to ``reference`` (Mattes MI, 3-level pyramid).

    Parameters
    ----------
    reference, moving : Image
        Any orientation and grid; physical space from their affines.

    Returns
    -------
    RigidTransform
        ``metric_before``/``metric_after`` are the Mattes MI values (lower is better).

    Raises
    ------
    BadInputData
        The fields of view do not overlap (headers place the images in different places).
    """
    import SimpleITK as sitk

    overlap = fov_overlap(reference, moving)
    if overlap < MIN_FOV_OVERLAP:
        raise BadInputData(
            f"The images do not overlap in space (only {overlap:.0%} of the reference field of view is covered).",
            path=moving.path,
            hint="check the NIfTI headers (qform/sform, origin) of both images.",
        )
    fixed = sitk.Normalize(to_sitk(reference))
    mov = sitk.Normalize(to_sitk(moving))
    mask = foreground_mask(reference.data)
    initial = sitk.CenteredTransformInitializer(
        fixed, mov, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    # Start from the headers' alignment (the images come from one session): only the centre
    # of rotation is taken from the geometry, not a translation between the two centres.
    initial = sitk.Euler3DTransform(initial)
    initial.SetTranslation((0.0, 0.0, 0.0))

    # The metric samples the head (or the brain of stripped input), not the air around it, and
    # fewer points at the finer levels: ~0.5/0.2/0.05 of the foreground at shrink 4/2/1. The
    # optimiser stops at steps of 1e-3 mm. Measured on patient07 with a known motion of 4.5 deg
    # and 5.4 mm (benchmarks/bench_participant.py, docs/benchmarks.md): 27 s -> 4 s on one
    # thread, mean error 0.60 -> 0.44 mm.
    reg = mattes_registration(initial, sampling_percentage=RIGID_SAMPLING, max_iterations=max_iterations,
                              shrink_factors=[4, 2, 1], smoothing_mm=[2.0, 1.0, 0.0], min_step=1e-3,
                              fixed_mask=None if mask is None else _mask_like(mask, reference))
    before = reg.MetricEvaluate(fixed, mov)
    final = reg.Execute(fixed, mov)
    euler = sitk.Euler3DTransform(final.GetNthTransform(0) if hasattr(final, "GetNthTransform") else final)
    reg.SetInitialTransform(euler, inPlace=False)
    after = reg.MetricEvaluate(fixed, mov)
    if after > before:
        # The optimiser ended worse than the scanner headers' alignment (same-session images
        # usually are aligned already): keep the headers.
        return RigidTransform((0.0,) * 6, tuple(float(p) for p in euler.GetFixedParameters()),
                              float(before), float(before), True)
    return RigidTransform(
        parameters=tuple(float(p) for p in euler.GetParameters()),
        fixed_parameters=tuple(float(p) for p in euler.GetFixedParameters()),
        metric_before=float(before),
        metric_after=float(after),
        identity=False,
    )


#: metric sampling per pyramid level (shrink 4, 2, 1) of the rigid co-registration, within the foreground
RIGID_SAMPLING = (0.5, 0.2, 0.05)


def foreground_mask(data: np.ndarray, fraction: float = 0.02, dilate: int = 2) -> np.ndarray | None:
    """Voxels of an image that hold the head (or the brain of skull-stripped input), for the
    registration metric: intensity above ``fraction`` of the 99th percentile, dilated by
    ``dilate`` voxels. None when that is nearly all of the image (no gain) or almost nothing.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z)
        Intensities in any unit; NaN counts as background.

    Returns
    -------
    ndarray of bool, shape (X, Y, Z), or None
    """
    from scipy import ndimage

    values = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0)
    top = float(np.percentile(values, 99))
    if top <= 0:
        return None
    mask = ndimage.binary_dilation(values > fraction * top, iterations=dilate)
    share = float(mask.mean())
    return mask if 0.01 <= share <= 0.9 else None


def _mask_like(mask: np.ndarray, reference: Image):
    return to_sitk(Image(mask.astype(np.uint8), reference.affine), dtype=np.uint8)


def identity_transform(reference: Image) -> RigidTransform:
    return RigidTransform((0.0,) * 6, (0.0, 0.0, 0.0), float("nan"), float("nan"), True)


def resample_to(reference: Image, moving: Image, transform: RigidTransform | None = None,
                interpolation: str = "linear") -> np.ndarray:
    """Resample ``moving`` onto the reference grid through ``transform`` (reference -> moving).

    Without a transform (or with an identity one) the images are aligned by their headers
    and the resampling is one trilinear/nearest interpolation of the voxel-to-voxel affine
    (scipy), the same computation the training data went through
    (:func:`bids_app.training.dataset.conform_case`); a registration result goes through
    SimpleITK.

    Returns
    -------
    ndarray of float32, shape reference.shape
        0 outside the moving image's field of view.
    """
    if transform is None or transform.identity:
        return resample_by_header(reference, moving, interpolation)
    import SimpleITK as sitk

    return resample(to_sitk(moving), to_sitk(reference), transform.to_sitk(), interpolation, 0.0, sitk.sitkFloat32)


def resample_by_header(reference: Image, moving: Image, interpolation: str = "linear") -> np.ndarray:
    """``moving`` on the reference grid, aligned through the two affines only (no registration).

    Returns
    -------
    ndarray of float32, shape reference.shape
    """
    from scipy import ndimage

    order = {"linear": 1, "nearest": 0, "bspline": 3}[interpolation]
    vox = np.linalg.inv(moving.affine) @ reference.affine  # reference voxel -> moving voxel
    return ndimage.affine_transform(np.asarray(moving.data, dtype=np.float32), vox[:3, :3], offset=vox[:3, 3],
                                    output_shape=reference.shape, order=order, mode="constant", cval=0.0,
                                    prefilter=order > 1).astype(np.float32, copy=False)


def registration_quality(reference: Image, resampled: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Normalised correlation of the gradient magnitudes of the reference and the resampled
    image inside ``mask`` (or where both are non-zero); ~0.3-0.7 for a good T1w/FLAIR pair,
    below ~0.15 suggests a failed registration. Gradient magnitude makes the check
    contrast-independent (T1w and FLAIR have opposite CSF contrast)."""
    from scipy import ndimage

    def grad(v):
        v = np.asarray(v, dtype=np.float32)
        return np.sqrt(sum(ndimage.sobel(v, axis=a) ** 2 for a in range(3)))

    if mask is None:
        mask = (reference.data != 0) & (resampled != 0)
    return _normalised_correlation(grad(reference.data), grad(resampled), mask.astype(bool))


# --------------------------------------------------------------------------------------
# Brain mask
# --------------------------------------------------------------------------------------
def skull_stripped_support(image: Image) -> tuple[bool, str]:
    """Decide whether an image is already skull-stripped, and say why.

    Skull-stripped images are exactly zero outside the brain; a brain is 0.6-2.4 L, a whole
    head is 3-5 L, and defaced heads are zero only in the face region.
    """
    data = image.data
    nonzero = data != 0
    zero_fraction = 1.0 - float(nonzero.mean())
    voxel_ml = float(np.prod(image.zooms)) / 1000.0
    litres = float(nonzero.sum()) * voxel_ml / 1000.0
    lo, hi = BRAIN_VOLUME_LITRES
    stripped = zero_fraction >= STRIPPED_MIN_ZERO_FRACTION and lo <= litres <= hi
    reason = (f"{zero_fraction:.0%} of voxels are exactly zero and the non-zero support is {litres:.2f} L "
              f"({'within' if lo <= litres <= hi else 'outside'} the {lo}-{hi} L of a brain)")
    return stripped, reason


def support_mask(image: Image) -> np.ndarray:
    """Brain mask of a skull-stripped image: its non-zero support, holes filled."""
    from scipy import ndimage

    from bids_app.core.postprocess import label_components

    mask = image.data != 0
    labels, n = label_components(mask, 6)
    if n > 1:  # keep the largest component (drops isolated noise voxels)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return ndimage.binary_fill_holes(mask)


def template_brain_mask(reference: Image, template_t1w: Image, template_mask: Image) -> tuple[np.ndarray, float]:
    with single_threaded_itk():
        return _template_brain_mask(reference, template_t1w, template_mask)


def _template_brain_mask(reference: Image, template_t1w: Image, template_mask: Image) -> tuple[np.ndarray, float]:
    """Brain mask from a template: affine MI registration of the template's head T1w to the
    reference image, then its brain mask resampled (linear, > 0.5) onto the reference grid.

    Returns
    -------
    mask : ndarray of bool, shape reference.shape
    metric : float
        Final Mattes MI (lower is better), for QC.
    """
    import SimpleITK as sitk
    from scipy import ndimage

    init, fixed, moving = moments_start(reference, template_t1w, sitk.AffineTransform(3))
    reg = mattes_registration(init, sampling_percentage=0.2, max_iterations=200, shrink_factors=[4, 2, 1],
                              smoothing_mm=[2.0, 1.0, 0.0], min_step=1e-3)
    transform = reg.Execute(fixed, moving)
    reg.SetInitialTransform(transform, inPlace=False)
    metric = float(reg.MetricEvaluate(fixed, moving))
    mask = resample(to_sitk(template_mask), to_sitk(reference), transform, "linear", 0.0, sitk.sitkFloat32) > 0.5
    return ndimage.binary_fill_holes(mask), metric


# --------------------------------------------------------------------------------------
# QC heuristics (flags in summary.json and the report, never errors)
# --------------------------------------------------------------------------------------
#: voxel axes count as sheared when the cosine between two of them exceeds this (about 0.6 deg
#: off 90 deg; scanners write orthogonal axes to float32 precision, ~1e-6)
SHEAR_MAX_COSINE = 0.01
#: field of view of a brain image, per axis, in mm: outside this the geometry is implausible
#: (an adult brain is ~140 x 170 x 120 mm; slabs of 30 mm exist)
FOV_MM = (20.0, 500.0)
#: contrast check: a FLAIR's WM is darker than its GM, a T1w's WM brighter (ratio above this).
#: Measured: 0.90-1.01 for genuine FLAIRs (6 synthetic subjects, MPRAGE/UNIT1, stripped or not;
#: one clinical pair of open_ms_data: 0.93), 1.12-1.41 for the T1w given as FLAIR
MODALITY_WM_GM_RATIO_MAX = 1.05


def geometry_qc(image: Image) -> dict:
    """Shear and field-of-view checks of one image's voxel-to-world affine.

    Parameters
    ----------
    image : Image
        ``affine`` (4, 4) in mm.

    Returns
    -------
    dict
        ``max_axis_cosine`` (float, |cos| of the least orthogonal pair of voxel axes),
        ``sheared`` (bool, above :data:`SHEAR_MAX_COSINE`), ``fov_mm`` (3 floats),
        ``implausible_fov`` (bool, an extent outside :data:`FOV_MM`).
    """
    lin = np.asarray(image.affine, dtype=np.float64)[:3, :3]
    axes = lin / np.linalg.norm(lin, axis=0)
    cosines = np.abs(axes.T @ axes - np.eye(3))
    worst = float(cosines.max())
    fov = np.asarray(image.shape, dtype=np.float64) * np.asarray(image.zooms)
    return {"max_axis_cosine": round(worst, 6), "sheared": bool(worst > SHEAR_MAX_COSINE),
            "fov_mm": [round(float(f), 1) for f in fov],
            "implausible_fov": bool(np.any(fov < FOV_MM[0]) or np.any(fov > FOV_MM[1]))}


def negative_values_qc(data: np.ndarray) -> dict:
    """Negative intensities of a magnitude image (MR magnitudes are >= 0; negatives come from
    a wrong scl_slope/inter, a phase or difference image, or an unclipped reconstruction).

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z)

    Returns
    -------
    dict
        ``negative_voxels`` (int), ``negative_fraction`` (float in [0, 1]), ``min_value`` (float).
    """
    neg = int(np.count_nonzero(data < 0))
    return {"negative_voxels": neg, "negative_fraction": round(neg / max(data.size, 1), 6),
            "min_value": float(np.min(data)) if data.size else 0.0}


def modality_contrast_qc(t1w: np.ndarray, flair: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """A heuristic check that a FLAIR channel has FLAIR contrast, using the T1w as tissue proxy.

    Within the foreground (``mask``, else where the T1w exceeds 10% of its 99th percentile, in
    the middle half of its bounding box along every axis, which keeps the brain and leaves
    out the scalp), the brightest T1w voxels (percentiles 70-95: mostly white matter) and the mid-grey ones
    (percentiles 35-55: mostly grey matter) are taken; the ratio of the FLAIR's mean over the
    first to its mean over the second is about 0.9-1.0 for a FLAIR (white matter darker than
    grey matter) and about 1.1-1.4 when the "FLAIR" is T1-weighted (or the same image twice).
    A ratio above :data:`MODALITY_WM_GM_RATIO_MAX` is flagged.

    It is a heuristic: it assumes the T1w channel is T1-weighted (a swapped pair is not
    detected), and heavy lesion load, strong bias fields or noise-only images blur it.

    Parameters
    ----------
    t1w, flair : ndarray, shape (X, Y, Z)
        On the same grid.
    mask : ndarray of bool, shape (X, Y, Z), optional

    Returns
    -------
    dict
        ``wm_gm_ratio`` (float or None when undefined), ``looks_unlike_flair`` (bool), ``rule``.
    """
    t1 = np.asarray(t1w, dtype=np.float64)
    fl = np.asarray(flair, dtype=np.float64)
    if mask is None:
        hi = np.percentile(t1, 99) if t1.size else 0.0
        mask = t1 > 0.1 * hi
        box = _bbox_slices(mask)
        if box is not None:
            # the middle half of the head along every axis: brain, not scalp fat (bright in both)
            central = np.zeros_like(mask)
            central[tuple(slice(s.start + (s.stop - s.start) // 4, s.stop - (s.stop - s.start) // 4)
                          for s in box)] = True
            mask = mask & central
    values = t1[mask]
    ratio = None
    if values.size >= 100:
        p35, p55, p70, p95 = np.percentile(values, [35, 55, 70, 95])
        wm = mask & (t1 >= p70) & (t1 <= p95)
        gm = mask & (t1 >= p35) & (t1 <= p55)
        gm_mean = float(fl[gm].mean()) if gm.any() else 0.0
        if wm.any() and gm_mean > 0:
            ratio = float(fl[wm].mean()) / gm_mean
    return {"wm_gm_ratio": None if ratio is None else round(ratio, 4),
            "looks_unlike_flair": bool(ratio is not None and ratio > MODALITY_WM_GM_RATIO_MAX),
            "rule": f"mean FLAIR over T1w percentiles 70-95 / over 35-55 > {MODALITY_WM_GM_RATIO_MAX} "
                    "(heuristic: a FLAIR's white matter is darker than its grey matter)"}


def _bbox_slices(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the True voxels (None when there are none)."""
    if not mask.any():
        return None
    out = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        out.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(out)
