"""``msxplain-tools train-refiner``: train the saliency-radiomics TP/FP lesion classifier.

Reads, for every participant/session output:

* the per-lesion saliency store ``*_desc-lesions_saliency.npz`` (``--store-glob``; format in
  ``docs/explain.md``): lesion labels, instance crops and SmoothGrad maps on the input grid;
* the reference (manual) lesion masks of the same subject and session: files matching
  ``--reference-glob`` (default ``*_desc-lesions_dseg.nii.gz`` and ``*_label-*_mask.nii.gz``;
  every non-zero voxel is lesion, all matching files are united) under ``--reference-dir``
  (searched recursively; default: the store's own folder). Subject and session are matched
  through the ``sub-``/``ses-`` entities of the file names; the reference must be on the
  store's grid (same shape, and the same affine when the store records one).

A lesion is TP when it overlaps the reference at all (IES ``non_zero`` rule), FP otherwise.
The 93 radiomic features of its ``--map`` (default ``smoothgrad_max``) on ``--channel``
(default FLAIR, else the first channel) are computed on crops, and an L1 logistic regression
(liblinear, ``--C``, class weights ``spec`` = {FP: 0.29, TP: 0.71} or ``balanced``) is fitted
on standardised features. ``--tables`` adds (or replaces, without ``--inputs``) training
tables: TSV files with the 93 feature columns and a ``is_tp`` column (1/0), as written by
``--save-table``.

Writes OUT.json: the model as plain JSON (feature names, scaler mean/scale, coefficients,
intercept, threshold, training counts and provenance); no pickle.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from bids_app.errors import BadInputData, MissingInput, UsageError

NAME = "train-refiner"
HELP = "train the saliency-radiomics TP/FP lesion classifier on outputs with reference masks"

DEFAULT_STORE_GLOB = "*_desc-lesions_saliency.npz"
DEFAULT_REFERENCE_GLOBS = ("*_desc-lesions_dseg.nii.gz", "*_label-*_mask.nii.gz")
AFFINE_TOLERANCE_MM = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bids_app.cli.parser import number

    parser.add_argument("out", type=Path, metavar="OUT.json", help="the trained refiner (JSON)")
    parser.add_argument("--inputs", nargs="+", type=Path, default=[], metavar="DIR",
                        help="participant output folders (searched recursively for saliency stores)")
    parser.add_argument("--tables", nargs="+", type=Path, default=[], metavar="TSV",
                        help="training tables (93 feature columns + is_tp), e.g. from --save-table")
    parser.add_argument("--reference-dir", type=Path, default=None, metavar="DIR",
                        help="where the reference masks are (recursive; default: beside each store)")
    parser.add_argument("--reference-glob", nargs="+", default=list(DEFAULT_REFERENCE_GLOBS), metavar="PATTERN",
                        help="file patterns of reference masks (default: %(default)s)")
    parser.add_argument("--store-glob", default=DEFAULT_STORE_GLOB, metavar="PATTERN",
                        help="file pattern of the saliency stores (default: %(default)s)")
    parser.add_argument("--map", default="smoothgrad_max", help="saliency map used (default: %(default)s)")
    parser.add_argument("--channel", default=None, help="channel of the map (default: FLAIR, else the first)")
    parser.add_argument("--class-weight", choices=("spec", "balanced"), default="spec",
                        help="spec = {FP: 0.29, TP: 0.71} as in the paper, or balanced (default: %(default)s)")
    parser.add_argument("--C", type=number(float, gt=0.0), default=1.0,
                        help="inverse L1 strength (default: %(default)s)")
    parser.add_argument("--threshold", type=number(float, ge=0.0, le=1.0), default=0.5,
                        help="refinement drops lesions with p_true_lesion below this (default: %(default)s)")
    parser.add_argument("--save-table", type=Path, default=None, metavar="TSV",
                        help="also write the training table (source, label, is_tp, features)")


# ------------------------------------------------------------------------------------------

def _entities(name: str) -> dict[str, str]:
    out = {}
    for key in ("sub", "ses"):
        m = re.search(rf"(?:^|_){key}-([A-Za-z0-9]+)", name)
        if m:
            out[key] = m.group(1)
    return out


def find_references(store_path: Path, reference_dir: Path | None, patterns) -> list[Path]:
    """Reference mask files of the store's subject/session (see the module docstring)."""
    ents = _entities(store_path.name)
    if "sub" not in ents:
        raise BadInputData("Saliency store name has no sub- entity.", path=str(store_path),
                           hint="keep the BIDS names msxplain writes (sub-<label>[_ses-<label>]_...).")
    root = reference_dir if reference_dir is not None else store_path.parent
    found = set()
    for pattern in patterns:
        iterator = root.rglob(pattern) if reference_dir is not None else root.glob(pattern)
        for p in iterator:
            e = _entities(p.name)
            if e.get("sub") == ents["sub"] and e.get("ses") == ents.get("ses"):
                found.add(p)
    return sorted(found)


