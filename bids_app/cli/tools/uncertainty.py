"""``msxplain-tools uncertainty``: uncertainty maps, lesion table and patient summary from the
probability maps of the members of any ensemble.

Each ``--member-probs`` file is either a 3D lesion-probability map or a 4D image of class
probabilities (last axis = classes, background at index 0). The lesion segmentation is the
ensemble mean thresholded at ``--threshold`` (``p >= threshold``), cleaned of lesions smaller than
``--min-lesion-size`` voxels and labelled with ``--connectivity``; the members are segmented the
same way (``docs/uncertainty.md``).

Writes into ``--out-dir``:

* ``voxel_<measure>.nii.gz`` (float32) for NC, EoE, ExE, MI, EPKL, RMI;
* ``lesion_instances.nii.gz`` (int32): the lesion labels the table refers to;
* ``lesions.tsv``: one row per lesion in label order (``label`` first, ``n/a`` for NaN,
  ``-inf`` kept);
* ``patient.json``: the patient summary (NaN / inf written as ``null``);
* ``parameters.json``: threshold, minimum size, connectivity, ε, inputs with their sha256;
* with ``--lesion-maps``: ``lesion_<measure>.nii.gz``, each lesion painted with its value.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bids_app.cli.parser import positive_int, probability
from bids_app.errors import BadInputData, CannotCreateOutput, MissingInput, OutputIOError, UsageError

NAME = "uncertainty"
HELP = "uncertainty maps, lesion table and patient summary from member probabilities"

#: defaults of the tool (recorded in parameters.json): MS_WML_uncs' l_min = 3 and 18-connectivity
DEFAULT_THRESHOLD = 0.5
DEFAULT_MIN_SIZE = 4
DEFAULT_CONNECTIVITY = 18
#: affines of the inputs must agree to this many mm at the grid corners
AFFINE_TOLERANCE_MM = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--member-probs", nargs="+", required=True, metavar="FILE",
                        help="one NIfTI per ensemble member: a 3D lesion probability map, or 4D class probabilities "
                             "(last axis = classes, background at 0); at least 2 members")
    parser.add_argument("--out-dir", required=True, type=Path, help="output folder (created if needed)")
    parser.add_argument("--threshold", type=probability, default=DEFAULT_THRESHOLD,
                        help="ensemble threshold, a voxel is lesion when p >= threshold (default %(default)s)")
    parser.add_argument("--member-thresholds", type=probability, nargs="+", default=None, metavar="T",
                        help="each member's own tuned threshold, in --member-probs order; adds LSU+ and PSU+")
    parser.add_argument("--min-lesion-size", type=positive_int, default=DEFAULT_MIN_SIZE, metavar="N",
                        help="smallest lesion kept, in voxels (reference l_min + 1; default %(default)s)")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=DEFAULT_CONNECTIVITY,
                        help="lesion connectivity (default %(default)s, as MS_WML_uncs)")
    parser.add_argument("--brain-mask", type=Path, default=None, metavar="MASK",
                        help="brain mask for the patient-level voxel averages (default: the whole volume)")
    parser.add_argument("--lesion-maps", action="store_true",
                        help="also write one NIfTI per lesion measure, each lesion painted with its value")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def _header(path: Path):
    import nibabel as nib

    if not path.is_file():
        raise MissingInput("Input file does not exist.", path=str(path), hint="check the path.")
    if path.stat().st_size == 0:
        raise BadInputData("Image file is empty (0 bytes).", path=str(path), hint="re-export or re-copy it.")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt headers
        raise BadInputData(f"Cannot read the NIfTI header ({type(exc).__name__}).", path=str(path),
                           hint="the file is corrupt or not NIfTI; re-export it.") from exc


def _check_probabilities(data: np.ndarray, path: Path) -> None:
    lo, hi = data.min(), data.max()
    if not (lo >= 0 and hi <= 1):  # also False for NaN
        raise BadInputData(f"Probabilities must lie in [0, 1] (found min {lo}, max {hi}).", path=str(path),
                           hint="give softmax probabilities, not logits; replace NaN and clip resampling overshoot.")


def load_probability_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One member file -> (class probabilities (C, X, Y, Z) float32, affine).

    3D files are lesion probabilities and become ``[1 - p, p]``; 4D files keep their classes.
    """
    from bids_app.core.imageio import check_affine, load_image

    img = _header(path)
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] > 1:
        affine = check_affine(img, str(path))
        try:
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:  # truncated / corrupt payload
            raise BadInputData(f"Image data cannot be read ({type(exc).__name__}).", path=str(path),
                               hint="re-copy the file; check that the transfer completed.") from exc
        _check_probabilities(data, path)
        return np.ascontiguousarray(np.moveaxis(data, -1, 0)), affine
    image = load_image(path, check_values=False)  # an all-zero member map is legitimate
    _check_probabilities(image.data, path)
    p = image.data.astype(np.float32, copy=False)
    return np.stack([1.0 - p, p]), image.affine


def _same_grid(affine: np.ndarray, ref_affine: np.ndarray, shape, path: Path, ref_path: Path) -> None:
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)],
                       dtype=np.float64)
    gap = np.abs(corners @ affine.T - corners @ ref_affine.T).max()
    if gap > AFFINE_TOLERANCE_MM:
        raise BadInputData(f"Image grid differs from {ref_path.name} by up to {gap:.3g} mm.", path=str(path),
                           hint="resample all inputs onto one grid first.")


