"""Lesion placement in template space: real white-matter lesions and synthetic cortical lesions.

White-matter lesions (WML) are real components of the library
(:class:`~bids_app.synth.sources.LesionLibrary`), placed **where they occurred** in MNI space
(FSL MNI152 and MNI152NLin2009cAsym share world coordinates to within a few mm, so the
affines alone map one to the other), optionally mirrored left-right, and kept only when they
land mostly in the template's white matter. A subject recombines lesions of a few donor
patients without overlaps.

Cortical lesions (CL) have no public expert masks, so they are synthesised: small irregular
blobs (10-200 mm^3) seeded in cortical GM, either *leukocortical* (crossing the GM/WM
boundary) or *intracortical* (inside GM, not touching WM), following the MRI CL literature
(Calabrese et al. 2010; Filippi et al. 2019; type I and II of Bo/Peterson). Subpial lesions
(MRI-invisible at 1.5/3 T) are not modelled.

Every lesion is a set of 1 mm world points (voxel centres), painted onto any grid as a
partial-volume fraction by :func:`paint_fraction`. Pure numerics; inputs are not modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from bids_app.synth.anatomy import sample_points
from bids_app.synth.sources import LesionLibrary, TemplateSet

WML = 1
CL = 2
#: a library lesion is eligible when the mean template WM probability over its voxels
#: reaches this, and (nearly) all its voxels are inside the template brain mask
WM_ELIGIBILITY = 0.5
BRAIN_ELIGIBILITY = 0.98
#: cortical lesion volume range at 1 mm (mm^3); the lower bound is raised to 2.5 voxels
CL_VOLUME_MM3 = (10.0, 200.0)
#: share of leukocortical among cortical lesions
LEUKOCORTICAL_SHARE = 0.6


@dataclass
class PlacedLesion:
    """One lesion in template world space.

    Attributes
    ----------
    cls : int
        1 = WML, 2 = CL.
    points : ndarray of float32, shape (N, 3)
        World coordinates of its 1 mm voxel centres.
    info : dict
        Provenance: for WML ``patient``, ``component``, ``flipped``, ``library_index``;
        for CL ``type`` (leukocortical/intracortical) and the target volume.
    """

    cls: int
    points: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def volume_mm3(self) -> float:
        return float(self.points.shape[0])


# --------------------------------------------------------------------------------------------
# painting
# --------------------------------------------------------------------------------------------

_SUB_OFFSETS = np.array([[dx, dy, dz] for dx in (-0.25, 0.25) for dy in (-0.25, 0.25) for dz in (-0.25, 0.25)])


def paint_fraction(
    points_list: list[np.ndarray],
    shape: tuple[int, int, int],
    affine: np.ndarray,
    source_voxel_mm: float = 1.0,
) -> np.ndarray:
    """Partial-volume fraction of lesion voxels on a grid.

    Each source voxel (a cube of ``source_voxel_mm`` centred on a point) is supersampled at
    8 sub-points; the fraction of a grid voxel is the lesion volume it contains divided by
    its own volume (exact for grids aligned with the 1 mm / 2 mm MNI grids).

    Parameters
    ----------
    points_list : list of ndarray, each (N_i, 3)
        World coordinates (mm) of voxel centres.
    shape, affine : the target grid.
    source_voxel_mm : float

    Returns
    -------
    ndarray of float32, shape ``shape``, values in [0, 1]
    """
    out = np.zeros(int(np.prod(shape)), dtype=np.float64)
    if not points_list:
        return out.reshape(shape).astype(np.float32)
    pts = np.concatenate([np.asarray(p, dtype=np.float64) for p in points_list], axis=0)
    if pts.size == 0:
        return out.reshape(shape).astype(np.float32)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    voxel_volume = abs(np.linalg.det(np.asarray(affine)[:3, :3]))
    weight = source_voxel_mm ** 3 / 8.0 / voxel_volume
    sub = (pts[None, :, :] + _SUB_OFFSETS[:, None, :] * source_voxel_mm).reshape(-1, 3)
    vox = np.rint(sub @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.asarray(shape)), axis=1)
    flat = np.ravel_multi_index(tuple(vox[inside].T), shape)
    uniq, counts = np.unique(flat, return_counts=True)
    out[uniq] = counts * weight
    return np.clip(out, 0.0, 1.0).reshape(shape).astype(np.float32)


def footprint(points: np.ndarray, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray | None:
    """Flat indices of the grid voxels hit by the points; ``None`` if any point is outside."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    vox = np.rint(np.asarray(points, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
    if np.any(vox < 0) or np.any(vox >= np.asarray(shape)):
        return None
    return np.unique(np.ravel_multi_index(tuple(vox.T), shape))


