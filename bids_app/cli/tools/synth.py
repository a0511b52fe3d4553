"""``msxplain-tools synth``: write a synthetic multi-site MS BIDS dataset with true lesion masks.

Example::

    TEMPLATEFLOW_HOME=/path/to/templateflow \\
    msxplain-tools synth /tmp/synth --n-subjects 3 --sites 2 --resolution 2 --seed 0

See ``docs/synth.md``. Only argparse is imported at module level (``--help`` stays instant).
"""

from __future__ import annotations

import argparse

NAME = "synth"
HELP = "write a synthetic multi-site MS BIDS dataset with true lesion masks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bids_app.cli.parser import number

    parser.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder for the BIDS dataset")
    parser.add_argument("--n-subjects", type=int, required=True, metavar="N", help="number of subjects")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="master seed; the same seed and options give byte-identical files (default 0)")
    parser.add_argument("--sites", type=int, default=2, metavar="K",
                        help="number of synthetic sites; subject i goes to site i %% K (default 2)")
    parser.add_argument("--sessions", type=int, default=1, metavar="K",
                        help="sessions per subject; > 1 writes ses- folders, follow-ups add new lesions (default 1)")
    parser.add_argument("--resolution", type=float, default=1.0, metavar="MM",
                        help="isotropic T1w voxel size in mm, 0.5-4 (default 1.0; 2.0 is fast)")
    parser.add_argument("--wml-load", type=float, default=None, metavar="MEAN",
                        help="mean number of white-matter lesions per subject (default 20)")
    parser.add_argument("--cl-load", type=float, default=None, metavar="MEAN",
                        help="mean number of cortical lesions per subject (default 3)")
    parser.add_argument("--no-cl", action="store_true", help="no cortical lesions (same as --cl-load 0)")
    parser.add_argument("--t1-contrast", choices=("mixed", "mprage", "mp2rage"), default="mixed",
                        help="T1-weighted sequence per site: MPRAGE-like acq-MPRAGE_T1w, MP2RAGE UNIT1, or a "
                             "random mix (default mixed, 40%% MP2RAGE)")
    parser.add_argument("--flair-slice-thickness", nargs=2, type=number(float), default=(1.0, 3.0),
                        metavar=("MIN", "MAX"),
                        help="range of the per-site FLAIR slice thickness in mm (default 1 3; at least the "
                             "resolution)")
    parser.add_argument("--orientation", choices=("mixed", "ras"), default="mixed",
                        help="axis orientation of the stored images: 'mixed' draws RAS or LAS per site and "
                             "image, 'ras' stores everything as RAS (default mixed)")
    parser.add_argument("--misalign-mm", type=float, default=0.0, metavar="MM",
                        help="random rigid FLAIR-vs-T1w offset per session: up to MM mm and MM degrees per axis "
                             "(default 0: same world space, only the grids differ)")
    parser.add_argument("--skull-stripped", action="store_true",
                        help="write brain-only images (default: heads, as scanners deliver them)")
    parser.add_argument("--anatomy-variation", type=float, default=1.0, metavar="F",
                        help="scale of the random anatomical deformation (0 = the template anatomy; default 1)")
    parser.add_argument("--templates", default=None, metavar="DIR",
                        help="folder with tpl-MNI152NLin2009cAsym/ (default: TemplateFlow via TEMPLATEFLOW_HOME; "
                             "nothing is downloaded)")
    parser.add_argument("--lesion-masks", default=None, metavar="DIR",
                        help="open_ms_data cross_sectional/MNI folder with patientNN/GOLD_STANDARD*.nii.gz "
                             "(default: $MSXPLAIN_LESION_MASKS, else the 28 open_ms_data masks bundled with msxplain)")
    parser.add_argument("--exclude-patients", default="patient07", metavar="LIST",
                        help="comma-separated lesion-library patients to leave out (default patient07, the real "
                             "held-out case; 'none' keeps all)")


def run(args: argparse.Namespace) -> int:
    import time

    from bids_app.errors import UsageError
    from bids_app.synth.engine import DEFAULT_CL_LOAD, DEFAULT_WML_LOAD
    from bids_app.synth.writer import write_dataset

    cl_load = DEFAULT_CL_LOAD if args.cl_load is None else args.cl_load
    if args.no_cl:
        if args.cl_load not in (None, 0):
            raise UsageError("--no-cl contradicts --cl-load.", hint="give only one of them.")
        cl_load = 0.0
    wml_load = DEFAULT_WML_LOAD if args.wml_load is None else args.wml_load
    lo, hi = args.flair_slice_thickness
    if lo > hi:
        raise UsageError(f"--flair-slice-thickness {lo} {hi}: MIN is larger than MAX.", hint="give MIN MAX.")
    exclude = () if args.exclude_patients.strip().lower() in ("", "none") else tuple(
        p.strip() for p in args.exclude_patients.split(",") if p.strip())
    start = time.perf_counter()
    summary = write_dataset(
        args.out_dir,
        args.n_subjects,
        args.seed,
        sites=args.sites,
        sessions=args.sessions,
        resolution_mm=args.resolution,
        wml_load=wml_load,
        cl_load=cl_load,
        t1_contrast=args.t1_contrast,
        flair_slice_thickness=(lo, hi),
        orientation=args.orientation,
        misalign_mm=args.misalign_mm,
        skull_stripped=args.skull_stripped,
        anatomy_variation=args.anatomy_variation,
        templates_dir=args.templates,
        lesion_dir=args.lesion_masks,
        exclude_patients=exclude,
    )
    elapsed = time.perf_counter() - start
    n_wml = sum(p["n_wml"] for p in summary["participants"])
    n_cl = sum(p["n_cl"] for p in summary["participants"])
    print(f"msxplain-tools synth: wrote {len(summary['participants'])} subjects x {args.sessions} session(s), "
          f"{len(summary['sites'])} sites, {n_wml} WML + {n_cl} CL (first sessions), {summary['n_files']} files "
          f"in {elapsed:.1f} s -> {summary['out_dir']}")
    return 0
