"""Issue 16 item 2 and the voxel-type cases of item 5: every NIfTI is sized before it is read.

Each test fails on the loader before the checks: the bombs allocated GBs (or raised a bare
MemoryError), RGB and complex voxels were cast to float32 silently, huge intensities passed.
"""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.core import imageio
from bids_app.core.imageio import load_image
from bids_app.errors import BadInputData, UsageError
from bids_app.testing import write_nifti


def _header(shape, dtype) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), code=1)
    hdr.set_sform(np.eye(4), code=1)
    return hdr


def _gz_bomb(path: Path, side: int = 1000) -> Path:
    """A .nii.gz of side^3 uint8 zeros, written in 1 MiB chunks (about 1 MB on disk for 1000^3)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    left = side ** 3
    with open(path, "wb") as out:
        out.write(comp.compress(_header((side,) * 3, np.uint8).binaryblock + b"\0" * 4))
        chunk = bytes(1 << 20)
        while left > 0:
            out.write(comp.compress(chunk[: min(left, len(chunk))]))
            left -= len(chunk)
        out.write(comp.flush())
    return path


def test_decompression_bomb_is_refused_without_allocating(tmp_path):
    path = _gz_bomb(tmp_path / "sub-01_T1w.nii.gz")
    assert path.stat().st_size < 2_000_000  # the 972 kB file that inflates to 1000^3
    tracemalloc.start()
    try:
        with pytest.raises(BadInputData, match=r"Image too large: the header declares 1000 x 1000 x 1000") as err:
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50e6, peak
    assert str(path) in str(err.value) and "MSXPLAIN_MAX_IMAGE_BYTES" in str(err.value)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_claiming_4000_cubed_is_a_message_not_a_memory_error(tmp_path, suffix):
    """A 116-byte .nii.gz (just a header) claiming 4000^3 float32 (256 GB)."""
    raw = _header((4000, 4000, 4000), np.float32).binaryblock + b"\0" * 4
    path = tmp_path / f"sub-01_T1w{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    with pytest.raises(BadInputData, match=r"4000 x 4000 x 4000 voxels of float32 \(238\.4 GiB"):
        load_image(path)


def test_gzip_inflating_past_its_header_is_refused(tmp_path):
    """The header says 20^3 float32 (32 kB); the file inflates to 64 MiB: streamed, never held."""
    hdr = _header((20, 20, 20), np.float32)
    voxels = np.ones(20 ** 3, np.float32).tobytes()
    path = tmp_path / "sub-01_FLAIR.nii.gz"
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + voxels + bytes(64 << 20), compresslevel=1))
    tracemalloc.start()
    try:
        with pytest.raises(BadInputData, match=r"Compressed image inflates to more than 1.0 MiB \(\d+ bytes on disk\), "
                                               "more than its header declares"):
            load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + voxels))  # honest: read as usual
    assert load_image(path).shape == (20, 20, 20)


def test_limit_is_configurable_and_fits_a_7t_brain(tmp_path, monkeypatch):
    monkeypatch.delenv("MSXPLAIN_MAX_IMAGE_BYTES", raising=False)
    assert imageio.max_image_bytes() == 1 << 30
    # a 7T 0.5 mm whole brain stored as float64 passes the default; 600^3 float32 does not
    imageio.check_declared_size((512, 512, 400), np.dtype(np.float64), "x")
    with pytest.raises(BadInputData):
        imageio.check_declared_size((700, 700, 700), np.dtype(np.float32), "x")
    for text, value in (("2G", 2 << 30), ("1500M", 1500 << 20), ("800000000", 800_000_000), ("1.5GiB", 3 << 29)):
        monkeypatch.setenv("MSXPLAIN_MAX_IMAGE_BYTES", text)
        assert imageio.max_image_bytes() == value
    monkeypatch.setenv("MSXPLAIN_MAX_IMAGE_BYTES", "lots")
    with pytest.raises(UsageError, match="MSXPLAIN_MAX_IMAGE_BYTES='lots' is not a size"):
        imageio.max_image_bytes()
    monkeypatch.setenv("MSXPLAIN_MAX_IMAGE_BYTES", "10K")
    path = write_nifti(tmp_path / "small.nii.gz", np.ones((20, 20, 20), np.float32))
    with pytest.raises(BadInputData, match="over the limit of 10.0 KiB"):
        load_image(path)


def test_rgb24_image_is_refused(tmp_path):
    rgb = np.zeros((10, 10, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 100
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    assert nib.load(str(path)).get_data_dtype().names == ("R", "G", "B")
    with pytest.raises(BadInputData, match=r"record type \(R, G, B\), e.g. RGB colour") as err:
        load_image(path)
    assert str(path) in str(err.value) and "Fix: give the scanner's greyscale image" in str(err.value)


def test_complex_image_is_refused_not_reduced_to_its_real_part(tmp_path):
    data = (np.ones((10, 10, 10)) + 1j * np.full((10, 10, 10), 5.0)).astype(np.complex64)
    path = write_nifti(tmp_path / "sub-01_FLAIR.nii.gz", data)
    with pytest.raises(BadInputData, match=r"complex \(complex64\).*Fix: give the magnitude image"):
        load_image(path)


@pytest.mark.parametrize("peak", [3.0e38, 1e20])
def test_intensities_near_the_float32_maximum_are_refused(tmp_path, peak):
    data = np.ones((10, 10, 10), np.float32)
    data[3:6, 3:6, 3:6] = peak
    path = write_nifti(tmp_path / "sub-01_T1w.nii.gz", data)
    with pytest.raises(BadInputData, match="nnU-Net's float32 normalisation would overflow"):
        load_image(path)
    # what nnU-Net's ZScoreNormalization would compute: the deviation overflows
    with np.errstate(over="ignore"):
        assert not np.isfinite(data.std())
    data[3:6, 3:6, 3:6] = 1e6  # bright but ordinary
    assert load_image(write_nifti(tmp_path / "ok.nii.gz", data)).shape == (10, 10, 10)


def test_float64_beyond_float32_is_reported_as_out_of_range_not_as_inf(tmp_path):
    data = np.ones((10, 10, 10), np.float64)
    data[0, 0, 0] = 1e39
    path = write_nifti(tmp_path / "sub-01_T1w.nii.gz", data)
    with pytest.raises(BadInputData, match="intensities reach 1e\\+39"):
        load_image(path)
