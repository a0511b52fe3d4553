"""NIfTI loading checks and the nibabel <-> nnU-Net axis conversions."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from bids_app.core.imageio import from_nnunet_order, load_image, save_image, to_nnunet_order
from bids_app.errors import BadInputData, MissingInput
from bids_app.testing import write_nifti


def asymmetric_phantom(shape=(7, 9, 11)):
    data = np.zeros(shape, np.float32)
    data[1, 2, 3] = 1
    data[5, 1, 9] = 2
    data[:, -1, 0] = 3
    return data


def test_axis_order_roundtrip_with_asymmetric_phantom():
    data = asymmetric_phantom()
    arr, spacing = to_nnunet_order(data, (1.0, 2.0, 3.0))
    assert arr.shape == (11, 9, 7) and spacing == [3.0, 2.0, 1.0]
    assert arr[3, 2, 1] == 1 and arr[9, 1, 5] == 2
    assert np.array_equal(from_nnunet_order(arr), data)
    stacked = np.stack([data, 2 * data])
    arr4, _ = to_nnunet_order(stacked, (1.0, 2.0, 3.0))
    assert arr4.shape == (2, 11, 9, 7) and np.array_equal(from_nnunet_order(arr4), stacked)


def test_nnunet_order_matches_simpleitk(tmp_path):
    import SimpleITK as sitk

    data = asymmetric_phantom()
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    path = write_nifti(tmp_path / "p.nii.gz", data, affine)
    img = load_image(path, check_values=False)
    arr, spacing = to_nnunet_order(img.data, img.zooms)
    itk = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(itk), arr)
    assert list(itk.GetSpacing())[::-1] == pytest.approx(spacing)


def test_save_load_roundtrip_sets_qform_and_sform(tmp_path):
    data = asymmetric_phantom()
    affine = np.array([[0, -1.5, 0, 10], [1.2, 0, 0, -5], [0, 0, 2, 3], [0, 0, 0, 1]], float)
    save_image(tmp_path / "x.nii.gz", data, affine)
    img = nib.load(str(tmp_path / "x.nii.gz"))
    assert img.header["qform_code"] == 1 and img.header["sform_code"] == 1
    np.testing.assert_allclose(img.header.get_qform(), affine, atol=1e-5)
    loaded = load_image(tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(loaded.data, data)
    assert loaded.zooms == pytest.approx((1.2, 1.5, 2.0))


def test_missing_file(tmp_path):
    with pytest.raises(MissingInput):
        load_image(tmp_path / "nope.nii.gz")


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(BadInputData, match="empty"):
        load_image(tmp_path / "empty.nii.gz")


def test_truncated_file(tmp_path):
    path = write_nifti(tmp_path / "t.nii.gz", np.random.default_rng(0).random((20, 20, 20)).astype(np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadInputData, match="truncated|corrupt"):
        load_image(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "g.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    with pytest.raises(BadInputData, match="header"):
        load_image(path)


@pytest.mark.parametrize("shape, match", [((8, 8, 8, 3), "3D"), ((8, 8), "3D"), ((8, 8, 1), "not a volume")])
def test_wrong_dimensionality(tmp_path, shape, match):
    path = write_nifti(tmp_path / "d.nii.gz", np.ones(shape, np.float32))
    with pytest.raises(BadInputData, match=match):
        load_image(path)


def test_single_volume_4d_is_accepted(tmp_path):
    path = write_nifti(tmp_path / "d.nii.gz", np.ones((8, 8, 8, 1), np.float32))
    assert load_image(path).shape == (8, 8, 8)


def test_nan_and_all_zero(tmp_path):
    data = np.ones((8, 8, 8), np.float32)
    data[2, 2, 2] = np.nan
    with pytest.raises(BadInputData, match="NaN"):
        load_image(write_nifti(tmp_path / "n.nii.gz", data))
    with pytest.raises(BadInputData, match="all zeros"):
        load_image(write_nifti(tmp_path / "z.nii.gz", np.zeros((8, 8, 8), np.float32)))


def test_absurd_voxel_size(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.diag([50.0, 1.0, 1.0, 1.0])), str(tmp_path / "a.nii"))
    with pytest.raises(BadInputData, match="Implausible voxel size"):
        load_image(tmp_path / "a.nii")


def test_singular_affine(tmp_path):
    # nibabel refuses to write a singular affine, so patch the header bytes of a valid file
    path = tmp_path / "s.nii"
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    img.set_qform(None, code=0)
    img.set_sform(np.eye(4), code=1)
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
    hdr["srow_z"] = [0, 0, 0, 0]
    raw[:348] = hdr.binaryblock
    path.write_bytes(bytes(raw))
    with pytest.raises(BadInputData, match="singular"):
        load_image(path)


def test_qform_sform_disagreement(tmp_path):
    img = nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4))
    shifted = np.eye(4)
    shifted[:3, 3] = [0, 0, 12.0]
    img.set_qform(np.eye(4), code=1)
    img.set_sform(shifted, code=1)
    nib.save(img, str(tmp_path / "q.nii.gz"))
    with pytest.raises(BadInputData, match="qform and sform disagree by up to 12.0 mm"):
        load_image(tmp_path / "q.nii.gz")
