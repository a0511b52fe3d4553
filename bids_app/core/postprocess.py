"""Post-processing: probabilities -> binary lesion masks and a lesion instance map.

Conventions (shared by every module that thresholds probabilities, so that ensemble and
member masks are built identically, as the uncertainty measures of arXiv:2311.08931 and
arXiv:2407.05761 require):

* a voxel is foreground when ``p >= threshold`` (``>=`` as in MS_WML_uncs ``process_probs``);
* connected components use 6-, 18- or 26-connectivity (faces, +edges, +corners);
* a component is **kept when it has at least** ``min_size`` voxels. The reference code's
  ``l_min`` removes components of ``<= l_min`` voxels, so ``l_min = 3`` is ``min_size = 4``;
* instance labels are numbered in C-order raster order of each component's first voxel
  (the order ``scipy.ndimage.label`` gives), class by class in the model's label order, so
  the numbering does not depend on the labelling library.

All functions are pure: they never modify their inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONNECTIVITIES = (6, 18, 26)


def check_connectivity(connectivity: int) -> int:
    if int(connectivity) not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
    return int(connectivity)


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Label the connected components of a 3D binary mask in stable raster order.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
        Foreground voxels.
    connectivity : {6, 18, 26}
        Neighbourhood that joins two voxels into one component.

    Returns
    -------
    labels : ndarray of int32, shape (X, Y, Z)
        0 for background, ``1..n`` for the components, numbered by the C-order flat index
        of each component's first voxel.
    n : int
        Number of components.
    """
    import cc3d

    connectivity = check_connectivity(connectivity)
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {mask.shape}")
    raw = cc3d.connected_components(mask, connectivity=connectivity, out_dtype=np.uint32)
    n = int(raw.max()) if raw.size else 0
    labels = np.zeros(mask.shape, dtype=np.int32)
    if n == 0:
        return labels, 0
    # cc3d scans in its own order; renumber by first occurrence in C order. Only the foreground
    # is touched (lesions are a small part of a brain volume): the C-order flat indices of the
    # foreground come sorted, so the first index of each label is where np.unique finds it.
    nonzero = np.flatnonzero(mask)
    old = raw.ravel()[nonzero]
    _, first = np.unique(old, return_index=True)  # labels 1..n in label order
    order = np.argsort(first, kind="stable") + 1  # old labels in new order
    remap = np.zeros(n + 1, dtype=np.int32)
    remap[order] = np.arange(1, n + 1, dtype=np.int32)
    labels.ravel()[nonzero] = remap[old]
    return labels, n


def remove_small_components(mask: np.ndarray, min_size: int, connectivity: int = 26) -> np.ndarray:
    """Drop the components with fewer than ``min_size`` voxels.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
    min_size : int
        Smallest component size kept, in voxels (``<= 1`` keeps everything).
    connectivity : {6, 18, 26}

    Returns
    -------
    ndarray of bool, shape (X, Y, Z)
        A new array.
    """
    mask = np.asarray(mask, dtype=bool)
    if min_size <= 1:
        return mask.copy()
    import cc3d

    connectivity = check_connectivity(connectivity)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {mask.shape}")
    # sizes do not depend on the labels' order: cc3d's own labels, foreground voxels only
    nonzero = np.flatnonzero(mask)
    raw = cc3d.connected_components(mask, connectivity=connectivity, out_dtype=np.uint32).ravel()[nonzero]
    keep = np.bincount(raw) >= int(min_size)
    out = np.zeros(mask.shape, dtype=bool)
    out.ravel()[nonzero[keep[raw]]] = True
    return out


def binarize(prob: np.ndarray, threshold: float, min_size: int = 1, connectivity: int = 26) -> np.ndarray:
    """Threshold a probability map (``p >= threshold``) and remove small components.

    Parameters
    ----------
    prob : ndarray of float, shape (X, Y, Z)
        Probability of one lesion class, in [0, 1].
    threshold : float
    min_size : int
        Smallest lesion kept, in voxels.
    connectivity : {6, 18, 26}

    Returns
    -------
    ndarray of bool, shape (X, Y, Z)
    """
    return remove_small_components(np.asarray(prob) >= threshold, min_size, connectivity)


