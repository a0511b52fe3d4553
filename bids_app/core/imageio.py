"""NIfTI in and out, and the only axis-order conversions of the package.

Arrays inside msxplain are in **nibabel voxel order** ``(X, Y, Z)`` (first index along the
affine's first column). nnU-Net works in **SimpleITK order** ``(Z, Y, X)`` with spacing
reversed accordingly (``nnunet_mechanics.md`` §1.4); :func:`to_nnunet_order` and
:func:`from_nnunet_order` are the only places where that transposition happens.

Loading never trusts a file blindly: :func:`load_image` raises
:class:`~bids_app.errors.BadInputData` or :class:`~bids_app.errors.MissingInput` with a
one-line message naming the file for the failure modes seen in real datasets (zero-byte or
truncated files, 4D images, NaN voxels, singular affines, disagreeing qform/sform).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import BadInputData, MissingInput

#: largest plausible voxel side in mm (thick clinical slices reach ~6 mm; 20 mm is absurd)
MAX_VOXEL_MM = 20.0
#: smallest plausible voxel side in mm (7T MP2RAGE goes down to ~0.4 mm)
MIN_VOXEL_MM = 0.05
#: qform and sform are said to disagree above this many mm anywhere in the field of view
QFORM_SFORM_TOLERANCE_MM = 1.0


@dataclass(frozen=True)
class Image:
    """A 3D image in nibabel voxel order.

    Attributes
    ----------
    data : ndarray, shape (X, Y, Z)
    affine : ndarray of float64, shape (4, 4)
        Voxel-to-scanner (RAS+, mm) transform.
    path : str or None
        Where it was read from (for messages).
    """

    data: np.ndarray
    affine: np.ndarray
    path: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel sizes in mm along X, Y, Z."""
        return tuple(float(z) for z in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise MissingInput("Input file does not exist.", path=str(path), hint="check the path and the BIDS filters.")
    if path.stat().st_size == 0:
        raise BadInputData("Image file is empty (0 bytes).", path=str(path), hint="re-export or re-copy the scan.")


def load_image(path: str | os.PathLike, *, dtype=np.float32, check_values: bool = True) -> Image:
    """Read a 3D NIfTI image and check that it is usable.

    Parameters
    ----------
    path : path-like
    dtype : numpy dtype
        Dtype of the returned data (float32 by default; use the native dtype with ``None``).
    check_values : bool
        Refuse NaN/Inf voxels and all-zero images.

    Returns
    -------
    Image

    Raises
    ------
    MissingInput
        The file does not exist.
    BadInputData
        Zero-byte, truncated or corrupt file; not 3D; singular or absurd affine; NaN/Inf
        voxels; an all-zero image.
    """
    path = Path(path)
    _check_readable(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise BadInputData(
            f"Cannot read the NIfTI header ({type(exc).__name__}: {exc}).",
            path=str(path),
            hint="the file is corrupt or not NIfTI; re-export it from the scanner/converter.",
        ) from exc
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise BadInputData(
            f"Expected a 3D image, got shape {tuple(img.shape)}.",
            path=str(path),
            hint="select a single 3D volume (e.g. with a --bids-filter-file) or split the series.",
        )
    if min(shape) < 2:
        raise BadInputData(
            f"Image is not a volume (shape {tuple(img.shape)}).",
            path=str(path),
            hint="provide a 3D acquisition with at least 2 voxels along every axis.",
        )
    affine = check_affine(img, str(path))
    try:
        data = np.asarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise BadInputData(
            f"Image data cannot be read, the file is truncated or corrupt ({type(exc).__name__}).",
            path=str(path),
            hint="re-copy the file; check that the transfer completed.",
        ) from exc
    data = data.reshape(shape)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if check_values:
        check_values_usable(data, str(path))
    return Image(data=data, affine=affine, path=str(path))


def check_affine(img: nib.Nifti1Image, path: str) -> np.ndarray:
    """Return the image's affine after checking it is invertible and plausible.

    When both qform and sform are set and disagree by more than
    :data:`QFORM_SFORM_TOLERANCE_MM` anywhere in the field of view, the input is refused:
    tools disagree about which one wins (nibabel prefers sform, ITK qform), so the lesion
    masks could land in a different place than the user sees (LST-AI issue #44).
    """
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise BadInputData("Image affine contains NaN or Inf.", path=path, hint="repair the NIfTI header (qform/sform).")
    lin = affine[:3, :3]
    if abs(np.linalg.det(lin)) < 1e-9:
        raise BadInputData("Image affine is singular (zero voxel size or collinear axes).", path=path,
                           hint="repair the NIfTI header (pixdim, qform/sform).")
    zooms = np.sqrt((lin ** 2).sum(axis=0))
    if np.any(zooms > MAX_VOXEL_MM) or np.any(zooms < MIN_VOXEL_MM):
        raise BadInputData(
            f"Implausible voxel size {tuple(round(float(z), 4) for z in zooms)} mm.",
            path=path,
            hint=f"voxel sides must lie in [{MIN_VOXEL_MM}, {MAX_VOXEL_MM}] mm; repair pixdim in the header.",
        )
    header = img.header
    if isinstance(header, nib.Nifti1Header):
        qcode = int(header["qform_code"])
        scode = int(header["sform_code"])
        if qcode > 0 and scode > 0:
            qform = header.get_qform()
            sform = header.get_sform()
            shape = np.array(img.shape[:3]) - 1
            corners = np.array([[i, j, k, 1] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])],
                               dtype=np.float64)
            gap = np.abs(corners @ qform.T - corners @ sform.T)[:, :3].max()
            if gap > QFORM_SFORM_TOLERANCE_MM:
                raise BadInputData(
                    f"qform and sform disagree by up to {gap:.1f} mm.",
                    path=path,
                    hint="decide which is right and make the other equal (e.g. nibabel set_qform(img.get_sform())).",
                )
    return affine


