"""Image formation: tissue model, lesion contrast, blur, bias field and noise.

The noise-free image of one contrast is a partial-volume mixture::

    I = brain * (p_GM I_GM + p_WM I_WM + p_CSF I_CSF) + (1 - brain) * s_head T1_template

(WM = 1; ``T1_template`` is the template's head T1w scaled to WM = 1, which gives the scalp,
skull and neck a plausible appearance) in which lesions replace tissue with their own
intensity, weighted by their partial-volume fraction ``w``::

    I <- (1 - w) I + w r I_WM      (WML, r per lesion)
    I <- (1 - w) I + w r I_GM      (CL)

The acquisition then applies a Gaussian point-spread function, a smooth multiplicative bias
field ``exp(b)`` (``b`` a random cubic polynomial of the coordinates with a given standard
deviation over the field of view) and Rician noise (the magnitude of a complex Gaussian
signal). MP2RAGE UNIT1 images get Gaussian noise and the characteristic salt-and-pepper
background outside the head (a ratio of two noise-only signals).

Pure numerics; inputs are never modified.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def tissue_image(
    gm: np.ndarray,
    wm: np.ndarray,
    csf: np.ndarray,
    brain: np.ndarray,
    head_t1: np.ndarray,
    *,
    i_gm: float,
    i_csf: float,
    i_nonbrain: float,
    i_wm: float = 1.0,
) -> np.ndarray:
    """Noise-free partial-volume image (float32, same shape as the inputs).

    ``gm, wm, csf`` are tissue probabilities; inside the brain they are renormalised to sum
    to 1 (voxels with no tissue become CSF); ``brain`` in [0, 1] blends with the head.
    """
    total = gm + wm + csf
    scale = 1.0 / np.maximum(total, 1.0)
    mix = (gm * i_gm + wm * i_wm + csf * i_csf) * scale + np.clip(1.0 - total, 0.0, 1.0) * i_csf
    out = brain * mix + (1.0 - brain) * (i_nonbrain * head_t1)
    return out.astype(np.float32)


def blend_lesions(
    image: np.ndarray,
    weight: np.ndarray,
    ratio: np.ndarray,
    reference: float,
) -> np.ndarray:
    """``(1 - w) I + w r ref`` (new float32 array); ``ratio`` broadcastable to the image."""
    w = np.clip(weight, 0.0, 1.0)
    return ((1.0 - w) * image + w * (np.asarray(ratio, dtype=np.float32) * reference)).astype(np.float32)


def psf_blur(image: np.ndarray, sigma_vox) -> np.ndarray:
    """Gaussian point-spread function (sigma in voxels, scalar or per axis); new array."""
    sigma = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (3,))
    if np.all(sigma < 0.05):
        return np.array(image, dtype=np.float32, copy=True)
    return ndi.gaussian_filter(np.asarray(image, dtype=np.float32), sigma=sigma, mode="nearest", truncate=3.0)


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], affine: np.ndarray, log_sd: float,
               centre_mm: np.ndarray, half_extent_mm: float = 100.0) -> np.ndarray:
    """Smooth multiplicative field ``exp(b)`` (float32, mean of b over the grid = 0).

    ``b`` is a random polynomial of degree 3 in the world coordinates (relative to
    ``centre_mm`` and divided by ``half_extent_mm``), scaled to standard deviation
    ``log_sd`` over the grid. The grid must be axis-aligned (any flips allowed).
    """
    coeffs = rng.standard_normal((4, 4, 4))
    if log_sd <= 0:
        return np.ones(shape, dtype=np.float32)
    lin = np.asarray(affine, dtype=np.float64)
    # normalised world coordinate along each world axis, shaped to broadcast along the
    # array dimension that runs along it (axis-aligned grids)
    world = [None, None, None]
    for dim in range(3):
        col = lin[:3, dim]
        axis = int(np.argmax(np.abs(col)))
        coord = lin[axis, 3] + col[axis] * np.arange(shape[dim])
        shp = [1, 1, 1]
        shp[dim] = -1
        world[axis] = ((coord - centre_mm[axis]) / half_extent_mm).reshape(shp)
    field = np.zeros(shape, dtype=np.float32)
    for i in range(4):
        for j in range(4 - i):
            poly_z = sum((coeffs[i, j, k] / (1.0 + i + j + k)) * world[2] ** k for k in range(4 - i - j))
            field += (world[0] ** i * world[1] ** j * poly_z).astype(np.float32)
    field -= np.float32(field.mean(dtype=np.float64))
    sd = float(field.std(dtype=np.float64)) or 1.0
    return np.exp(field * (log_sd / sd)).astype(np.float32)


def rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of ``image + N(0, sigma) + i N(0, sigma)`` (float32, new array)."""
    n1 = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt((image + n1) ** 2 + n2 ** 2).astype(np.float32)


def gaussian_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """``image + N(0, sigma)`` (float32, new array)."""
    return (image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)).astype(np.float32)


def salt_and_pepper_background(rng: np.random.Generator, image: np.ndarray, head: np.ndarray,
                               maximum: float) -> np.ndarray:
    """Replace the air outside ``head`` (in [0, 1]) by the UNIT1 background.

    In air both MP2RAGE inversions are pure noise and their uniform combination takes values
    over the whole range, clustered at both ends: ``Beta(0.4, 0.4) * maximum``.
    """
    background = (rng.beta(0.4, 0.4, size=image.shape) * maximum).astype(np.float32)
    h = np.clip(head, 0.0, 1.0)
    return (h * image + (1.0 - h) * background).astype(np.float32)


def to_integer(image: np.ndarray, scale: float, maximum: float = 32767.0) -> np.ndarray:
    """Scale (WM -> ``scale``), round and store as int16 (clipped to [0, maximum])."""
    return np.clip(np.rint(image * scale), 0, maximum).astype(np.int16)
