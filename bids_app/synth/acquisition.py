"""Random acquisition of the domain-randomised generator: resolution, slice thickness, noise, gamma.

An image on the fine working grid is *acquired* at a random (possibly anisotropic) voxel size,
as SynthSeg does (Billot et al., Medical Image Analysis 2023, doi:10.1016/j.media.2023.102789):
a Gaussian slice/point-spread profile whose full width at half maximum equals the acquired
spacing, linear sampling on the coarse grid (random sub-voxel phase), noise added on the coarse
grid (so that it is correlated after resampling, as in a clinical scan interpolated to 1 mm) and
linear resampling back onto the working grid. Gamma (contrast nonlinearity) is applied last.
See ``docs/synth.md`` ("Domain-randomised mode (issue 14)").

Pure numerics (numpy/scipy); inputs are never modified. Arrays are (X, Y, Z).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: FWHM of a Gaussian = 2.355 sigma
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def _interp_axis(vol: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``vol`` at fractional indices ``pos`` along one axis (edges clamped)."""
    n = vol.shape[axis]
    if n == 1:
        return np.repeat(vol, pos.size, axis=axis)
    pos = np.clip(pos, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    t = (pos - i0).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = -1
    a = np.take(vol, i0, axis=axis)
    b = np.take(vol, i0 + 1, axis=axis)
    return (a + (b - a) * t.reshape(shape)).astype(np.float32)


def acquisition_sigma(spacing_mm, voxel_mm: float) -> np.ndarray:
    """Gaussian sigma (working voxels, per axis) that brings the working PSF to an FWHM of ``spacing_mm``."""
    ratio = np.asarray(spacing_mm, dtype=np.float64) / float(voxel_mm)
    return np.sqrt(np.maximum(ratio ** 2 - 1.0, 0.0)) / FWHM_PER_SIGMA


def simulate_resolution(
    rng: np.random.Generator,
    image: np.ndarray,
    spacing_mm,
    voxel_mm: float,
    *,
    noise_sd: float = 0.0,
    rician: bool = True,
) -> np.ndarray:
    """Acquire ``image`` at voxel size ``spacing_mm`` and resample it back to its grid.

    Parameters
    ----------
    rng : numpy Generator
        Draws the sampling phase (one uniform per axis) and the noise.
    image : ndarray, shape (X, Y, Z)
        Noise-free image on the working grid (isotropic ``voxel_mm``).
    spacing_mm : sequence of 3 float
        Acquired voxel size per array axis (mm); axes with spacing <= 1.05 voxel are kept on
        the working grid (no down-sampling; the blur is then below a tenth of a voxel).
    voxel_mm : float
    noise_sd : float
        Standard deviation of the noise added on the acquired grid (image units).
    rician : bool
        Magnitude of complex Gaussian noise (Rician) instead of additive Gaussian noise.

    Returns
    -------
    ndarray of float32, shape (X, Y, Z)
    """
    img = np.asarray(image, dtype=np.float32)
    sigma = acquisition_sigma(spacing_mm, voxel_mm)
    ratio = np.asarray(spacing_mm, dtype=np.float64) / float(voxel_mm)
    phases = rng.uniform(0.0, 1.0, 3)
    work = ndi.gaussian_filter(img, sigma=sigma, mode="nearest", truncate=3.0) if np.any(sigma > 0.05) else img.copy()
    coarse_axes = [a for a in range(3) if ratio[a] > 1.05]
    positions = {}
    for a in coarse_axes:
        step = ratio[a]
        pos = phases[a] * step + np.arange(0.0, img.shape[a], step)
        pos = pos[pos <= img.shape[a] - 1.0]
        if pos.size < 2:
            pos = np.array([0.0, img.shape[a] - 1.0])
        positions[a] = pos
        work = _interp_axis(work, a, pos)
    if noise_sd > 0:
        n1 = rng.standard_normal(work.shape, dtype=np.float32) * np.float32(noise_sd)
        if rician:
            n2 = rng.standard_normal(work.shape, dtype=np.float32) * np.float32(noise_sd)
            work = np.sqrt((work + n1) ** 2 + n2 ** 2)
        else:
            work = work + n1
    for a in coarse_axes:
        pos = positions[a]
        # working index k sits at coarse index (k - pos[0]) / step
        back = (np.arange(img.shape[a], dtype=np.float64) - pos[0]) / (pos[1] - pos[0])
        work = _interp_axis(work, a, back)
    return np.ascontiguousarray(work, dtype=np.float32)


def random_spacing(rng: np.random.Generator, *, p_isotropic: float, isotropic_mm: tuple[float, float],
                   inplane_mm: tuple[float, float], slice_mm: tuple[float, float],
                   slice_axis_p: tuple[float, float, float]) -> tuple[list[float], int | None]:
    """Draw an acquired voxel size: isotropic with ``p_isotropic``, else 2D slices along a random axis.

    Returns
    -------
    spacing : list of 3 float (mm, per array axis of an RAS grid)
    slice_axis : int or None
        0 sagittal, 1 coronal, 2 axial slices; ``None`` when isotropic.
    """
    draw = rng.uniform(size=5)
    if draw[0] < p_isotropic:
        s = isotropic_mm[0] + draw[1] * (isotropic_mm[1] - isotropic_mm[0])
        return [float(s)] * 3, None
    axis = int(np.searchsorted(np.cumsum(slice_axis_p) / np.sum(slice_axis_p), draw[2], side="right"))
    axis = min(axis, 2)
    inplane = inplane_mm[0] + draw[3] * (inplane_mm[1] - inplane_mm[0])
    thick = slice_mm[0] + draw[4] * (slice_mm[1] - slice_mm[0])
    spacing = [float(inplane)] * 3
    spacing[axis] = float(thick)
    return spacing, axis


def apply_gamma(image: np.ndarray, gamma: float, mask: np.ndarray | None = None, percentile: float = 99.9
                ) -> np.ndarray:
    """``ref * (I / ref) ** gamma`` with ``ref`` the ``percentile`` of ``I`` inside ``mask`` (float32, new).

    Negative values are set to 0 first. Keeping ``ref`` fixed leaves the brightest tissue
    where it was and bends the rest of the intensity scale.
    """
    img = np.maximum(np.asarray(image, dtype=np.float32), 0.0)
    values = img[mask] if mask is not None and np.any(mask) else img[img > 0]
    ref = float(np.percentile(values, percentile)) if values.size else 1.0
    if ref <= 0:
        return img.copy()
    return (ref * np.power(img / np.float32(ref), np.float32(gamma))).astype(np.float32)


def high_frequency_energy(image: np.ndarray, axis: int, mask: np.ndarray | None = None) -> float:
    """Mean squared first difference of ``image`` along ``axis`` (inside ``mask`` if given).

    A simple measure of the high-frequency content along one axis (used by tests and benchmarks).
    """
    img = np.asarray(image, dtype=np.float64)
    diff = np.diff(img, axis=axis) ** 2
    if mask is None:
        return float(diff.mean())
    m = np.asarray(mask, dtype=bool)
    both = np.take(m, np.arange(m.shape[axis] - 1), axis=axis) & np.take(m, np.arange(1, m.shape[axis]), axis=axis)
    return float(diff[both].mean()) if both.any() else 0.0
