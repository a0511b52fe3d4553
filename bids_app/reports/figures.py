"""Figures for the HTML reports: matplotlib (headless) from arrays, returned as inline PNG.

Every figure function takes arrays in RAS+ voxel order ``(X, Y, Z)`` (the reports reorient
with ``nibabel.as_closest_canonical`` when they read an image) and returns a ``data:`` URI, so
the reports are single self-contained files (no network, no side files). The numerics
(which slices, which lesions, which category) are plain functions of arrays in
:mod:`bids_app.reports.selection`; the group report's plots are :mod:`bids_app.reports.plots`.

Display conventions: neurological (the patient's left on the left of the screen, marked L/R
on every panel), anterior up in axial slices, superior up in coronal and sagittal slices,
anterior on the right in sagittal slices; voxel sizes give the aspect ratio.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np

from bids_app.reports.selection import PLANES, bounding_box, plane_aspect, plane_slice

#: colours of the lesion classes (model label index -> colour)
CLASS_COLOURS = {1: "#ffd700", 2: "#ff3df5", 3: "#00ffff"}


def pyplot():
    """``matplotlib.pyplot`` with the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_data_uri(fig, dpi: int = 80) -> str:
    """The figure as a ``data:image/png;base64`` URI (the figure is closed)."""
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
