"""Figures for the HTML reports: matplotlib (headless) from arrays, returned as inline PNG.

Every figure function takes arrays in RAS+ voxel order ``(X, Y, Z)`` (the reports reorient
with ``nibabel.as_closest_canonical`` when they read an image) and returns a ``data:`` URI, so
the reports are single self-contained files (no network, no side files). The numerics
(which slices, which lesions, which colours) are plain functions of arrays, tested on their own.

Display conventions: neurological (the patient's left on the left of the screen, marked L/R
on every panel), anterior up in axial slices, superior up in coronal and sagittal slices,
anterior on the right in sagittal slices; voxel sizes give the aspect ratio.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np

#: colours of the lesion classes (model label index -> colour)
CLASS_COLOURS = {1: "#ffd700", 2: "#ff3df5", 3: "#00ffff"}

#: evaluation categories against the reference masks: key -> (colour, legend label)
EVAL_CATEGORIES = {
    "TP": ("#2bd96b", "true positive"),
    "USL": ("#ffd400", "under-segmented"),
    "FP": ("#ff4b2b", "false positive"),
    "FN": ("#33b6ff", "missed"),
}
#: what each evaluation category means (the report's legend)
EVAL_EXPLANATIONS = {
    "TP": "detected: overlap with a reference lesion at or above the detection threshold",
    "USL": "overlaps a reference lesion, below the detection threshold",
    "FP": "no reference lesion there",
    "FN": "reference lesion that no predicted voxel touches",
}
#: lesion_type values of the lesion table -> evaluation category
LESION_TYPE_CATEGORY = {"TPL": "TP", "USL": "USL", "FPL": "FP"}

#: plane name -> the voxel axis it cuts (RAS+ order)
PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}

#: below this volume a lesion is not shown as an "uncertain lesion" crop (a 10 mm^3 lesion is
#: about 2.7 mm across: smaller specks are mostly threshold noise at the edge of larger ones)
MIN_CROP_VOLUME_MM3 = 10.0


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_data_uri(fig, dpi: int = 80) -> str:
    """The figure as a ``data:image/png;base64`` URI (the figure is closed)."""
    plt = _plt()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor=fig.get_facecolor())
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _robust_limits(image: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    values = image[mask] if mask is not None and mask.any() else image[image != 0]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


# ------------------------------------------------------------------ pure numerics
def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """The 2-D slice of a RAS+ volume as displayed (rows top to bottom, columns left to right).

    Parameters
    ----------
    volume : ndarray, shape (X, Y, Z)
    plane : {'axial', 'coronal', 'sagittal'}
    index : int
        Position along the axis the plane cuts.

    Returns
    -------
    ndarray
        axial: (Y, X) anterior up; coronal: (Z, X) superior up; sagittal: (Z, Y) superior up.
    """
    axis = PLANES[plane]
    return np.rot90(np.take(volume, int(index), axis=axis))


def plane_aspect(plane: str, zooms: Sequence[float]) -> float:
    """``imshow`` aspect (row spacing / column spacing) of a displayed slice."""
    zx, zy, zz = (float(z) for z in zooms[:3])
    return {"axial": zy / zx, "coronal": zz / zx, "sagittal": zz / zy}[plane]


def choose_cuts(mask: np.ndarray, n: int = 3, brain: np.ndarray | None = None, zooms: Sequence[float] = (1, 1, 1),
                min_gap_mm: float = 10.0) -> dict[str, list[int]]:
    """Slices through the lesions, in each plane, showing as many different lesions as possible.

    Greedy, per plane: the slice that cuts the most lesions not yet shown (ties: the most
    lesion voxels), at least ``min_gap_mm`` from the slices already chosen, up to ``n``.
    Lesions are the connected components (26-connectivity) of ``mask``, so a missed reference
    lesion counts as much as a large predicted one. Without lesions (or when fewer than ``n``
    slices hold new lesions), evenly spaced slices through the brain fill up.

    Parameters
    ----------
    mask : ndarray, shape (X, Y, Z)
        Lesion voxels (non-zero), e.g. the prediction and the missed reference lesions.
    n : int
        Slices per plane.
    brain : ndarray of bool, optional
        Brain mask, for the fallback positions.
    zooms : sequence of float
        Voxel sizes (mm).
    min_gap_mm : float
        Minimum distance between two chosen slices of a plane.

    Returns
    -------
    dict
        ``{'axial': [z...], 'coronal': [y...], 'sagittal': [x...]}``, each sorted.
    """
    from scipy import ndimage

    mask = np.asarray(mask) > 0
    labels, n_lesions = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    support = np.asarray(brain) > 0 if brain is not None and np.any(brain) else np.ones(mask.shape, bool)
    coords = np.nonzero(labels)
    values = labels[coords]
    cuts: dict[str, list[int]] = {}
    for plane, axis in PLANES.items():
        others = tuple(a for a in range(3) if a != axis)
        size = mask.shape[axis]
        per_slice = mask.sum(axis=others)
        # which lesions each slice cuts: a (slice, lesion) incidence matrix
        cut = np.zeros((size, n_lesions + 1), bool)
        cut[coords[axis], values] = True
        cut = cut[:, 1:]
        gap = max(1, round(min_gap_mm / float(zooms[axis])))
        chosen: list[int] = []
        shown = np.zeros(n_lesions, bool)
        while len(chosen) < n:
            new = (cut & ~shown).sum(axis=1)
            allowed = np.ones(size, bool)
            for c in chosen:
                allowed[max(c - gap + 1, 0):c + gap] = False
            score = np.where(allowed & (per_slice > 0), new * (mask.size + 1) + per_slice, -1)
            best = int(np.argmax(score))
            if score[best] < 0 or (new[best] == 0 and shown.any() and per_slice[best] == 0):
                break
            chosen.append(best)
            shown |= cut[best]
        if len(chosen) < n:
            inside = np.flatnonzero(support.any(axis=others))
            if inside.size == 0:
                inside = np.arange(size)
            for index in np.linspace(inside[0], inside[-1], n + 2)[1:-1].round().astype(int):
                if len(chosen) < n and all(abs(int(index) - c) >= max(1, gap // 2) for c in chosen):
                    chosen.append(int(index))
        cuts[plane] = sorted(chosen)
    return cuts


def bounding_box(mask: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels (the whole array if empty)."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return tuple(slice(0, s) for s in mask.shape)
    boxes = []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        boxes.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin + 1, mask.shape[axis])))
    return tuple(boxes)


def evaluation_categories(instances: np.ndarray, lesion_types: dict[int, str],
                          missed: np.ndarray | None) -> np.ndarray:
    """A category map for the TP / USL / FP / missed colouring.

    Parameters
    ----------
    instances : ndarray of int, shape (X, Y, Z)
        Predicted lesion labels ``1..n``.
    lesion_types : dict
        Label -> ``lesion_type`` of the lesion table (``TPL``, ``USL``, ``FPL``).
    missed : ndarray of bool, optional
        Voxels of the reference lesions that no predicted voxel overlaps (FN).

    Returns
    -------
    ndarray of uint8
        0 background, then the 1-based position of the category in :data:`EVAL_CATEGORIES`.
        Predicted lesions win where a missed lesion would overlap them (it cannot, by definition).
    """
    codes = {key: i for i, key in enumerate(EVAL_CATEGORIES, start=1)}
    out = np.zeros(np.shape(instances), np.uint8)
    if missed is not None:
        out[np.asarray(missed) > 0] = codes["FN"]
    labels = np.asarray(instances)
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.uint8)
    for label, kind in lesion_types.items():
        category = LESION_TYPE_CATEGORY.get(str(kind))
        if category and 0 < int(label) < lut.size:
            lut[int(label)] = codes[category]
    predicted = labels > 0
    out[predicted] = lut[labels[predicted]]
    return out


def missed_reference_lesions(instances: np.ndarray, reference: np.ndarray, connectivity: int = 18) -> np.ndarray:
    """Voxels of the reference lesions that no predicted lesion voxel overlaps (the FNL of the evaluation).

    Uses :func:`bids_app.core.metrics.evaluation.classify_lesions`, so the missed lesions shown are the
    ones the evaluation counted.
    """
    from bids_app.core.metrics.evaluation import classify_lesions

    reference = np.asarray(reference) > 0
    if not reference.any():
        return np.zeros(reference.shape, bool)
    instances = np.asarray(instances).astype(np.int32)
    # relabel 1..n (classify_lesions wants every label used)
    labels = np.unique(instances[instances > 0])
    lut = np.zeros(int(instances.max(initial=0)) + 1, np.int32)
    lut[labels] = np.arange(1, labels.size + 1)
    types = classify_lesions(None, reference, connectivity=connectivity, pred_instances=lut[instances])
    missed_labels = np.flatnonzero(~np.asarray(types.ref_detected)) + 1
    return np.isin(types.ref_labels, missed_labels) & (types.ref_labels > 0)


def choose_uncertain_lesions(table, n: int = 5, min_volume_mm3: float = MIN_CROP_VOLUME_MM3,
                             score: str = "LSU"):
    """The ``n`` most uncertain lesions among those of at least ``min_volume_mm3``.

    Parameters
    ----------
    table : pandas.DataFrame
        The lesion table (``label``, ``volume_mm3`` and ``score`` columns).
    n : int
    min_volume_mm3 : float
        Size floor; lesions below it are never chosen.
    score : str
        The uncertainty column, highest first (ties: larger lesion first).

    Returns
    -------
    pandas.DataFrame
        At most ``n`` rows, most uncertain first (may be empty).
    """
    if score not in table.columns or "volume_mm3" not in table.columns:
        return table.iloc[0:0]
    usable = table[(table["volume_mm3"].astype(float) >= float(min_volume_mm3)) & table[score].notna()]
    return usable.sort_values([score, "volume_mm3"], ascending=[False, False], kind="stable").head(n)


def crop_title(label: int, volume_mm3: float, score_name: str, score: float, extra: Sequence[str] = ()) -> str:
    """``lesion #12 · 45 mm³ · LSU 0.31`` (plus e.g. the class and the evaluation type)."""
    parts = [f"lesion #{int(label)}", f"{float(volume_mm3):.0f} mm\u00b3", f"{score_name} {float(score):.3g}"]
    return " \u00b7 ".join(parts + [str(e) for e in extra if e])


