"""The HTML reports: three-plane lesion figures, TP/FP/missed colouring, uncertain-lesion crops,
provenance formatting, small-sample group plots and the MNI frequency figure.

Small synthetic arrays and a hand-made output folder: no pipeline run.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app.reports import figures, plots, selection
from bids_app.reports.html import MISSING, format_value

SHAPE = (48, 56, 40)


def png(uri: str):
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def brain_volume(shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    r = sum(((g - c) / (0.45 * s)) ** 2 for g, c, s in zip(grid, centre, shape))
    brain = r <= 1
    image = np.where(brain, 100 + 5 * rng.standard_normal(shape), 0).astype(np.float32)
    return image, brain


def cube(shape, corner, size):
    out = np.zeros(shape, bool)
    x, y, z = corner
    out[x:x + size, y:y + size, z:z + size] = True
    return out


# ------------------------------------------------------------------ formatting
def test_format_value_writes_values_as_a_person_does():
    assert format_value(["0", "1", "2"]) == "0, 1, 2"
    assert format_value(None) == MISSING
    assert format_value(float("nan")) == MISSING
    assert format_value(True) == "yes" and format_value(np.bool_(False)) == "no"
    assert format_value(0.123456789) == "0.1235"
    assert format_value(2.0) == "2"
    assert format_value(np.float32(0.5)) == "0.5"
    assert format_value({"a": [1, 2], "b": None}) == "a: 1, 2; b: \u2014"


# ------------------------------------------------------------------ participant numerics
def test_choose_cuts_go_through_the_lesions_in_each_plane():
    _, brain = brain_volume()
    lesion = cube(SHAPE, (30, 20, 25), 3)
    cuts = selection.choose_cuts(lesion, 3, brain)
    assert set(cuts) == {"axial", "coronal", "sagittal"}
    assert any(25 <= z <= 27 for z in cuts["axial"])
    assert any(20 <= y <= 22 for y in cuts["coronal"])
    assert any(30 <= x <= 32 for x in cuts["sagittal"])
    assert all(len(v) == 3 for v in cuts.values())
    empty = selection.choose_cuts(np.zeros(SHAPE, bool), 3, brain)
    assert all(len(v) == 3 and len(set(v)) == 3 for v in empty.values())


def test_three_plane_figure_shows_a_3mm_lesion_in_each_plane():
    from scipy import ndimage

    image, brain = brain_volume()
    lesion = cube(SHAPE, (30, 20, 25), 3)  # 3 mm at 1 mm voxels
    image[lesion] = 180
    cuts = selection.choose_cuts(lesion, 3, brain)
    fig = figures.three_plane_fig(image, lesion.astype(np.uint8), cuts, {1: ("#00ff00", "lesion")}, brain=brain)
    labels = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_text().split(" ")[0] in selection.PLANES]
    assert {label.split(" ")[0] for label in labels} == {"axial", "coronal", "sagittal"}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lesion"]  # a swatch legend, no hex code
    picture = png(figures.to_data_uri(fig, dpi=100))
    assert picture.width >= 1200  # three panels of ~440 px
    pixels = np.asarray(picture).astype(int)
    green = (pixels[..., 1] > 200) & (pixels[..., 0] < 80) & (pixels[..., 2] < 80)
    blobs, _ = ndimage.label(ndimage.binary_dilation(green, iterations=2))
    sizes = [max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in ndimage.find_objects(blobs)]
    big = [s for s in sizes if s >= 8]  # the outline of a 3 mm lesion spans >= 8 screen pixels
    assert len(big) >= 3 + 1, sizes  # one outline per plane (plus the legend swatch)


def test_evaluation_categories_and_missed_reference_lesions():
    instances = np.zeros(SHAPE, np.int32)
    instances[cube(SHAPE, (10, 10, 10), 4)] = 1
    instances[cube(SHAPE, (30, 30, 20), 3)] = 2
    reference = cube(SHAPE, (11, 11, 11), 4) | cube(SHAPE, (20, 40, 30), 3)
    missed = selection.missed_reference_lesions(instances, reference)
    assert missed.sum() == 27 and missed[21, 41, 31] and not missed[12, 12, 12]
    cat = selection.evaluation_categories(instances, {1: "TPL", 2: "FPL"}, missed)
    codes = {k: i for i, k in enumerate(selection.EVAL_CATEGORIES, start=1)}
    assert cat[11, 11, 11] == codes["TP"] and cat[31, 31, 21] == codes["FP"] and cat[21, 41, 31] == codes["FN"]
    assert len({selection.EVAL_CATEGORIES[k][0] for k in ("TP", "FP", "FN")}) == 3


def test_uncertain_lesions_are_chosen_above_the_size_floor():
    table = pd.DataFrame({"label": [1, 2, 3, 4], "volume_mm3": [2.0, 64.0, 9.0, 27.0], "LSU": [0.9, 0.2, 0.8, 0.5]})
    top = selection.choose_uncertain_lesions(table, 5, 10.0)
    assert top["label"].tolist() == [4, 2]
    assert selection.choose_uncertain_lesions(table, 1, 0.0)["label"].tolist() == [1]
    title = selection.crop_title(4, 27.0, "LSU", 0.5)
    assert title == "lesion #4 \u00b7 27 mm\u00b3 \u00b7 LSU 0.5"


# ------------------------------------------------------------------ a hand-made participant output
def _save(path: Path, data, dtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype or np.asarray(data).dtype), np.eye(4)), str(path))


@pytest.fixture(scope="module")
def participant_output(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    bids, out = root / "bids", root / "out"
    anat = out / "sub-01" / "anat"
    image, brain = brain_volume()
    instances = np.zeros(SHAPE, np.int16)
    instances[cube(SHAPE, (14, 16, 14), 4)] = 1      # 64 mm3, TPL
    instances[cube(SHAPE, (30, 34, 22), 3)] = 2      # 27 mm3, FPL
    instances[20, 40, 10] = instances[21, 40, 10] = 3  # 2 mm3 speck, USL, the most uncertain
    reference = cube(SHAPE, (15, 17, 15), 4) | cube(SHAPE, (26, 20, 26), 3)  # the second is missed
    reference[20, 40, 10] = reference[20, 41, 10] = reference[20, 42, 10] = True
    image[instances > 0] = 170
    _save(anat / "sub-01_desc-preproc_FLAIR.nii.gz", image)
    _save(anat / "sub-01_desc-preproc_T1w.nii.gz", 200 - image * brain)
    _save(anat / "sub-01_desc-brain_mask.nii.gz", brain, np.uint8)
    _save(anat / "sub-01_desc-instances_dseg.nii.gz", instances)
    _save(anat / "sub-01_desc-lesions_dseg.nii.gz", (instances > 0).astype(np.uint8))
    (anat / "sub-01_desc-lesions_dseg.tsv").write_text("index\tname\tabbreviation\n1\twhite matter lesion\tWML\n")
    pd.DataFrame({"label": [1, 2, 3], "class": ["WML"] * 3, "volume_mm3": [64.0, 27.0, 2.0],
                  "LSU": [0.31, 0.47, 0.93], "lesion_type": ["TPL", "FPL", "USL"]}).to_csv(
        anat / "sub-01_lesions.tsv", sep="\t", index=False)
    _save(bids / "derivatives" / "truth" / "sub-01" / "anat" / "sub-01_desc-lesion_mask.nii.gz", reference, np.uint8)
    (anat / "sub-01_desc-evaluation_metrics.json").write_text(
        json.dumps({"metrics": {}, "reference_files": ["sub-01_desc-lesion_mask.nii.gz"]}))
    (out / "dataset_description.json").write_text(json.dumps({"Name": "x", "DatasetLinks": {"raw": bids.as_uri()}}))
    provenance = {"Model": {"Id": "demo", "Name": "demo model", "Demo": True,
                            "Members": [{"Fold": "0", "SHA256": "ab" * 32}]},
                  "Parameters": {"Members": ["0", "1", "2"], "MemberThresholds": None, "TestTimeAugmentation": False,
                                 "Threshold": 0.5, "Explanations": {"Refiner": None, "SmoothGradNoiseLevel": 0.1}},
                  "Software": {"nnunetv2": "2.6.2", "torch": "2.9.0"}}
    summary = {"participant_id": "sub-01", "session_id": None, "qc_flags": [],
               "lesions": {"n_lesions": 3, "total_volume_mm3": 93.0,
                           "per_class": {"WML": {"n_lesions": 3, "volume_mm3": 93.0}}},
               "uncertainty": {"PSU": 0.2}, "parameters": {"Connectivity": 18, "MinLesionSizeVoxels": 3,
                                                             "Threshold": 0.5},
               "evaluation": {"all/F1": 0.4, "all/TPL": 1, "all/FPL": 1, "all/USL": 1, "all/FNL": 1,
                              "method": "iou_adj", "detection_threshold": 0.1, "connectivity": 18},
               "provenance": provenance}
    (anat / "sub-01_summary.json").write_text(json.dumps(summary))
    from bids_app.reports.participant import build_participant_report

    page = build_participant_report(out, "sub-01")
    return {"page": page, "html": page.read_text(), "out": out}


def visible_text(page: str) -> str:
    page = re.sub(r"<img[^>]*>", "", page)
    page = re.sub(r"<style>.*?</style>", "", page, flags=re.DOTALL)
    return re.sub(r"<[^>]+>", " ", page)


def test_participant_report_colours_tp_fp_missed_with_a_swatch_legend(participant_output):
    page = participant_output["html"]
    assert "lesions in three planes (axial, coronal, sagittal)" in page
    assert page.count("class='swatch'") >= 3
    text = visible_text(page)
    for label in ("true positive", "false positive", "missed"):
        assert label in text
    assert not re.search(r"#[0-9a-fA-F]{6}", text), "a hex colour code is printed"
    assert "Missed lesions are not outlined" not in page  # the reference mask was found


def test_uncertain_lesion_crops_are_titled_and_above_the_size_floor(participant_output):
    page = participant_output["html"]
    titles = re.findall(r"<li>(lesion #\d+[^<]*)</li>", page)
    assert titles[0].startswith("lesion #2 \u00b7 27 mm\u00b3 \u00b7 LSU 0.47")
    assert titles[1].startswith("lesion #1 \u00b7 64 mm\u00b3 \u00b7 LSU 0.31")
    assert not any(t.startswith("lesion #3 ") for t in titles)  # the 2 mm3 speck, although most uncertain
    assert "of at least 10 mm\u00b3" in page


def test_provenance_tables_show_no_python_reprs(participant_output):
    page = participant_output["html"]
    text = visible_text(page)
    assert "['" not in page and "None" not in text and "True" not in text and "False" not in text
    assert "0, 1, 2" in text and "Explanations / SmoothGradNoiseLevel" in text
    assert "table-layout" in page and "overflow-wrap" in page


def test_report_without_references_colours_classes(participant_output, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(participant_output["out"], out)
    anat = out / "sub-01" / "anat"
    (anat / "sub-01_desc-evaluation_metrics.json").unlink()
    table = pd.read_csv(anat / "sub-01_lesions.tsv", sep="\t").drop(columns="lesion_type")
    table.to_csv(anat / "sub-01_lesions.tsv", sep="\t", index=False)
    summary = json.loads((anat / "sub-01_summary.json").read_text())
    summary.pop("evaluation")
    (anat / "sub-01_summary.json").write_text(json.dumps(summary))
    from bids_app.reports.participant import build_participant_report

    text = visible_text(build_participant_report(out, "sub-01").read_text())
    assert "WML" in text and "true positive" not in text


# ------------------------------------------------------------------ group
def test_small_groups_are_strip_plots():
    small = {"site-A": np.array([3.0]), "site-B": np.array([5.0, 7.0])}
    assert plots.plot_kind(small) == "strip"
    assert plots.plot_kind({"a": np.arange(12.0), "b": np.arange(15.0)}) == "box"
    fig = plots.values_fig(small, "lesions", "n")
    ax = fig.axes[0]
    assert not ax.lines  # no box, whisker or cap (a box plot draws them as lines)
    assert plots.values_fig({"a": np.arange(12.0)}, "t", "y").axes[0].lines  # ... and the control does
    points = sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))
    assert points >= 3  # every session a point
    assert [t.get_text() for t in ax.get_xticklabels()] == ["site-A\nn = 1", "site-B\nn = 2"]


def test_retention_curves_are_told_apart():
    x = np.linspace(0, 1, 11)
    assert plots.split_series(["PSU / DSC", "PSU / F1", "LSU / DSC"]) == {"DSC": ["PSU / DSC", "LSU / DSC"],
                                                                            "F1": ["PSU / F1"]}
    fig = plots.curves_fig({"PSU / DSC": (x, x), "PSU / F1": (x, x), "avg_LSU / DSC": (x, x),
                              "avg_MI / DSC": (x, x)}, "t", "x", "y", caveat="n < 10: descriptive only (2 subjects)")
    panels = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title() for ax in panels] == ["DSC", "F1"]
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in panels[0].lines}
    assert len(styles) == 3  # three measures, three looks, even where the curves coincide
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["1: PSU", "2: avg_LSU", "3: avg_MI"]
    ends = sorted(t.get_text() for t in panels[0].texts if t.get_text().isdigit())
    assert ends == ["1", "2", "3"]  # each line's end is numbered
    positions = [t.get_position()[1] for t in panels[0].texts if t.get_text().isdigit()]
    assert len(set(np.round(positions, 6))) == 3  # ... and the labels do not sit on each other
    assert any("descriptive only" in t.get_text() for t in panels[0].texts)


def _group_result(n_subjects: int):
    sessions = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(n_subjects)], "session_id": "n/a",
                             "site": ["A", "B"] * (n_subjects // 2), "n_lesions": np.arange(n_subjects),
                             "total_volume_mm3": np.arange(n_subjects) * 10.0, "qc_flags": "none"})
    curve = SimpleNamespace(fracs=np.linspace(0, 1, 5), values=np.linspace(0.5, 1, 5))
    regression = {"importance": [{"feature": "volume_mm3", "mean": 0.3, "sd": 0.1}],
                  "summary": {"model": "ElasticNet", "cv_r2_mean": 0.1, "cv_r2_sd": 0.05, "n_repeats": 5},
                  "n_lesions": 40}
    return SimpleNamespace(sessions=sessions, lesions=pd.DataFrame(), notes=[],
                           retention_curves={("PSU", "DSC"): curve}, retention=None, detection=None,
                           regression=regression, icc=None, summary=pd.DataFrame(columns=["variable"]))


def test_group_report_caveat_strip_plots_and_frequency_map(tmp_path):
    from bids_app.bids.templates import template_file
    from bids_app.reports.group import FREQUENCY_MAP, small_sample_caveat, write_group_report

    assert small_sample_caveat(2, 2).startswith("n < 10: descriptive only")
    assert small_sample_caveat(12, 20) is None
    template = nib.load(str(template_file(resolution=2, suffix="T1w")))
    freq = np.zeros(template.shape, np.float32)
    freq[40:44, 60:64, 50:53] = 0.5
    (tmp_path / "group").mkdir()
    nib.save(nib.Nifti1Image(freq, template.affine), str(tmp_path / "group" / FREQUENCY_MAP))
    page = write_group_report(tmp_path, _group_result(2)).read_text()
    text = visible_text(page)
    assert text.count("n &lt; 10: descriptive only") >= 3  # top, retention curves, regression
    assert "lesion frequency map in three planes" in page and "Lesion frequency in MNI space" in text
    assert "over the template's T1w image" in text
    page_big = write_group_report(tmp_path, _group_result(12)).read_text()
    assert "descriptive only" not in page_big


def test_frequency_figure_without_template_uses_projections():
    freq = np.zeros((20, 24, 18), np.float32)
    freq[5:8, 10:12, 9] = 1.0
    picture = png(figures.frequency_figure(freq, None, (2, 2, 2), 3))
    pixels = np.asarray(picture).astype(int)
    assert ((pixels[..., 0] > 200) & (pixels[..., 2] < 100)).sum() > 50  # the hot colour map is drawn


def test_reports_render_offline_in_headless_chromium(participant_output, tmp_path):
    from chromium import is_blank, render

    shot, requests = render(participant_output["page"], width=1400, height=1600)
    assert requests == [] and not is_blank(shot)
    group = write_group(tmp_path)
    shot, requests = render(group, width=1400, height=1600)
    assert requests == [] and not is_blank(shot)


def write_group(tmp_path: Path) -> Path:
    from bids_app.reports.group import write_group_report

    return write_group_report(tmp_path, _group_result(2))


def test_three_plane_figure_without_lesions_shows_evenly_spaced_slices():
    image, brain = brain_volume()
    cuts = selection.choose_cuts(np.zeros(SHAPE, bool), 3, brain)
    fig = figures.three_plane_fig(image, np.zeros(SHAPE, np.uint8), cuts, {1: ("#ffd700", "WML")}, brain=brain)
    assert not fig.legends  # nothing outlined, no legend entry
    assert sum(1 for ax in fig.axes if ax.images) == 9