def _dilate_flat(flat: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    ijk = np.stack(np.unravel_index(flat, shape), axis=1)
    offs = np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)])
    allv = (ijk[:, None, :] + offs[None, :, :]).reshape(-1, 3)
    allv = np.clip(allv, 0, np.asarray(shape) - 1)
    return np.unique(np.ravel_multi_index(tuple(allv.T), shape))


class Occupancy:
    """Template-grid voxels already taken by lesions (dilated by one voxel)."""

    def __init__(self, shape: tuple[int, int, int], affine: np.ndarray):
        self.shape = shape
        self.affine = affine
        self.taken = np.zeros(int(np.prod(shape)), dtype=bool)

    def fits(self, points: np.ndarray) -> np.ndarray | None:
        fp = footprint(points, self.shape, self.affine)
        if fp is None or self.taken[fp].any():
            return None
        return fp

    def add(self, fp: np.ndarray) -> None:
        self.taken[_dilate_flat(fp, self.shape)] = True


# --------------------------------------------------------------------------------------------
# white-matter lesions from the library
# --------------------------------------------------------------------------------------------


def library_eligibility(library: LesionLibrary, templates: TemplateSet) -> np.ndarray:
    """Which library lesions land mostly in template WM, unflipped and mirrored.

    Returns
    -------
    ndarray of bool, shape (L, 2)
        Column 0: at the original position; column 1: mirrored in x. Cached per template.
    """
    key = ("eligibility", id(library))
    if key in templates.cache:
        return templates.cache[key]
    result = np.zeros((library.n_lesions, 2), dtype=bool)
    seg = np.repeat(np.arange(library.n_lesions), np.diff(library.offsets))
    counts = np.maximum(np.diff(library.offsets), 1)
    for col, flip in enumerate((False, True)):
        pts = np.asarray(library.coords, dtype=np.float64).copy()
        if flip:
            pts[:, 0] = -pts[:, 0]
        wm = sample_points(templates.wm, templates.affine, pts, order=1)
        brain = sample_points(templates.brain, templates.affine, pts, order=0)
        mean_wm = np.bincount(seg, weights=wm, minlength=library.n_lesions) / counts
        in_brain = np.bincount(seg, weights=(brain >= 0.5), minlength=library.n_lesions) / counts
        result[:, col] = (mean_wm >= WM_ELIGIBILITY) & (in_brain >= BRAIN_ELIGIBILITY)
    result.flags.writeable = False
    templates.cache[key] = result
    return result


def sample_lesion_count(rng: np.random.Generator, mean: float, minimum: int = 0) -> int:
    """Over-dispersed count (Poisson-Gamma, shape 3: coefficient of variation ~0.6) with the given mean."""
    if mean <= 0:
        return 0
    lam = rng.gamma(3.0, mean / 3.0)
    return max(int(rng.poisson(lam)), minimum)


