"""Lesion location: registration to a template, atlas warping and location classes.

* **Registration.** :func:`register_to_template` fits an affine transform between the
  subject's reference image (fixed) and the template T1w (moving, MNI152NLin2009cAsym by
  default): Mattes mutual information, centre-of-mass start, a similarity stage then a full
  affine stage, each with a 3-level pyramid. ITK runs single-threaded with a fixed sampling
  seed (as :mod:`bids_app.core.conform` does), so reruns give bit-identical transforms.
  The result, :class:`TemplateTransform`, maps **subject points to template points** (ITK's
  fixed-to-moving convention, LPS inside ITK): it is what resampling a template image onto the
  subject grid needs, and what carries lesion centroids to MNI coordinates.
* **Warping.** :func:`warp_labels_to_subject` (nearest neighbour, for a dseg atlas),
  :func:`warp_probability_to_subject` (linear, for probseg maps) and
  :func:`warp_to_template` (subject array -> template grid, through the inverse) all take
  arrays plus affines; :func:`lesion_frequency_map` accumulates warped lesion masks.
* **Atlas.** The atlas is configuration, never bundled: a dseg image plus a lookup table with
  columns ``index``, ``name``, ``location_class`` (``index`` may be a range ``"101-196"``);
  :func:`parse_atlas_lut` reads the table's DataFrame. The ``desc-HOparc`` dseg used in the
  tests is named like a TemplateFlow file but is not one: niworkflows 0.0.5 derived it from the
  FSL Harvard-Oxford atlases, which carry FSL's licence.
* **Rules.** :class:`LocationRules` holds every threshold of the cortical-involvement types and
  of the location classes; :func:`cortical_type` and :func:`location_class` apply them to
  per-lesion arrays (vectorised). ``docs/features.md`` documents them.

All functions are pure: they never modify their inputs and never read or write files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bids_app.core.conform import (
    RAS_TO_LPS,
    REGISTRATION_SEED,
    _single_threaded_itk,
    from_sitk_array,
    set_sitk_geometry,
    to_sitk,
)
from bids_app.core.imageio import Image
from bids_app.errors import BadInputData

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"

#: location classes in the default priority order (the first rule that holds wins)
LOCATION_CLASSES: tuple[str, ...] = (
    "infratentorial", "cortical", "periventricular", "juxtacortical", "deep_white_matter",
)
#: cortical-involvement types
CORTICAL_TYPES: tuple[str, ...] = ("intracortical", "leukocortical", "juxtacortical", "none")

# --------------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LocationRules:
    """Thresholds and atlas classes of the cortical types and the location classes.

    Attributes
    ----------
    gm_threshold : float
        A voxel is grey matter when the GM probability is ``> gm_threshold``.
    intracortical_min : float
        Cortex fraction ``>= intracortical_min`` -> ``intracortical``.
    leukocortical_min : float
        Cortex fraction in ``[leukocortical_min, intracortical_min)`` -> ``leukocortical``.
    juxtacortical_mm : float
        Cortex fraction ``< leukocortical_min`` and distance from the lesion's closest voxel to
        the cortex ``<= juxtacortical_mm`` -> ``juxtacortical`` (a lesion with a few cortical
        voxels has distance 0). 2 mm = 2 voxels at 1 mm.
    periventricular_mm : float
        Distance from the lesion's closest voxel to a ventricle voxel ``<= periventricular_mm``
        -> ``periventricular``.
    ventricle_classes, infratentorial_classes, cortex_classes, white_matter_classes,
    deep_grey_classes : tuple of str
        ``location_class`` values of the atlas lookup table that make up each region.
    non_cortical_gm_classes : tuple of str
        Atlas classes removed from the GM mask to obtain the cortex (deep grey nuclei,
        cerebellum/brain stem, ventricles), when both a GM map and an atlas are given.
    priority : tuple of str
        Order in which the location rules are tried; names from ``infratentorial``,
        ``cortical``, ``periventricular``, ``juxtacortical``, ``deep_grey_matter``; the last
        entry is the fallback (``deep_white_matter``).
    """

    gm_threshold: float = 0.5
    intracortical_min: float = 0.9
    leukocortical_min: float = 0.1
    juxtacortical_mm: float = 2.0
    periventricular_mm: float = 3.0
    ventricle_classes: tuple[str, ...] = ("ventricle",)
    infratentorial_classes: tuple[str, ...] = ("infratentorial",)
    cortex_classes: tuple[str, ...] = ("cortex",)
    white_matter_classes: tuple[str, ...] = ("white_matter",)
    deep_grey_classes: tuple[str, ...] = ("deep_grey_matter",)
    non_cortical_gm_classes: tuple[str, ...] = ("deep_grey_matter", "infratentorial", "ventricle")
    priority: tuple[str, ...] = LOCATION_CLASSES

    def __post_init__(self):
        known = {"infratentorial", "cortical", "periventricular", "juxtacortical", "deep_grey_matter",
                 "deep_white_matter"}
        bad = [p for p in self.priority if p not in known]
        if bad or not self.priority:
            raise ValueError(f"unknown location rules {bad}; choose from {sorted(known)}")
        if not 0.0 < self.leukocortical_min <= self.intracortical_min <= 1.0:
            raise ValueError("need 0 < leukocortical_min <= intracortical_min <= 1")


def cortical_type(cortex_fraction: np.ndarray, distance_to_cortex_mm: np.ndarray,
                  rules: LocationRules = LocationRules()) -> np.ndarray:
    """Cortical involvement of each lesion.

    Parameters
    ----------
    cortex_fraction : array of float, shape (n,)
        Fraction of the lesion's voxels in the cortex, in [0, 1] (NaN: unknown).
    distance_to_cortex_mm : array of float, shape (n,)
        Distance from the lesion's closest voxel to the closest cortex voxel (0 when they
        overlap; NaN: unknown).
    rules : LocationRules

    Returns
    -------
    ndarray of object, shape (n,)
        ``"intracortical"`` (fraction >= 0.9), ``"leukocortical"`` (0.1 <= fraction < 0.9),
        ``"juxtacortical"`` (fraction < 0.1 and distance <= 2 mm), ``"none"``; ``None`` where
        the fraction is NaN.
    """
    f = np.asarray(cortex_fraction, dtype=np.float64)
    d = np.asarray(distance_to_cortex_mm, dtype=np.float64)
    out = np.full(f.shape, "none", dtype=object)
    with np.errstate(invalid="ignore"):
        out[d <= rules.juxtacortical_mm] = "juxtacortical"
        out[f >= rules.leukocortical_min] = "leukocortical"
        out[f >= rules.intracortical_min] = "intracortical"
    out[np.isnan(f)] = None
    return out


def location_class(
    majority_class: Sequence[str | None],
    cortical: Sequence[str | None],
    distance_to_ventricle_mm: np.ndarray,
    rules: LocationRules = LocationRules(),
) -> np.ndarray:
    """Location class of each lesion: the first rule of ``rules.priority`` that holds.

    Rules
    -----
    * ``infratentorial``: the lesion's majority atlas class is in ``infratentorial_classes``
      (brain stem, cerebellum);
    * ``cortical``: the cortical type is ``intracortical`` or ``leukocortical``;
    * ``periventricular``: distance to a ventricle ``<= periventricular_mm`` (3 mm);
    * ``juxtacortical``: the cortical type is ``juxtacortical``;
    * ``deep_grey_matter`` (not in the default priority): majority class in ``deep_grey_classes``;
    * otherwise ``deep_white_matter``.

    Parameters
    ----------
    majority_class : sequence of str or None, length n
        Majority atlas ``location_class`` over the lesion's voxels (None: no atlas).
    cortical : sequence of str or None, length n
        From :func:`cortical_type`.
    distance_to_ventricle_mm : array of float, shape (n,)
        NaN when unknown.

    Returns
    -------
    ndarray of object, shape (n,)
        The class names; None for every lesion when no atlas information is available
        (``majority_class`` all None), since periventricular/infratentorial cannot be decided.
    """
    maj = np.asarray(list(majority_class), dtype=object)
    cort = np.asarray(list(cortical), dtype=object)
    dv = np.asarray(distance_to_ventricle_mm, dtype=np.float64)
    n = maj.size
    if not (cort.size == n == dv.size):
        raise ValueError("majority_class, cortical and distance_to_ventricle_mm must have the same length")
    out = np.full(n, None, dtype=object)
    if n == 0:
        return out
    known = np.array([m is not None for m in maj], dtype=bool)
    with np.errstate(invalid="ignore"):
        tests = {
            "infratentorial": np.isin(maj, list(rules.infratentorial_classes)),
            "cortical": np.isin(cort, ["intracortical", "leukocortical"]),
            "periventricular": dv <= rules.periventricular_mm,
            "juxtacortical": cort == "juxtacortical",
            "deep_grey_matter": np.isin(maj, list(rules.deep_grey_classes)),
            "deep_white_matter": np.ones(n, dtype=bool),
        }
    undecided = known.copy()
    for name in rules.priority:
        hit = undecided & tests[name]
        out[hit] = name
        undecided &= ~hit
    out[undecided] = "deep_white_matter"
    return out


# --------------------------------------------------------------------------------------------
# atlas lookup table
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AtlasLUT:
    """A parsed atlas lookup table.

    Attributes
    ----------
    index : ndarray of int64, shape (K,)
        Label values (ranges expanded), increasing.
    name : ndarray of object, shape (K,)
    location_class : ndarray of object, shape (K,)
    """

    index: np.ndarray
    name: np.ndarray
    location_class: np.ndarray

    def _lookup(self, labels: np.ndarray, values: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        out = np.full(labels.shape, None, dtype=object)
        if self.index.size == 0:
            return out
        pos = np.clip(np.searchsorted(self.index, labels), 0, self.index.size - 1)
        found = self.index[pos] == labels
        out[found] = values[pos[found]]
        return out

    def class_of(self, labels: np.ndarray) -> np.ndarray:
        """``location_class`` of each label value (None for labels absent from the table)."""
        return self._lookup(labels, self.location_class)

    def name_of(self, labels: np.ndarray) -> np.ndarray:
        """``name`` of each label value (None for labels absent from the table)."""
        return self._lookup(labels, self.name)

    def mask_of(self, atlas_labels: np.ndarray, classes: Iterable[str]) -> np.ndarray:
        """Boolean mask of the atlas voxels whose label belongs to one of ``classes``."""
        wanted = self.index[np.isin(self.location_class, list(classes))]
        return np.isin(np.asarray(atlas_labels), wanted)


def parse_atlas_lut(table: pd.DataFrame, source: str | None = None) -> AtlasLUT:
    """Parse an atlas lookup table (columns ``index``, ``name``, ``location_class``).

    ``index`` holds integers or inclusive ranges ``"a-b"`` (e.g. ``"101-196"``: one row for all
    cortical labels); ``name`` is optional. Label 0 is background and cannot be listed.

    Raises
    ------
    BadInputData
        Missing columns, unparsable or duplicated indices.
    """
    hint = "the atlas lookup table needs the columns index, name, location_class (index may be a range a-b)."
    if "index" not in table.columns or "location_class" not in table.columns:
        raise BadInputData(f"Atlas lookup table lacks the columns index and location_class (has "
                           f"{list(table.columns)}).", path=source, hint=hint)
    idx: list[int] = []
    names: list[str] = []
    classes: list[str] = []
    for _, row in table.iterrows():
        raw = str(row["index"]).strip()
        try:
            if "-" in raw[1:]:
                a, b = raw.split("-", 1) if not raw.startswith("-") else (raw, raw)
                lo, hi = int(a), int(b)
                values = list(range(lo, hi + 1))
                if hi < lo:
                    raise ValueError
            else:
                values = [int(float(raw))]
        except ValueError:
            raise BadInputData(f"Atlas lookup table has an unparsable index {raw!r}.", path=source, hint=hint) from None
        name = str(row["name"]) if "name" in table.columns and pd.notna(row["name"]) else str(raw)
        cls = str(row["location_class"]).strip() if pd.notna(row["location_class"]) else "n/a"
        idx += values
        names += [name] * len(values)
        classes += [cls] * len(values)
    index = np.asarray(idx, dtype=np.int64)
    if np.any(index <= 0):
        raise BadInputData("Atlas lookup table lists label 0 or a negative label (0 is background).", path=source,
                           hint=hint)
    if np.unique(index).size != index.size:
        raise BadInputData("Atlas lookup table lists a label twice.", path=source, hint=hint)
    order = np.argsort(index, kind="stable")
    return AtlasLUT(index[order], np.asarray(names, dtype=object)[order], np.asarray(classes, dtype=object)[order])


# --------------------------------------------------------------------------------------------
# transform
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TemplateTransform:
    """An affine transform from subject (fixed) space to template (moving) space.

    ``parameters`` are ITK ``AffineTransform`` parameters (9 matrix entries, row-major, then 3
    translations, mm) and ``fixed_parameters`` its centre (mm), in ITK's LPS convention, exactly
    as SimpleITK writes a ``.txt`` transform file (readable by ANTs and ITK-SNAP). The transform
    maps a subject point to the corresponding template point.

    Attributes
    ----------
    parameters : tuple of 12 float
    fixed_parameters : tuple of 3 float
    metric : float
        Final Mattes mutual information (lower is better), for QC.
    template : str
    """

    parameters: tuple[float, ...]
    fixed_parameters: tuple[float, ...]
    metric: float = float("nan")
    template: str = DEFAULT_TEMPLATE

    def to_sitk(self):
        import SimpleITK as sitk

        t = sitk.AffineTransform(3)
        t.SetFixedParameters([float(v) for v in self.fixed_parameters])
        t.SetParameters([float(v) for v in self.parameters])
        return t

    @classmethod
    def from_sitk(cls, transform, metric: float = float("nan"), template: str = DEFAULT_TEMPLATE) -> TemplateTransform:
        import SimpleITK as sitk

        aff = sitk.AffineTransform(3)
        aff.SetMatrix(transform.GetMatrix())
        aff.SetTranslation(transform.GetTranslation())
        aff.SetCenter(transform.GetCenter())
        return cls(tuple(float(p) for p in aff.GetParameters()), tuple(float(p) for p in aff.GetFixedParameters()),
                   float(metric), template)

    @classmethod
    def from_ras_matrix(cls, matrix: np.ndarray, template: str = DEFAULT_TEMPLATE) -> TemplateTransform:
        """From a 4x4 matrix mapping subject RAS+ mm to template RAS+ mm (centre 0)."""
        m = np.asarray(matrix, dtype=np.float64)
        a = RAS_TO_LPS @ m[:3, :3] @ RAS_TO_LPS
        t = RAS_TO_LPS @ m[:3, 3]
        return cls(tuple(float(v) for v in a.ravel()) + tuple(float(v) for v in t), (0.0, 0.0, 0.0),
                   float("nan"), template)

    @property
    def ras_matrix(self) -> np.ndarray:
        """4x4 matrix mapping subject RAS+ mm to template RAS+ mm."""
        a = np.asarray(self.parameters[:9], dtype=np.float64).reshape(3, 3)
        t = np.asarray(self.parameters[9:12], dtype=np.float64)
        c = np.asarray(self.fixed_parameters[:3], dtype=np.float64)
        out = np.eye(4)
        out[:3, :3] = RAS_TO_LPS @ a @ RAS_TO_LPS
        out[:3, 3] = RAS_TO_LPS @ (t + c - a @ c)
        return out

    def subject_to_template(self, points_mm: np.ndarray) -> np.ndarray:
        """Map subject scanner RAS+ points (mm), shape (N, 3), to template RAS+ points (mm)."""
        p = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        m = self.ras_matrix
        return p @ m[:3, :3].T + m[:3, 3]

    def template_to_subject(self, points_mm: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`subject_to_template`."""
        p = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        m = np.linalg.inv(self.ras_matrix)
        return p @ m[:3, :3].T + m[:3, 3]