def jitter(n: int, width: float = 0.18, seed: int = 0) -> np.ndarray:
    """Reproducible horizontal offsets of a strip plot's points."""
    return np.random.default_rng(seed).uniform(-width, width, int(n))


# ------------------------------------------------------------------ participant figures
def _orientation_marks(ax, plane: str) -> None:
    left, right = ("P", "A") if plane == "sagittal" else ("L", "R")
    style = {"color": "#dddddd", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes, "va": "center"}
    ax.text(0.01, 0.5, left, ha="left", **style)
    ax.text(0.99, 0.5, right, ha="right", **style)


def three_plane_figure(background: np.ndarray, categories: np.ndarray, cuts: dict[str, Sequence[int]],
                       legend: dict[int, tuple[str, str]], zooms: Sequence[float] = (1, 1, 1),
                       brain: np.ndarray | None = None, title: str = "", panel_px: int = 440) -> str:
    """:func:`three_plane_fig` as a PNG data URI (100 dpi)."""
    return to_data_uri(three_plane_fig(background, categories, cuts, legend, zooms, brain, title, panel_px), dpi=100)


def three_plane_fig(background: np.ndarray, categories: np.ndarray, cuts: dict[str, Sequence[int]],
                    legend: dict[int, tuple[str, str]], zooms: Sequence[float] = (1, 1, 1),
                    brain: np.ndarray | None = None, title: str = "", panel_px: int = 440):
    """Lesion outlines on an anatomical image in three planes (rows), at the chosen cuts (columns).

    Parameters
    ----------
    background : ndarray, shape (X, Y, Z)
        Anatomical image (RAS+), e.g. the FLAIR.
    categories : ndarray of int, same shape
        What to outline: a value per voxel, drawn in ``legend[value][0]``.
    cuts : dict
        Plane -> slice positions (:func:`choose_cuts`).
    legend : dict
        Value -> (colour, label); the figure's legend shows a swatch per value present.
    zooms : sequence of float
        Voxel sizes (mm), for the aspect ratio and the scale bar.
    brain : ndarray of bool, optional
        Brain mask: the panels are cropped to it.
    title : str
    panel_px : int
        Width of one panel in pixels (at 100 dpi); 440 px shows a 3 mm lesion about 8 px wide.

    Returns
    -------
    matplotlib.figure.Figure
        One row of panels per plane; each panel's top-left text names its plane and slice.
    """
    plt = _plt()
    from matplotlib.patches import Patch

    planes = [p for p in PLANES if cuts.get(p)]
    ncol = max(len(cuts[p]) for p in planes)
    lo, hi = _robust_limits(background, brain)
    box = bounding_box(brain if brain is not None and np.any(brain) else background > 0, margin=3)
    sub_bg = background[box]
    sub_cat = np.asarray(categories)[box]
    offsets = [s.start for s in box]
    heights = []
    for plane in planes:
        shape = plane_slice(sub_bg, plane, 0).shape
        heights.append(shape[0] * plane_aspect(plane, zooms) / shape[1])
    widths_in = panel_px / 100.0
    header_in = 0.85 if title else 0.5
    total_in = widths_in * sum(heights) * 1.03 + header_in
    fig = plt.figure(figsize=(widths_in * ncol, total_in), facecolor="black")
    grid = fig.add_gridspec(len(planes), ncol, height_ratios=heights, hspace=0.06, wspace=0.03,
                            top=1 - header_in / total_in, bottom=0.0, left=0.0, right=1.0)
    present = set(np.unique(sub_cat).tolist()) - {0}
    for r, plane in enumerate(planes):
        axis = PLANES[plane]
        for c in range(ncol):
            ax = fig.add_subplot(grid[r, c])
            ax.set_facecolor("black")
            ax.set_axis_off()
            if c >= len(cuts[plane]):
                continue
            index = int(cuts[plane][c]) - offsets[axis]
            index = min(max(index, 0), sub_bg.shape[axis] - 1)
            aspect = plane_aspect(plane, zooms)
            ax.imshow(plane_slice(sub_bg, plane, index), cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                      interpolation="bilinear")
            cat_slice = plane_slice(sub_cat, plane, index)
            for value in sorted(present):
                sl = cat_slice == value
                if sl.any():
                    ax.contour(sl.astype(float), levels=[0.5], colors=[legend[value][0]], linewidths=1.1,
                               antialiased=True)
            ax.set_xlim(-0.5, cat_slice.shape[1] - 0.5)
            ax.set_ylim(cat_slice.shape[0] - 0.5, -0.5)
            _orientation_marks(ax, plane)
            letter = {"axial": "z", "coronal": "y", "sagittal": "x"}[plane]
            ax.text(0.01, 0.99, f"{plane} {letter}={int(cuts[plane][c])}", transform=ax.transAxes, color="white",
                    fontsize=10, va="top", ha="left")
            if r == 0 and c == ncol - 1:
                _scale_bar(ax, cat_slice.shape, float(zooms[0]))
    handles = [Patch(facecolor=legend[v][0], edgecolor="white", label=legend[v][1]) for v in sorted(legend)
               if v in present]
    if title:
        fig.text(0.005, 1 - 0.08 / total_in, title, color="white", fontsize=13, va="top", ha="left")
    if handles:
        fig.legend(handles=handles, loc="upper left", ncol=len(handles), frameon=False, fontsize=12,
                   labelcolor="white", bbox_to_anchor=(0.0, 1 - (header_in - 0.5) / total_in), handlelength=1.3,
                   handleheight=1.1, borderaxespad=0.2, columnspacing=2.0)
    return fig


