"""The two read-only sources of the synthetic engine: the template and the real lesion masks.

* **Anatomy**: MNI ICBM152 2009c nonlinear asymmetric (``MNI152NLin2009cAsym``): the head
  T1w, the brain mask and the GM/WM/CSF probabilistic segmentations, at ``res-01`` (1 mm,
  193x229x193) or ``res-02`` (2 mm, 97x115x97). Files come from :mod:`bids_app.bids.templates`
  (the TemplateFlow cache, fetched once on first use unless offline), or from an explicit
  folder (``--templates DIR``), which is never completed from the network.
* **Lesion shapes**: bundled with the package (``bids_app/data/lesion_masks``), the expert-consensus
  white-matter lesion masks of the 3D MR image
  database of MS patients (Lesjak et al., Neuroinformatics 2017, doi:10.1007/s12021-017-9348-7,
  CC-BY), registered to the FSL MNI152 1 mm grid (182x218x182, LAS). Each mask is split
  into 26-connected components; every component is kept as the world coordinates (mm) of
  its voxels, so it can be placed on any grid. ``patient07`` is excluded by default: its
  real FLAIR/T1 are the project's held-out end-to-end test case, and a synthetic training
  set must not contain its lesions.

This module reads files (and only reads them); everything else in :mod:`bids_app.synth`
works on the arrays it returns. Loaded sources are cached per process.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app import DATA_DIR
from bids_app.bids.templates import TEMPLATE_MAPS
from bids_app.errors import BadInputData, MissingInput, UsageError

TEMPLATE = "MNI152NLin2009cAsym"
#: template files needed at each native resolution: key -> TemplateFlow query entities
TEMPLATE_FILES = TEMPLATE_MAPS
#: patients whose lesion masks are left out of the library unless asked otherwise
DEFAULT_EXCLUDED_PATIENTS: tuple[str, ...] = ("patient07",)
#: lesion-mask file pattern inside ``<dir>/patientNN/``
LESION_MASK_GLOB = "GOLD_STANDARD*.nii*"
#: smallest library lesion kept (voxels of the 1 mm source grid = mm^3)
DEFAULT_MIN_LESION_VOXELS = 3

LESJAK_2017 = (
    "Lesjak Z, et al. A Novel Public MR Image Dataset of Multiple Sclerosis Patients With Lesion Segmentations "
    "Based on Multi-rater Consensus. Neuroinformatics (2017), doi:10.1007/s12021-017-9348-7 (data: CC-BY)"
)
MNI2009C = (
    "Fonov V, Evans AC, Botteron K, Almli CR, McKinstry RC, Collins DL. Unbiased average age-appropriate atlases "
    "for pediatric studies. NeuroImage 54:313-327 (2011), doi:10.1016/j.neuroimage.2010.07.033; MNI ICBM152 2009c "
    "nonlinear asymmetric template, copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, MNI, "
    "McGill University (permissive licence, the copyright notice must be kept), via TemplateFlow"
)


#: the lesion masks bundled with the package (CC-BY; README.md and LICENSE.txt beside them)
BUNDLED_LESION_DIR = DATA_DIR / "lesion_masks"


# --------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class TemplateSet:
    """The template on one grid (RAS, nibabel voxel order).

    Attributes
    ----------
    affine : ndarray of float64, shape (4, 4)
    t1w : ndarray of float32, shape (X, Y, Z)
        Head T1w, scaled so that the median of confident WM (``WM >= 0.9``) is 1.
    brain, gm, wm, csf : ndarray of float32, shape (X, Y, Z)
        Brain mask (0/1, or a fraction after resampling) and tissue probabilities in [0, 1].
    resolution_mm : float
    sources : dict of str
        Where each map came from (file paths), for provenance.
    cache : dict
        Derived maps computed once per template by the engine (head mask, CL candidates...).
    """

    affine: np.ndarray
    t1w: np.ndarray
    brain: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    resolution_mm: float
    sources: dict[str, str]
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.wm.shape)  # type: ignore[return-value]


def _native_resolution(resolution_mm: float) -> int:
    return 1 if resolution_mm < 2.0 - 1e-6 else 2


def resolve_template_files(resolution: int, templates_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Find the five template files of one native resolution (1 or 2 mm).

    Parameters
    ----------
    resolution : {1, 2}
    templates_dir : path-like, optional
        A folder holding ``tpl-MNI152NLin2009cAsym/`` (a TemplateFlow home) or the files
        themselves. When given it wins and nothing is fetched; otherwise the files come from
        :func:`bids_app.bids.templates.template_file` (the TemplateFlow cache, fetched on first use
        unless offline).

    Returns
    -------
    dict of str -> Path

    Raises
    ------
    MissingInput
        The files are not in ``templates_dir``, or not in the cache and cannot be fetched.
    """
    from bids_app.bids.templates import template_file, template_filename

    if templates_dir is None:
        return {key: template_file(TEMPLATE, resolution=resolution, **entities)
                for key, entities in TEMPLATE_FILES.items()}
    base = Path(templates_dir).expanduser()
    if not base.is_dir():
        raise MissingInput("Template folder does not exist.", path=str(base),
                           hint=f"pass --templates DIR with DIR/tpl-{TEMPLATE}/ (a TemplateFlow home copy).")
    folder = base / f"tpl-{TEMPLATE}" if (base / f"tpl-{TEMPLATE}").is_dir() else base
    files: dict[str, Path] = {}
    for key, entities in TEMPLATE_FILES.items():
        path = folder / template_filename(TEMPLATE, resolution=resolution, **entities)
        if not path.is_file() or path.stat().st_size == 0:
            raise MissingInput(f"Template file {path.name} is missing or empty.", path=str(folder),
                               hint=f"copy the res-{resolution:02d} files of tpl-{TEMPLATE} there.")
        files[key] = path
    return files


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:
        raise BadInputData(f"Cannot read {path.name} ({type(exc).__name__}: {exc}).", path=str(path),
                           hint="re-copy the file.") from exc
    if data.ndim != 3:
        raise BadInputData(f"Expected a 3D image, got shape {data.shape}.", path=str(path), hint="use the 3D file.")
    return data, np.asarray(img.affine, dtype=np.float64)


