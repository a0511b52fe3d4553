"""Lesion location: atlas lookup, location classes and lesion frequency in template space.

* **Atlas.** The atlas is configuration, never bundled: a dseg image plus a lookup table with
  columns ``index``, ``name``, ``location_class`` (``index`` may be a range ``"101-196"``);
  :func:`parse_atlas_lut` reads the table's DataFrame, and :func:`atlas_assignment` gives each
  lesion its majority label and class on the atlas warped to the subject
  (:func:`bids_app.core.registration.warp_labels_to_subject`). The ``desc-HOparc`` dseg used in
  the tests is named like a TemplateFlow file but is not one: niworkflows 0.0.5 derived it from
  the FSL Harvard-Oxford atlases, which carry FSL's licence.
* **Rules.** :class:`LocationRules` holds every threshold of the cortical-involvement types and
  of the location classes; :func:`cortical_type` and :func:`location_class` apply them to
  per-lesion arrays (vectorised). ``docs/features.md`` documents them.
* **Frequency.** :func:`lesion_frequency_map` accumulates subject lesion masks warped to the
  template (:func:`bids_app.core.registration.warp_to_template`) into a count/fraction map.

Registration to the template and the warps live in :mod:`bids_app.core.registration`.

All functions are pure: they never modify their inputs and never read or write files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bids_app.core.registration import TemplateTransform, warp_to_template
from bids_app.errors import BadInputData

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
# lesion frequency in template space
# --------------------------------------------------------------------------------------------

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
