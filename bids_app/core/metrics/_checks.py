"""Input checks shared by the metrics modules: 2-D masks as one-slice volumes, binarisation, shape
agreement and the voxels considered (all, or those inside a mask). Pure numpy.

A 2-D mask ``(X, Y)`` is treated as the one-slice volume ``(X, Y, 1)`` (``docs/uncertainty.md``).
"""

from __future__ import annotations

import numpy as np


def as_volume(a, name: str) -> np.ndarray:
    """``a`` as an ``(X, Y, Z)`` array: ``(X, Y)`` becomes the view ``(X, Y, 1)``; other ranks raise
    ``ValueError`` naming ``name``."""
    arr = np.asarray(a)
    if arr.ndim == 2:  # a 2-D image is the one-slice volume (X, Y, 1); this is a view
        return arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be 2-D or 3-D, got shape {arr.shape}")
    return arr


def binary(a, name: str) -> np.ndarray:
    """``as_volume(a) > 0``: bool, shape (X, Y, Z)."""
    return as_volume(a, name) > 0


def same_shape(*arrays: tuple[np.ndarray, str]) -> None:
    """Raise ``ValueError`` unless the ``(array, name)`` pairs (``None`` arrays skipped) share one shape."""
    shapes = {arr.shape for arr, _ in arrays if arr is not None}
    if len(shapes) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{n} {a.shape}" for a, n in arrays if a is not None))


def select(arr: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Voxels considered: all (flattened, a view when possible) or those inside ``mask``."""
    return arr.reshape(-1) if mask is None else arr[mask]