def _scale_bar(ax, shape: tuple[int, int], zoom: float, mm: float = 10.0) -> None:
    length = mm / zoom
    x0, y0 = shape[1] - 4 - length, shape[0] - 5
    ax.plot([x0, x0 + length], [y0, y0], color="white", linewidth=2)
    ax.text(x0 + length / 2, y0 - 2, f"{mm:.0f} mm", color="white", fontsize=8, ha="center", va="bottom")


def overlay_mosaic(background: np.ndarray, overlay: np.ndarray, slices: Sequence[int], title: str,
                   cmap: str = "hot", vmin: float | None = None, vmax: float | None = None,
                   threshold: float | None = None, brain: np.ndarray | None = None,
                   zooms: Sequence[float] = (1, 1, 1)) -> str:
    """A map (probability, uncertainty) over an anatomical image in axial slices, with a colour bar."""
    plt = _plt()
    box = bounding_box(brain if brain is not None and np.any(brain) else background > 0, margin=3)
    fig, axes = plt.subplots(1, len(slices), figsize=(4.0 * len(slices), 4.4), squeeze=False, facecolor="black")
    lo, hi = _robust_limits(background, brain)
    vmax = float(np.nanmax(overlay)) if vmax is None else vmax
    vmin = 0.0 if vmin is None else vmin
    artist = None
    aspect = plane_aspect("axial", zooms)
    for c, z in enumerate(slices):
        ax = axes[0][c]
        ax.imshow(plane_slice(background[box[0], box[1]], "axial", z), cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        data = plane_slice(overlay[box[0], box[1]], "axial", z).astype(float)
        shown = np.ma.masked_less_equal(data, threshold if threshold is not None else vmin + 1e-6 * (vmax - vmin))
        artist = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1, alpha=0.75,
                           aspect=aspect)
        ax.set_axis_off()
        _orientation_marks(ax, "axial")
        ax.set_title(f"axial z={int(z)}", color="white", fontsize=9)
    if artist is not None:
        bar = fig.colorbar(artist, ax=axes[0].tolist(), fraction=0.02, pad=0.01)
        bar.ax.tick_params(colors="white", labelsize=8)
    fig.suptitle(title, color="white", fontsize=11)
    return to_data_uri(fig, dpi=90)


