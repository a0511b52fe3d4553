"""What the report figures show, as plain functions of arrays: which slices, which lesions, which
evaluation category each voxel has (tested on their own, no matplotlib).

Arrays are in RAS+ voxel order ``(X, Y, Z)`` (:mod:`bids_app.reports.figures`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: evaluation categories against the reference masks: key -> (colour, legend label)
EVAL_CATEGORIES = {
    "TP": ("#2bd96b", "true positive"),
    "USL": ("#ffd400", "under-segmented"),
    "FP": ("#ff4b2b", "false positive"),
    "FN": ("#33b6ff", "missed"),
}
#: what each evaluation category means (the report's legend)
EVAL_EXPLANATIONS = {
    "TP": "detected: overlap with a reference lesion at or above the detection threshold",
    "USL": "overlaps a reference lesion, below the detection threshold",
    "FP": "no reference lesion there",
    "FN": "reference lesion that no predicted voxel touches",
}
#: lesion_type values of the lesion table -> evaluation category
LESION_TYPE_CATEGORY = {"TPL": "TP", "USL": "USL", "FPL": "FP"}

#: plane name -> the voxel axis it cuts (RAS+ order)
PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}

#: below this volume a lesion is not shown as an "uncertain lesion" crop (a 10 mm^3 lesion is
#: about 2.7 mm across: smaller specks are mostly threshold noise at the edge of larger ones)
MIN_CROP_VOLUME_MM3 = 10.0


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2-D slice of a RAS+ volume as displayed (rows top to bottom, columns left to right).

    Parameters
    ----------
    volume : ndarray, shape (X, Y, Z)
    plane : {'axial', 'coronal', 'sagittal'}
    index : int
        Position along the axis the plane cuts.

    Returns
    -------
    ndarray
        axial: (Y, X) anterior up; coronal: (Z, X) superior up; sagittal: (Z, Y) superior up.
    """
    axis = PLANES[plane]
    return np.rot90(np.take(volume, int(index), axis=axis))


def plane_aspect(plane: str, zooms: Sequence[float]) -> float:
    """``imshow`` aspect (row spacing / column spacing) of a displayed slice."""
    zx, zy, zz = (float(z) for z in zooms[:3])
    return {"axial": zy / zx, "coronal": zz / zx, "sagittal": zz / zy}[plane]