def sample_wml(
    rng: np.random.Generator,
    library: LesionLibrary,
    templates: TemplateSet,
    n: int,
    occupancy: Occupancy,
    *,
    n_donors: tuple[int, int] = (2, 5),
    max_tries: int = 20,
    min_volume_mm3: float = 0.0,
) -> list[PlacedLesion]:
    """Draw up to ``n`` real lesions from a few donor patients, without overlaps.

    Lesions are taken at their library position (mirrored in x with probability 0.5 when both
    positions are eligible). When the donors run out, the other patients fill in.

    Returns
    -------
    list of PlacedLesion (class WML), possibly fewer than ``n``.
    """
    if n <= 0 or library.n_lesions == 0:
        return []
    elig = library_eligibility(library, templates)
    any_elig = elig.any(axis=1) & (library.volumes_mm3 >= min_volume_mm3)
    patients = np.asarray(library.patients)
    k = int(min(len(patients), rng.integers(n_donors[0], n_donors[1] + 1)))
    donors = set(rng.choice(patients, size=k, replace=False).tolist())
    in_donor = np.isin(library.patient, list(donors))
    primary = np.flatnonzero(any_elig & in_donor)
    secondary = np.flatnonzero(any_elig & ~in_donor)
    order = np.concatenate([rng.permutation(primary), rng.permutation(secondary)])
    placed: list[PlacedLesion] = []
    failures = 0
    for idx in order:
        if len(placed) >= n or failures > max_tries * n:
            break
        options = [col for col in (0, 1) if elig[idx, col]]
        flip = bool(options[int(rng.integers(len(options)))]) if len(options) > 1 else bool(options[0])
        pts = library.lesion_coords(int(idx), flip=flip)
        fp = occupancy.fits(pts)
        if fp is None:
            failures += 1
            continue
        occupancy.add(fp)
        placed.append(PlacedLesion(WML, pts, {
            "patient": str(library.patient[idx]),
            "component": int(library.component[idx]),
            "flipped": flip,
            "library_index": int(idx),
            "library_volume_mm3": float(pts.shape[0] * library.voxel_mm ** 3),
        }))
    return placed


# --------------------------------------------------------------------------------------------
# cortical lesions
# --------------------------------------------------------------------------------------------


def cortical_candidates(templates: TemplateSet) -> dict[str, np.ndarray]:
    """Template voxels (flat indices) where cortical lesions may be seeded.

    ``leukocortical``: cortical GM (GM >= 0.5) within 1.5 mm of WM (WM >= 0.5);
    ``intracortical``: cortical GM with GM >= 0.7 and at least 1.5 mm from WM. Cortical means
    within 4 mm of CSF or the brain surface and within 25 mm of the brain surface (this leaves
    out deep GM), and not in the cerebellum (y < -40 mm and z < -8 mm). Cached per template.
    """
    key = "cl_candidates"
    if key in templates.cache:
        return templates.cache[key]
    zooms = np.sqrt((templates.affine[:3, :3] ** 2).sum(axis=0))
    brain = templates.brain >= 0.5
    wm = templates.wm >= 0.5
    outside_or_csf = (~brain) | (templates.csf >= 0.3)
    d_wm = ndi.distance_transform_edt(~wm, sampling=zooms)
    d_csf = ndi.distance_transform_edt(~outside_or_csf, sampling=zooms)
    d_surface = ndi.distance_transform_edt(brain, sampling=zooms)
    gm = templates.gm
    x, y, z = np.meshgrid(*[templates.affine[a, 3] + zooms[a] * np.arange(templates.shape[a]) for a in range(3)],
                          indexing="ij", sparse=True)
    cerebellum = (y < -40.0) & (z < -8.0)
    cortical = brain & (gm >= 0.5) & (d_csf <= 4.0) & (d_surface <= 25.0) & ~cerebellum
    leuko = cortical & (d_wm <= 1.5) & ~wm
    intra = cortical & (gm >= 0.7) & (d_wm >= 1.5)
    result = {"leukocortical": np.flatnonzero(leuko), "intracortical": np.flatnonzero(intra)}
    templates.cache[key] = result
    return result