def _resample_template(data: np.ndarray, affine: np.ndarray, resolution_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Resample an RAS template map to an isotropic grid covering the same field of view."""
    from scipy import ndimage as ndi

    src = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    extent = np.asarray(data.shape) * src
    shape = np.maximum(np.ceil(extent / resolution_mm - 1e-6).astype(int), 2)
    new_affine = np.eye(4)
    new_affine[:3, :3] = np.diag([resolution_mm] * 3)
    first_edge = affine[:3, 3] - src / 2.0
    new_affine[:3, 3] = first_edge + resolution_mm / 2.0
    work = data.astype(np.float32)
    ratio = resolution_mm / src
    if np.any(ratio > 1.0):
        sigma = np.sqrt(np.maximum(ratio ** 2 - 1.0, 0.0)) / 2.355
        work = ndi.gaussian_filter(work, sigma=sigma, mode="nearest")
    # target voxel -> source voxel (axis-aligned, RAS)
    idx = [np.arange(n, dtype=np.float64) for n in shape]
    coords = [(new_affine[a, 3] + idx[a] * resolution_mm - affine[a, 3]) / affine[a, a] for a in range(3)]
    grid = np.meshgrid(*coords, indexing="ij")
    out = ndi.map_coordinates(work, grid, order=1, mode="constant", cval=0.0).astype(np.float32)
    return out, new_affine


@functools.lru_cache(maxsize=4)
def _load_templates_cached(resolution_mm: float, files_key: tuple[tuple[str, str], ...]) -> TemplateSet:
    files = {k: Path(v) for k, v in files_key}
    maps: dict[str, np.ndarray] = {}
    affine = None
    for key, path in files.items():
        data, aff = _read_nifti(path)
        if not np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3]))) or np.any(np.diag(aff[:3, :3]) <= 0):
            raise BadInputData("Template is not in RAS axis-aligned orientation.", path=str(path),
                               hint="use the TemplateFlow files unchanged.")
        if affine is None:
            affine = aff
        elif not np.allclose(aff, affine, atol=1e-4):
            raise BadInputData("Template files are not on the same grid.", path=str(path),
                               hint="use files of one resolution of one template.")
        maps[key] = np.ascontiguousarray(data)  # NIfTI arrays come in Fortran order
    assert affine is not None
    native = float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[0])
    if abs(native - resolution_mm) > 1e-6:
        resampled = {}
        for key, data in maps.items():
            resampled[key], new_affine = _resample_template(data, affine, resolution_mm)
        maps, affine = resampled, new_affine
    t1 = maps["T1w"].astype(np.float32)
    wm = np.clip(maps["WM"].astype(np.float32), 0.0, 1.0)
    confident = wm >= 0.9
    ref = float(np.median(t1[confident])) if confident.any() else float(np.percentile(t1[t1 > 0], 90))
    t1 = t1 / max(ref, 1e-6)
    ts = TemplateSet(
        affine=np.asarray(affine, dtype=np.float64),
        t1w=t1.astype(np.float32),
        brain=np.clip(maps["brain"].astype(np.float32), 0.0, 1.0),
        gm=np.clip(maps["GM"].astype(np.float32), 0.0, 1.0),
        wm=wm,
        csf=np.clip(maps["CSF"].astype(np.float32), 0.0, 1.0),
        resolution_mm=float(resolution_mm),
        sources={k: str(v) for k, v in files.items()},
    )
    for arr in (ts.t1w, ts.brain, ts.gm, ts.wm, ts.csf):
        arr.flags.writeable = False  # shared between subjects: never modified
    return ts


def load_templates(resolution_mm: float = 1.0, templates_dir: str | os.PathLike | None = None) -> TemplateSet:
    """Load MNI152NLin2009cAsym on an isotropic grid of ``resolution_mm``.

    1 mm and 2 mm use the native ``res-01``/``res-02`` files; other sizes (0.5-4 mm) are
    resampled (with an anti-aliasing Gaussian) from ``res-01`` (below 2 mm) or ``res-02``.
    Arrays are read-only and cached per process.

    Raises
    ------
    UsageError
        ``resolution_mm`` outside [0.5, 4].
    MissingInput, BadInputData
        See :func:`resolve_template_files`.
    """
    resolution_mm = float(resolution_mm)
    if not 0.5 <= resolution_mm <= 4.0:
        raise UsageError(f"Resolution {resolution_mm} mm is outside [0.5, 4] mm.", hint="use e.g. --resolution 1 or 2.")
    files = resolve_template_files(_native_resolution(resolution_mm), templates_dir)
    key = tuple(sorted((k, str(Path(v).resolve())) for k, v in files.items()))
    return _load_templates_cached(round(resolution_mm, 6), key)


# --------------------------------------------------------------------------------------------
# lesion library
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LesionLibrary:
    """Real lesion shapes at their MNI positions (FSL MNI152 world mm == MNI152NLin2009cAsym).

    Lesion ``i`` has the voxels ``coords[offsets[i]:offsets[i + 1]]``.

    Attributes
    ----------
    coords : ndarray of float32, shape (M, 3)
        World coordinates (RAS mm) of the voxel centres of all lesions.
    offsets : ndarray of int64, shape (L + 1,)
    patient : ndarray of str, shape (L,)
        Source patient folder name (e.g. ``"patient01"``).
    component : ndarray of int32, shape (L,)
        Component number inside that patient's mask (26-connectivity, raster order, from 1).
    voxel_mm : float
        Side of the (isotropic) source voxels.
    excluded : tuple of str
        Patients left out.
    sources : dict of str
        Patient -> mask file.
    cache : dict
        Per-template eligibility tables computed by the engine.
    """

    coords: np.ndarray
    offsets: np.ndarray
    patient: np.ndarray
    component: np.ndarray
    voxel_mm: float
    excluded: tuple[str, ...]
    sources: dict[str, str]
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_lesions(self) -> int:
        return int(self.patient.size)

    @property
    def volumes_mm3(self) -> np.ndarray:
        """Volume of each lesion in mm^3, shape (L,)."""
        return np.diff(self.offsets).astype(np.float64) * self.voxel_mm ** 3

    @property
    def patients(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.patient.tolist())))

    def lesion_coords(self, index: int, flip: bool = False) -> np.ndarray:
        """World coordinates of one lesion's voxels (a new array), optionally mirrored in x."""
        pts = self.coords[self.offsets[index]:self.offsets[index + 1]].copy()
        if flip:
            pts[:, 0] = -pts[:, 0]
        return pts


def build_lesion_library(
    masks: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    min_voxels: int = DEFAULT_MIN_LESION_VOXELS,
    excluded: tuple[str, ...] = (),
    sources: dict[str, str] | None = None,
) -> LesionLibrary:
    """Split binary lesion masks into connected components (pure; no file access).

    Parameters
    ----------
    masks : dict of str -> (ndarray, ndarray)
        Patient name -> (mask data of shape (X, Y, Z), affine (4, 4)). Nonzero = lesion.
        All masks must share one isotropic voxel size.
    min_voxels : int
        Components with fewer voxels are dropped (segmentation specks).
    excluded : tuple of str
        Recorded in the result (the caller already left those patients out).

    Returns
    -------
    LesionLibrary
        Lesions ordered by patient name, then component number.
    """
    from bids_app.core.postprocess import label_components

    all_coords: list[np.ndarray] = []
    counts: list[int] = []
    patients: list[str] = []
    components: list[int] = []
    voxel_mm = None
    for name in sorted(masks):
        data, affine = masks[name]
        zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
        if not np.allclose(zooms, zooms[0], atol=1e-3):
            raise BadInputData(f"Lesion mask of {name} is not isotropic ({zooms}).", hint="use the 1 mm MNI masks.")
        if voxel_mm is None:
            voxel_mm = float(zooms[0])
        elif abs(voxel_mm - zooms[0]) > 1e-3:
            raise BadInputData(f"Lesion mask of {name} has a different voxel size.", hint="use masks of one grid.")
        mask = np.asarray(data) > 0
        # crop to the lesions' bounding box: C-order raster numbering is unchanged by cropping
        spans = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
        if any(s.size == 0 for s in spans):
            continue
        lo = np.array([s[0] for s in spans])
        box = tuple(slice(int(s[0]), int(s[-1]) + 1) for s in spans)
        labels, n = label_components(np.ascontiguousarray(mask[box]), connectivity=26)
        flat = labels.ravel()
        idx = np.flatnonzero(flat)
        lab = flat[idx]
        order = np.argsort(lab, kind="stable")
        idx, lab = idx[order], lab[order]
        sizes = np.bincount(lab, minlength=n + 1)[1:]
        ijk = np.stack(np.unravel_index(idx, labels.shape), axis=1).astype(np.float64) + lo
        world = ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
        start = 0
        for comp in range(1, n + 1):
            size = int(sizes[comp - 1])
            if size >= min_voxels:
                all_coords.append(world[start:start + size].astype(np.float32))
                counts.append(size)
                patients.append(name)
                components.append(comp)
            start += size
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)
    coords = np.concatenate(all_coords, axis=0) if all_coords else np.zeros((0, 3), np.float32)
    lib = LesionLibrary(
        coords=coords,
        offsets=offsets,
        patient=np.asarray(patients, dtype=str),
        component=np.asarray(components, dtype=np.int32),
        voxel_mm=float(voxel_mm or 1.0),
        excluded=tuple(excluded),
        sources=dict(sources or {}),
    )
    lib.coords.flags.writeable = False
    return lib


