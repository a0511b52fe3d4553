"""Command-line parser of the BIDS App (pure argparse; no heavy imports).

Follows the BIDS-Apps contract (positional ``bids_dir output_dir {participant,group}``) and
NiPreps habits: kebab-case options with the underscore spellings of the standard BIDS-App
flags as aliases, ``sub-``/``ses-`` prefixes stripped, and usage errors reported with the
execution-spec code 64 instead of argparse's 2 (which the spec reserves for Bash).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bids_app.errors import UnknownAnalysisLevel, UsageError

ANALYSIS_LEVELS = ("participant", "group")


class UsageArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that exits with 64 (usage) or 17 (unknown analysis level)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        code = UsageError.exit_code
        if "analysis_level" in message and "invalid choice" in message:
            code = UnknownAnalysisLevel.exit_code
        self.exit(code, f"{self.prog}: error: {message}\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Append ``(default: X)`` once, and only where it reads right.

    argparse's ``ArgumentDefaultsHelpFormatter`` prints ``(default: True)`` after a switch
    such as ``--no-tta`` (which reads as "TTA off by default"), ``(default: None)`` after
    options whose text already says what happens when they are absent, and a second default
    after texts that state one. Here switches (``store_true``/``store_false``/``count``) and
    options without a default never get the suffix, and a help text that says "default"
    itself is left as written.
    """

    _SWITCHES = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._CountAction,
                 argparse._HelpAction, argparse._VersionAction)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (isinstance(action, self._SWITCHES) or action.default in (None, argparse.SUPPRESS)
                or not action.option_strings or "default" in text.lower()):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {default})"


def _strip_prefix(prefix: str):
    def convert(value: str) -> str:
        value = value.strip()
        if value.startswith(prefix):
            value = value[len(prefix):]
        if not value or not value.isalnum():
            raise argparse.ArgumentTypeError(f"invalid label {value!r}: BIDS labels are alphanumeric")
        return value

    return convert


def _existing_dir(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"directory does not exist: {value}")
    return path.resolve()


def number(cast=float, *, gt=None, ge=None, lt=None, le=None):
    """An argparse ``type`` that parses a number and checks its bounds (shared by every CLI)."""

    def convert(value: str):
        try:
            result = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if cast is int else ' number'}: {value!r}") from None
        for bound, ok, text in ((gt, lambda b: result > b, ">"), (ge, lambda b: result >= b, ">="),
                                (lt, lambda b: result < b, "<"), (le, lambda b: result <= b, "<=")):
            if bound is not None and not ok(bound):
                raise argparse.ArgumentTypeError(f"must be {text} {bound}, got {value}")
        return result

    return convert


#: a probability threshold in the open interval (0, 1)
probability = number(float, gt=0.0, lt=1.0)


def refine_threshold(value: str):
    """``--refine`` value: a probability, or ``model`` (the refiner's own threshold)."""
    return value if value == "model" else probability(value)
#: an integer >= 1
positive_int = number(int, ge=1)


def parse_memory_gb(value: str) -> float:
    """``--mem`` values: a plain number is GB; suffixes ``K``/``M``/``G``/``T`` (with an
    optional ``B``) are accepted as in SLURM and fMRIPrep (``16G``, ``16000MB``)."""
    text = value.strip().upper().rstrip("B")
    factors = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    factor = 1.0
    if text and text[-1] in factors:
        factor = factors[text[-1]]
        text = text[:-1]
    try:
        number = float(text) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid memory size {value!r} (examples: 8, 8G, 8000MB)") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"memory must be positive, got {value!r}")
    return number


def _filter_file(value: str) -> dict:
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"BIDS filter file does not exist: {value}")
    try:
        filters = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"BIDS filter file {value} is not valid JSON ({exc.msg} at line {exc.lineno}); "
            'expected e.g. {"t1w": {"acquisition": "MPRAGE"}}'
        ) from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise argparse.ArgumentTypeError(
            f"BIDS filter file {value} must map channel names to entity filters, "
            'e.g. {"t1w": {"acquisition": "MPRAGE"}}'
        )
    return filters


def _plugin_args(value: str) -> dict:
    try:
        args = json.loads(value)
    except json.JSONDecodeError:
        path = Path(value)
        if path.is_file():
            try:
                args = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise argparse.ArgumentTypeError(f"--plugin-args file {value} is not JSON: {exc.msg}") from None
        else:
            raise argparse.ArgumentTypeError(f"--plugin-args must be JSON or a JSON file: {value!r}") from None
    if not isinstance(args, dict):
        raise argparse.ArgumentTypeError("--plugin-args must be a JSON object")
    return args