def _cl_shape(rng: np.random.Generator, centre: np.ndarray, n_vox: int, templates: TemplateSet,
              kind: str) -> np.ndarray | None:
    """Irregular blob of ~n_vox 1 mm voxels around ``centre`` restricted to the allowed tissue."""
    radius = (3.0 * n_vox / (4.0 * np.pi)) ** (1.0 / 3.0)
    half = int(np.ceil(1.8 * radius)) + 2
    ax = np.arange(-half, half + 1, dtype=np.float64)
    gx, gy, gz = np.meshgrid(ax, ax, ax, indexing="ij")
    offsets = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)
    pts = np.rint(centre)[None, :] + offsets
    # anisotropic, randomly rotated ellipsoid + smooth noise -> irregular outline
    axes = radius * rng.uniform(0.6, 1.6, 3)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    local = offsets @ q
    ell = np.sqrt(((local / axes) ** 2).sum(axis=1))
    noise = ndi.gaussian_filter(rng.standard_normal(gx.shape), 1.2, mode="reflect").ravel()
    noise /= noise.std() or 1.0
    score = -ell + 0.35 * noise
    gm = sample_points(templates.gm, templates.affine, pts)
    wm = sample_points(templates.wm, templates.affine, pts)
    brain = sample_points(templates.brain, templates.affine, pts)
    if kind == "intracortical":
        allowed = (gm >= 0.35) & (wm < 0.4) & (brain >= 0.5)
    else:
        allowed = ((gm >= 0.35) | (wm >= 0.5)) & (brain >= 0.5)
    if allowed.sum() < n_vox:
        return None
    score = np.where(allowed, score, -np.inf)
    chosen = np.argsort(-score, kind="stable")[:n_vox]
    mask = np.zeros(gx.shape, dtype=bool)
    mask.ravel()[chosen] = True
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    keep = labels.ravel() == (int(np.argmax(sizes)) + 1)
    if keep.sum() < 0.6 * n_vox:
        return None
    sel_gm, sel_wm = gm[keep], wm[keep]
    if kind == "leukocortical":
        wm_share = float((sel_wm >= 0.5).mean())
        if not (0.1 <= wm_share <= 0.6) or float((sel_gm >= 0.35).mean()) < 0.4:
            return None
    else:
        if float((sel_gm >= 0.5).mean()) < 0.7:
            return None
    return pts[keep].astype(np.float32)


def sample_cl(
    rng: np.random.Generator,
    templates: TemplateSet,
    n: int,
    occupancy: Occupancy,
    *,
    resolution_mm: float = 1.0,
    max_tries: int = 30,
) -> list[PlacedLesion]:
    """Synthesise up to ``n`` cortical lesions (see module docstring).

    The volume is log-uniform in :data:`CL_VOLUME_MM3`, with the lower bound raised to
    2.5 voxels of the working grid so that a lesion can survive partial-volume thresholding.
    """
    if n <= 0:
        return []
    cand = cortical_candidates(templates)
    lo, hi = CL_VOLUME_MM3
    lo = max(lo, 2.5 * resolution_mm ** 3)
    hi = max(hi, 2.0 * lo)
    placed: list[PlacedLesion] = []
    tries = 0
    zooms = np.sqrt((templates.affine[:3, :3] ** 2).sum(axis=0))
    while len(placed) < n and tries < max_tries * n:
        tries += 1
        kind = "leukocortical" if rng.uniform() < LEUKOCORTICAL_SHARE else "intracortical"
        pool = cand[kind]
        if pool.size == 0:
            continue
        flat = int(pool[int(rng.integers(pool.size))])
        ijk = np.asarray(np.unravel_index(flat, templates.shape), dtype=np.float64)
        centre = templates.affine[:3, :3] @ ijk + templates.affine[:3, 3]
        centre = centre + rng.uniform(-0.5, 0.5, 3) * zooms
        volume = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        pts = _cl_shape(rng, centre, int(round(volume)), templates, kind)
        if pts is None:
            continue
        fp = occupancy.fits(pts)
        if fp is None:
            continue
        occupancy.add(fp)
        placed.append(PlacedLesion(CL, pts, {"type": kind, "target_volume_mm3": round(volume, 1)}))
    return placed
