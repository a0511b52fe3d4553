"""NIfTI in and out, and the only axis-order conversions of the package.

Arrays inside msxplain are in **nibabel voxel order** ``(X, Y, Z)`` (first index along the
affine's first column). nnU-Net works in **SimpleITK order** ``(Z, Y, X)`` with spacing
reversed accordingly (as nnU-Net's SimpleITKIO reads a NIfTI; docs/model-card.md); :func:`to_nnunet_order` and
:func:`from_nnunet_order` are the only places where that transposition happens.

Loading never trusts a file blindly: :func:`load_image` raises
:class:`~bids_app.errors.BadInputData` or :class:`~bids_app.errors.MissingInput` with a
one-line message naming the file for the failure modes seen in real datasets (zero-byte or
truncated files, 4D images, NaN voxels, singular affines, disagreeing qform/sform), and for
hostile or broken files: RGB or complex voxel types, intensities that overflow nnU-Net's
float32 z-score, and **resource bombs**.

Resource limits: before any voxel is read, the size the header declares (voxels x bytes per
voxel, and voxels x 4 for the float32 copy every channel becomes) and, for ``.nii.gz``, the
decompressed size (streamed in 1 MiB chunks, never held in memory) must stay under
:func:`max_image_bytes`: :data:`DEFAULT_MAX_IMAGE_BYTES` (1 GiB, room for a 7T 0.5 mm whole
brain, 512 x 512 x 400 voxels stored as float64), or the environment variable
``MSXPLAIN_MAX_IMAGE_BYTES`` (bytes, or with a unit: ``2G``, ``1500M``). The variable is read
at every load, so it reaches Nipype's worker processes and SLURM jobs through the environment.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.errors import BadInputData, MissingInput, UsageError

#: largest plausible voxel side in mm (thick clinical slices reach ~6 mm; 20 mm is absurd)
MAX_VOXEL_MM = 20.0
#: smallest plausible voxel side in mm (7T MP2RAGE goes down to ~0.4 mm)
MIN_VOXEL_MM = 0.05
#: qform and sform are said to disagree above this many mm anywhere in the field of view
QFORM_SFORM_TOLERANCE_MM = 1.0
#: environment variable that overrides :data:`DEFAULT_MAX_IMAGE_BYTES`
MAX_IMAGE_BYTES_ENV = "MSXPLAIN_MAX_IMAGE_BYTES"
#: largest image accepted by default: 1 GiB. A 7T 0.5 mm whole brain (480 x 480 x 400 voxels) is
#: 0.37 GB as float32; 512 x 512 x 400 stored as float64 is 0.84 GB
DEFAULT_MAX_IMAGE_BYTES = 1 << 30
#: a .nii.gz may hold this much beyond header + voxels (NIfTI extensions, padding)
DECOMPRESSED_SLACK_BYTES = 1 << 20
#: largest |intensity| accepted. nnU-Net z-scores each channel in float32: with |x| <= 1e15 the
#: sum of squares of 3e8 voxels (more than the size limit allows) stays under the float32 maximum
#: (3.4e38); above it the deviation overflows and every probability becomes NaN. MR intensities
#: are < 1e7 in every scanner unit seen so far
MAX_ABS_INTENSITY = 1e15
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30,
          "T": 1 << 40, "TB": 1 << 40}


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


def max_image_bytes() -> int:
    """The per-image size limit in bytes: ``MSXPLAIN_MAX_IMAGE_BYTES`` or the default (1 GiB).

    Raises
    ------
    UsageError
        The variable is not a positive size (e.g. ``2G``, ``1500M``, ``800000000``).
    """
    raw = os.environ.get(MAX_IMAGE_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_BYTES
    text = raw.upper().replace(" ", "").removesuffix("IB")
    digits = text.rstrip("KMGTB")
    unit = text[len(digits):]
    try:
        value = int(float(digits) * _UNITS[unit])
    except (KeyError, ValueError):
        value = 0
    if value <= 0:
        raise UsageError(f"{MAX_IMAGE_BYTES_ENV}={raw!r} is not a size.",
                         hint=f"give bytes or a size with a unit, e.g. {MAX_IMAGE_BYTES_ENV}=2G.")
    return value


def _size_text(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def check_declared_size(shape: tuple[int, ...], dtype: np.dtype, path: str, limit: int | None = None) -> int:
    """Refuse an image whose header declares more voxel data than the limit allows.

    Parameters
    ----------
    shape : tuple of int
        Shape from the header.
    dtype : numpy dtype
        On-disk voxel type from the header.
    path : str
        For the message.
    limit : int, optional
        Bytes (default: :func:`max_image_bytes`).

    Returns
    -------
    int
        Bytes of voxel data the header declares (on disk, uncompressed).

    Raises
    ------
    BadInputData
        ``voxels x max(bytes per voxel, 4)`` exceeds the limit (the 4: every channel becomes a
        float32 array).
    """
    limit = max_image_bytes() if limit is None else int(limit)
    n_voxels = 1
    for s in shape:
        n_voxels *= int(s)  # Python ints: 4000^3 x 8 must not wrap around
    declared = n_voxels * int(dtype.itemsize)
    needed = n_voxels * max(int(dtype.itemsize), 4)
    if needed > limit:
        dims = " x ".join(str(int(s)) for s in shape)
        raise BadInputData(
            f"Image too large: the header declares {dims} voxels of {dtype} ({_size_text(needed)} in memory), "
            f"over the limit of {_size_text(limit)}.",
            path=path,
            hint=f"check the header (a corrupt or hostile file?); for a genuinely larger image raise the limit, "
                 f"e.g. {MAX_IMAGE_BYTES_ENV}={-(-needed // (1 << 30)) + 1}G.",
        )
    return declared


def check_decompressed_size(path: str | os.PathLike, limit: int) -> int:
    """Decompress a ``.nii.gz`` in 1 MiB chunks, discarding them, and stop past ``limit`` bytes.

    Memory stays at one chunk whatever the file inflates to; every gzip member counts (the
    ISIZE trailer holds the size modulo 4 GiB of the last member only, so it is not trusted).

    Returns
    -------
    int
        Decompressed bytes.

    Raises
    ------
    BadInputData
        The file inflates past ``limit`` (a decompression bomb), or is not valid gzip.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as handle:
            while True:
                chunk = handle.read(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise BadInputData(
                        f"Compressed image inflates to more than {_size_text(limit)} ({os.path.getsize(path)} bytes "
                        f"on disk), more than its header declares (header, voxels and 1 MiB of extensions).",
                        path=str(path),
                        hint="the file is corrupt or a decompression bomb; re-export it from the scanner/converter.",
                    )
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise BadInputData(
            f"Image data cannot be read, the file is truncated or corrupt ({type(exc).__name__}).",
            path=str(path),
            hint="re-copy the file; check that the transfer completed.",
        ) from exc
    return total


def check_voxel_type(dtype: np.dtype, path: str) -> None:
    """Refuse voxel types that are not one real number per voxel (RGB, complex).

    A complex image cast to float32 keeps only its real part (numpy warns and drops the
    imaginary part), which is not the magnitude image the network was trained on.
    """
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.kind == "V":
        raise BadInputData(
            f"Image voxels are a record type ({', '.join(dtype.names or ()) or dtype}), e.g. RGB colour, "
            "not intensities.",
            path=path,
            hint="give the scanner's greyscale image (RGB files are screenshots or colour maps).",
        )
    if dtype.kind == "c":
        raise BadInputData(
            f"Image voxels are complex ({dtype}); msxplain would have to drop the imaginary part.",
            path=path,
            hint="give the magnitude image (e.g. numpy.abs of the complex data, or the scanner's magnitude "
                 "reconstruction).",
        )
    if dtype.kind not in "biuf":
        raise BadInputData(f"Image voxel type {dtype} is not numeric.", path=path,
                           hint="re-export the scan as integers or floats.")


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
        voxels; an all-zero image; RGB or complex voxels; intensities beyond
        :data:`MAX_ABS_INTENSITY`; larger than :func:`max_image_bytes` (checked from the header,
        and for ``.nii.gz`` by streaming the decompression, before any voxel is read).
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
    check_voxel_type(img.get_data_dtype(), str(path))
    limit = max_image_bytes()
    declared = check_declared_size(tuple(img.shape), img.get_data_dtype(), str(path), limit)
    if path.name.endswith(".gz"):
        # the header bounds what nibabel reads, but the file must not inflate beyond it either
        offset = int(img.header.get("vox_offset", 352)) if hasattr(img.header, "get") else 352
        check_decompressed_size(path, min(declared + offset, limit) + DECOMPRESSED_SLACK_BYTES)
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
    if check_values:
        # before the cast: a float64 1e39 would become an Inf voxel and be misreported as one
        check_intensity_range(data, str(path))
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
        raise BadInputData("Image affine contains NaN or Inf.", path=path,
                           hint="repair the NIfTI header (qform/sform).")
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


def check_intensity_range(data: np.ndarray, path: str | None) -> None:
    """Refuse intensities whose float32 z-score (nnU-Net's normalisation) would overflow.

    Parameters
    ----------
    data : ndarray, shape (X, Y, Z)
        Any numeric array (NaN voxels are left to :func:`check_values_usable`).

    Raises
    ------
    BadInputData
        Some ``|value| > MAX_ABS_INTENSITY`` (1e15).
    """
    if data.size == 0 or data.dtype.kind == "b":
        return
    # min and max as Python floats: np.abs of the most negative int64 would wrap around
    peak = max(abs(float(np.max(data))), abs(float(np.min(data))))
    if peak > MAX_ABS_INTENSITY:
        raise BadInputData(
            f"Image intensities reach {peak:.3g}, beyond {MAX_ABS_INTENSITY:.0e}: nnU-Net's float32 "
            f"normalisation would overflow and give NaN probabilities.",
            path=path,
            hint="rescale the image (e.g. divide by its maximum) or fix scl_slope in the header.",
        )


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