def load_reference(paths: list[Path], shape, affine) -> np.ndarray:
    from bids_app.core.imageio import load_image

    ref = np.zeros(tuple(shape), bool)
    for p in paths:
        image = load_image(p, check_values=False)
        if image.shape != tuple(shape):
            raise BadInputData(f"Reference shape {image.shape} differs from the saliency store's grid {tuple(shape)}.",
                               path=str(p), hint="give reference masks on the grid msxplain segmented (the T1w grid).")
        if affine is not None:
            gap = float(np.abs(np.asarray(image.affine) - np.asarray(affine)).max())
            if gap > AFFINE_TOLERANCE_MM:
                raise BadInputData(f"Reference affine differs from the saliency store's by {gap:.3g}.", path=str(p),
                                   hint="resample the reference onto the segmentation grid.")
        ref |= np.asarray(image.data) > 0
    return ref


def collect_from_stores(inputs: list[Path], args) -> tuple[list[dict], np.ndarray, np.ndarray, list[str], dict]:
    """(rows of source/label, features, is_tp, names, {store: its explain config}) from every
    store under ``inputs`` that has lesions."""
    from bids_app.core.explain import refiner as R
    from bids_app.formats.saliency_store import load_store

    rows, feats, truth = [], [], []
    configs: dict[str, dict | None] = {}
    names = R.feature_names()
    stores = []
    for d in inputs:
        if not Path(d).is_dir():
            raise MissingInput("Input folder does not exist.", path=str(d), hint="give participant output folders.")
        stores += sorted(Path(d).rglob(args.store_glob))
    if not stores:
        raise MissingInput(f"No saliency store ({args.store_glob}) under the --inputs folders.",
                           path=", ".join(str(d) for d in inputs),
                           hint="run msxplain with explanations switched on, or set --store-glob.")
    for path in stores:
        store = load_store(path)
        if store.n_lesions == 0:
            continue
        refs = find_references(path, args.reference_dir, args.reference_glob)
        if not refs:
            raise MissingInput("No reference mask for this saliency store.", path=str(path),
                               hint="set --reference-dir / --reference-glob to where the manual masks are.")
        ref = load_reference(refs, store.shape, store.meta.get("affine"))
        try:
            X, _ = R.saliency_features(store, args.map, args.channel)
        except ValueError as exc:
            raise BadInputData(str(exc), path=str(path),
                               hint="choose --map / --channel present in the store.") from None
        y = R.store_truth(store, ref)
        configs[str(path)] = store.meta.get("config")
        for i in range(store.n_lesions):
            rows.append({"source": str(path), "label": int(store.labels[i])})
        feats.append(X)
        truth.append(y)
    if not rows:
        return [], np.zeros((0, len(names))), np.zeros(0, bool), names, configs
    return rows, np.concatenate(feats), np.concatenate(truth), names, configs


