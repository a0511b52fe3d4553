"""The per-participant HTML report, built from the derivatives on disk.

Used at the end of the participant level and by ``--reports-only``: everything it shows is
read back from the output dataset (so it shows what was written, and can be rebuilt). One
self-contained file per participant, ``OUTPUT_DIR/sub-<label>.html``: figures are inline PNG,
no script, no style sheet and no font is fetched.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger("bids_app.reports")

#: columns of the lesion table shown in the report (when present)
TABLE_COLUMNS = ("label", "class", "volume_mm3", "LSU", "mean_MI", "location_class", "cortical_type",
                 "lesion_type", "p_true_lesion")
N_UNCERTAIN_LESIONS = 5

STYLE = """
body{font-family:Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1180px;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:1.6em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#eee}.warn{background:#fff3cd;border:1px solid #e0b000;padding:.4em .8em;margin:.4em 0}
.demo{background:#fde2e1;border:1px solid #d33;padding:.5em 1em}.ok{color:#176f2c}
img{max-width:100%}.small{font-size:11px;color:#555}code{font-size:11px}
"""


def _esc(value) -> str:
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_esc(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _load(path: Path) -> np.ndarray | None:
    import nibabel as nib

    if not path.is_file():
        return None
    return np.asarray(nib.load(str(path)).dataobj)


def _session_dirs(output_dir: Path, participant: str) -> list[Path]:
    base = output_dir / participant
    with_sessions = sorted(d / "anat" for d in base.glob("ses-*") if (d / "anat").is_dir())
    if with_sessions:
        return with_sessions
    return [base / "anat"] if (base / "anat").is_dir() else []


def session_section(anat: Path) -> tuple[str, dict]:
    """HTML of one session and its summary (empty summary when the session has no outputs)."""
    import pandas as pd

    from . import figures

    summaries = sorted(anat.glob("*_summary.json"))
    if not summaries:
        return "", {}
    summary = json.loads(summaries[0].read_text())
    prefix = summaries[0].name[: -len("_summary.json")]
    title = summary["participant_id"] + (f" / {summary['session_id']}" if summary.get("session_id") else "")
    parts = [f"<h2>{_esc(title)}</h2>"]
    flags = summary.get("qc_flags", [])
    for flag in flags:
        parts.append(f"<div class='warn'>QC warning: <b>{_esc(flag)}</b></div>")
    if not flags:
        parts.append("<p class='ok'>No QC warning.</p>")
    lesions = summary.get("lesions", {})
    unc = summary.get("uncertainty", {})
    rows = [{"class": name, "lesions": entry.get("n_lesions"), "volume (mm^3)": entry.get("volume_mm3")}
            for name, entry in lesions.get("per_class", {}).items()]
    rows.append({"class": "all", "lesions": lesions.get("n_lesions"), "volume (mm^3)": lesions.get("total_volume_mm3")})
    parts.append(_table(rows, ["class", "lesions", "volume (mm^3)"]))
    if unc:
        keys = [k for k in ("PSU", "avg_LSU", "avg_MI", "avg_EoE") if k in unc]
        parts.append("<p>Patient-scale uncertainty: " + ", ".join(f"{k} = {_esc(unc[k])}" for k in keys) + "</p>")
    inputs = summary.get("bids_meta", {}).get("inputs", [])
    if inputs:
        parts.append("<h3>Inputs</h3>" + _table(inputs, ["channel", "file", "reason"]))
    conform_info = summary.get("conform", {}).get("channels", {})
    if conform_info:
        crow = [{"channel": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, list)}}
                for k, v in conform_info.items()]
        cols = ["channel", "method", "translation_mm", "max_rotation_deg", "gradient_correlation"]
        parts.append(_table(crow, cols))
    bm = summary.get("brain_mask", {})
    if bm:
        parts.append(f"<p class='small'>Brain mask: {_esc(bm.get('method'))}; "
                     f"{_esc(bm.get('brain_volume_litres'))} L ({_esc(bm.get('skull_strip_reason'))}).</p>")

    # images
    images = {}
    for f in sorted(anat.glob(f"{prefix}*desc-preproc_*.nii.gz")):
        images[f.name.split("_")[-1].replace(".nii.gz", "")] = _load(f).astype(np.float32)
    classes = _load(anat / f"{prefix}_desc-lesions_dseg.nii.gz")
    instances = _load(anat / f"{prefix}_desc-instances_dseg.nii.gz")
    brain = _load(anat / f"{prefix}_desc-brain_mask.nii.gz")
    brain = brain > 0 if brain is not None else None
    class_names = {}
    lut = anat / f"{prefix}_desc-lesions_dseg.tsv"
    if lut.is_file():
        t = pd.read_csv(lut, sep="\t")
        class_names = {int(r["index"]): str(r["abbreviation"]) for _, r in t.iterrows()}
    if images and classes is not None:
        background = next(iter(images.values()))
        slices = figures.choose_slices(classes, 6, brain)
        parts.append("<h3>Lesions</h3>")
        parts.append(f"<img alt='lesion mosaic' src='{figures.lesion_mosaic(images, classes, slices, class_names, brain)}'>")
        probs = [_load(p) for p in sorted(anat.glob(f"{prefix}_label-*_probseg.nii.gz")) if "desc-member" not in p.name]
        if probs:
            lesion_prob = np.sum([p.astype(np.float32) for p in probs], axis=0)
            threshold = summary.get("parameters", {}).get("Threshold")
            parts.append(f"<img alt='probability' src='"
                         f"{figures.overlay_mosaic(background, lesion_prob, slices, f'ensemble lesion probability (threshold {threshold})', vmin=0, vmax=1, threshold=0.05, brain=brain)}'>")
        for measure in ("mi", "eoe"):
            path = anat / f"{prefix}_desc-{measure}_uncertainty.nii.gz"
            if path.is_file():
                u = _load(path).astype(np.float32)
                label = {"mi": "mutual information (epistemic)", "eoe": "entropy of the expected (total)"}[measure]
                parts.append(f"<img alt='uncertainty' src='"
                             f"{figures.overlay_mosaic(background, u, slices, f'voxel uncertainty: {label} (nat)', cmap='viridis', brain=brain)}'>")
                break
    table_path = anat / f"{prefix}_lesions.tsv"
    if table_path.is_file() and instances is not None:
        table = pd.read_csv(table_path, sep="\t", na_values=["n/a"], keep_default_na=False)
        if len(table) and "LSU" in table.columns and images:
            top = table.sort_values("LSU", ascending=False, kind="stable").head(N_UNCERTAIN_LESIONS)
            overlays = {}
            for f in sorted(anat.glob(f"{prefix}_desc-*_saliency.nii.gz"))[:2]:
                overlays[f.name.split("desc-")[1].split("_")[0]] = _load(f).astype(np.float32)
            parts.append(f"<h3>The {len(top)} most uncertain lesions (LSU)</h3>")
            parts.append(f"<img alt='uncertain lesions' src='"
                         f"{figures.lesion_crops(images, instances, [int(v) for v in top['label']], overlays)}'>")
        cols = [c for c in TABLE_COLUMNS if c in table.columns]
        parts.append(f"<h3>Lesion table ({len(table)} lesions; full table: <code>{table_path.name}</code>)</h3>")
        parts.append(_table(table[cols].to_dict(orient="records"), cols))
    evaluation = summary.get("evaluation")
    if evaluation:
        keys = [k for k in ("all/F1", "all/precision", "all/recall", "all/DSC", "all/nDSC", "all/TPL", "all/FPL",
                            "all/USL", "all/FNL", "all/ECE") if k in evaluation]
        parts.append("<h3>Evaluation against the reference masks</h3>")
        parts.append(_table([{k: evaluation[k] for k in keys}], keys))
        parts.append(f"<p class='small'>Detection: {_esc(evaluation.get('method'))}, IoU threshold "
                     f"{_esc(evaluation.get('detection_threshold'))}, connectivity {_esc(evaluation.get('connectivity'))}.</p>")
    return "\n".join(parts), summary


def build_participant_report(output_dir: Path, participant: str) -> Path | None:
    """Write ``OUTPUT_DIR/<participant>.html``; returns its path (None without outputs)."""
    from .. import __version__
    from ..derivatives import atomic_write_text

    output_dir = Path(output_dir)
    sections, summaries = [], []
    for anat in _session_dirs(output_dir, participant):
        try:
            section, summary = session_section(anat)
        except Exception as exc:  # noqa: BLE001 - a broken figure must not lose the report
            LOGGER.warning("report section %s failed: %s", anat, exc)
            section, summary = f"<div class='warn'>This section could not be drawn: {_esc(exc)}</div>", {}
        if section:
            sections.append(section)
            summaries.append(summary)
    errors = []
    for err in sorted((output_dir / participant / "log").glob("*/*_error.json")):
        data = json.loads(err.read_text())
        errors.append(f"<div class='warn'><b>{_esc(data.get('session'))}</b> failed (exit code "
                      f"{_esc(data.get('exit_code'))}): {_esc(data.get('message'))}</div>")
    if not sections and not errors:
        return None
    provenance = summaries[0].get("provenance", {}) if summaries else {}
    model = provenance.get("Model", {})
    demo = ("<div class='demo'><b>Demo model.</b> These lesion maps come from a model trained on synthetic "
            "data only; they are not clinically validated.</div>") if model.get("Demo") else ""
    prov = ""
    if provenance:
        members = ", ".join(f"fold {m['Fold']} (sha256 {m['SHA256'][:12]}...)" for m in model.get("Members", []))
        params = provenance.get("Parameters", {})
        software = provenance.get("Software", {})
        prov = ("<h2>Provenance</h2>"
                f"<p>Model <b>{_esc(model.get('Id'))}</b> ({_esc(model.get('Name'))}), members: {_esc(members)}.</p>"
                + _table([params], list(params)) + _table([software], list(software)))
    body = "\n".join([f"<h1>msxplain report: {_esc(participant)}</h1>",
                      f"<p class='small'>msxplain {_esc(__version__)}</p>", demo, *errors, *sections, prov])
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_esc(participant)} - msxplain"
            f"</title><style>{STYLE}</style></head><body>{body}</body></html>\n")
    path = output_dir / f"{participant}.html"
    atomic_write_text(path, page)
    return path


def build_reports(output_dir: Path, participants: list[str] | None = None) -> list[Path]:
    """Reports of the given participants (default: every ``sub-*`` folder of the output)."""
    output_dir = Path(output_dir)
    if participants is None:
        participants = sorted(p.name for p in output_dir.glob("sub-*") if p.is_dir())
    written = []
    for i, participant in enumerate(participants, start=1):
        path = build_participant_report(output_dir, participant)
        if path is not None:
            written.append(path)
            LOGGER.info("[%d/%d] report %s", i, len(participants), path.name)
    return written