@dataclass(frozen=True)
class LesionSegmentation:
    """Result of :func:`segment_lesions`.

    Attributes
    ----------
    dseg : ndarray of uint8, shape (X, Y, Z)
        Class map: 0 background, otherwise the model's label index of the lesion class.
    instances : ndarray of int32, shape (X, Y, Z)
        Lesion instance map, 0 background, ``1..n`` lesions.
    instance_class : ndarray of int32, shape (n,)
        Model label index of each instance (row ``i`` is label ``i + 1``).
    """

    dseg: np.ndarray
    instances: np.ndarray
    instance_class: np.ndarray

    @property
    def n_lesions(self) -> int:
        return int(self.instance_class.size)

    def class_mask(self, label_index: int) -> np.ndarray:
        """Binary mask of one lesion class, shape (X, Y, Z)."""
        return self.dseg == label_index


def segmentation_from_maps(dseg: np.ndarray, instances: np.ndarray) -> LesionSegmentation:
    """The :class:`LesionSegmentation` whose class map and instance map these are (e.g. read
    back from the files a first node wrote, so a second node does not segment again).

    Parameters
    ----------
    dseg : ndarray of int, shape (X, Y, Z)
        Class map (0 background).
    instances : ndarray of int, shape (X, Y, Z)
        Instance map, ``1..n`` (0 background); every voxel of an instance has one class.

    Returns
    -------
    LesionSegmentation

    Raises
    ------
    ValueError
        Shapes differ, labels are not ``1..n``, or an instance spans two classes or background.
    """
    dseg = np.asarray(dseg)
    instances = np.asarray(instances)
    if dseg.shape != instances.shape:
        raise ValueError(f"class map {dseg.shape} and instance map {instances.shape} differ in shape")
    inside = instances > 0
    n = int(instances.max()) if inside.any() else 0
    labels = instances[inside].astype(np.int64)
    classes = dseg[inside].astype(np.int64)
    low = np.full(n, np.iinfo(np.int64).max)
    high = np.full(n, -1)
    np.minimum.at(low, labels - 1, classes)
    np.maximum.at(high, labels - 1, classes)
    if n and (high < 0).any():
        raise ValueError("instance labels are not 1..n")
    if (low != high).any() or (n and (low <= 0).any()):
        raise ValueError("an instance spans several classes or the background")
    return LesionSegmentation(dseg=dseg.astype(np.uint8), instances=instances.astype(np.int32),
                              instance_class=high.astype(np.int32))


def segment_lesions(
    class_probs: np.ndarray,
    lesion_labels: list[int] | tuple[int, ...],
    thresholds: dict[int, float] | float,
    min_size: int = 1,
    connectivity: int = 26,
) -> LesionSegmentation:
    """Turn ensemble class probabilities into a class map and an instance map.

    A voxel is assigned to the lesion class with the highest probability among those whose
    probability reaches their threshold, so the class masks never overlap (this only matters
    when thresholds are below 0.5). Each class mask is then cleaned of components smaller
    than ``min_size`` and its components become instances, class by class.

    Parameters
    ----------
    class_probs : ndarray of float, shape (C, X, Y, Z)
        Softmax probabilities of all C model classes (background included).
    lesion_labels : sequence of int
        Indices into axis 0 that are lesion classes (e.g. ``[1, 2]`` for WML, CL).
    thresholds : float or dict
        One threshold for every class, or ``{label_index: threshold}``.
    min_size : int
        Smallest lesion kept, in voxels.
    connectivity : {6, 18, 26}

    Returns
    -------
    LesionSegmentation
    """
    class_probs = np.asarray(class_probs)
    if class_probs.ndim != 4:
        raise ValueError(f"expected (C, X, Y, Z) probabilities, got shape {class_probs.shape}")
    lesion_labels = [int(c) for c in lesion_labels]
    if isinstance(thresholds, dict):
        thr = {c: float(thresholds[c]) for c in lesion_labels}
    else:
        thr = {c: float(thresholds) for c in lesion_labels}

    shape = class_probs.shape[1:]
    dseg = np.zeros(shape, dtype=np.uint8)
    if lesion_labels:
        # only the voxels where some lesion class reaches its threshold are touched (a small part
        # of a brain volume): among the classes that pass there, the most probable wins, the
        # first in ``lesion_labels`` on a tie
        passing = np.zeros(shape, dtype=bool)
        for c in lesion_labels:
            passing |= class_probs[c] >= thr[c]
        idx = np.flatnonzero(passing)
        candidates = np.stack([class_probs[c].ravel()[idx] for c in lesion_labels])
        # thresholds in the probabilities' own dtype, as ``p >= t`` with a Python float compares
        # (NumPy 2: the scalar takes the array's dtype), so ``passing`` and ``reached`` agree
        cut = np.array([thr[c] for c in lesion_labels]).astype(candidates.dtype if candidates.dtype.kind == "f"
                                                                 else np.float64)
        reached = candidates >= cut[:, None]
        winner = np.argmax(np.where(reached, candidates, -1.0), axis=0)
        dseg.ravel()[idx] = np.asarray(lesion_labels, dtype=np.uint8)[winner]

    instances = np.zeros(shape, dtype=np.int32)
    classes: list[np.ndarray] = []
    offset = 0
    cleaned_dseg = np.zeros(shape, dtype=np.uint8)
    for c in lesion_labels:
        kept = remove_small_components(dseg == c, min_size, connectivity)
        labels, n = label_components(kept, connectivity)
        kept_idx = np.flatnonzero(kept)
        cleaned_dseg.ravel()[kept_idx] = c
        instances.ravel()[kept_idx] = labels.ravel()[kept_idx] + offset
        classes.append(np.full(n, c, dtype=np.int32))
        offset += n
    instance_class = np.concatenate(classes) if classes else np.zeros(0, dtype=np.int32)
    return LesionSegmentation(dseg=cleaned_dseg, instances=instances, instance_class=instance_class)


