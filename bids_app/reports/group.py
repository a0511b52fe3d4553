"""The group HTML report (``OUTPUT_DIR/group/group_report.html``), from a :class:`~bids_app.app.group.GroupResult`.

Small cohorts are shown as they are: per-site values as strip plots (every session a point)
when a site has fewer than :data:`SMALL_N` sessions, and a visible "descriptive only" caveat
on the curves and the regression when the cohort has fewer than :data:`SMALL_N` subjects or
sessions. The MNI lesion-frequency map the group level wrote is drawn over the template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_app.reports.html import STYLE, esc, table

#: below this many subjects (or sessions), statistics are descriptive only
SMALL_N = 10
FREQUENCY_MAP = "group_space-MNI152NLin2009cAsym_desc-lesionfrequency_probseg.nii.gz"


def _by_site(sessions, column: str) -> dict[str, np.ndarray]:
    if "site" in sessions.columns:
        return {str(site): sub[column].to_numpy(dtype=float) for site, sub in sessions.groupby("site", sort=True)}
    return {"all": sessions[column].to_numpy(dtype=float)}


def small_sample_caveat(n_subjects: int, n_sessions: int, small_n: int = SMALL_N) -> str | None:
    """``n < 10: descriptive only`` text when the cohort is small, else None."""
    n = min(n_subjects, n_sessions)
    if n >= small_n:
        return None
    return (f"n < {small_n}: descriptive only ({n_subjects} subject{'s' if n_subjects != 1 else ''}, "
            f"{n_sessions} session{'s' if n_sessions != 1 else ''})")


def _caveat_html(caveat: str | None) -> str:
    return f"<p class='caveat'>{esc(caveat)}. No inference: read these as a description of this cohort.</p>" \
        if caveat else ""


def frequency_section(output_dir: Path, n_sessions: int) -> str:
    """The lesion-frequency map over the MNI template (else over its own projections), or ''."""
    import nibabel as nib

    from bids_app.reports import figures

    path = Path(output_dir) / "group" / FREQUENCY_MAP
    if not path.is_file():
        return ""
    img = nib.as_closest_canonical(nib.load(str(path)))
    frequency = np.asarray(img.dataobj, dtype=np.float32)
    template = None
    try:  # the cached template only: drawing a report never downloads anything
        from bids_app.bids.templates import local_template_file

        cached = local_template_file(resolution=2, suffix="T1w")
        timg = nib.as_closest_canonical(nib.load(str(cached))) if cached is not None else None
        if timg is not None and timg.shape[:3] == frequency.shape[:3]:
            template = np.asarray(timg.dataobj, dtype=np.float32)
    except Exception:  # noqa: BLE001 - the map is still shown (as projections) without the template
        template = None
    uri = figures.frequency_figure(frequency, template, img.header.get_zooms()[:3], n_sessions)
    shown = ("slices through the most lesion frequency, over the template's T1w image" if template is not None
             else "maximum projections (the template's T1w image is not in the TemplateFlow cache)")
    return ("<h2>Lesion frequency in MNI space</h2>"
            f"<img alt='lesion frequency map in three planes' src='{uri}'>"
            f"<p class='small'>Fraction of sessions with a lesion at each voxel of MNI152NLin2009cAsym (2 mm): "
            f"{shown}; file <code>{esc(path.name)}</code>.</p>")


def write_group_report(output_dir: Path, result) -> Path:
    from bids_app import __version__
    from bids_app.bids.derivatives import atomic_write_text
    from bids_app.reports import plots

    sessions, lesions = result.sessions, result.lesions
    n_sessions = len(sessions)
    n_subjects = sessions["participant_id"].nunique() if "participant_id" in sessions.columns else n_sessions
    caveat = small_sample_caveat(n_subjects, n_sessions)
    parts = [(f"<h1>msxplain group report</h1><p class='small'>msxplain {esc(__version__)}; "
              f"{n_subjects} subject(s), {n_sessions} session(s), {len(lesions)} lesion(s).</p>")]
    if caveat:
        parts.append(_caveat_html(caveat))
    for note in result.notes:
        parts.append(f"<div class='warn'>{esc(note)}</div>")
    flagged = sessions[sessions.get("qc_flags", "none") != "none"] if "qc_flags" in sessions.columns else []
    if len(flagged):
        parts.append("<h2>Sessions with QC warnings</h2>" + table(
            flagged[["participant_id", "session_id", "qc_flags"]].to_dict(orient="records"),
            ["participant_id", "session_id", "qc_flags"]))
    parts.append("<h2>Lesion counts and volumes</h2>")
    if "n_lesions" in sessions.columns:
        uri = plots.values_plot(_by_site(sessions, "n_lesions"), "lesions per session", "lesions", SMALL_N)
        parts.append(f"<img alt='counts' src='{uri}'>")
    if "total_volume_mm3" in sessions.columns:
        uri = plots.values_plot(_by_site(sessions, "total_volume_mm3"), "lesion volume per session", "mm³",
                                  SMALL_N)
        parts.append(f"<img alt='volumes' src='{uri}'>")
    parts.append(frequency_section(output_dir, n_sessions))
    if len(lesions) and {"volume_mm3", "LSU"} <= set(lesions.columns):
        groups = lesions["location_class"].fillna("unknown").to_numpy() if "location_class" in lesions.columns \
            else lesions.get("class", None)
        groups = groups.to_numpy() if hasattr(groups, "to_numpy") else groups
        parts.append("<h2>Lesion uncertainty</h2>")
        uri = plots.scatter(lesions["volume_mm3"].to_numpy(float), lesions["LSU"].to_numpy(float), groups,
                              "lesion uncertainty (LSU) vs size", "volume (mm³)", "LSU", logx=True)
        parts.append(f"<img alt='uncertainty vs size' src='{uri}'>")
    if result.retention_curves:
        items = list(result.retention_curves.items())[:12]
        keys = [[str(k) for k in (key if isinstance(key, tuple) else (key,))] for key, _ in items]
        shared = 0  # leading name parts common to every curve (e.g. "all / all") say nothing
        while keys and len(keys[0]) - shared > 1 and all(len(k) > shared + 1 and k[shared] == keys[0][shared]
                                                          for k in keys):
            shared += 1
        series = {" / ".join(k[shared:]): (np.asarray(c.fracs), np.asarray(c.values)) for k, (_, c) in zip(keys, items)}
        parts.append("<h2>Patient-scale retention curves</h2>")
        parts.append(_caveat_html(caveat))
        uri = plots.curves(series, "metric when the most uncertain patients are replaced by perfect scores",
                             "retained fraction", "mean metric", caveat=caveat)
        parts.append(f"<img alt='retention curves' src='{uri}'>")
        parts.append("<p class='small'>One panel per metric, one numbered line per uncertainty measure; lines that "
                     "coincide rank the patients alike.</p>")
    if result.retention is not None:
        parts.append(table(result.retention.to_dict(orient="records"), list(result.retention.columns)))
    if result.detection is not None:
        det = result.detection
        parts.append("<h2>Lesion detection (pooled counts)</h2>")
        parts.append(table(det.to_dict(orient="records"), list(det.columns)))
        sites = det[det["group_by"] == "site"] if "group_by" in det.columns else det.iloc[0:0]
        if len(sites) and "F1" in sites.columns:
            uri = plots.coefficients([str(g) for g in sites["group"]], sites["F1"].to_numpy(float), None,
                                       "pooled lesion F1 per site")
            parts.append(f"<img alt='per-site F1' src='{uri}'>")
    if result.regression is not None:
        imp = result.regression["importance"]
        names = [r["feature"] for r in imp]
        parts.append("<h2>What explains lesion uncertainty</h2>")
        parts.append(_caveat_html(caveat))
        summary = result.regression["summary"]
        parts.append(f"<p>{esc(summary.get('model'))}: cross-validated R² = {esc(summary.get('cv_r2_mean'))} "
                     f"± {esc(summary.get('cv_r2_sd'))} over {esc(summary.get('n_repeats'))} repeats, "
                     f"{esc(result.regression['n_lesions'])} lesions from {n_subjects} subject(s).</p>")
        uri = plots.coefficients(names, [r["mean"] for r in imp], [r["sd"] for r in imp],
                                   "standardised coefficients (target: LSU)", caveat=caveat)
        parts.append(f"<img alt='coefficients' src='{uri}'>")
    if result.icc is not None:
        parts.append("<h2>Stability across sessions: ICC(3,1)</h2>")
        parts.append(_caveat_html(caveat))
        parts.append(table(result.icc.to_dict(orient="records"), list(result.icc.columns)))
    summary_table = result.summary
    if len(summary_table):
        keep = summary_table[summary_table["variable"].isin(["n_lesions", "total_volume_mm3", "unc_PSU",
                                                             "eval_all_F1", "eval_all_DSC"])]
        parts.append("<h2>Summary (mean, bootstrap 95% CI)</h2>")
        parts.append(table(keep.to_dict(orient="records"), list(keep.columns)))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>msxplain group report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = Path(output_dir) / "group" / "group_report.html"
    atomic_write_text(path, page)
    return path