def lesion_crops(images: dict[str, np.ndarray], instances: np.ndarray, rows: Sequence[tuple[int, str]],
                 overlays: dict[str, np.ndarray] | None = None, size_mm: float = 20.0,
                 zooms: Sequence[float] = (1, 1, 1), colours: dict[int, str] | None = None) -> str:
    """:func:`lesion_crops_fig` as a PNG data URI (100 dpi)."""
    return to_data_uri(lesion_crops_fig(images, instances, rows, overlays, size_mm, zooms, colours), dpi=100)


def lesion_crops_fig(images: dict[str, np.ndarray], instances: np.ndarray, rows: Sequence[tuple[int, str]],
                     overlays: dict[str, np.ndarray] | None = None, size_mm: float = 20.0,
                     zooms: Sequence[float] = (1, 1, 1), colours: dict[int, str] | None = None):
    """One column per lesion, titled; rows: the first channel without and with the outline, the
    other channels with it, then e.g. the saliency maps. Axial crops through the lesion's
    largest cross-section.

    Parameters
    ----------
    images : dict
        Channel name -> volume (RAS+); the first one (e.g. the FLAIR) is also shown bare.
    instances : ndarray of int
        Lesion labels.
    rows : sequence of (label, title)
        The lesions to show and their titles (:func:`crop_title`; " · " starts a new line).
    overlays : dict, optional
        Signed maps (saliency) shown with a diverging colour map.
    size_mm : float
        Half-width of the crop.
    zooms : sequence of float
    colours : dict, optional
        Label -> outline colour (default green).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _plt()
    names = list(images)
    panels = [(names[0], images[names[0]], False, False)] if names else []
    panels += [(name, images[name], True, False) for name in names]
    panels += [(name, volume, True, True) for name, volume in (overlays or {}).items()]
    limits = {name: _robust_limits(v) for name, v in images.items()}
    ncol = max(len(rows), 1)
    fig, axes = plt.subplots(len(panels), ncol, figsize=(2.55 * ncol + 0.5, 2.55 * len(panels) + 1.0),
                             squeeze=False, facecolor="black", gridspec_kw={"wspace": 0.04, "hspace": 0.04})
    fig.subplots_adjust(left=0.5 / (2.55 * ncol + 0.5), right=1.0, bottom=0.0,
                        top=1 - 1.0 / (2.55 * len(panels) + 1.0))
    half = [max(round(size_mm / float(z)), 4) for z in zooms[:2]]
    aspect = plane_aspect("axial", zooms)
    for r, (name, _, outlined, _) in enumerate(panels):
        label = f"{name}" + ("" if outlined else " (bare)")
        axes[r][0].text(-0.04, 0.5, label, transform=axes[r][0].transAxes, color="white", fontsize=10,
                        rotation=90, ha="right", va="center")
    for c, (label, title) in enumerate(rows):
        for ax in axes[:, c]:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            ax.set_facecolor("black")
        words = title.split(" \u00b7 ")
        lines = [words[0], " \u00b7 ".join(words[1:3]), " \u00b7 ".join(words[3:])]
        axes[0][c].set_title("\n".join(line for line in lines if line), color="white", fontsize=10.5, loc="left",
                             pad=4)
        coords = np.argwhere(instances == label)
        if coords.size == 0:
            continue
        cx, cy = np.round(coords[:, :2].mean(0)).astype(int)
        zs, counts = np.unique(coords[:, 2], return_counts=True)
        cz = int(zs[np.argmax(counts)])  # the slice with the most lesion voxels
        xs = slice(max(cx - half[0], 0), cx + half[0] + 1)
        ys = slice(max(cy - half[1], 0), cy + half[1] + 1)
        contour = np.rot90(instances[xs, ys, cz] == label)
        colour = (colours or {}).get(int(label), "#00ff00")
        for r, (name, volume, outlined, signed) in enumerate(panels):
            ax = axes[r][c]
            crop = np.rot90(volume[xs, ys, cz])
            if signed:
                limit = float(np.nanmax(np.abs(crop))) or 1.0
                ax.imshow(crop, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect=aspect)
            else:
                ax.imshow(crop, cmap="gray", vmin=limits[name][0], vmax=limits[name][1], aspect=aspect,
                          interpolation="bilinear")
            if outlined and contour.any():
                ax.contour(contour.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
            if r == len(panels) - 1:
                ax.text(0.98, 0.03, f"z={cz}", transform=ax.transAxes, color="#cccccc", fontsize=8, ha="right")
    for c in range(len(rows), ncol):
        for ax in axes[:, c]:
            ax.set_axis_off()
    return fig


# ------------------------------------------------------------------ group plots
def plot_kind(values_by_group: dict[str, np.ndarray], small_n: int = 10) -> str:
    """``'strip'`` when a group has fewer than ``small_n`` finite values (a box of 1-9 points
    says less than the points), else ``'box'``."""
    sizes = [int(np.isfinite(np.asarray(v, dtype=float)).sum()) for v in values_by_group.values()]
    return "strip" if min(sizes, default=0) < small_n else "box"


def values_plot(values_by_group: dict[str, np.ndarray], title: str, ylabel: str, small_n: int = 10) -> str:
    """:func:`values_fig` as a PNG data URI."""
    return to_data_uri(values_fig(values_by_group, title, ylabel, small_n))


def values_fig(values_by_group: dict[str, np.ndarray], title: str, ylabel: str, small_n: int = 10):
    """Per-group values: a strip plot (every point, jittered, with the median) when a group has
    fewer than ``small_n`` values (:func:`plot_kind`), else box plots with the points on top.
    The x labels give n."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.8, 3.4))
    groups = list(values_by_group)
    data = [np.asarray(values_by_group[g], dtype=float) for g in groups]
    data = [d[np.isfinite(d)] for d in data]
    strip = plot_kind(values_by_group, small_n) == "strip"
    if not strip:
        ax.boxplot(data, showmeans=True)
    for i, d in enumerate(data, start=1):
        ax.scatter(i + jitter(d.size, 0.15 if strip else 0.1, seed=i), d, s=36 if strip else 10,
                   alpha=0.85 if strip else 0.6, color=f"C{(i - 1) % 10}", edgecolor="k", linewidth=0.5, zorder=3)
        if strip and d.size:
            ax.hlines(np.median(d), i - 0.25, i + 0.25, color="k", linewidth=1.5, zorder=2)
    ax.set_xticks(range(1, len(groups) + 1), [f"{g}\nn = {d.size}" for g, d in zip(groups, data)])
    ax.set_xlim(0.4, len(groups) + 0.6)
    kind = "each point one session; bar = median" if strip else "box: quartiles; triangle: mean"
    ax.set_title(f"{title}\n({kind})", fontsize=10)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def bar_or_box(values_by_group: dict[str, np.ndarray], title: str, ylabel: str) -> str:
    """Alias of :func:`values_plot` (strip plot for small groups)."""
    return values_plot(values_by_group, title, ylabel)


