"""Subject anatomy: random smooth deformations of the template and resampling helpers.

A subject is the template seen through a transform that maps **subject world (mm) -> template
world (mm)**::

    t(x) = A @ P^-1(x) + d(P^-1(x))

with ``A`` a random global affine (scaling, rotation, translation about the brain centre),
``d`` a smooth random displacement field (cubic B-spline-like interpolation of a coarse
random grid) and ``P`` an optional rigid head pose of one session. Maps are *pulled*: each
output voxel samples the template at ``t(x)``.

Pure numerics (numpy/scipy): nothing here reads or writes files, inputs are never modified.
Arrays are in nibabel voxel order (X, Y, Z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

#: defaults of the random anatomy (scaled together by ``variation``)
DEFORM_DEFAULTS = {
    "scale_sd": 0.04,         # relative, per axis (1 +- ~8 % at 2 sd)
    "rotation_deg": 4.0,      # uniform +- per axis
    "translation_mm": 4.0,    # uniform +- per axis
    "displacement_mm": 2.5,   # RMS of the smooth nonlinear displacement
    "control_spacing_mm": 24.0,
    "pose_rotation_deg": 3.0,  # per session head pose
    "pose_translation_mm": 3.0,
}


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """3x3 rotation from Euler angles (degrees) about x, then y, then z."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid_about(centre: np.ndarray, angles_deg: np.ndarray, translation_mm: np.ndarray) -> np.ndarray:
    """4x4 rigid transform rotating about ``centre`` (mm) then translating."""
    out = np.eye(4)
    rot = rotation_matrix(angles_deg)
    c = np.asarray(centre, dtype=np.float64)
    out[:3, :3] = rot
    out[:3, 3] = c - rot @ c + np.asarray(translation_mm, dtype=np.float64)
    return out


@dataclass(frozen=True)
class Deformation:
    """Subject world -> template world mapping (see module docstring).

    Attributes
    ----------
    affine : ndarray (4, 4)
        Global part ``A`` (subject anatomical mm -> template mm).
    displacement : ndarray of float32, shape (3, X, Y, Z) or None
        Dense smooth displacement ``d`` (mm) on the anatomy grid; ``None`` = no nonlinear part.
    grid_affine : ndarray (4, 4)
        Anatomy-grid voxel -> subject anatomical mm (the template grid).
    pose : ndarray (4, 4)
        Session head pose ``P`` (scanner mm -> scanner mm); identity by default.
    """

    affine: np.ndarray
    displacement: np.ndarray | None
    grid_affine: np.ndarray
    pose: np.ndarray

    def with_pose(self, pose: np.ndarray) -> Deformation:
        return Deformation(self.affine, self.displacement, self.grid_affine, np.asarray(pose, dtype=np.float64))

    @property
    def has_pose(self) -> bool:
        return not np.allclose(self.pose, np.eye(4))

    def to_template(self, world: np.ndarray, grid_slab: tuple[tuple[int, int, int], slice] | None = None) -> np.ndarray:
        """Map points (N, 3) of subject scanner mm to template mm (new float64 array).

        ``grid_slab = (shape, zslice)`` says that the points are the voxel centres of those
        z slices of the anatomy grid in C order (then the displacement is read, not
        interpolated).
        """
        pts = np.asarray(world, dtype=np.float64)
        if self.has_pose:
            inv_pose = np.linalg.inv(self.pose)
            pts = pts @ inv_pose[:3, :3].T + inv_pose[:3, 3]
        out = pts @ self.affine[:3, :3].T + self.affine[:3, 3]
        if self.displacement is not None:
            if grid_slab is not None and not self.has_pose:
                _, zs = grid_slab
                for a in range(3):
                    out[:, a] += self.displacement[a][:, :, zs].reshape(-1)
            else:
                inv_g = np.linalg.inv(self.grid_affine)
                vox = pts @ inv_g[:3, :3].T + inv_g[:3, 3]
                for a in range(3):
                    out[:, a] += ndi.map_coordinates(self.displacement[a], vox.T, order=1, mode="nearest")
        return out


def identity_deformation(grid_affine: np.ndarray | None = None) -> Deformation:
    g = np.eye(4) if grid_affine is None else np.asarray(grid_affine, dtype=np.float64)
    return Deformation(np.eye(4), None, g, np.eye(4))