def lesion_geometry(instances: np.ndarray, n_lesions: int, affine: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Position and size of every lesion, from one pass over the instance map.

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)
        0 background, ``1..n_lesions`` lesions.
    n_lesions : int
    affine : ndarray, shape (4, 4), optional
        Voxel -> scanner RAS+ mm; without it the mm columns and the volume are NaN.

    Returns
    -------
    dict of ndarray, each of shape (n_lesions,), in label order
        ``label``, ``centroid_x_vox``/``_y_vox``/``_z_vox`` (voxel indices, float),
        ``centroid_x_mm``/``_y_mm``/``_z_mm`` (scanner RAS+, mm), ``n_voxels``, ``volume_mm3``.
    """
    inst = np.asarray(instances)
    n = int(n_lesions)
    idx = np.flatnonzero(inst)
    lab = inst.reshape(-1)[idx].astype(np.int64)
    count = np.bincount(lab, minlength=n + 1)[: n + 1].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        centroid = np.stack([np.bincount(lab, weights=c, minlength=n + 1)[: n + 1] / count
                             for c in np.unravel_index(idx, inst.shape)], axis=1)[1:]
    if affine is None:
        mm = np.full_like(centroid, np.nan)
        volume = np.full(n, np.nan)
    else:
        aff = np.asarray(affine, dtype=np.float64)
        mm = centroid @ aff[:3, :3].T + aff[:3, 3]
        volume = count[1:] * abs(float(np.linalg.det(aff[:3, :3])))
    out = {"label": np.arange(1, n + 1, dtype=np.int64)}
    for axis, name in enumerate("xyz"):
        out[f"centroid_{name}_vox"] = centroid[:, axis]
    for axis, name in enumerate("xyz"):
        out[f"centroid_{name}_mm"] = mm[:, axis]
    out["n_voxels"] = count[1:].astype(np.int64)
    out["volume_mm3"] = volume
    return out


def label_pair_counts(a: np.ndarray, b: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint histogram of two label maps over the same voxels (the overlaps of every lesion pair).

    Parameters
    ----------
    a, b : ndarray of int, shape (N,)
        Labels of the same N voxels in two maps (``0..na`` and ``0..nb``).
    nb : int
        Largest label of ``b``.

    Returns
    -------
    a_label, b_label, n_voxels : ndarray of int64, shape (K,)
        Each label pair that occurs, sorted by (a, b), and its voxel count.
    """
    key = a.astype(np.int64) * (nb + 1) + b
    uniq, counts = np.unique(key, return_counts=True)
    return uniq // (nb + 1), uniq % (nb + 1), counts