def _caveat(ax, text: str | None) -> None:
    if text:
        ax.text(0.5, 0.5, text.split(" (")[0], transform=ax.transAxes, ha="center", va="center", fontsize=12,
                color="#b07800", alpha=0.4, rotation=20, fontweight="bold", zorder=0, clip_on=True)


def scatter(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, title: str, xlabel: str, ylabel: str,
            logx: bool = False, caveat: str | None = None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    if groups is None:
        ax.scatter(x, y, s=12, alpha=0.7)
    else:
        for g in sorted({str(v) for v in groups}):
            sel = np.asarray([str(v) == g for v in groups])
            ax.scatter(np.asarray(x)[sel], np.asarray(y)[sel], s=12, alpha=0.7, label=g)
        ax.legend(fontsize=7, loc="best")
    if logx:
        ax.set_xscale("log")
    _caveat(ax, caveat)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return to_data_uri(fig)


#: line styles and markers cycled with the colours so that curves stay distinct in grey too
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def curves(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str,
           caveat: str | None = None) -> str:
    """:func:`curves_fig` as a PNG data URI."""
    return to_data_uri(curves_fig(series, title, xlabel, ylabel, caveat))


def split_series(names: Sequence[str]) -> dict[str, list[str]]:
    """Panels of curves: names ``"<line> / <panel>"`` grouped by their last part (e.g. the metric),
    in first-seen order; names without " / " share one panel ``""``."""
    panels: dict[str, list[str]] = {}
    for name in names:
        panel = name.rsplit(" / ", 1)[1] if " / " in name else ""
        panels.setdefault(panel, []).append(name)
    return panels


def curves_fig(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str,
               caveat: str | None = None):
    """Labelled curves, one panel per metric (:func:`split_series`): each line (e.g. each
    uncertainty measure) keeps its colour, line style and marker in every panel, one legend
    names them, and each line's end carries its number (labels pushed apart where lines end
    at the same value)."""
    plt = _plt()
    panels = split_series(list(series))
    lines = list(dict.fromkeys(name.rsplit(" / ", 1)[0] if " / " in name else name for name in series))
    style = {line: (f"C{i % 10}", LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)])
             for i, line in enumerate(lines)}
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels) + 2.2, 3.9), squeeze=False, sharey=True)
    for ax, (panel, names) in zip(axes[0], panels.items()):
        ends = []
        for name in names:
            line_name = name.rsplit(" / ", 1)[0] if " / " in name else name
            i = lines.index(line_name)
            colour, linestyle, marker = style[line_name]
            x, y = (np.asarray(v, float) for v in series[name])
            every = max(1, x.size // 6)
            ax.plot(x, y, label=line_name, color=colour, linestyle=linestyle, marker=marker,
                    markevery=(i % every, every), markersize=5, linewidth=1.7)
            if x.size and np.isfinite(y[-1]):
                ends.append((float(y[-1]), float(x[-1]), i, colour))
        lo, hi = ax.get_ylim()
        step = 0.06 * (hi - lo)
        placed: list[float] = []
        for y_end, x_end, i, colour in sorted(ends):
            y_text = max([y_end] + [p + step for p in placed])
            placed.append(y_text)
            ax.annotate(f"{i + 1}", (x_end, y_end), xytext=(x_end + 0.06 * (ax.get_xlim()[1] - ax.get_xlim()[0]),
                                                             y_text),
                        textcoords="data", color=colour, fontsize=9, fontweight="bold", va="center",
                        arrowprops={"arrowstyle": "-", "color": colour, "linewidth": 0.6}, annotation_clip=False)
        _caveat(ax, caveat)
        ax.set_title(panel or title, fontsize=10)
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel(ylabel)
    handles = [plt.Line2D([], [], color=c, linestyle=ls, marker=m, linewidth=1.7) for c, ls, m in style.values()]
    fig.legend(handles, [f"{i + 1}: {name}" for i, name in enumerate(lines)], fontsize=9, loc="center left",
               bbox_to_anchor=(1.0, 0.5), frameon=False)
    if len(panels) > 1 or next(iter(panels)):
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def coefficients(names: Sequence[str], values: Sequence[float], errors: Sequence[float] | None, title: str,
                 caveat: str | None = None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.8, 0.35 * max(len(names), 3) + 1.2))
    y = np.arange(len(names))
    ax.barh(y, values, xerr=errors, color=["#d62728" if v > 0 else "#1f77b4" for v in values])
    ax.set_yticks(y, list(names), fontsize=8)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.invert_yaxis()
    _caveat(ax, caveat)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return to_data_uri(fig)


