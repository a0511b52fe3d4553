"""The group level: cohort tables and statistics from existing participant outputs.

Plain pandas, no Nipype and no re-running of participants (MRIQC's design): it reads the
``*_summary.json`` and ``*_lesions.tsv`` files the participant level wrote, checks first that
every expected participant has them (MRtrix3_connectome's habit: name what is missing before
computing anything; :mod:`bids_app.app.group_inputs`), and writes into ``OUTPUT_DIR/group/``:

==========================================  ================================================
file                                        content
==========================================  ================================================
``group_sessions.tsv`` + ``.json``          one row per session (``participant_id``,
                                            ``session_id`` first; site/scanner from
                                            ``participants.tsv``): counts, volumes,
                                            patient uncertainty, QC flags, evaluation
``group_lesions.tsv`` + ``.json``           every lesion of every session
``group_summary.tsv`` + ``.json``           mean, median, bootstrap CI and SE of the session
                                            measures, overall and per site
``group_detection.tsv`` + ``.json``         pooled and per-site (in/out of domain) lesion
                                            detection (with reference masks)
``group_retention.tsv`` + ``.json``         patient-scale retention AUC/AAC per uncertainty
                                            measure and metric (with reference masks)
``group_regression.json``                   which lesion properties explain lesion
                                            uncertainty (ElasticNet + RFE, repeated CV)
``group_icc.tsv`` + ``.json``               ICC(3,1) and ICC(3,k) of session measures across
                                            repeated sessions of the same subjects
``group_space-MNI152NLin2009cAsym_desc-``   fraction of sessions with a lesion at each
``lesionfrequency_probseg.nii.gz``          template voxel
``group_report.html``                       the group report (``bids_app.reports``)
==========================================  ================================================

Every TSV has a JSON data dictionary beside it that defines each of its columns.

Inputs are checked before anything is written: a participant output that cannot be read (a
summary that is not a JSON object, a lesion table that is not text, a transform ITK cannot
read) stops the group level with exit 65 and a message naming every such file. ``group/`` is
written all or nothing: built in a staging folder and swapped in as one unit
(:func:`bids_app.bids.commit.swap_in`), so a failed group run leaves the previous one intact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bids_app.app.group_inputs import (
    SESSION_DICTIONARY,
    collect,
    lesion_dictionaries,
    participants_dictionary,
    session_dictionary,
)
from bids_app.bids.derivatives import find_outputs, output_path
from bids_app.errors import BadInputData, MissingInput

LOGGER = logging.getLogger("bids_app.app.group")

#: lesion-table columns that explain uncertainty (when present); the target is LSU
EXPLANATORY_FEATURES = (
    "volume_mm3", "radiomics_shape_Sphericity", "radiomics_shape_Elongation", "radiomics_shape_Flatness",
    "radiomics_shape_SurfaceVolumeRatio", "radiomics_shape_Maximum3DDiameter", "gm_fraction",
    "distance_to_cortex_mm", "distance_to_ventricle_mm", "T1w_contrast_nawm", "FLAIR_contrast_nawm",
)
SESSION_MEASURES_FOR_ICC = ("n_lesions", "total_volume_mm3", "unc_PSU", "unc_avg_LSU", "unc_avg_MI")
MIN_LESIONS_FOR_REGRESSION = 30


@dataclass
class GroupResult:
    sessions: pd.DataFrame
    lesions: pd.DataFrame
    summary: pd.DataFrame
    detection: pd.DataFrame | None = None
    retention: pd.DataFrame | None = None
    retention_curves: dict = field(default_factory=dict)
    regression: dict | None = None
    icc: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def analyse(sessions: pd.DataFrame, lesions: pd.DataFrame, *, in_domain_sites=None, seed: int = 0,
            n_boot: int = 1000, regression_repeats: int = 10, regression_model: str = "elasticnet") -> GroupResult:
    """All cohort statistics (pure: DataFrames in, DataFrames/dicts out)."""
    from bids_app.core.cohort.drivers import uncertainty_drivers
    from bids_app.core.cohort.icc import icc_table
    from bids_app.core.cohort.summary import detection_summary, patient_retention_table, summarise

    by = ["site"] if "site" in sessions.columns else []
    numeric = [c for c in sessions.columns if c not in ("participant_id", "session_id")
               and pd.api.types.is_numeric_dtype(sessions[c])]
    result = GroupResult(sessions=sessions, lesions=lesions,
                         summary=summarise(sessions, numeric, by, n_boot=n_boot, seed=seed))
    counts = [f"eval_all_{c}" for c in ("TPL", "FPL", "USL", "FNL")]
    if all(c in sessions.columns for c in counts) and sessions[counts].notna().all(axis=None):
        evaluated = sessions.copy()
        rename = {f"eval_all_{c}": c for c in ("TPL", "FPL", "USL", "FNL")}
        evaluated = evaluated.rename(columns=rename)
        metric_cols = [c for c in evaluated.columns if c.startswith("eval_all_") and
                       pd.api.types.is_numeric_dtype(evaluated[c])]
        det = detection_summary(evaluated, by=("site", "domain"), in_domain_sites=in_domain_sites,
                                metrics=metric_cols, n_boot=n_boot, seed=seed)
        result.detection = det.pooled
        unc_cols = [c for c in ("unc_PSU", "unc_avg_LSU", "unc_avg_MI", "unc_avg_EoE") if c in sessions.columns]
        met_cols = [c for c in ("eval_all_DSC", "eval_all_nDSC", "eval_all_F1") if c in sessions.columns]
        if unc_cols and met_cols and len(sessions) >= 2:
            result.retention, result.retention_curves = patient_retention_table(
                sessions, unc_cols, met_cols)
    else:
        result.notes.append("no evaluation results (run the participant level with --reference-masks)")
    features = [c for c in EXPLANATORY_FEATURES if c in lesions.columns]
    if "LSU" in lesions.columns and features:
        usable = lesions.dropna(subset=["LSU"] + features)
        if len(usable) >= MIN_LESIONS_FOR_REGRESSION:
            res = uncertainty_drivers(usable, "LSU", features, model=regression_model,
                                      n_repeats=regression_repeats)
            result.regression = {"target": "LSU", "features": features, "n_lesions": int(len(usable)),
                                 "model": regression_model,
                                 "summary": res.summary,
                                 "importance": res.importance.to_dict(orient="records"),
                                 "scores": res.scores.to_dict(orient="records")}
        else:
            result.notes.append(f"uncertainty regression skipped: {len(usable)} complete lesions "
                                f"(< {MIN_LESIONS_FOR_REGRESSION})")
    repeated = sessions.groupby("participant_id")["session_id"].nunique()
    if (repeated >= 2).sum() >= 2:
        measures = [c for c in SESSION_MEASURES_FOR_ICC if c in sessions.columns]
        result.icc = icc_table(sessions, "participant_id", "session_id", measures)
    else:
        result.notes.append("ICC skipped: fewer than 2 participants with repeated sessions")
    return result


def lesion_frequency(output_dir: Path, sessions: pd.DataFrame):
    """Fraction of sessions with a lesion at each MNI152NLin2009cAsym (2 mm) voxel, from the
    instance maps and the subject->template transforms the participant level wrote."""
    import nibabel as nib
    import SimpleITK as sitk

    from bids_app.bids.templates import template_file
    from bids_app.core.lesions.location import lesion_frequency_map
    from bids_app.core.registration import TemplateTransform

    template = nib.load(str(template_file(resolution=2, suffix="mask", desc="brain")))
    items, problems = [], []
    for _, row in sessions.iterrows():
        prefix = row["participant_id"] + ("" if row["session_id"] in (None, "n/a") else f"_{row['session_id']}")
        folder = Path(output_dir) / row["participant_id"]
        if row["session_id"] not in (None, "n/a"):
            folder = folder / row["session_id"]
        inst = output_path(folder / "anat", prefix, "instance_dseg")
        xfms = [p for p in find_outputs(folder / "anat", "template_xfm", to="MNI152NLin2009cAsym")
                if p.name.startswith(f"{prefix}_")]
        if not inst.is_file() or not xfms:
            continue
        try:
            img = nib.load(str(inst))
            mask = np.asarray(img.dataobj) > 0
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a corrupt file
            problems.append(f"{inst}: cannot be read ({type(exc).__name__})")
            continue
        try:
            transform = TemplateTransform.from_sitk(sitk.ReadTransform(str(xfms[0])))
        except Exception as exc:  # noqa: BLE001 - SimpleITK raises RuntimeError, the conversion others
            problems.append(f"{xfms[0]}: not a transform ITK can read ({type(exc).__name__})")
            continue
        items.append((mask, img.affine, transform))
    if problems:
        raise BadInputData(f"{len(problems)} participant output file(s) cannot be read: {'; '.join(problems)}.",
                           hint="re-run the participant level for those participants, or leave them out with "
                                "--participant-label.")
    if not items:
        return None, template.affine
    result = lesion_frequency_map(items, template.shape, template.affine)
    return result, template.affine


def run_group(config) -> int:
    """The group level (see the module docstring): ``group/`` is built in a staging folder and
    swapped in as one unit once every file of it is written."""
    import shutil

    from bids_app.bids.commit import recover_swap, staging_name, swap_in
    from bids_app.bids.derivatives import io_error

    ex = config.execution
    out = ex.output_dir
    sessions, lesions = collect(out, ex.bids_dir, ex.participant_label)
    LOGGER.info("Group level: %d session(s), %d lesion(s)", len(sessions), len(lesions))
    result = analyse(sessions, lesions, in_domain_sites=getattr(config.outputs, "in_domain_sites", None))
    staging = out / staging_name()
    try:
        (staging / "new" / "group").mkdir(parents=True)
        if (out / "group" / "log").is_dir():  # earlier group runs' logs stay
            shutil.copytree(out / "group" / "log", staging / "new" / "group" / "log")
        _write_group(config, staging / "new", result)
        swap_in(staging, out, Path("group"))
    except OSError as exc:
        raise io_error(exc, out) from None
    finally:
        try:  # deletes the previous group/ after the swap, puts it back after a failed one
            recover_swap(staging, out)
        except OSError:
            pass
    LOGGER.info("Group outputs written to %s", out / "group")
    for note in result.notes:
        LOGGER.info("Group note: %s", note)
    return 0


def _write_group(config, root: Path, result: GroupResult) -> None:
    """Write every group file into ``root/group`` (``root``: the staging folder)."""
    from bids_app import __version__
    from bids_app.bids.derivatives import atomic_write_text, dumps_json, write_dataset_files
    from bids_app.formats.lesion_table import dictionary_for, to_tsv

    ex = config.execution
    out = ex.output_dir
    group = root / "group"

    def write_table(name: str, table: pd.DataFrame, extra: dict[str, dict]) -> None:
        # every TSV with its data dictionary: each column defined in the JSON beside it
        atomic_write_text(group / f"{name}.tsv", to_tsv(table))
        atomic_write_text(group / f"{name}.json", dumps_json(dictionary_for(table, extra)))

    write_table("group_sessions", result.sessions,
                session_dictionary(result.sessions.columns, participants_dictionary(ex.bids_dir)))
    write_table("group_lesions", result.lesions, {**lesion_dictionaries(out), **SESSION_DICTIONARY})
    write_table("group_summary", result.summary, _SUMMARY_DICT)
    if result.detection is not None:
        write_table("group_detection", result.detection, _DETECTION_DICT)
    if result.retention is not None:
        write_table("group_retention", result.retention, _RETENTION_DICT)
    if result.regression is not None:
        atomic_write_text(group / "group_regression.json", dumps_json(result.regression))
    if result.icc is not None:
        write_table("group_icc", result.icc, _ICC_DICT)
    try:
        freq, affine = lesion_frequency(out, result.sessions)
    except MissingInput as exc:
        freq = None
        result.notes.append(f"lesion-frequency map skipped: {exc.one_line()}")
    if freq is not None:
        from bids_app.core.imageio import save_image

        tmp = group / ".freq.tmp.nii.gz"
        save_image(tmp, freq.fraction.astype(np.float32), affine)
        tmp.replace(group / "group_space-MNI152NLin2009cAsym_desc-lesionfrequency_probseg.nii.gz")
    atomic_write_text(group / "group_notes.json", dumps_json({"notes": result.notes, "version": __version__}))
    try:
        from bids_app.reports.group import write_group_report

        write_group_report(root, result)
    except ImportError:  # pragma: no cover - reports are optional in minimal installs
        LOGGER.warning("group report skipped (report dependencies missing)")
    write_dataset_files(out, ex.bids_dir, __version__)


_GROUPING_DICT: dict[str, dict] = {
    "group_by": {"Description": "Grouping column of this row: all (every session), site or domain."},
    "group": {"Description": "Value of the grouping column (all for the whole cohort)."},
}
_SUMMARY_DICT: dict[str, dict] = {
    **_GROUPING_DICT,
    "variable": {"Description": "Session measure summarised (a column of group_sessions.tsv)."},
    "n": {"Description": "Number of sessions with a finite value."},
    "mean": {"Description": "Mean over the sessions (units of the variable)."},
    "sd": {"Description": "Sample standard deviation (ddof = 1; n/a for one session)."},
    "median": {"Description": "Median over the sessions."},
    "ci_low": {"Description": "Lower bound of the 95 % bootstrap confidence interval of the mean (percentile)."},
    "ci_high": {"Description": "Upper bound of the 95 % bootstrap confidence interval of the mean (percentile)."},
    "se": {"Description": "Bootstrap standard error of the mean (half-size resamples)."},
}
_DETECTION_DICT: dict[str, dict] = {
    **_GROUPING_DICT,
    "n_sessions": {"Description": "Number of evaluated sessions pooled in this row."},
    "TPL": {"Description": "Pooled true positive lesions (predicted lesions matching a reference lesion)."},
    "FPL": {"Description": "Pooled false positive lesions."},
    "USL": {"Description": "Pooled under-segmented lesions (0 < overlap score < detection threshold)."},
    "FNL": {"Description": "Pooled false negative (missed) reference lesions."},
    "F1": {"Description": "Lesion-wise F1 of the pooled counts.", "Units": "1"},
    "recall": {"Description": "Lesion-wise recall (sensitivity) of the pooled counts.", "Units": "1"},
    "precision": {"Description": "Lesion-wise precision of the pooled counts.", "Units": "1"},
    "USL_rate": {"Description": "Fraction of predicted lesions that are under-segmented.", "Units": "1"},
}
_RETENTION_DICT: dict[str, dict] = {
    **_GROUPING_DICT,
    "uncertainty": {"Description": "Patient-scale uncertainty measure that orders the sessions (a group_sessions "
                                   "column)."},
    "metric": {"Description": "Session metric of the retention curve (a group_sessions column)."},
    "n": {"Description": "Number of sessions with finite uncertainty and metric."},
    "auc": {"Description": "Area under the retention curve: sessions replaced (metric = 1) from the most "
                           "uncertain down."},
    "aac": {"Description": "Area above the retention curve (1 - auc)."},
    "auc_random": {"Description": "Expected area for a random order ((mean metric + 1) / 2)."},
    "auc_ideal": {"Description": "Area for the ideal order (sessions replaced from the worst metric up)."},
}
_ICC_DICT: dict[str, dict] = {
    "feature": {"Description": "Session measure whose reliability across repeated sessions is assessed."},
    "ICC3_1": {"Description": "ICC(3,1): two-way mixed effects, consistency, single session (Shrout & Fleiss "
                             "1979).", "Units": "1"},
    "ICC3_k": {"Description": "ICC(3,k): as ICC3_1 for the mean of k sessions.", "Units": "1"},
    "F": {"Description": "F statistic of the subjects effect (MS_R / MS_E)."},
    "df1": {"Description": "Numerator degrees of freedom (n_targets - 1)."},
    "df2": {"Description": "Denominator degrees of freedom ((n_targets - 1)(n_raters - 1))."},
    "pval": {"Description": "p-value of the F test (ICC > 0)."},
    "ICC3_1_ci_low": {"Description": "Lower bound of the 95 % confidence interval of ICC3_1 (F distribution)."},
    "ICC3_1_ci_high": {"Description": "Upper bound of the 95 % confidence interval of ICC3_1."},
    "ICC3_k_ci_low": {"Description": "Lower bound of the 95 % confidence interval of ICC3_k."},
    "ICC3_k_ci_high": {"Description": "Upper bound of the 95 % confidence interval of ICC3_k."},
    "MS_R": {"Description": "Mean square of the subjects (rows)."},
    "MS_C": {"Description": "Mean square of the sessions (columns)."},
    "MS_E": {"Description": "Residual mean square."},
    "n_targets": {"Description": "Number of participants with every session."},
    "n_raters": {"Description": "Number of sessions per participant."},
    "n_dropped_targets": {"Description": "Participants left out for a missing session or value."},
}