def load_members(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """All member files -> (member probabilities (M, C, X, Y, Z) float32, affine)."""
    first, affine = load_probability_map(paths[0])
    out = np.empty((len(paths),) + first.shape, dtype=np.float32)
    out[0] = first
    del first
    for m, path in enumerate(paths[1:], start=1):
        probs, aff = load_probability_map(path)
        if probs.shape != out.shape[1:]:
            raise BadInputData(
                f"Shape {probs.shape[1:]} with {probs.shape[0]} classes differs from {paths[0].name} "
                f"({out.shape[2:]} with {out.shape[1]} classes).", path=str(path),
                hint="all members must be 3D lesion maps, or 4D maps with the same classes, on one grid.")
        _same_grid(aff, affine, out.shape[2:], path, paths[0])
        out[m] = probs
    return out, affine


def load_mask(path: Path, shape, affine: np.ndarray, ref_path: Path) -> np.ndarray:
    from bids_app.core.imageio import load_image

    image = load_image(path, check_values=False)
    if image.shape != tuple(shape):
        raise BadInputData(f"Mask shape {image.shape} differs from {ref_path.name} {tuple(shape)}.", path=str(path),
                           hint="resample the mask onto the probability grid.")
    _same_grid(image.affine, affine, shape, path, ref_path)
    if not np.all(np.isfinite(image.data)):
        raise BadInputData("Mask has NaN/Inf voxels.", path=str(path), hint="replace them by 0.")
    return image.data > 0


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------

def _safe_name(measure: str) -> str:
    return measure.replace("+", "plus")


def _save(path: Path, data: np.ndarray, affine: np.ndarray, dtype) -> None:
    from bids_app.core.imageio import save_image

    try:
        save_image(path, data, affine, dtype=dtype)
    except OSError as exc:
        raise OutputIOError(f"Cannot write the image ({exc.strerror}).", path=str(path),
                            hint="check free space and permissions of the output folder.") from None


def input_record(path: Path) -> dict:
    from bids_app.model.card import sha256_file

    return {"path": str(path.resolve()), "sha256": sha256_file(path)}


def run(args: argparse.Namespace) -> int:
    from bids_app import __version__
    from bids_app.bids.derivatives import atomic_write_text, dumps_json
    from bids_app.core import uncertainty as U
    from bids_app.core.postprocess import check_connectivity

    paths = [Path(p) for p in args.member_probs]
    if len(paths) < 2:
        raise UsageError("An ensemble needs at least 2 --member-probs files.",
                         hint="give one probability map per member (e.g. per fold).")
    if args.member_thresholds is not None and len(args.member_thresholds) != len(paths):
        raise UsageError(f"--member-thresholds has {len(args.member_thresholds)} values for {len(paths)} members.",
                         hint="give one threshold per --member-probs file, in the same order.")
    connectivity = check_connectivity(args.connectivity)
    member_probs, affine = load_members(paths)
    brain = None
    if args.brain_mask is not None:
        brain = load_mask(Path(args.brain_mask), member_probs.shape[2:], affine, paths[0])

    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotCreateOutput(f"Cannot create the output folder ({exc.strerror}).", path=str(out_dir),
                                 hint="choose a writable location.") from None

    result = U.compute_uncertainty(
        member_probs, threshold=float(args.threshold), min_size=int(args.min_lesion_size), connectivity=connectivity,
        member_thresholds=args.member_thresholds, brain_mask=brain, affine=affine,
    )
    del member_probs

    written = []
    for name, data in result.voxel_maps.items():
        target = out_dir / f"voxel_{_safe_name(name)}.nii.gz"
        _save(target, data, affine, np.float32)
        written.append(target.name)
    target = out_dir / "lesion_instances.nii.gz"
    _save(target, result.segmentation.instances, affine, np.int32)
    written.append(target.name)
    if args.lesion_maps:
        skip = {"label", "class", "n_voxels", "volume_mm3"}
        skip |= {c for c in result.lesions.columns if c.startswith("centroid_")}
        for col in result.lesions.columns:
            if col in skip:
                continue
            target = out_dir / f"lesion_{_safe_name(col)}.nii.gz"
            painted = U.paint_lesions(result.segmentation.instances, result.lesions[col].to_numpy())
            _save(target, painted, affine, np.float32)
            written.append(target.name)

    tsv = result.lesions.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    atomic_write_text(out_dir / "lesions.tsv", tsv)
    atomic_write_text(out_dir / "patient.json", dumps_json(result.patient))
    written += ["lesions.tsv", "patient.json"]
    parameters = dict(result.parameters)
    parameters.update({
        "tool": "msxplain-tools uncertainty",
        "version": __version__,
        "inputs": {
            "member_probs": [input_record(p) for p in paths],
            "brain_mask": None if args.brain_mask is None else input_record(Path(args.brain_mask)),
        },
        "member_layout": "4D class probabilities" if result.parameters["n_classes"] > 2 or _is_4d(paths[0]) else
        "3D lesion probability (classes [1 - p, p])",
        "outputs": sorted(written),
        "conventions": "docs/uncertainty.md",
    })
    atomic_write_text(out_dir / "parameters.json", dumps_json(parameters))
    return 0


def _is_4d(path: Path) -> bool:
    shape = _header(path).shape
    return len(shape) == 4 and shape[3] > 1