def default_lesion_dir() -> Path:
    """``$MSXPLAIN_LESION_MASKS``, else the masks bundled with the package
    (:data:`BUNDLED_LESION_DIR`, the 28 open_ms_data cross-sectional MNI masks)."""
    env = os.environ.get("MSXPLAIN_LESION_MASKS")
    return Path(env) if env else BUNDLED_LESION_DIR


def find_lesion_masks(lesion_dir: str | os.PathLike) -> dict[str, Path]:
    """Patient folder name -> its ``GOLD_STANDARD*`` mask file."""
    root = Path(lesion_dir).expanduser()
    if not root.is_dir():
        raise MissingInput("Lesion-mask folder does not exist.", path=str(root),
                           hint="pass --lesion-masks DIR (open_ms_data/cross_sectional/MNI).")
    found: dict[str, Path] = {}
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and re.fullmatch(r"patient\d+", sub.name):
            candidates = sorted(sub.glob(LESION_MASK_GLOB))
            if candidates:
                found[sub.name] = candidates[0]
    if not found:
        raise MissingInput("No patientNN/GOLD_STANDARD*.nii.gz lesion masks found.", path=str(root),
                           hint="pass --lesion-masks pointing to open_ms_data/cross_sectional/MNI.")
    return found


@functools.lru_cache(maxsize=4)
def _load_library_cached(files_key: tuple[tuple[str, str], ...], excluded: tuple[str, ...],
                         min_voxels: int) -> LesionLibrary:
    masks = {}
    for name, path in files_key:
        data, affine = _read_nifti(Path(path))
        masks[name] = (data, affine)
    return build_lesion_library(masks, min_voxels=min_voxels, excluded=excluded,
                                sources=dict(files_key))