def frequency_figure(frequency: np.ndarray, template: np.ndarray | None, zooms: Sequence[float] = (2, 2, 2),
                     n_sessions: int | None = None) -> str:
    """The lesion-frequency map in three planes (each through the slice holding the most lesion
    frequency), over the template (or, without
    one, as maximum-intensity projections of the map itself), with a colour bar.

    Parameters
    ----------
    frequency : ndarray, shape (X, Y, Z)
        Fraction of sessions with a lesion at each template voxel (RAS+).
    template : ndarray, optional
        The template image on the same grid; None draws projections instead of slices.
    zooms : sequence of float
    n_sessions : int, optional
        Shown in the title.

    Returns
    -------
    str
        PNG data URI.
    """
    plt = _plt()
    frequency = np.nan_to_num(np.asarray(frequency, float))
    vmax = float(frequency.max()) if frequency.max() > 0 else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 4.6), facecolor="black",
                             gridspec_kw={"width_ratios": [frequency.shape[0] / frequency.shape[1],
                                                           frequency.shape[0] / frequency.shape[2],
                                                           frequency.shape[1] / frequency.shape[2]]})
    # per plane, the slice holding the most lesion frequency
    peak = tuple(int(np.argmax(frequency.sum(axis=tuple(a for a in range(3) if a != axis)))) for axis in range(3))
    artist = None
    for ax, plane in zip(axes, ("axial", "coronal", "sagittal")):
        axis = PLANES[plane]
        aspect = plane_aspect(plane, zooms)
        if template is not None:
            lo, hi = _robust_limits(np.asarray(template, float))
            ax.imshow(plane_slice(template, plane, peak[axis]), cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            shown = plane_slice(frequency, plane, peak[axis])
            label = f"{plane}, {'xyz'[axis]}={peak[axis]}"
        else:
            shown = np.rot90(frequency.max(axis=axis))
            ax.imshow(np.rot90((frequency > 0).any(axis=axis)), cmap="gray", vmin=0, vmax=4, aspect=aspect)
            label = f"{plane} maximum projection"
        artist = ax.imshow(np.ma.masked_less_equal(shown, 0), cmap="autumn", vmin=0, vmax=vmax, aspect=aspect,
                           alpha=0.9, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label, color="white", fontsize=10)
        _orientation_marks(ax, plane)
    bar = fig.colorbar(artist, ax=list(axes), fraction=0.015, pad=0.01)
    bar.set_label("fraction of sessions with a lesion", color="white", fontsize=9)
    bar.ax.tick_params(colors="white", labelsize=8)
    extra = f" ({n_sessions} session{'s' if n_sessions != 1 else ''})" if n_sessions is not None else ""
    background = "over the MNI152NLin2009cAsym template" if template is not None else "(no template image found)"
    fig.suptitle(f"lesion frequency in MNI152NLin2009cAsym space{extra} {background}", color="white", fontsize=11)
    return to_data_uri(fig, dpi=90)