def check_values_usable(data: np.ndarray, path: str | None) -> None:
    """Refuse images with NaN/Inf voxels or no signal at all."""
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int((~finite).sum())
        raise BadInputData(
            f"Image has {n_bad} NaN/Inf voxels.",
            path=path,
            hint="replace them (e.g. by 0) or re-export the scan.",
        )
    if not np.any(data):
        raise BadInputData("Image is all zeros.", path=path, hint="check the conversion from DICOM.")


def save_image(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, *, dtype=None) -> Path:
    """Write a NIfTI file with qform = sform = ``affine`` (code 1, scanner).

    Writing both forms equal avoids the qform/sform ambiguity this package refuses on input.
    """
    path = Path(path)
    arr = np.asarray(data)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if arr.dtype.kind == "f":
        img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))
    return path


def to_nnunet_order(data: np.ndarray, zooms: tuple[float, float, float]) -> tuple[np.ndarray, list[float]]:
    """nibabel ``(..., X, Y, Z)`` array and zooms -> nnU-Net ``(..., Z, Y, X)`` and spacing.

    Parameters
    ----------
    data : ndarray, shape (..., X, Y, Z)
    zooms : tuple of 3 float
        Voxel sizes along X, Y, Z in mm.

    Returns
    -------
    array : ndarray, shape (..., Z, Y, X)
        A view, not a copy.
    spacing : list of 3 float
        ``[sz, sy, sx]``.
    """
    nd = data.ndim
    axes = tuple(range(nd - 3)) + (nd - 1, nd - 2, nd - 3)
    return np.transpose(data, axes), [float(zooms[2]), float(zooms[1]), float(zooms[0])]


def from_nnunet_order(data: np.ndarray) -> np.ndarray:
    """nnU-Net ``(..., Z, Y, X)`` -> nibabel ``(..., X, Y, Z)`` (a view)."""
    nd = data.ndim
    axes = tuple(range(nd - 3)) + (nd - 1, nd - 2, nd - 3)
    return np.transpose(data, axes)
