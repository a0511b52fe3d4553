"""The group level's inputs: the participant outputs, read and checked, and the data
dictionaries of the tables built from them.

:func:`collect` reads every session summary and lesion table (found through io_spec.json,
:func:`bids_app.bids.derivatives.find_outputs`) and checks first that every expected participant has
them (MRtrix3_connectome's habit: name what is missing before computing anything); a participant
output that cannot be read stops the group level with exit 65 and a message naming every such file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from bids_app.bids.derivatives import find_outputs, output_path, session_folders, session_prefix, sidecar_path
from bids_app.errors import BadInputData, MissingInput

LOGGER = logging.getLogger("bids_app.app.group")


def find_summaries(output_dir: Path) -> list[Path]:
    """Every session summary (``summary`` of io_spec.json) of the output folder, sorted."""
    return sorted(p for folder in session_folders(output_dir) for p in find_outputs(folder, "summary"))


def read_participants(bids_dir: Path) -> pd.DataFrame:
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return pd.DataFrame(columns=["participant_id"])
    table = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
    return table


def expected_participants(bids_dir: Path, labels: tuple[str, ...] | None) -> list[str]:
    """Participants the group level expects outputs for: the labels given, else every
    ``sub-*`` folder of the input dataset."""
    if labels:
        return [f"sub-{label}" for label in labels]
    return sorted(p.name for p in Path(bids_dir).glob("sub-*") if p.is_dir())


def _flat(prefix: str, data: dict) -> dict:
    out = {}
    for key, value in (data or {}).items():
        if isinstance(value, (dict, list)):
            continue
        out[f"{prefix}{key}".replace("/", "_")] = value
    return out


def session_row(summary: dict) -> dict:
    """One row of ``group_sessions.tsv`` from a session summary."""
    row: dict[str, Any] = {"participant_id": summary["participant_id"],
                           "session_id": summary.get("session_id", "n/a")}
    lesions = summary.get("lesions", {})
    row["n_lesions"] = lesions.get("n_lesions")
    row["total_volume_mm3"] = lesions.get("total_volume_mm3")
    for name, entry in lesions.get("per_class", {}).items():
        row[f"n_{name}"] = entry.get("n_lesions")
        row[f"volume_{name}_mm3"] = entry.get("volume_mm3")
    row.update(_flat("unc_", summary.get("uncertainty", {})))
    row.update(_flat("eval_", summary.get("evaluation", {})))
    row["brain_volume_litres"] = summary.get("brain_mask", {}).get("brain_volume_litres")
    row["qc_flags"] = ";".join(summary.get("qc_flags", [])) or "none"
    row["model_id"] = summary.get("provenance", {}).get("Model", {}).get("Id")
    return row


def read_summary(path: Path) -> dict:
    """A session summary, checked: a JSON object naming its participant.

    Raises
    ------
    ValueError
        What is wrong with the file (one line).
    """
    try:
        summary = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not text (binary content)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"a JSON {type(summary).__name__}, not an object")
    participant = summary.get("participant_id")
    if not (isinstance(participant, str) and participant.startswith("sub-")):
        raise ValueError("no participant_id of the form sub-<label>")
    for key in ("lesions", "uncertainty", "evaluation", "brain_mask", "provenance"):
        if not isinstance(summary.get(key, {}), dict):
            raise ValueError(f"'{key}' is a {type(summary[key]).__name__}, not an object")
    if not isinstance(summary.get("qc_flags", []), list):
        raise ValueError("'qc_flags' is not a list")
    return summary


def read_lesion_table(path: Path) -> pd.DataFrame:
    """A session's lesion table, checked: UTF-8 text, tab-separated, with a ``label`` column.

    Raises
    ------
    ValueError
        What is wrong with the file (one line).
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not text (binary content)") from None
    if "\x00" in text:
        raise ValueError("not text (binary content)")
    import io

    try:
        table = pd.read_csv(io.StringIO(text), sep="\t", na_values=["n/a"], keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"not a tab-separated table ({str(exc).splitlines()[0] if str(exc) else 'empty'})") \
            from None
    if "label" not in table.columns:
        raise ValueError("no 'label' column")
    return table


