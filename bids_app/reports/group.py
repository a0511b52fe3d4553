"""The group HTML report (``OUTPUT_DIR/group/group_report.html``), from a :class:`~bids_app.group.GroupResult`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .participant import STYLE, _esc, _table


def _by_site(table, column: str) -> dict[str, np.ndarray]:
    if "site" in table.columns:
        return {str(site): sub[column].to_numpy(dtype=float) for site, sub in table.groupby("site", sort=True)}
    return {"all": table[column].to_numpy(dtype=float)}


def write_group_report(output_dir: Path, result) -> Path:
    from .. import __version__
    from ..derivatives import atomic_write_text
    from . import figures

    sessions, lesions = result.sessions, result.lesions
    parts = [f"<h1>msxplain group report</h1><p class='small'>msxplain {_esc(__version__)}; "
             f"{len(sessions)} session(s), {len(lesions)} lesion(s).</p>"]
    for note in result.notes:
        parts.append(f"<div class='warn'>{_esc(note)}</div>")
    flagged = sessions[sessions.get("qc_flags", "none") != "none"] if "qc_flags" in sessions.columns else []
    if len(flagged):
        parts.append("<h2>Sessions with QC warnings</h2>" + _table(
            flagged[["participant_id", "session_id", "qc_flags"]].to_dict(orient="records"),
            ["participant_id", "session_id", "qc_flags"]))
    parts.append("<h2>Lesion counts and volumes</h2>")
    if "n_lesions" in sessions.columns:
        parts.append(f"<img alt='counts' src='{figures.bar_or_box(_by_site(sessions, 'n_lesions'), 'lesions per session', 'lesions')}'>")
    if "total_volume_mm3" in sessions.columns:
        parts.append(f"<img alt='volumes' src='{figures.bar_or_box(_by_site(sessions, 'total_volume_mm3'), 'lesion volume per session', 'mm^3')}'>")
    if len(lesions) and {"volume_mm3", "LSU"} <= set(lesions.columns):
        groups = lesions["location_class"].fillna("unknown").to_numpy() if "location_class" in lesions.columns \
            else lesions.get("class", None)
        groups = groups.to_numpy() if hasattr(groups, "to_numpy") else groups
        parts.append("<h2>Lesion uncertainty</h2>")
        parts.append(f"<img alt='uncertainty vs size' src='"
                     f"{figures.scatter(lesions['volume_mm3'].to_numpy(float), lesions['LSU'].to_numpy(float), groups, 'lesion uncertainty (LSU) vs size', 'volume (mm^3)', 'LSU', logx=True)}'>")
    if result.retention_curves:
        series = {}
        for key, curve in list(result.retention_curves.items())[:6]:
            name = " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            series[name] = (np.asarray(curve.fracs), np.asarray(curve.values))
        parts.append("<h2>Patient-scale retention curves</h2>")
        parts.append(f"<img alt='retention' src='{figures.curves(series, 'metric when the most uncertain patients are replaced by perfect scores', 'retained fraction', 'mean metric')}'>")
    if result.retention is not None:
        parts.append(_table(result.retention.to_dict(orient="records"), list(result.retention.columns)))
    if result.detection is not None:
        det = result.detection
        parts.append("<h2>Lesion detection (pooled counts)</h2>")
        parts.append(_table(det.to_dict(orient="records"), list(det.columns)))
        sites = det[det["group_by"] == "site"] if "group_by" in det.columns else det.iloc[0:0]
        if len(sites) and "F1" in sites.columns:
            parts.append(f"<img alt='per-site F1' src='{figures.coefficients([str(g) for g in sites['group']], sites['F1'].to_numpy(float), None, 'pooled lesion F1 per site')}'>")
    if result.regression is not None:
        imp = result.regression["importance"]
        names = [r["feature"] for r in imp]
        parts.append("<h2>What explains lesion uncertainty</h2>")
        summary = result.regression["summary"]
        parts.append(f"<p>{_esc(summary.get('model'))}: cross-validated R^2 = {_esc(summary.get('cv_r2_mean'))} "
                     f"+/- {_esc(summary.get('cv_r2_sd'))} over {_esc(summary.get('n_repeats'))} repeats, "
                     f"{_esc(result.regression['n_lesions'])} lesions.</p>")
        parts.append(f"<img alt='coefficients' src='{figures.coefficients(names, [r['mean'] for r in imp], [r['sd'] for r in imp], 'standardised coefficients (target: LSU)')}'>")
    if result.icc is not None:
        parts.append("<h2>Stability across sessions: ICC(3,1)</h2>")
        parts.append(_table(result.icc.to_dict(orient="records"), list(result.icc.columns)))
    summary_table = result.summary
    if len(summary_table):
        keep = summary_table[summary_table["variable"].isin(["n_lesions", "total_volume_mm3", "unc_PSU",
                                                             "eval_all_F1", "eval_all_DSC"])]
        parts.append("<h2>Summary (mean, bootstrap 95% CI)</h2>")
        parts.append(_table(keep.to_dict(orient="records"), list(keep.columns)))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>msxplain group report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    path = Path(output_dir) / "group" / "group_report.html"
    atomic_write_text(path, page)
    return path