def _bspline_matrix(positions: np.ndarray, n_ctrl: int) -> np.ndarray:
    """Cubic B-spline weights (len(positions), n_ctrl) at positions in control-grid units."""
    out = np.zeros((positions.size, n_ctrl), dtype=np.float64)
    i0 = np.floor(positions).astype(int)
    t = positions - i0
    weights = [(1 - t) ** 3 / 6.0, (3 * t ** 3 - 6 * t ** 2 + 4) / 6.0, (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6.0,
               t ** 3 / 6.0]
    rows = np.arange(positions.size)
    for m, w in enumerate(weights):
        np.add.at(out, (rows, np.clip(i0 - 1 + m, 0, n_ctrl - 1)), w)
    return out


def random_deformation(
    rng: np.random.Generator,
    template_affine: np.ndarray,
    template_shape: tuple[int, int, int],
    centre_mm: np.ndarray,
    variation: float = 1.0,
) -> Deformation:
    """Draw a subject's anatomy transform.

    Parameters
    ----------
    rng : numpy Generator
    template_affine, template_shape : the template grid (RAS, axis-aligned); the dense
        displacement lives on it.
    centre_mm : ndarray (3,)
        Centre of scaling/rotation (the brain centre).
    variation : float
        Multiplies every amplitude in :data:`DEFORM_DEFAULTS`; 0 gives the identity (the
        random numbers are still drawn, so later draws do not depend on it).

    Returns
    -------
    Deformation
        The displacement is a cubic B-spline on a control grid of
        ``control_spacing_mm`` with random coefficients, scaled to the RMS
        ``displacement_mm`` over the grid.
    """
    p = DEFORM_DEFAULTS
    scales = 1.0 + variation * p["scale_sd"] * np.clip(rng.standard_normal(3), -2.5, 2.5)
    angles = variation * rng.uniform(-p["rotation_deg"], p["rotation_deg"], 3)
    shift = variation * rng.uniform(-p["translation_mm"], p["translation_mm"], 3)
    c = np.asarray(centre_mm, dtype=np.float64)
    lin = rotation_matrix(angles) @ np.diag(scales)
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = c - lin @ c + shift

    spacing = p["control_spacing_mm"]
    taff = np.asarray(template_affine, dtype=np.float64)
    zooms = np.sqrt((taff[:3, :3] ** 2).sum(axis=0))
    extent = np.asarray(template_shape) * zooms
    n_ctrl = np.maximum(np.ceil(extent / spacing).astype(int) + 3, 4)
    coeffs = rng.standard_normal((3, *n_ctrl))
    if variation <= 0:
        return Deformation(affine, None, taff, np.eye(4))
    mats = []
    for a in range(3):
        # voxel index -> control units, control point 1 at the first voxel
        pos = 1.0 + np.arange(template_shape[a]) * zooms[a] / spacing
        mats.append(_bspline_matrix(pos, int(n_ctrl[a])))
    dense = np.empty((3, *template_shape), dtype=np.float32)
    for a in range(3):
        f = np.tensordot(mats[0], coeffs[a], axes=(1, 0))          # (X, cy, cz)
        f = np.tensordot(f, mats[1], axes=(1, 1))                   # (X, cz, Y)
        f = np.tensordot(f, mats[2], axes=(1, 1))                   # (X, Y, Z)
        dense[a] = f.astype(np.float32)
    rms = float(np.sqrt(np.mean(np.square(dense, dtype=np.float64)))) or 1.0
    dense *= np.float32(variation * p["displacement_mm"] / rms)
    dense.flags.writeable = False
    return Deformation(affine, dense, taff, np.eye(4))


def random_pose(rng: np.random.Generator, centre_mm: np.ndarray, variation: float = 1.0) -> np.ndarray:
    """A small rigid head pose for one session (4x4, about ``centre_mm``)."""
    p = DEFORM_DEFAULTS
    angles = variation * rng.uniform(-p["pose_rotation_deg"], p["pose_rotation_deg"], 3)
    shift = variation * rng.uniform(-p["pose_translation_mm"], p["pose_translation_mm"], 3)
    return rigid_about(centre_mm, angles, shift)


def grid_world(shape: tuple[int, int, int], affine: np.ndarray, z_slice: slice | None = None) -> np.ndarray:
    """World coordinates (N, 3) of the voxel centres of a grid (optionally of some z slices)."""
    zs = np.arange(shape[2])[z_slice] if z_slice is not None else np.arange(shape[2])
    i, j, k = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), zs, indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(np.float64)
    return ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def warp_maps(
    maps: list[np.ndarray],
    src_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    deformation: Deformation | None = None,
    *,
    order: int = 1,
    slab: int = 24,
    sparse: tuple[bool, ...] | None = None,
) -> list[np.ndarray]:
    """Pull several maps of one source grid onto a destination grid through a transform.

    Parameters
    ----------
    maps : list of ndarray, each shape (Xs, Ys, Zs)
        Maps on the source grid (template space).
    src_affine : ndarray (4, 4)
    dst_shape : tuple of 3 int
    dst_affine : ndarray (4, 4)
        Destination voxel -> subject world.
    deformation : Deformation or None
        Subject world -> source world; ``None`` = identity.
    order : int
        Interpolation order (1 = trilinear). Outside the source grid the value is 0.
    slab : int
        Destination z slices processed at once (bounds the memory of coordinate arrays).
    sparse : tuple of bool, optional
        Per map: mostly zero (e.g. lesion fractions). Such a map is interpolated only at the
        destination voxels whose nearest source voxel is within one voxel of its support
        (same result with ``order=1``, much faster).

    Returns
    -------
    list of ndarray of float32, each shape ``dst_shape``
    """
    inv_src = np.linalg.inv(np.asarray(src_affine, dtype=np.float64))
    dst_affine = np.asarray(dst_affine, dtype=np.float64)
    srcs = [np.asarray(m, dtype=np.float32) for m in maps]
    identity = deformation is None or (
        deformation.displacement is None and not deformation.has_pose and np.allclose(deformation.affine, np.eye(4)))
    if identity and tuple(dst_shape) == tuple(srcs[0].shape) and np.allclose(dst_affine, src_affine):
        return [m.copy() for m in srcs]  # same grid, no transform: interpolation would return the map
    outs = [np.zeros(dst_shape, dtype=np.float32) for _ in maps]
    if deformation is None:
        pull = inv_src @ dst_affine  # dst voxel -> src voxel
        to_anat = None
    else:
        inv_pose = np.linalg.inv(deformation.pose)
        pull = inv_src @ deformation.affine @ inv_pose @ dst_affine
        to_anat = np.linalg.inv(deformation.grid_affine) @ inv_pose @ dst_affine  # dst voxel -> anatomy voxel
    disp = None if deformation is None else deformation.displacement
    same_grid = (
        disp is not None
        and not deformation.has_pose
        and tuple(dst_shape) == tuple(disp.shape[1:])
        and np.allclose(dst_affine, deformation.grid_affine)
    )
    if sparse is None:
        sparse = (False,) * len(srcs)
    if order > 1 and any(sparse):
        raise ValueError("sparse maps need order <= 1")
    supports = [ndi.binary_dilation(m != 0, structure=np.ones((3, 3, 3), bool)) if sp else None
                for m, sp in zip(srcs, sparse)]
    ii = np.arange(dst_shape[0], dtype=np.float32)[:, None, None]
    jj = np.arange(dst_shape[1], dtype=np.float32)[None, :, None]
    for z0 in range(0, dst_shape[2], slab):
        zs = slice(z0, min(z0 + slab, dst_shape[2]))
        kk = np.arange(zs.start, zs.stop, dtype=np.float32)[None, None, :]
        sub_shape = (dst_shape[0], dst_shape[1], zs.stop - zs.start)
        coords = _affine_coords(pull, ii, jj, kk, sub_shape)
        if disp is not None:
            if same_grid:
                d = disp[:, :, :, zs]
            else:
                anat = _affine_coords(to_anat, ii, jj, kk, sub_shape)
                d = np.stack([ndi.map_coordinates(disp[a], anat, order=1, mode="nearest") for a in range(3)])
            # displacement is in mm (template world): convert to source voxels
            lin = inv_src[:3, :3].astype(np.float32)
            for a in range(3):
                coords[a] += lin[a, 0] * d[0] + lin[a, 1] * d[1] + lin[a, 2] * d[2]
        nearest = None
        for m, out, support in zip(srcs, outs, supports):
            if support is None:
                out[:, :, zs] = ndi.map_coordinates(m, coords, order=order, mode="constant", cval=0.0,
                                                    prefilter=order > 1)
                continue
            if nearest is None:
                nearest = np.rint(coords.reshape(3, -1)).astype(np.int64)
                valid = np.all((nearest >= 0) & (nearest < np.asarray(m.shape)[:, None]), axis=0)
                clipped = np.clip(nearest, 0, np.asarray(m.shape)[:, None] - 1)
                flat_nearest = np.where(valid, np.ravel_multi_index(tuple(clipped), m.shape), 0)
            sel = valid & support.ravel()[flat_nearest]
            block = np.zeros(int(np.prod(sub_shape)), dtype=np.float32)
            if sel.any():
                block[sel] = ndi.map_coordinates(m, coords.reshape(3, -1)[:, sel], order=order, mode="constant",
                                                 cval=0.0, prefilter=order > 1)
            out[:, :, zs] = block.reshape(sub_shape)
    return outs


