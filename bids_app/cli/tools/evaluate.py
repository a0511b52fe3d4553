"""``msxplain-tools evaluate``: lesion-wise detection, voxel and calibration metrics of a mask
against a reference mask, written as one flat JSON object.

* always: ``F1, precision, recall, USL_rate, TPL, FPL, USL, FNL, n_pred_lesions, n_ref_lesions``
  (``--method`` at ``--detection-threshold``, components with ``--connectivity``) and
  ``DSC, nDSC, TPRvox, FPRvox, FDRvox``;
* with ``--prob``: ``CE, ECE, MCE, Brier`` (``--n-bins`` uniform bins);
* with ``--uncertainty``: ``voxel_RC_DSC_AUC``, ``voxel_RC_DSC_AAC``, ``voxel_RC_nDSC_AUC``,
  ``voxel_RC_nDSC_AAC`` (400 retained fractions, stable sort);
* the parameters (``method, detection_threshold, connectivity, ndsc_r, n_bins, rc_points``) and
  the inputs with their sha256.

``--brain-mask`` restricts the voxel metrics, calibration and retention curves to the brain
(N of nDSC = brain voxels); lesion detection always uses the whole masks. Definitions:
``docs/uncertainty.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bids_app.errors import BadInputData

NAME = "evaluate"
HELP = "lesion-wise detection, voxel and calibration metrics of a mask against a reference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bids_app.cli.parser import number, positive_int
    from bids_app.core.metrics.calibration import CALIBRATION_BINS
    from bids_app.core.metrics.detection import (
        DEFAULT_CONNECTIVITY,
        DEFAULT_DETECTION_THRESHOLD,
        DEFAULT_METHOD,
        DETECTION_METHODS,
    )
    from bids_app.core.metrics.overlap import DEFAULT_NDSC_R

    parser.add_argument("--pred", required=True, type=Path, metavar="MASK",
                        help="predicted lesion mask (non-zero = lesion)")
    parser.add_argument("--ref", required=True, type=Path, metavar="MASK",
                        help="reference lesion mask (non-zero = lesion)")
    parser.add_argument("--prob", type=Path, default=None, metavar="P", help="lesion probability map: adds calibration")
    parser.add_argument("--uncertainty", type=Path, default=None, metavar="U",
                        help="voxel uncertainty map: adds voxel retention-curve AUC/AAC (DSC, nDSC)")
    parser.add_argument("--brain-mask", type=Path, default=None, metavar="MASK",
                        help="voxels considered by the voxel metrics, calibration and retention curves")
    parser.add_argument("--method", choices=DETECTION_METHODS, default=DEFAULT_METHOD,
                        help="lesion matching rule (default %(default)s)")
    parser.add_argument("--detection-threshold", type=number(float, gt=0.0, le=1.0),
                        default=DEFAULT_DETECTION_THRESHOLD, metavar="T",
                        help="IoU threshold of a true-positive lesion, in (0, 1] (default %(default)s)")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=DEFAULT_CONNECTIVITY,
                        help="lesion connectivity (default %(default)s, as Bench-Explain)")
    parser.add_argument("--ndsc-r", type=number(float, gt=0.0, lt=1.0), default=DEFAULT_NDSC_R, metavar="R",
                        help="reference lesion load of nDSC (default %(default)s; 2e-5 for cortical lesions)")
    parser.add_argument("--n-bins", type=positive_int, default=CALIBRATION_BINS, metavar="N",
                        help="calibration bins (default %(default)s)")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE.json", help="output JSON file")


def _load(
    path: Path, what: str, ref_shape=None, ref_affine=None, ref_path: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    from bids_app.cli.tools.uncertainty import _same_grid
    from bids_app.core.imageio import load_image

    image = load_image(path, check_values=False)  # an empty mask is a legitimate input
    if not np.all(np.isfinite(image.data)):
        raise BadInputData(f"The {what} has NaN/Inf voxels.", path=str(path), hint="replace them (e.g. by 0).")
    if ref_shape is not None:
        if image.shape != tuple(ref_shape):
            raise BadInputData(f"The {what} has shape {image.shape}, the prediction {tuple(ref_shape)}.",
                               path=str(path), hint="resample it onto the prediction's grid.")
        _same_grid(image.affine, ref_affine, ref_shape, path, ref_path)
    return image.data, image.affine


def run(args: argparse.Namespace) -> int:
    from bids_app import __version__
    from bids_app.bids.derivatives import atomic_write_text, dumps_json
    from bids_app.cli.tools.uncertainty import input_record
    from bids_app.core.metrics.calibration import calibration
    from bids_app.core.metrics.detection import lesion_detection
    from bids_app.core.metrics.overlap import voxel_metrics
    from bids_app.core.metrics.retention import RC_POINTS, voxel_retention_curve

    pred, affine = _load(Path(args.pred), "prediction")
    grid = dict(ref_shape=pred.shape, ref_affine=affine, ref_path=Path(args.pred))
    ref, _ = _load(Path(args.ref), "reference", **grid)
    mask = None
    if args.brain_mask is not None:
        mask = _load(Path(args.brain_mask), "brain mask", **grid)[0] > 0

    out: dict = {}
    det = lesion_detection(pred > 0, ref > 0, args.method, args.detection_threshold, args.connectivity)
    det["detection_threshold"] = det.pop("threshold")
    out.update(det)
    out.update(voxel_metrics(pred > 0, ref > 0, r=args.ndsc_r, mask=mask))
    inputs = {"pred": input_record(Path(args.pred)), "ref": input_record(Path(args.ref))}
    if args.prob is not None:
        prob, _ = _load(Path(args.prob), "probability map", **grid)
        lo, hi = prob.min(), prob.max()
        if not (lo >= 0 and hi <= 1):
            raise BadInputData(f"Probabilities must lie in [0, 1] (found min {lo}, max {hi}).", path=str(args.prob),
                               hint="give a lesion probability map, not logits.")
        out.update(calibration(prob, ref > 0, n_bins=args.n_bins, mask=mask))
        inputs["prob"] = input_record(Path(args.prob))
    out["n_bins"] = int(args.n_bins)
    if args.uncertainty is not None:
        unc, _ = _load(Path(args.uncertainty), "uncertainty map", **grid)
        curves = voxel_retention_curve(pred > 0, ref > 0, unc, r=args.ndsc_r, mask=mask)
        for name, curve in curves.items():
            out[f"voxel_RC_{name}_AUC"] = curve.auc
            out[f"voxel_RC_{name}_AAC"] = curve.aac
        inputs["uncertainty"] = input_record(Path(args.uncertainty))
    out["rc_points"] = RC_POINTS
    if mask is not None:
        inputs["brain_mask"] = input_record(Path(args.brain_mask))
    out["brain_mask_given"] = mask is not None
    out["inputs"] = inputs
    out["tool"] = "msxplain-tools evaluate"
    out["version"] = __version__
    atomic_write_text(Path(args.out), dumps_json(out))
    return 0