def latest_failure(output_dir: Path, participant: str) -> str | None:
    """The message of a participant's latest failed run (its newest ``log/<run>/*_error.json``), if any."""
    logs = sorted(Path(output_dir).glob(f"{participant}/log/*/*_error.json"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    try:
        error = json.loads(logs[-1].read_text())
        return f"exit code {error.get('exit_code')}: {error.get('message')}"
    except (OSError, ValueError, AttributeError):
        return "see " + str(logs[-1])


def _missing_outputs(missing: list[str], output_dir: Path) -> MissingInput:
    """The error naming participants without outputs, each with the error of its latest run when it failed."""
    named = []
    for p in missing[:10]:
        failure = latest_failure(output_dir, p)
        named.append(f"{p} (its latest participant run failed, {failure})" if failure else p)
    return MissingInput(f"No participant outputs for {len(missing)} participant(s): {', '.join(named)}"
                        f"{'...' if len(missing) > 10 else ''}.", path=str(output_dir),
                        hint="run the participant level for them, or restrict the group with --participant-label.")


def collect(output_dir: Path, bids_dir: Path, participant_label=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every session summary and lesion table; check nothing expected is missing.

    Raises
    ------
    MissingInput
        No participant output at all, or expected participants without outputs (named, with
        the error of their latest participant run when it failed).
    BadInputData
        Participant outputs that cannot be read (every such file named).
    """
    summaries = find_summaries(output_dir)
    expected = expected_participants(bids_dir, participant_label)
    if not summaries and any(latest_failure(output_dir, p) for p in expected):
        raise _missing_outputs(expected, output_dir)
    if not summaries:
        raise MissingInput("No participant outputs (*_summary.json) found in the output folder.", path=str(output_dir),
                           hint="run the participant level first, into this output folder.")
    rows, lesion_frames, problems = [], [], []
    for path in summaries:
        folder = path.relative_to(output_dir).parts[0]
        if participant_label and folder[4:] not in participant_label:
            continue
        table_path = output_path(path.parent, session_prefix(path), "lesion_table")
        try:
            summary = read_summary(path)
        except (ValueError, OSError) as exc:
            problems.append(f"{path}: {exc}")
            continue
        if not table_path.is_file():
            raise MissingInput("A session has a summary but no lesion table.", path=str(table_path),
                               hint="re-run the participant level for this session.")
        try:
            lesions = read_lesion_table(table_path)
        except (ValueError, OSError) as exc:
            problems.append(f"{table_path}: {exc}")
            continue
        rows.append(session_row(summary))
        lesions.insert(0, "session_id", summary.get("session_id", "n/a"))
        lesions.insert(0, "participant_id", summary["participant_id"])
        lesion_frames.append(lesions)
    if problems:
        raise BadInputData(f"{len(problems)} participant output file(s) cannot be read: {'; '.join(problems)}.",
                           hint="re-run the participant level for those participants, or leave them out with "
                                "--participant-label.")
    have = {r["participant_id"] for r in rows}
    missing = [p for p in expected if p not in have]
    if missing:
        raise _missing_outputs(missing, output_dir)
    sessions = pd.DataFrame(rows)
    participants = read_participants(bids_dir)
    extra = [c for c in participants.columns if c != "participant_id"]
    if extra:
        sessions = sessions.merge(participants, on="participant_id", how="left")
        order = ["participant_id", "session_id"] + [c for c in ("site", "scanner") if c in extra]
        sessions = sessions[order + [c for c in sessions.columns if c not in order]]
    sessions = sessions.sort_values(["participant_id", "session_id"], kind="stable").reset_index(drop=True)
    lesions = pd.concat(lesion_frames, ignore_index=True) if lesion_frames else pd.DataFrame()
    if "site" in sessions.columns and len(lesions):
        lesions = lesions.merge(sessions[["participant_id", "session_id", "site"]], on=["participant_id", "session_id"],
                                how="left")
    return sessions, lesions


#: definitions of the session-level columns that every group table shares
SESSION_DICTIONARY: dict[str, dict] = {
    "participant_id": {"Description": "BIDS participant label."},
    "session_id": {"Description": "BIDS session label (n/a without sessions)."},
    "site": {"Description": "Site, from participants.tsv."},
    "scanner": {"Description": "Scanner, from participants.tsv."},
    "n_lesions": {"Description": "Number of predicted lesions (all classes)."},
    "total_volume_mm3": {"Description": "Total predicted lesion volume.", "Units": "mm^3"},
    "unc_PSU": {"Description": "Patient-scale structural uncertainty (1 - mean IoU of member masks with the "
                               "ensemble mask).", "Units": "1"},
    "qc_flags": {"Description": "QC flags of the session, ';'-separated, or none: empty_prediction, "
                                "implausible_brain_volume, poor_registration_<channel>, sheared_affine_<channel>, "
                                "implausible_field_of_view_<channel>, negative_values_<channel>, "
                                "modality_mismatch_<channel>, lesion_features_failed, refiner_features_failed "
                                "(docs/input-checks.md)."},
    "model_id": {"Description": "Model card id."},
}


def participants_dictionary(bids_dir: Path) -> dict[str, dict]:
    """The column definitions of the input dataset's ``participants.json`` (empty without one)."""
    try:
        data = json.loads((Path(bids_dir) / "participants.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and v.get("Description")} \
        if isinstance(data, dict) else {}


def session_dictionary(columns, participants: dict[str, dict] | None = None) -> dict[str, dict]:
    """Data dictionary of ``group_sessions.tsv``: fixed columns, the input dataset's
    ``participants.json`` definitions, then the column families (``n_<class>``,
    ``volume_<class>_mm3``, ``unc_<measure>``, ``eval_<class>_<metric>``)."""
    import re

    entries = dict(SESSION_DICTIONARY)
    for column in columns:
        if column in entries:
            continue
        if participants and column in participants:
            entries[column] = participants[column]
            continue
        if m := re.fullmatch(r"n_(\w+)", column):
            entries[column] = {"Description": f"Number of predicted lesions of class {m.group(1)}."}
        elif m := re.fullmatch(r"volume_(\w+)_mm3", column):
            entries[column] = {"Description": f"Predicted lesion volume of class {m.group(1)}.", "Units": "mm^3"}
        elif column.startswith("unc_"):
            entries[column] = {"Description": f"Patient-scale uncertainty measure {column[4:]} of the session "
                                              "(uncertainty block of the session summary; docs/uncertainty.md)."}
        elif column.startswith("eval_"):
            entries[column] = {"Description": _evaluation_description(column[5:])}
        elif column == "brain_volume_litres":
            entries[column] = {"Description": "Brain-mask volume.", "Units": "L"}
        else:
            entries[column] = {"Description": f"{column}, from participants.tsv of the input dataset."}
    return entries


#: metrics of the session evaluation (evaluation block of the session summary)
_EVAL_METRICS = {
    "DSC": "Dice similarity coefficient (voxels)", "nDSC": "normalised DSC (reference lesion load r of the card)",
    "F1": "lesion-wise F1", "recall": "lesion-wise recall", "precision": "lesion-wise precision",
    "TPL": "true positive lesions", "FPL": "false positive lesions", "USL": "under-segmented lesions",
    "FNL": "missed reference lesions", "USL_rate": "fraction of predicted lesions that are under-segmented",
    "TPRvox": "voxel true positive rate", "FPRvox": "voxel false positive rate",
    "FDRvox": "voxel false discovery rate", "n_pred": "number of predicted lesions",
    "n_ref": "number of reference lesions", "CE": "mean calibration gap over the probability bins",
    "ECE": "expected calibration error", "MCE": "maximum calibration error", "Brier": "Brier score",
    "n_bins": "number of probability bins of the calibration metrics",
}


def _evaluation_description(name: str) -> str:
    """Description of an ``eval_<class|all>_<metric>`` (or ``eval_<setting>``) column."""
    scope, _, metric = name.partition("_")
    if metric in _EVAL_METRICS:
        where = "all lesion classes" if scope == "all" else f"lesion class {scope}"
        return f"Evaluation against the reference masks, {where}: {_EVAL_METRICS[metric]}."
    return (f"Evaluation against the reference masks: {name.replace('_', ' ')} (evaluation block of the "
            "session summary).")


def lesion_dictionaries(output_dir: Path) -> dict[str, dict]:
    """The column definitions of the participants' lesion tables (their ``*_lesions.json``),
    merged (the first definition of a column wins); keys that are not columns are left out."""
    merged: dict[str, dict] = {}
    for path in sorted(sidecar_path(table) for folder in session_folders(output_dir)
                       for table in find_outputs(folder, "lesion_table")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for column, entry in data.items():
            if isinstance(entry, dict) and "Description" in entry and column not in merged:
                merged[column] = entry
    return merged
