"""Per-lesion surface meshes and the binary STL writer."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from bids_app.core.lesions import meshes as M


def _oblique_affine(flip: bool) -> np.ndarray:
    a = np.radians(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.1, 1.5]) @ (np.diag([-1.0, 1.0, 1.0]) if flip else np.eye(3))
    aff[:3, 3] = [30.0, -12.0, 5.0]
    return aff


def _ball(shape, centre, radius) -> np.ndarray:
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return ((g - np.asarray(centre)) ** 2).sum(-1) <= radius ** 2


def _scene():
    shape = (40, 36, 30)
    inst = np.zeros(shape, dtype=np.int32)
    inst[_ball(shape, (12, 12, 10), 6)] = 1
    inst[25:33, 20:26, 15:20] = 2
    return inst


@pytest.mark.parametrize("flip", [False, True])
def test_mesh_volume_and_orientation_under_an_oblique_affine(flip):
    inst = _scene()
    aff = _oblique_affine(flip)
    assert (np.linalg.det(aff[:3, :3]) < 0) == flip
    meshes = M.lesion_meshes(inst, 2, aff)
    assert [m.label for m in meshes] == [1, 2]
    voxel_mm3 = abs(np.linalg.det(aff[:3, :3]))
    for k, mesh in enumerate(meshes, start=1):
        vox_volume = (inst == k).sum() * voxel_mm3
        vol = mesh.volume()
        assert vol > 0  # outward winding, whatever the handedness of the affine
        # marching cubes at 0.5 cuts the voxel corners: a little less than the voxel volume
        assert 0.85 * vox_volume < vol <= vox_volume, (vol, vox_volume)
        # normals point away from the object's centre (both shapes are convex)
        centre = mesh.vertices.mean(axis=0)
        tri_centres = mesh.vertices[mesh.faces].mean(axis=1)
        outward = np.einsum("ij,ij->i", mesh.face_normals(), tri_centres - centre)
        assert (outward > 0).mean() > 0.99
    # the box lesion: its mesh lies within half a voxel of the voxel centres, in mm
    ijk = np.argwhere(inst == 2)
    lo, hi = ijk.min(0) - 0.5, ijk.max(0) + 0.5
    back = (np.linalg.inv(aff) @ np.c_[meshes[1].vertices, np.ones(len(meshes[1].vertices))].T).T[:, :3]
    assert np.all(back >= lo - 1e-6) and np.all(back <= hi + 1e-6)
    # the box's mesh extent equals the box from (lo + 0.5) - 0.5 to (hi - 0.5) + 0.5 = its voxels
    np.testing.assert_allclose(back.min(0), ijk.min(0) - 0.5, atol=1e-6)
    np.testing.assert_allclose(back.max(0), ijk.max(0) + 0.5, atol=1e-6)


def test_mesh_volume_matches_pyradiomics_mesh_volume():
    import SimpleITK as sitk
    from radiomics import shape as rshape

    inst = _scene()
    aff = np.diag([0.8, 1.1, 1.5, 1.0])
    mesh = M.lesion_meshes(inst, 2, aff)[0]
    m = (inst == 1).astype(np.uint8)
    mask = sitk.GetImageFromArray(np.ascontiguousarray(m.transpose(2, 1, 0)))
    mask.SetSpacing((0.8, 1.1, 1.5))
    image = sitk.GetImageFromArray(np.zeros(m.shape[::-1], dtype=np.float32))
    image.SetSpacing((0.8, 1.1, 1.5))
    ref = rshape.RadiomicsShape(image, mask, label=1).execute()
    assert mesh.volume() == pytest.approx(float(ref["MeshVolume"]), rel=1e-6)
    assert mesh.area() == pytest.approx(float(ref["SurfaceArea"]), rel=1e-6)


def test_stl_parses_back():
    inst = _scene()
    aff = _oblique_affine(True)
    mesh = M.lesion_meshes(inst, 2, aff)[0]
    data = M.stl_bytes(mesh, name="sub-01 lesion 1")
    assert len(data) == 84 + 50 * mesh.n_faces
    assert struct.unpack("<I", data[80:84])[0] == mesh.n_faces
    header, tri, normals = M.read_stl(data)
    assert header.startswith("msxplain sub-01 lesion 1") and header.endswith("SPACE=RAS")
    np.testing.assert_allclose(tri, mesh.vertices[mesh.faces], atol=1e-4)
    np.testing.assert_allclose(normals, mesh.face_normals(), atol=1e-6)
    # an independent parse of the first record with struct
    rec = struct.unpack("<12fH", data[84:134])
    np.testing.assert_allclose(rec[3:6], mesh.vertices[mesh.faces[0, 0]], atol=1e-4)
    assert rec[12] == 0
    # LPS: x and y negated, normals still outward
    header, tri_lps, normals_lps = M.read_stl(M.stl_bytes(mesh, space="lps"))
    assert header.endswith("SPACE=LPS")
    np.testing.assert_allclose(tri_lps, tri * np.array([-1, -1, 1], dtype=np.float32), atol=1e-4)
    np.testing.assert_allclose(normals_lps, normals * np.array([-1, -1, 1], dtype=np.float32), atol=1e-6)
    with pytest.raises(ValueError):
        M.read_stl(data[:-3])
    with pytest.raises(ValueError):
        M.stl_bytes(mesh, space="XYZ")


def test_absent_labels_and_empty_masks_give_empty_meshes():
    inst = np.zeros((8, 8, 8), dtype=np.int32)
    inst[2:4, 2:4, 2:4] = 2
    meshes = M.lesion_meshes(inst, 3, np.eye(4))
    assert [m.n_faces == 0 for m in meshes] == [True, False, True]
    data = M.stl_bytes(meshes[0])
    assert len(data) == 84 and M.read_stl(data)[1].shape == (0, 3, 3)
    assert M.lesion_meshes(np.zeros((4, 4, 4), dtype=np.int32), 0, np.eye(4)) == []


def test_smoothing_keeps_the_volume_close_and_the_mesh_closed():
    inst = _scene()
    raw = M.lesion_meshes(inst, 1, np.eye(4))[0]
    smooth = M.lesion_meshes(inst, 1, np.eye(4), smooth_sigma=0.7)[0]
    assert smooth.volume() == pytest.approx(raw.volume(), rel=0.1)
    # closed surface: every edge is shared by exactly two faces
    f = smooth.faces
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert np.all(counts == 2)


def test_inputs_are_not_modified():
    inst = _scene()
    copy = inst.copy()
    inst.setflags(write=False)
    aff = _oblique_affine(False)
    aff.setflags(write=False)
    meshes = M.lesion_meshes(inst, 2, aff)
    M.stl_bytes(meshes[0])
    np.testing.assert_array_equal(inst, copy)
