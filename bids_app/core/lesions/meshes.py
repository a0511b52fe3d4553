"""Per-lesion surface meshes (marching cubes) and a binary STL writer.

* Each lesion is meshed on its own crop, padded by one background voxel on every side so that
  the surface is closed, with ``skimage.measure.marching_cubes`` at level 0.5 of the binary
  mask (optionally Gaussian-smoothed first). Vertices go from voxel indices to scanner RAS+ mm
  through the image affine.
* Faces are wound counter-clockwise seen from outside (right-hand normals point outwards), for
  any affine: when the affine flips handedness (negative determinant, e.g. LAS images) the
  winding is reversed, so the signed volume of every mesh is positive.
* :func:`stl_bytes` writes binary STL as bytes (no file I/O); the 80-byte header names the
  coordinate space (``SPACE=RAS`` or ``SPACE=LPS``, the convention 3D Slicer reads).
  :func:`read_stl` parses binary STL back (tests, QC).

All functions are pure: they never modify their inputs and never read or write files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_STL_DTYPE = np.dtype([("normal", "<f4", (3,)), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh.

    Attributes
    ----------
    vertices : ndarray of float64, shape (V, 3)
        Scanner RAS+ coordinates in mm.
    faces : ndarray of int64, shape (F, 3)
        Vertex indices, counter-clockwise seen from outside.
    label : int
        Lesion label (0 when not a lesion mesh).
    """

    vertices: np.ndarray
    faces: np.ndarray
    label: int = 0

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])

    def face_normals(self) -> np.ndarray:
        """Unit outward normals, shape (F, 3) (zero for degenerate triangles)."""
        tri = self.vertices[self.faces]
        cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        norm = np.linalg.norm(cross, axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(norm > 0, cross / norm, 0.0)

    def volume(self) -> float:
        """Signed enclosed volume (mm³) by the divergence theorem; positive when outward-oriented."""
        return _signed_volume(self.vertices, self.faces)

    def area(self) -> float:
        """Surface area (mm²)."""
        tri = self.vertices[self.faces]
        return float(0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum())


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)


def mask_mesh(mask: np.ndarray, affine: np.ndarray, *, smooth_sigma: float = 0.0, label: int = 0,
              offset: tuple[int, int, int] = (0, 0, 0)) -> Mesh:
    """Surface mesh of a binary mask.

    Parameters
    ----------
    mask : ndarray of bool, shape (x, y, z)
        The object (any crop).
    affine : ndarray, shape (4, 4)
        Voxel -> scanner RAS+ mm of the *full* image.
    smooth_sigma : float
        Gaussian smoothing of the mask before meshing, in voxels (0: none; the surface then
        cuts voxel edges at their midpoints).
    label : int
        Stored in the result.
    offset : (int, int, int)
        Index of ``mask[0, 0, 0]`` in the full image.

    Returns
    -------
    Mesh
        Empty (0 vertices, 0 faces) for an empty mask.
    """
    from skimage import measure

    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {m.shape}")
    if not m.any():
        return Mesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), int(label))
    field = np.pad(m.astype(np.float32), 1)
    if smooth_sigma > 0:
        from scipy import ndimage

        field = np.pad(ndimage.gaussian_filter(m.astype(np.float32), smooth_sigma, mode="constant"), 1)
    verts, faces, _normals, _values = measure.marching_cubes(field, level=0.5, allow_degenerate=False)
    ijk = verts.astype(np.float64) - 1.0 + np.asarray(offset, dtype=np.float64)
    aff = np.asarray(affine, dtype=np.float64)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    faces = faces.astype(np.int64)
    # For a foreground of high values, skimage winds faces so that the right-hand normal
    # (v1 - v0) x (v2 - v0) points into the object (in index space); reverse them for outward
    # normals, unless the affine mirrors space (negative determinant), which reverses them again.
    if np.linalg.det(aff[:3, :3]) > 0:
        faces = faces[:, ::-1]
    faces = np.ascontiguousarray(faces)
    if _signed_volume(xyz, faces) < 0:  # safety net for unexpected skimage conventions
        faces = np.ascontiguousarray(faces[:, ::-1])
    return Mesh(xyz, faces, int(label))


def lesion_meshes(instances: np.ndarray, n_lesions: int, affine: np.ndarray, *,
                  smooth_sigma: float = 0.0) -> list[Mesh]:
    """One mesh per lesion, in label order, each computed on the lesion's crop.

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)
        0 background, ``1..n_lesions`` lesions.
    n_lesions : int
    affine : ndarray, shape (4, 4)
        Voxel -> scanner RAS+ mm.
    smooth_sigma : float
        See :func:`mask_mesh`.

    Returns
    -------
    list of Mesh, length n_lesions
        An empty mesh for a label absent from the map.
    """
    from scipy import ndimage

    inst = np.asarray(instances)
    n = int(n_lesions)
    out: list[Mesh] = []
    pad = int(np.ceil(3 * smooth_sigma)) if smooth_sigma > 0 else 0
    for i, sl in enumerate(ndimage.find_objects(inst, max_label=n) if n else []):
        if sl is None:
            out.append(Mesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), i + 1))
            continue
        sl = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, dim)) for s, dim in zip(sl, inst.shape))
        out.append(mask_mesh(inst[sl] == i + 1, affine, smooth_sigma=smooth_sigma, label=i + 1,
                             offset=tuple(s.start for s in sl)))
    return out


def stl_bytes(mesh: Mesh, *, name: str = "", space: str = "RAS") -> bytes:
    """Binary STL of a mesh.

    Parameters
    ----------
    mesh : Mesh
        Vertices in scanner RAS+ mm.
    name : str
        Written into the header (ASCII, truncated).
    space : {"RAS", "LPS"}
        Coordinates written: RAS+ as stored, or LPS (x and y negated; the winding stays
        outward since that map preserves handedness). The header ends with ``SPACE=<space>``.

    Returns
    -------
    bytes
        80-byte header, uint32 triangle count, then per triangle the unit normal, three
        vertices (float32, little endian) and a zero uint16.
    """
    space = space.upper()
    if space not in ("RAS", "LPS"):
        raise ValueError(f"space must be 'RAS' or 'LPS', got {space!r}")
    vertices = mesh.vertices if space == "RAS" else mesh.vertices @ _LPS
    shown = Mesh(vertices, mesh.faces, mesh.label)
    tail = f" SPACE={space}"
    head = (f"msxplain {name}".strip()[: 80 - len(tail)] + tail).encode("ascii", "replace")
    header = head.ljust(80, b" ")
    records = np.zeros(mesh.n_faces, dtype=_STL_DTYPE)
    if mesh.n_faces:
        records["normal"] = shown.face_normals()
        records["vertices"] = vertices[mesh.faces]
    return header + np.uint32(mesh.n_faces).tobytes() + records.tobytes()


def read_stl(data: bytes) -> tuple[str, np.ndarray, np.ndarray]:
    """Parse binary STL.

    Returns
    -------
    header : str
    triangles : ndarray of float32, shape (F, 3, 3)
    normals : ndarray of float32, shape (F, 3)
    """
    if len(data) < 84:
        raise ValueError("not a binary STL: shorter than 84 bytes")
    n = int(np.frombuffer(data, dtype="<u4", count=1, offset=80)[0])
    if len(data) != 84 + n * _STL_DTYPE.itemsize:
        raise ValueError(f"binary STL size mismatch: {len(data)} bytes for {n} triangles")
    rec = np.frombuffer(data, dtype=_STL_DTYPE, count=n, offset=84)
    return data[:80].decode("ascii", "replace").rstrip(), rec["vertices"].copy(), rec["normal"].copy()