def load_lesion_library(
    lesion_dir: str | os.PathLike | None = None,
    *,
    exclude: tuple[str, ...] | list[str] = DEFAULT_EXCLUDED_PATIENTS,
    min_voxels: int = DEFAULT_MIN_LESION_VOXELS,
) -> LesionLibrary:
    """Read the real lesion masks and build the library (cached per process).

    Parameters
    ----------
    lesion_dir : path-like, optional
        Folder with ``patientNN/GOLD_STANDARD*.nii.gz``; default :func:`default_lesion_dir`.
    exclude : sequence of str
        Patient folders left out; ``("patient07",)`` by default (the held-out real case).
    min_voxels : int
        Smallest component kept, in source voxels (1 mm^3).

    Raises
    ------
    MissingInput
        No masks found, or every patient excluded.
    """
    if lesion_dir is None:
        lesion_dir = default_lesion_dir()
    found = find_lesion_masks(lesion_dir)
    excluded = tuple(sorted({str(e).strip() for e in exclude if str(e).strip()}))
    kept = {k: v for k, v in found.items() if k not in excluded}
    if not kept:
        raise MissingInput("Every lesion mask was excluded.", path=str(lesion_dir),
                           hint="exclude fewer patients.")
    key = tuple(sorted((k, str(v.resolve())) for k, v in kept.items()))
    return _load_library_cached(key, excluded, int(min_voxels))