def choose_cuts(mask: np.ndarray, n: int = 3, brain: np.ndarray | None = None, zooms: Sequence[float] = (1, 1, 1),
                min_gap_mm: float = 10.0) -> dict[str, list[int]]:
    """Slices through the lesions, in each plane, showing as many different lesions as possible.

    Greedy, per plane: the slice that cuts the most lesions not yet shown (ties: the most
    lesion voxels), at least ``min_gap_mm`` from the slices already chosen, up to ``n``.
    Lesions are the connected components (26-connectivity) of ``mask``, so a missed reference
    lesion counts as much as a large predicted one. Without lesions (or when fewer than ``n``
    slices hold new lesions), evenly spaced slices through the brain fill up.

    Parameters
    ----------
    mask : ndarray, shape (X, Y, Z)
        Lesion voxels (non-zero), e.g. the prediction and the missed reference lesions.
    n : int
        Slices per plane.
    brain : ndarray of bool, optional
        Brain mask, for the fallback positions.
    zooms : sequence of float
        Voxel sizes (mm).
    min_gap_mm : float
        Minimum distance between two chosen slices of a plane.

    Returns
    -------
    dict
        ``{'axial': [z...], 'coronal': [y...], 'sagittal': [x...]}``, each sorted.
    """
    from scipy import ndimage

    mask = np.asarray(mask) > 0
    labels, n_lesions = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    support = np.asarray(brain) > 0 if brain is not None and np.any(brain) else np.ones(mask.shape, bool)
    coords = np.nonzero(labels)
    values = labels[coords]
    cuts: dict[str, list[int]] = {}
    for plane, axis in PLANES.items():
        others = tuple(a for a in range(3) if a != axis)
        size = mask.shape[axis]
        per_slice = mask.sum(axis=others)
        # which lesions each slice cuts: a (slice, lesion) incidence matrix
        cut = np.zeros((size, n_lesions + 1), bool)
        cut[coords[axis], values] = True
        cut = cut[:, 1:]
        gap = max(1, round(min_gap_mm / float(zooms[axis])))
        chosen: list[int] = []
        shown = np.zeros(n_lesions, bool)
        while len(chosen) < n:
            new = (cut & ~shown).sum(axis=1)
            allowed = np.ones(size, bool)
            for c in chosen:
                allowed[max(c - gap + 1, 0):c + gap] = False
            score = np.where(allowed & (per_slice > 0), new * (mask.size + 1) + per_slice, -1)
            best = int(np.argmax(score))
            if score[best] < 0 or (new[best] == 0 and shown.any() and per_slice[best] == 0):
                break
            chosen.append(best)
            shown |= cut[best]
        if len(chosen) < n:
            inside = np.flatnonzero(support.any(axis=others))
            if inside.size == 0:
                inside = np.arange(size)
            for index in np.linspace(inside[0], inside[-1], n + 2)[1:-1].round().astype(int):
                if len(chosen) < n and all(abs(int(index) - c) >= max(1, gap // 2) for c in chosen):
                    chosen.append(int(index))
        cuts[plane] = sorted(chosen)
    return cuts


def bounding_box(mask: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (the whole array if empty)."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    boxes = []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        boxes.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, mask.shape[axis])))
    return tuple(boxes)


def evaluation_categories(instances: np.ndarray, lesion_types: dict[int, str],
                          missed: np.ndarray | None) -> np.ndarray:
    """A category map for the TP / USL / FP / missed colouring.

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)
        Predicted lesion labels ``1..n``.
    lesion_types : dict
        Label -> ``lesion_type`` of the lesion table (``TPL``, ``USL``, ``FPL``).
    missed : ndarray of bool, optional
        Voxels of the reference lesions that no predicted voxel overlaps (FN).

    Returns
    -------
    ndarray of uint8
        0 background, then the 1-based position of the category in :data:`EVAL_CATEGORIES`.
        Predicted lesions win where a missed lesion would overlap them (it cannot, by definition).
    """
    codes = {key: i for i, key in enumerate(EVAL_CATEGORIES, start=1)}
    out = np.zeros(np.shape(instances), np.uint8)
    if missed is not None:
        out[np.asarray(missed) > 0] = codes["FN"]
    labels = np.asarray(instances)
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.uint8)
    for label, kind in lesion_types.items():
        category = LESION_TYPE_CATEGORY.get(str(kind))
        if category and 0 < int(label) < lut.size:
            lut[int(label)] = codes[category]
    predicted = labels > 0
    out[predicted] = lut[labels[predicted]]
    return out


def missed_reference_lesions(instances: np.ndarray, reference: np.ndarray, connectivity: int = 18) -> np.ndarray:
    """Voxels of the reference lesions that no predicted lesion voxel overlaps (the FNL of the evaluation).

    Uses :func:`bids_app.core.metrics.detection.classify_lesions`, so the missed lesions shown are the
    ones the evaluation counted.
    """
    from bids_app.core.metrics.detection import classify_lesions

    reference = np.asarray(reference) > 0
    if not reference.any():
        return np.zeros(reference.shape, bool)
    instances = np.asarray(instances).astype(np.int32)
    # relabel 1..n (classify_lesions wants every label used)
    labels = np.unique(instances[instances > 0])
    lut = np.zeros(int(instances.max(initial=0)) + 1, np.int32)
    lut[labels] = np.arange(1, labels.size + 1)
    types = classify_lesions(None, reference, connectivity=connectivity, pred_instances=lut[instances])
    missed_labels = np.flatnonzero(~np.asarray(types.ref_detected)) + 1
    return np.isin(types.ref_labels, missed_labels) & (types.ref_labels > 0)


def choose_uncertain_lesions(table, n: int = 5, min_volume_mm3: float = MIN_CROP_VOLUME_MM3,
                             score: str = "LSU"):
    """The ``n`` most uncertain lesions among those of at least ``min_volume_mm3``.

    Parameters
    ----------
    table : pandas.DataFrame
        The lesion table (``label``, ``volume_mm3`` and ``score`` columns).
    n : int
    min_volume_mm3 : float
        Size floor; lesions below it are never chosen.
    score : str
        The uncertainty column, highest first (ties: larger lesion first).

    Returns
    -------
    pandas.DataFrame
        At most ``n`` rows, most uncertain first (may be empty).
    """
    if score not in table.columns or "volume_mm3" not in table.columns:
        return table.iloc[0:0]
    usable = table[(table["volume_mm3"].astype(float) >= float(min_volume_mm3)) & table[score].notna()]
    return usable.sort_values([score, "volume_mm3"], ascending=[False, False], kind="stable").head(n)


def crop_title(label: int, volume_mm3: float, score_name: str, score: float, extra: Sequence[str] = ()) -> str:
    """``lesion #12 · 45 mm³ · LSU 0.31`` (plus e.g. the class and the evaluation type)."""
    parts = [f"lesion #{int(label)}", f"{float(volume_mm3):.0f} mm\u00b3", f"{score_name} {float(score):.3g}"]
    return " \u00b7 ".join(parts + [str(e) for e in extra if e])