def build_parser() -> UsageArgumentParser:
    """The ``msxplain`` argument parser."""
    from bids_app import __version__
    from bids_app.app.config import (  # the defaults, written once there
        ModelConfig,
        OutputConfig,
        PostprocessConfig,
        ResourceConfig,
    )
    from bids_app.core.brain_extraction import SKULL_STRIP_METHODS, SKULL_STRIPPED_CHOICES
    from bids_app.core.metrics.detection import DETECTION_METHODS
    from bids_app.core.uncertainty.matching import ENSEMBLE_MEANS
    from bids_app.core.uncertainty.voxel import VOXEL_MEASURES

    parser = UsageArgumentParser(
        prog="msxplain",
        description=(
            "msxplain: segment multiple-sclerosis lesions (white-matter and cortical) with an "
            "nnU-Net ensemble, and say per voxel, lesion and patient how certain the model is "
            "and why it decided. Writes BIDS derivatives with provenance."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="the root of the input BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="where the derivatives are written")
    parser.add_argument(
        "analysis_level",
        choices=ANALYSIS_LEVELS,
        help="participant: process sessions; group: aggregate existing participant outputs",
    )
    parser.add_argument("--version", action="version", version=f"msxplain {__version__}")

    sel = parser.add_argument_group("Selecting inputs")
    sel.add_argument(
        "--participant-label", "--participant_label", dest="participant_label", nargs="+",
        type=_strip_prefix("sub-"), metavar="LABEL",
        help="participants to process (the 'sub-' prefix is optional) (default: all)",
    )
    sel.add_argument(
        "--session-label", "--session_label", dest="session_label", nargs="+",
        type=_strip_prefix("ses-"), metavar="LABEL",
        help="sessions to process (the 'ses-' prefix is optional) (default: all)",
    )
    sel.add_argument(
        "--bids-filter-file", "--bids_filter_file", dest="bids_filters", type=_filter_file, metavar="FILE",
        help="JSON mapping model channels (e.g. 't1w', 'flair') to extra PyBIDS entity filters; "
        "overrides the model card's queries, e.g. {\"t1w\": {\"acquisition\": \"MPRAGE\", \"run\": 2}}",
    )
    sel.add_argument(
        "--skip-bids-validation", "--skip_bids_validation", "--skip_bids_validator",
        dest="skip_bids_validation", action="store_true",
        help="do not validate the input dataset with the BIDS validator",
    )
    sel.add_argument(
        "--reference-masks", dest="reference_masks", type=Path, metavar="DIR",
        help="a BIDS derivatives folder with manual lesion masks: switches on the evaluation",
    )

    model = parser.add_argument_group("Model and post-processing")
    model.add_argument(
        "--model", default=ModelConfig.spec, metavar="NAME|SOURCE|DIR|ZIP",
        help="a bundled, installed or registry model name (names are looked up first: give a folder or zip as "
        "a path, e.g. ./mymodel), doi:10.5281/zenodo.<id>, zenodo:<id> or an https:// URL of an nnU-Net export "
        "zip (fetched once, checksum-verified, cached; msxplain-tools models), a model folder (nnU-Net results "
        "folder with an msxplain model card) or an nnUNetv2_export_model_to_zip archive (default: demo, the "
        "bundled demo model, trained on synthetic data only)",
    )
    model.add_argument(
        "--model-card", dest="model_card", type=Path, metavar="FILE",
        help="model card JSON to use instead of the one beside the model",
    )
    model.add_argument("--device", choices=("auto", "cpu", "cuda"), default=ModelConfig.device,
                       help="where the networks run; auto picks CUDA when a GPU is visible")
    model.add_argument("--members", "--folds", dest="members", nargs="+", metavar="MEMBER",
                       help="ensemble members to use, by name (nnU-Net's fold_<name> folders; default: all of the "
                       "model card's). --folds is the same option")
    model.add_argument("--checkpoint", dest="checkpoint", choices=("auto", "final", "best"),
                       default=ModelConfig.checkpoint,
                       help="which checkpoint of each member to load: checkpoint_final.pth or checkpoint_best.pth "
                       "(nnUNetv2_predict's -chk); auto: the model card's nnunet.checkpoint. The card must pin the "
                       "chosen file's SHA-256 (members[].sha256_best / sha256_final), else the run is refused")
    model.add_argument("--no-tta", dest="tta", action="store_false",
                       help="turn test-time augmentation off. TTA (mirroring over the axes the model allows, up "
                       "to 8 passes per member) is ON by default; --no-tta makes prediction up to 8x faster on a "
                       "CPU and slightly less accurate")
    model.add_argument("--threshold", type=probability, metavar="P",
                       help="lesion probability threshold (default: the model card's)")
    model.add_argument("--min-lesion-size", dest="min_lesion_size", type=positive_int, metavar="VOXELS",
                       help="smallest lesion kept, in voxels (default: the model card's)")
    model.add_argument("--connectivity", type=int, choices=(6, 18, 26),
                       help="voxel connectivity that defines a lesion (default: the model card's)")
    model.add_argument("--ensemble-mean", dest="ensemble_mean", choices=ENSEMBLE_MEANS,
                       default=PostprocessConfig.ensemble_mean,
                       help="how the members make the probability map that is thresholded: the mean of their "
                       "probabilities (the deep-ensemble convention of the uncertainty measures) or the softmax of "
                       "their mean logits (what nnUNetv2_predict does); the uncertainty measures always use "
                       "probabilities")
    model.add_argument("--skull-stripped", dest="skull_stripped", choices=SKULL_STRIPPED_CHOICES,
                       default=ModelConfig.skull_stripped,
                       help="are the inputs skull-stripped? auto: decide from the image (exact zeros outside a "
                       "brain-sized volume); no: they have a skull, --skull-strip makes their brain mask")
    model.add_argument("--skull-strip", dest="skull_strip", choices=SKULL_STRIP_METHODS,
                       default=ModelConfig.skull_strip,
                       help="brain mask of an image with a skull: learned (deepbet, a network; follows the "
                       "individual cortex), template (the MNI brain mask registered affinely), none (no extraction: "
                       "the whole image, for models trained on heads); auto: learned on T1w and FLAIR images when "
                       "deepbet is installed, else template. A model trained on skull-stripped input sees its "
                       "inputs masked with it")
    model.add_argument("--input-orientation", dest="input_orientation", choices=("auto", "native", "ras"),
                       default=ModelConfig.input_orientation,
                       help="voxel order the network sees: native (the reference image's stored axis order, as "
                       "nnU-Net's SimpleITKIO and NibabelIO read files) or ras (RAS+, as NibabelIOWithReorient). "
                       "auto: the model card's input_orientation, else the reader named in the model's plans.json, "
                       "i.e. what nnUNetv2_predict would show the network")
    model.add_argument("--save-member-probabilities", dest="save_member_probabilities", action="store_true",
                       help="also write each ensemble member's lesion probabilities (large)")

    unc = parser.add_argument_group("Uncertainty and evaluation")
    unc.add_argument("--voxel-uncertainty", dest="voxel_maps", nargs="+", metavar="MEASURE",
                     choices=VOXEL_MEASURES, default=list(OutputConfig.voxel_maps),
                     help="voxel uncertainty maps to write")
    unc.add_argument("--lesion-uncertainty-maps", dest="lesion_maps", nargs="*", metavar="MEASURE",
                     default=list(OutputConfig.lesion_maps),
                     help="lesion measures written as maps (each lesion painted with its value); all lesion "
                     "measures are in the lesion table anyway")
    unc.add_argument("--detection-method", dest="detection_method", choices=DETECTION_METHODS,
                     default=OutputConfig.detection_method, help="lesion-wise detection rule of the evaluation")
    unc.add_argument("--in-domain-sites", dest="in_domain_sites", nargs="+", metavar="SITE",
                     help="group level: sites the model was trained on (the others are reported as "
                     "out-of-domain)")
    unc.add_argument("--detection-threshold", dest="detection_threshold", type=probability,
                     default=OutputConfig.detection_threshold,
                     metavar="T", help="IoU threshold of a detected lesion (evaluation)")

    feat = parser.add_argument_group("Lesion features")
    feat.add_argument("--no-lesion-features", dest="lesion_features", action="store_false",
                      help="skip the lesion features (shape, intensity, cortical involvement, MNI location), "
                      "which are computed by default")
    feat.add_argument("--atlas", default=OutputConfig.atlas, metavar="DSEG|auto|none",
                      help="dseg atlas on the MNI152NLin2009cAsym grid for lesion location classes; auto "
                      "(default): a desc-HOparc dseg (a Harvard-Oxford-derived parcellation, not distributed by "
                      "TemplateFlow) when the local TemplateFlow folder holds one, else no atlas; none: no atlas")
    feat.add_argument("--atlas-lut", dest="atlas_lut", metavar="TSV",
                      help="atlas lookup table (columns index, name, location_class) "
                      "(default: the .tsv beside the atlas)")
    feat.add_argument("--export-meshes", dest="export_meshes", action="store_true",
                      help="write one STL surface mesh per lesion (scanner RAS+ mm)")

    expl = parser.add_argument_group("Explanations (instance-level saliency) and refinement")
    expl.add_argument("--explain", action="store_true",
                      help="explain every predicted lesion: SmoothGrad (mean and max aggregation, per channel), "
                      "Grad-CAM and Grad-CAM++; writes a per-lesion store, viewer maps and lesion-table columns "
                      "(minutes per lesion on a CPU with a full-size model; a GPU is the intended device)")
    expl.add_argument("--explain-samples", dest="explain_samples", type=positive_int, metavar="N",
                      help="SmoothGrad noise samples (default: the refiner's training setting when a refiner "
                      "is used, else 50)")
    expl.add_argument("--explain-noise", dest="explain_noise", type=number(float, ge=0.0, le=1.0), metavar="F",
                      help="SmoothGrad sigma as a fraction of the input's intensity range (default: the "
                      "refiner's training setting, else 0.05)")
    expl.add_argument("--explain-margin", dest="explain_margin", type=number(float, gt=0.0), metavar="MM",
                      help="context kept around each lesion in its crop, in mm (default: the refiner's training "
                      "setting, else measured from the network's effective receptive field)")
    expl.add_argument("--explain-max-lesions", dest="explain_max_lesions", type=number(int, ge=0),
                      default=OutputConfig.explain_max_lesions,
                      metavar="N", help="explain only the N largest lesions of a session; 0 explains all (default: 0)")
    expl.add_argument("--refiner", metavar="FILE|none",
                      help="saliency-radiomics TP/FP classifier (JSON from msxplain-tools train-refiner) giving "
                      "p_true_lesion in the lesion table (implies --explain); default with --explain: the one "
                      "bundled with the model, if any")
    expl.add_argument("--refine", nargs="?", const="model", metavar="THRESHOLD",
                      type=refine_threshold,
                      help="also write a refined segmentation without the lesions whose p_true_lesion is "
                      "under THRESHOLD (default: the refiner's own); implies --explain")

    perf = parser.add_argument_group("Performance and execution")
    perf.add_argument("-w", "--work-dir", dest="work_dir", type=Path, metavar="DIR",
                      help="Nipype working directory; re-use it to resume an interrupted run (default: ./work, "
                      "in the current folder)")
    perf.add_argument("--nprocs", "--nthreads", "--n-cpus", dest="nprocs", type=positive_int, metavar="N",
                      help="maximum number of parallel processes (default: the CPUs this process may use)")
    perf.add_argument("--omp-nthreads", dest="omp_nthreads", type=positive_int, metavar="N",
                      help="threads per process (torch) (default: the smaller of --nprocs and 8)")
    perf.add_argument("--mem", "--mem-gb", dest="mem_gb", type=parse_memory_gb, metavar="SIZE",
                      help="memory cap for the scheduler, GB or e.g. 16G / 16000MB (default: no cap)")
    perf.add_argument("--plugin", choices=("MultiProc", "Linear", "SLURM", "SLURMGraph"),
                      default=ResourceConfig.plugin,
                      help="Nipype execution plugin")
    perf.add_argument("--plugin-args", dest="plugin_args", type=_plugin_args, metavar="JSON",
                      help="extra Nipype plugin arguments as JSON (or a JSON file), e.g. "
                      "'{\"sbatch_args\": \"-p short --time=01:00:00\"}'")
    perf.add_argument("--stop-on-first-crash", dest="stop_on_first_crash", action="store_true",
                      help="stop everything at the first failing participant")
    perf.add_argument("--reports-only", dest="reports_only", action="store_true",
                      help="only (re)build the HTML reports from existing outputs")
    perf.add_argument("--write-graph", dest="write_graph", action="store_true",
                      help="write the workflow graph (needs graphviz)")
    perf.add_argument("--offline", action="store_true",
                      help="never use the network: templates must already be in the TemplateFlow cache "
                      "(msxplain-tools fetch-templates fills it); setting TEMPLATEFLOW_HOME has the same effect")
    perf.add_argument("-v", "--verbose", action="count", default=0,
                      help="more output on the console: -v adds Nipype's node messages (always in the run's log "
                      "file), -vv debug messages")
    perf.add_argument("--notrack", action="store_true", help=argparse.SUPPRESS)  # NiPreps muscle memory

    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; raises SystemExit(64/17) on usage errors like the BIDS-Apps spec asks."""
    return build_parser().parse_args(argv)