def read_table(path: Path, names: list[str]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    import pandas as pd

    if not path.is_file():
        raise MissingInput("Training table does not exist.", path=str(path), hint="check the path.")
    try:
        df = pd.read_csv(path, sep="\t", na_values=["n/a"])
    except Exception as exc:
        raise BadInputData(f"Cannot read the training table ({type(exc).__name__}).", path=str(path),
                           hint="give a tab-separated file with a header row.") from None
    missing = [n for n in names + ["is_tp"] if n not in df.columns]
    if missing:
        raise BadInputData(f"Training table lacks {len(missing)} column(s), e.g. {missing[:3]}.", path=str(path),
                           hint="write it with --save-table (93 feature columns and is_tp).")
    y = df["is_tp"].to_numpy()
    if not np.isin(y, [0, 1]).all():
        raise BadInputData("Column is_tp must hold 0 or 1.", path=str(path),
                           hint="1 = true lesion, 0 = false positive.")
    rows = [{"source": str(df["source"].iloc[i]) if "source" in df.columns else str(path),
             "label": int(df["label"].iloc[i]) if "label" in df.columns else i + 1} for i in range(len(df))]
    return rows, df[names].to_numpy(np.float64), y.astype(bool)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from bids_app import __version__
    from bids_app.bids.derivatives import atomic_write_text, dumps_json
    from bids_app.core.explain import refiner as R
    from bids_app.model.card import sha256_file

    if not args.inputs and not args.tables:
        raise UsageError("Nothing to train on.", hint="give --inputs DIR [DIR ...] and/or --tables TSV [TSV ...].")
    names = R.feature_names()
    rows, X, y = [], np.zeros((0, len(names))), np.zeros(0, bool)
    configs: dict[str, dict | None] = {}
    if args.inputs:
        rows, X, y, names, configs = collect_from_stores([Path(d) for d in args.inputs], args)
    for table in args.tables:
        r, Xt, yt = read_table(Path(table), names)
        rows += r
        X = np.concatenate([X, Xt])
        y = np.concatenate([y, yt])
    if args.save_table is not None:
        df = pd.DataFrame(rows)
        df["is_tp"] = y.astype(int)
        df = pd.concat([df, pd.DataFrame(X, columns=names)], axis=1)
        atomic_write_text(Path(args.save_table), df.to_csv(sep="\t", index=False, na_rep="n/a", lineterminator="\n"))
    try:
        model = R.fit_refiner(X, y, names, class_weight=args.class_weight, C=args.C, threshold=args.threshold)
    except ValueError as exc:
        raise BadInputData(f"Cannot train the refiner: {exc}.",
                           hint="add participants with both true and false-positive lesions.") from None
    p = R.predict_refiner(model, X)
    keep = R.refine(p, R.refinement_threshold(model))
    # the SmoothGrad settings the features were computed with (first store): a run should use the same
    explain_config = configs[min(configs)] if configs else None
    model.update({
        "map": args.map,
        "channel": args.channel,
        "channel_rule": args.channel or "FLAIR if present, else the first channel",
        "explain_config": explain_config,
        "tool": "msxplain-tools train-refiner",
        "version_msxplain": __version__,
        "training_fit": {"TP_kept": int((keep & y).sum()), "TP_rejected": int((~keep & y).sum()),
                         "FP_kept": int((keep & ~y).sum()), "FP_rejected": int((~keep & ~y).sum()),
                         "note": "on the training lesions themselves (optimistic)"},
        "inputs": {
            "stores": sorted({r["source"] for r in rows if str(r["source"]).endswith(".npz")}),
            "tables": [{"path": str(Path(t).resolve()), "sha256": sha256_file(Path(t))} for t in args.tables],
        },
    })
    atomic_write_text(Path(args.out), dumps_json(model))
    print(f"train-refiner: {int(y.sum())} TP and {int((~y).sum())} FP lesions; "
          f"{int(np.count_nonzero(model['coef']))} of {len(names)} features kept; wrote {args.out}")
    return 0
