"""The per-participant HTML report, built from the derivatives on disk.

Used at the end of the participant level and by ``--reports-only``: everything it shows is
read back from the output dataset (so it shows what was written, and can be rebuilt). One
self-contained file per participant, ``OUTPUT_DIR/sub-<label>.html``: figures are inline PNG,
no script, no style sheet and no font is fetched.

What a session shows:

* the lesions in three planes (axial, coronal, sagittal; three slices each, chosen where the
  lesion load is highest), outlined on the FLAIR (else the first channel) at about 2.4
  screen pixels per mm; coloured by class, or, when the session was evaluated against
  reference masks, as true positive / under-segmented / false positive / missed lesions;
* the ensemble probability and the voxel uncertainty (axial);
* the most uncertain lesions (highest LSU) among those of at least
  :data:`~bids_app.reports.selection.MIN_CROP_VOLUME_MM3` mm³ (and of the minimum lesion size),
  each titled with its number, volume and score;
* the lesion table, the evaluation metrics and the provenance (tables that wrap, values
  written as a person writes them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from bids_app.bids.derivatives import find_outputs, output_path, session_prefix, sidecar_path
from bids_app.reports.html import STYLE, esc, format_value, key_value_table, swatch_legend, table

LOGGER = logging.getLogger("bids_app.reports")

#: columns of the lesion table shown in the report (when present)
TABLE_COLUMNS = ("label", "class", "volume_mm3", "LSU", "mean_MI", "location_class", "cortical_type",
                 "lesion_type", "iou_score", "p_true_lesion")
N_UNCERTAIN_LESIONS = 5
#: slices per plane in the lesion figure
N_CUTS = 3

__all__ = ["STYLE", "build_participant_report", "build_reports", "session_section"]


def _load(path: Path, zooms: bool = False):
    """The image as a RAS+ array (``nibabel.as_closest_canonical``), and its voxel sizes if asked."""
    import nibabel as nib

    if not path.is_file():
        return (None, None) if zooms else None
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj)
    return (data, tuple(float(z) for z in img.header.get_zooms()[:3])) if zooms else data


def _session_dirs(output_dir: Path, participant: str) -> list[Path]:
    base = output_dir / participant
    with_sessions = sorted(d / "anat" for d in base.glob("ses-*") if (d / "anat").is_dir())
    if with_sessions:
        return with_sessions
    return [base / "anat"] if (base / "anat").is_dir() else []


def _raw_root(output_dir: Path) -> Path | None:
    try:
        links = json.loads((output_dir / "dataset_description.json").read_text()).get("DatasetLinks", {})
        uri = links.get("raw")
    except (OSError, ValueError):
        return None
    if not uri:
        return None
    path = Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)
    return path if path.is_dir() else None


def find_reference_files(anat: Path, prefix: str, output_dir: Path) -> tuple[list[Path], list[str]]:
    """The reference masks named by the session's ``desc-evaluation_metrics.json``.

    The metrics file names them (``reference_files``: absolute paths, or bare file names that
    are looked up under the raw dataset's ``derivatives/`` and the raw dataset itself).

    Returns
    -------
    (found, missing) : list of Path, list of str
    """
    metrics = output_path(anat, prefix, "evaluation")
    try:
        names = json.loads(metrics.read_text()).get("reference_files", [])
    except (OSError, ValueError):
        return [], []
    raw = _raw_root(output_dir)
    subject = prefix.split("_")[0]
    found, missing = [], []
    for name in names:
        path = Path(name)
        if path.is_absolute() and path.is_file():
            found.append(path)
            continue
        hits = []
        if raw is not None:
            hits = sorted((raw / "derivatives").glob(f"*/{subject}/**/{path.name}")) or \
                sorted((raw / "derivatives").glob(f"**/{path.name}")) or sorted(raw.glob(f"{subject}/**/{path.name}"))
            own = output_dir.resolve()
            hits = [h for h in hits if own not in h.resolve().parents]  # not msxplain's own file of that name
        if hits:
            found.append(hits[0])
        else:
            missing.append(path.name)
    return found, missing


def _reference_mask(files: list[Path], shape: tuple[int, ...]) -> np.ndarray | None:
    mask = None
    for path in files:
        data = _load(path)
        if data is None or data.shape != shape:
            return None
        mask = (data > 0) if mask is None else (mask | (data > 0))
    return mask


def _lesion_figure(anat: Path, prefix: str, output_dir: Path, images: dict, zooms, classes, instances, brain,
                   class_names: dict[int, str], table, summary: dict) -> tuple[list[str], dict, dict[int, str]]:
    """HTML of the three-plane lesion figure; the cuts; the outline colour of each lesion label."""
    from bids_app.reports import figures, selection

    parts: list[str] = []
    background_name = "FLAIR" if "FLAIR" in images else next(iter(images))
    background = images[background_name]
    evaluated = table is not None and "lesion_type" in table.columns and instances is not None
    label_colours: dict[int, str] = {}
    if evaluated:
        types = {int(r["label"]): str(r["lesion_type"]) for _, r in table.iterrows()}
        ref_files, missing_files = find_reference_files(anat, prefix, output_dir)
        missed = None
        if ref_files:
            reference = _reference_mask(ref_files, instances.shape)
            if reference is not None:
                connectivity = int(summary.get("parameters", {}).get("Connectivity", 18) or 18)
                missed = selection.missed_reference_lesions(instances, reference, connectivity)
        categories = selection.evaluation_categories(instances, types, missed)
        keys = list(selection.EVAL_CATEGORIES)
        legend = {i: selection.EVAL_CATEGORIES[k] for i, k in enumerate(keys, start=1)}
        for label, kind in types.items():
            category = selection.LESION_TYPE_CATEGORY.get(kind)
            if category:
                label_colours[label] = selection.EVAL_CATEGORIES[category][0]
        counts = {k: sum(1 for v in types.values() if selection.LESION_TYPE_CATEGORY.get(v) == k) for k in keys[:3]}
        evaluation = summary.get("evaluation", {})
        counts["FN"] = evaluation.get("all/FNL")
        title = f"{background_name}: lesions against the reference masks"
        parts.append(swatch_legend([(selection.EVAL_CATEGORIES[k][0],
                                     (f"{selection.EVAL_CATEGORIES[k][1]} ({format_value(counts.get(k))}): "
                                      f"{selection.EVAL_EXPLANATIONS[k]}")) for k in keys]))
        if missed is None:
            why = (f"reference mask {', '.join(missing_files)} not found" if missing_files
                   else "reference mask not on this grid" if ref_files
                   else f"{prefix}_desc-evaluation_metrics.json names no reference file")
            parts.append(f"<p class='small'>Missed lesions are not outlined ({esc(why)}); their count is "
                         "in the evaluation table.</p>")
        outline = categories
    else:
        legend = {i: (figures.CLASS_COLOURS.get(i, "#ffffff"), name) for i, name in class_names.items()}
        outline = classes
        title = f"{background_name}: predicted lesions by class"
        parts.append(swatch_legend([legend[i] for i in sorted(legend)]))
        if instances is not None:
            label_colours = {int(v): legend.get(int(c), ("#00ff00", ""))[0]
                             for v, c in _label_classes(instances, classes).items()}
    cuts = selection.choose_cuts(outline > 0, N_CUTS, brain, zooms)
    figure = figures.three_plane_figure(background, outline, cuts, legend, zooms, brain, title=title)
    parts.append(f"<img alt='lesions in three planes (axial, coronal, sagittal)' src='{figure}'>")
    parts.append("<p class='small'>Rows: axial, coronal, sagittal slices, chosen to cut as many different lesions "
                 "as possible; neurological convention (L/R marked on each slice); scale bar 10 mm.</p>")
    return parts, cuts, label_colours


def _label_classes(instances: np.ndarray, classes: np.ndarray) -> dict[int, int]:
    labels = instances[instances > 0]
    values = classes[instances > 0]
    return {int(label): int(values[labels == label].max()) for label in np.unique(labels)}


def session_section(anat: Path, output_dir: Path | None = None) -> tuple[str, dict]:
    """HTML of one session and its summary (empty summary when the session has no outputs)."""
    import pandas as pd

    from bids_app.reports import figures

    if output_dir is None:  # OUTPUT/sub-X/[ses-Y/]anat
        output_dir = anat.parents[2] if anat.parent.name.startswith("ses-") else anat.parents[1]
    output_dir = Path(output_dir)
    summaries = find_outputs(anat, "summary")
    if not summaries:
        return "", {}
    summary = json.loads(summaries[0].read_text())
    prefix = session_prefix(summaries[0])
    title = summary["participant_id"] + (f" / {summary['session_id']}" if summary.get("session_id") else "")
    parts = [f"<h2>{esc(title)}</h2>"]
    flags = summary.get("qc_flags", [])
    for flag in flags:
        parts.append(f"<div class='warn'>QC warning: <b>{esc(flag)}</b></div>")
    if not flags:
        parts.append("<p class='ok'>No QC warning.</p>")
    lesions = summary.get("lesions", {})
    unc = summary.get("uncertainty", {})
    rows = [{"class": name, "lesions": entry.get("n_lesions"), "volume (mm³)": entry.get("volume_mm3")}
            for name, entry in lesions.get("per_class", {}).items()]
    rows.append({"class": "all", "lesions": lesions.get("n_lesions"), "volume (mm³)": lesions.get("total_volume_mm3")})
    parts.append(table(rows, ["class", "lesions", "volume (mm³)"]))
    if unc:
        keys = [k for k in ("PSU", "avg_LSU", "avg_MI", "avg_EoE") if k in unc]
        parts.append("<p>Patient-scale uncertainty: " + ", ".join(f"{k} = {esc(unc[k])}" for k in keys) + "</p>")
    inputs = summary.get("bids_meta", {}).get("inputs", [])
    if inputs:
        parts.append("<h3>Inputs</h3>" + table(inputs, ["channel", "file", "reason"]))
    conform_info = summary.get("conform", {}).get("channels", {})
    if conform_info:
        crow = [{"channel": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, list)}}
                for k, v in conform_info.items()]
        cols = ["channel", "method", "translation_mm", "max_rotation_deg", "gradient_correlation"]
        parts.append(table(crow, cols))
    bm = summary.get("brain_mask", {})
    if bm:
        parts.append(f"<p class='small'>Brain mask: {esc(bm.get('method'))}; "
                     f"{esc(bm.get('brain_volume_litres'))} L ({esc(bm.get('skull_strip_reason'))}).</p>")

    # images (RAS+)
    images, zooms = {}, (1.0, 1.0, 1.0)
    for f in find_outputs(anat, "preproc"):
        data, zooms = _load(f, zooms=True)
        images[f.name.split("_")[-1].replace(".nii.gz", "")] = data.astype(np.float32)
    classes = _load(output_path(anat, prefix, "class_dseg"))
    instances = _load(output_path(anat, prefix, "instance_dseg"))
    instances = instances.astype(np.int32) if instances is not None else None
    brain = _load(output_path(anat, prefix, "brain_mask"))
    brain = brain > 0 if brain is not None else None
    class_names = {}
    lut = sidecar_path(output_path(anat, prefix, "class_dseg"), ".tsv")
    if lut.is_file():
        t = pd.read_csv(lut, sep="\t")
        class_names = {int(r["index"]): str(r["abbreviation"]) for _, r in t.iterrows()}
    table_path = output_path(anat, prefix, "lesion_table")
    lesion_table = pd.read_csv(table_path, sep="\t", na_values=["n/a"], keep_default_na=False) \
        if table_path.is_file() else None
    label_colours: dict[int, str] = {}
    if images and classes is not None:
        background = images.get("FLAIR", next(iter(images.values())))
        parts.append("<h3>Lesions</h3>")
        figure_parts, cuts, label_colours = _lesion_figure(anat, prefix, output_dir, images, zooms, classes,
                                                           instances, brain, class_names, lesion_table, summary)
        parts.extend(figure_parts)
        slices = cuts["axial"]
        probs = [_load(p) for p in find_outputs(anat, "probseg")]
        if probs:
            lesion_prob = np.sum([p.astype(np.float32) for p in probs], axis=0)
            threshold = summary.get("parameters", {}).get("Threshold")
            uri = figures.overlay_mosaic(background, lesion_prob, slices,
                                         f"ensemble lesion probability (threshold {format_value(threshold)})",
                                         vmin=0, vmax=1, threshold=0.05, brain=brain, zooms=zooms)
            parts.append(f"<img alt='probability' src='{uri}'>")
        for measure in ("mi", "eoe"):
            path = output_path(anat, prefix, "voxel_uncertainty", desc=measure)
            if path.is_file():
                u = _load(path).astype(np.float32)
                label = {"mi": "mutual information (epistemic)", "eoe": "entropy of the expected (total)"}[measure]
                uri = figures.overlay_mosaic(background, u, slices, f"voxel uncertainty: {label} (nat)",
                                             cmap="viridis", brain=brain, zooms=zooms)
                parts.append(f"<img alt='uncertainty' src='{uri}'>")
                break
    if lesion_table is not None and instances is not None:
        if len(lesion_table) and "LSU" in lesion_table.columns and images:
            parts.extend(_uncertain_lesions(anat, prefix, lesion_table, images, instances, zooms, summary,
                                            label_colours))
        cols = [c for c in TABLE_COLUMNS if c in lesion_table.columns]
        parts.append(f"<h3>Lesion table ({len(lesion_table)} lesions; full table: "
                     f"<code>{esc(table_path.name)}</code>)</h3>")
        parts.append(table(lesion_table[cols].to_dict(orient="records"), cols))
    evaluation = summary.get("evaluation")
    if evaluation:
        keys = [k for k in ("all/F1", "all/precision", "all/recall", "all/DSC", "all/nDSC", "all/TPL", "all/FPL",
                            "all/USL", "all/FNL", "all/ECE") if k in evaluation]
        parts.append("<h3>Evaluation against the reference masks</h3>")
        parts.append(table([{k: evaluation[k] for k in keys}], keys, {k: k.split("/", 1)[1] for k in keys}))
        parts.append(f"<p class='small'>Detection: {esc(evaluation.get('method'))}, IoU threshold "
                     f"{esc(evaluation.get('detection_threshold'))}, connectivity "
                     f"{esc(evaluation.get('connectivity'))}. TPL: true positive, FPL: false positive, "
                     "USL: under-segmented, FNL: missed reference lesions.</p>")
    return "\n".join(parts), summary


def _uncertain_lesions(anat: Path, prefix: str, lesion_table, images: dict, instances: np.ndarray, zooms,
                       summary: dict, label_colours: dict[int, str]) -> list[str]:
    from bids_app.reports import figures, selection

    voxel_mm3 = float(np.prod(zooms))
    min_voxels = summary.get("parameters", {}).get("MinLesionSizeVoxels") or 0
    floor = max(selection.MIN_CROP_VOLUME_MM3, float(min_voxels) * voxel_mm3)
    top = selection.choose_uncertain_lesions(lesion_table, N_UNCERTAIN_LESIONS, floor)
    small = int((lesion_table["volume_mm3"].astype(float) < floor).sum())
    head = (f"<h3>The {len(top)} most uncertain lesions (LSU) of at least {floor:.0f} mm³</h3>"
            f"<p class='small'>{small} smaller lesion(s) left out: at this size the score mostly measures where "
            "the threshold cut the edge. Outline colours as in the lesion figure; axial slice through the "
            "lesion's largest cross-section.</p>")
    if not len(top):
        return [head, "<p>No lesion reaches the size floor.</p>"]
    overlays = {}
    for f in find_outputs(anat, "saliency")[:2]:
        overlays[f.name.split("desc-")[1].split("_")[0]] = _load(f).astype(np.float32)
    rows = []
    for _, r in top.iterrows():
        extra = [str(r["class"]) if "class" in r and isinstance(r["class"], str) else ""]
        if "lesion_type" in r and isinstance(r["lesion_type"], str):
            extra.append(r["lesion_type"])
        rows.append((int(r["label"]), selection.crop_title(int(r["label"]), float(r["volume_mm3"]), "LSU",
                                                          float(r["LSU"]), extra)))
    ordered = dict(sorted(images.items(), key=lambda item: item[0] != "FLAIR"))  # FLAIR first (shown bare too)
    uri = figures.lesion_crops(ordered, instances, rows, overlays, zooms=zooms, colours=label_colours)
    listing = "".join(f"<li>{esc(title)}</li>" for _, title in rows)
    return [head, f"<img alt='the most uncertain lesions: {esc('; '.join(t for _, t in rows))}' src='{uri}'>",
            f"<ol class='small'>{listing}</ol>"]


def _flatten(params: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key} / "))
        else:
            out[f"{prefix}{key}"] = value
    return out


def provenance_section(provenance: dict) -> str:
    """The provenance: model, parameters and software as name/value tables that wrap."""
    if not provenance:
        return ""
    model = provenance.get("Model", {})
    members = ", ".join(f"fold {m.get('Fold')} (sha256 {str(m.get('SHA256', ''))[:12]}…)"
                        for m in model.get("Members", []))
    model_rows = {"Model": model.get("Id"), "Name": model.get("Name"), "Demo model": model.get("Demo"),
                  "Members": members or None}
    parts = ["<h2>Provenance</h2>",
             key_value_table({k: v for k, v in model_rows.items() if v is not None or k != "Demo model"}, "Model"),
             key_value_table(_flatten(provenance.get("Parameters", {})), "Parameters"),
             key_value_table(provenance.get("Software", {}), "Software")]
    return "".join(parts)


def build_participant_report(output_dir: Path, participant: str) -> Path | None:
    """Write ``OUTPUT_DIR/<participant>.html``; returns its path (None without outputs)."""
    from bids_app import __version__
    from bids_app.bids.derivatives import atomic_write_text

    output_dir = Path(output_dir)
    sections, summaries = [], []
    for anat in _session_dirs(output_dir, participant):
        try:
            section, summary = session_section(anat, output_dir)
        except Exception as exc:  # noqa: BLE001 - a broken figure must not lose the report
            LOGGER.warning("report section %s failed: %s", anat, exc)
            section, summary = f"<div class='warn'>This section could not be drawn: {esc(str(exc))}</div>", {}
        if section:
            sections.append(section)
            summaries.append(summary)
    errors = []
    for err in sorted((output_dir / participant / "log").glob("*/*_error.json")):
        data = json.loads(err.read_text())
        errors.append(f"<div class='warn'><b>{esc(data.get('session'))}</b> failed (exit code "
                      f"{esc(data.get('exit_code'))}): {esc(data.get('message'))}</div>")
    if not sections and not errors:
        return None
    provenance = summaries[0].get("provenance", {}) if summaries else {}
    model = provenance.get("Model", {})
    demo = ("<div class='demo'><b>Demo model.</b> These lesion maps come from a model trained on synthetic "
            "data only; they are not clinically validated.</div>") if model.get("Demo") else ""
    body = "\n".join([f"<h1>msxplain report: {esc(participant)}</h1>",
                      f"<p class='small'>msxplain {esc(__version__)}</p>", demo, *errors, *sections,
                      provenance_section(provenance)])
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(participant)} - msxplain"
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