def _affine_coords(matrix: np.ndarray, ii, jj, kk, shape) -> np.ndarray:
    """(3, *shape) float32 coordinates ``matrix @ [i, j, k, 1]`` from broadcastable index ranges."""
    out = np.empty((3, *shape), dtype=np.float32)
    m = np.asarray(matrix, dtype=np.float64)
    for a in range(3):
        out[a] = ((np.float32(m[a, 0]) * ii + np.float32(m[a, 1]) * jj)
                  + (np.float32(m[a, 2]) * kk + np.float32(m[a, 3])))
    return out


def sample_points(volume: np.ndarray, affine: np.ndarray, world: np.ndarray, order: int = 1) -> np.ndarray:
    """Values of ``volume`` at world points (N, 3); 0 outside. Returns float32 (N,)."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    vox = np.asarray(world, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]
    return ndi.map_coordinates(np.asarray(volume, dtype=np.float32), vox.T, order=order, mode="constant",
                               cval=0.0).astype(np.float32)


def reorient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store an image in another axis orientation (same world positions).

    Returns a new C-contiguous array and its affine.
    """
    import nibabel as nib

    start = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    transform = nib.orientations.ornt_transform(start, target)
    out = nib.orientations.apply_orientation(np.asarray(data), transform)
    new_affine = np.asarray(affine) @ nib.orientations.inv_ornt_aff(transform, np.asarray(data).shape)
    return np.ascontiguousarray(out), new_affine