def _sitk_grid(shape: Sequence[int], affine: np.ndarray, pixel=None):
    """An empty SimpleITK image with the geometry of a nibabel (shape, affine) grid."""
    import SimpleITK as sitk

    return set_sitk_geometry(sitk.Image([int(s) for s in shape], sitk.sitkUInt8 if pixel is None else pixel), affine)


def _check_grid(data: np.ndarray, affine: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(data)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"{name} must be a 3D array, got shape {data.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"{name} affine must be 4x4, got {affine.shape}")
    return data, affine


def register_to_template(
    reference_image: Image,
    template_t1w: Image,
    *,
    reference_mask: np.ndarray | None = None,
    template_mask: np.ndarray | None = None,
    max_iterations: int = 200,
    sampling_percentage: float = 0.1,
    shrink_factors: Sequence[int] = (4, 2),
    smoothing_mm: Sequence[float] = (2.0, 1.0),
    template: str = DEFAULT_TEMPLATE,
) -> TemplateTransform:
    """Affine registration of the template T1w (moving) to the subject's reference image (fixed).

    Mattes MI (32 bins), regular sampling of ``sampling_percentage`` of the fixed voxels with a
    fixed seed, regular-step gradient descent with physical-shift scales, a pyramid with
    ``shrink_factors`` (relative to the reference grid; (4, 2) = 4 and 2 mm for a 1 mm image,
    enough for an affine to a 2 mm template) and ``smoothing_mm``; first a similarity transform
    (rotation, translation, isotropic scale) from a centre-of-mass start, then a full affine
    transform from it. Single-threaded: bit-identical reruns.

    Masks multiply the images (zero outside). On a real skull-stripped 1 mm T1w (open_ms_data
    patient07) against the 2 mm template, brain-to-brain (both masks) matched the template's
    tissue to the subject's brain best (Dice 0.942 vs 0.939 with the subject mask only; ITK
    metric masks instead of multiplication: 0.909-0.913). For a head image, pass no masks.

    Parameters
    ----------
    reference_image : Image
        The subject's reference channel (e.g. T1w), any orientation.
    template_t1w : Image
        The template T1w (e.g. MNI152NLin2009cAsym res-02 or res-01).
    reference_mask, template_mask : ndarray of bool, optional
        Brain masks on the two grids. When given, each image is multiplied by its mask
        (brain-to-brain registration: use both for a skull-stripped subject).
    shrink_factors, smoothing_mm : sequence
        Pyramid levels (same length).
    max_iterations : int
        Per pyramid level and stage.
    sampling_percentage : float
        Fraction of the fixed image's voxels sampled for the metric.
    template : str
        Recorded in the result.

    Returns
    -------
    TemplateTransform
        Subject -> template points.
    """
    with _single_threaded_itk():
        return _register_to_template(reference_image, template_t1w, reference_mask, template_mask,
                                     int(max_iterations), float(sampling_percentage),
                                     [int(f) for f in shrink_factors], [float(v) for v in smoothing_mm], template)


def _masked(image: Image, mask: np.ndarray | None) -> Image:
    if mask is None:
        return image
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the image {image.shape}")
    return Image(np.where(mask, np.asarray(image.data, dtype=np.float32), np.float32(0)), image.affine, image.path)


def _register_to_template(reference, template_t1w, reference_mask, template_mask, max_iterations, sampling, shrink,
                          smoothing, name):
    import SimpleITK as sitk

    fixed_raw = to_sitk(_masked(reference, reference_mask))
    moving_raw = to_sitk(_masked(template_t1w, template_mask))

    # centres of mass of the raw (non-negative) intensities: the scanner and template frames can
    # be centimetres apart, and a geometric centre would be misled by the neck
    init = sitk.CenteredTransformInitializer(fixed_raw, moving_raw, sitk.Similarity3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    fixed = sitk.Normalize(fixed_raw)
    moving = sitk.Normalize(moving_raw)

    def method(initial):
        reg = sitk.ImageRegistrationMethod()
        reg.SetNumberOfThreads(1)
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(sampling, REGISTRATION_SEED)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=max_iterations,
                                                     gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(shrink)
        reg.SetSmoothingSigmasPerLevel(smoothing)
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(initial, inPlace=False)
        return reg

    reg = method(init)
    similarity = reg.Execute(fixed, moving)
    similarity = sitk.Similarity3DTransform(similarity.GetNthTransform(0) if hasattr(similarity, "GetNthTransform")
                                            else similarity)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    affine.SetCenter(similarity.GetCenter())
    reg = method(affine)
    final = reg.Execute(fixed, moving)
    final = final.GetNthTransform(0) if hasattr(final, "GetNthTransform") else final
    final = sitk.AffineTransform(final)
    reg.SetInitialTransform(final, inPlace=False)
    metric = float(reg.MetricEvaluate(fixed, moving))
    return TemplateTransform.from_sitk(final, metric, name)


# --------------------------------------------------------------------------------------------
# warping
# --------------------------------------------------------------------------------------------

def _resample(data, affine, out_shape, out_affine, transform, interpolation: str, dtype, default=0.0):
    import SimpleITK as sitk

    interp = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
    if interpolation not in interp:
        raise ValueError(f"interpolation must be one of {sorted(interp)}, got {interpolation!r}")
    np_dtype, pixel = dtype
    moving = to_sitk(Image(np.asarray(data), affine), dtype=np_dtype)
    grid = _sitk_grid(out_shape, out_affine)
    with _single_threaded_itk():
        out = sitk.Resample(moving, grid, transform, interp[interpolation], default, pixel)
    return from_sitk_array(out)


def warp_labels_to_subject(
    atlas_labels: np.ndarray,
    atlas_affine: np.ndarray,
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
    transform: TemplateTransform,
) -> np.ndarray:
    """Resample a template label map (dseg) onto the subject grid, nearest neighbour.

    Parameters
    ----------
    atlas_labels : ndarray of int, shape (X', Y', Z')
        On the template grid.
    atlas_affine : ndarray, shape (4, 4)
    reference_shape : (X, Y, Z)
    reference_affine : ndarray, shape (4, 4)
        The subject grid.
    transform : TemplateTransform
        Subject -> template, from :func:`register_to_template`.

    Returns
    -------
    ndarray of int32, shape (X, Y, Z)
        0 outside the atlas field of view.
    """
    import SimpleITK as sitk

    atlas_labels, atlas_affine = _check_grid(atlas_labels, atlas_affine, "atlas_labels")
    return _resample(atlas_labels, atlas_affine, reference_shape, reference_affine, transform.to_sitk(), "nearest",
                     (np.int32, sitk.sitkInt32)).astype(np.int32, copy=False)


def warp_probability_to_subject(
    probability: np.ndarray,
    template_affine: np.ndarray,
    reference_shape: Sequence[int],
    reference_affine: np.ndarray,
    transform: TemplateTransform,
) -> np.ndarray:
    """Resample a template probability map (probseg) onto the subject grid, linear.

    Returns
    -------
    ndarray of float32, shape (X, Y, Z)
        In [0, 1]; 0 outside the template field of view.
    """
    import SimpleITK as sitk

    probability, template_affine = _check_grid(probability, template_affine, "probability")
    out = _resample(probability, template_affine, reference_shape, reference_affine, transform.to_sitk(), "linear",
                    (np.float32, sitk.sitkFloat32))
    return np.clip(out, 0.0, 1.0)


def warp_to_template(
    data: np.ndarray,
    affine: np.ndarray,
    template_shape: Sequence[int],
    template_affine: np.ndarray,
    transform: TemplateTransform,
    interpolation: str = "linear",
) -> np.ndarray:
    """Resample a subject array onto the template grid (through the inverse transform).

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z)
        On the subject grid (e.g. a lesion mask as float).
    affine : ndarray, shape (4, 4)
    template_shape, template_affine
        The template grid.
    transform : TemplateTransform
        Subject -> template.
    interpolation : {"linear", "nearest", "bspline"}

    Returns
    -------
    ndarray of float32, shape template_shape
        0 outside the subject's field of view.
    """
    import SimpleITK as sitk

    data, affine = _check_grid(data, affine, "data")
    inverse = transform.to_sitk().GetInverse()
    return _resample(data, affine, template_shape, template_affine, inverse, interpolation,
                     (np.float32, sitk.sitkFloat32))


@dataclass(frozen=True)
class LesionFrequencyMap:
    """Lesion frequency in template space.

    Attributes
    ----------
    count : ndarray of uint16, shape template_shape
        Number of subjects with a lesion at each voxel.
    fraction : ndarray of float32, shape template_shape
        ``count / n_subjects`` (0 with no subjects).
    n_subjects : int
    """

    count: np.ndarray
    fraction: np.ndarray
    n_subjects: int


def lesion_frequency_map(
    subjects: Iterable[tuple[np.ndarray, np.ndarray, TemplateTransform]],
    template_shape: Sequence[int],
    template_affine: np.ndarray,
) -> LesionFrequencyMap:
    """Accumulate subject lesion masks, warped to the template, into a count/fraction map.

    Each mask is resampled with linear interpolation and a voxel counts when the warped value is
    ``>= 0.5`` (the nearest-neighbour result for an isotropic grid, smoother when the grids
    differ). Subjects are consumed one at a time (pass a generator to keep memory flat).

    Parameters
    ----------
    subjects : iterable of (mask, affine, transform)
        ``mask`` (X, Y, Z) bool/int (non-zero = lesion) on the subject grid with its affine,
        and the subject's :class:`TemplateTransform`.
    template_shape, template_affine
        The template grid.

    Returns
    -------
    LesionFrequencyMap
    """
    shape = tuple(int(s) for s in template_shape)
    count = np.zeros(shape, dtype=np.uint16)
    n = 0
    for mask, affine, transform in subjects:
        warped = warp_to_template((np.asarray(mask) > 0).astype(np.float32), affine, shape, template_affine, transform,
                                  "linear")
        count += warped >= 0.5
        n += 1
    fraction = count.astype(np.float32) / np.float32(n) if n else np.zeros(shape, dtype=np.float32)
    return LesionFrequencyMap(count, fraction, n)


# --------------------------------------------------------------------------------------------
# per-lesion atlas reductions
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AtlasAssignment:
    """Majority atlas label and class of each lesion (arrays of shape (n,))."""

    label: np.ndarray          # int64, 0 when the lesion lies outside every listed label
    label_fraction: np.ndarray  # float64
    name: np.ndarray           # object
    location_class: np.ndarray  # object (None when no listed label)
    class_fraction: np.ndarray  # float64


def atlas_assignment(instances: np.ndarray, n_lesions: int, atlas_labels: np.ndarray, lut: AtlasLUT) -> AtlasAssignment:
    """Majority atlas label and majority location class of every lesion.

    Voxels whose atlas label is 0 or missing from the lookup table are not counted. Ties go to
    the smaller label value (class: the first in sorted class-name order).

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)
    n_lesions : int
    atlas_labels : ndarray of int, shape (X, Y, Z)
        On the subject grid (:func:`warp_labels_to_subject`).
    lut : AtlasLUT

    Returns
    -------
    AtlasAssignment
        Fractions are relative to the lesion's voxel count (all voxels).
    """
    inst = np.asarray(instances)
    atlas = np.asarray(atlas_labels)
    if atlas.shape != inst.shape:
        raise ValueError(f"atlas_labels shape {atlas.shape} differs from instances {inst.shape}")
    n = int(n_lesions)
    idx = np.flatnonzero(inst)
    lab = inst.reshape(-1)[idx].astype(np.int64)
    size = np.bincount(lab, minlength=n + 1)[1:n + 1].astype(np.float64)
    a = atlas.reshape(-1)[idx].astype(np.int64)
    listed = np.isin(a, lut.index)
    lab_l, a_l = lab[listed], a[listed]

    label = np.zeros(n, dtype=np.int64)
    label_count = np.zeros(n, dtype=np.float64)
    if lab_l.size:
        pairs, counts = np.unique(np.stack([lab_l, a_l]), axis=1, return_counts=True)
        # sort by lesion, then count descending, then label ascending: the first of each lesion wins
        order = np.lexsort((pairs[1], -counts, pairs[0]))
        pairs, counts = pairs[:, order], counts[order]
        first = np.ones(pairs.shape[1], dtype=bool)
        first[1:] = pairs[0, 1:] != pairs[0, :-1]
        label[pairs[0, first] - 1] = pairs[1, first]
        label_count[pairs[0, first] - 1] = counts[first]

    classes = np.array(sorted(set(lut.location_class.tolist())), dtype=object)
    cls_code = np.searchsorted(classes, lut.class_of(a_l).astype(str)) if a_l.size else np.zeros(0, np.int64)
    n_cls = classes.size
    hist = np.bincount((lab_l - 1) * n_cls + cls_code, minlength=n * n_cls).reshape(n, n_cls) if n else \
        np.zeros((0, n_cls))
    best = hist.argmax(axis=1) if n_cls else np.zeros(n, dtype=np.int64)
    best_count = hist[np.arange(n), best] if n_cls else np.zeros(n)
    loc = np.full(n, None, dtype=object)
    has = best_count > 0
    loc[has] = classes[best[has]]
    with np.errstate(divide="ignore", invalid="ignore"):
        label_fraction = np.where(size > 0, label_count / size, np.nan)
        class_fraction = np.where(size > 0, best_count / size, np.nan)
    name = lut.name_of(label)
    return AtlasAssignment(label, label_fraction, name, loc, class_fraction)
