"""Figures for the HTML reports: matplotlib (headless) from arrays, returned as inline PNG.

Every function takes arrays in nibabel voxel order ``(X, Y, Z)`` and returns a ``data:`` URI,
so the reports are single self-contained files (no network, no side files).
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np

CLASS_COLOURS = {1: "#ffd700", 2: "#ff00ff", 3: "#00ffff"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_data_uri(fig, dpi: int = 80) -> str:
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


def _axial(volume: np.ndarray, z: int) -> np.ndarray:
    return np.rot90(volume[:, :, z])


def choose_slices(classes: np.ndarray, n: int = 6, brain: np.ndarray | None = None) -> list[int]:
    """Axial slices through the lesion load (most lesion voxels first), else evenly spaced."""
    per_slice = (classes > 0).sum(axis=(0, 1))
    if per_slice.sum() == 0:
        support = (brain if brain is not None else np.ones(classes.shape, bool)).any(axis=(0, 1))
        idx = np.flatnonzero(support)
        if idx.size == 0:
            idx = np.arange(classes.shape[2])
        return sorted({int(v) for v in np.linspace(idx[0], idx[-1], n + 2)[1:-1].round()})
    order = np.argsort(-per_slice, kind="stable")
    chosen: list[int] = []
    for z in order:
        if per_slice[z] == 0 or len(chosen) == n:
            break
        if all(abs(int(z) - c) >= 3 for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)


def lesion_mosaic(images: dict[str, np.ndarray], classes: np.ndarray, slices: Sequence[int],
                  class_names: dict[int, str], brain: np.ndarray | None = None) -> str:
    """Rows = input channels, columns = slices; lesion classes as coloured contours."""
    plt = _plt()
    rows = len(images)
    fig, axes = plt.subplots(rows, len(slices), figsize=(2.2 * len(slices), 2.4 * rows), squeeze=False,
                             facecolor="black")
    for r, (name, image) in enumerate(images.items()):
        lo, hi = _robust_limits(image, brain)
        for c, z in enumerate(slices):
            ax = axes[r][c]
            ax.imshow(_axial(image, z), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            for index, colour in CLASS_COLOURS.items():
                sl = _axial(classes == index, z)
                if sl.any():
                    ax.contour(sl.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(f"z={z}", color="white", fontsize=8)
        axes[r][0].text(2, 8, name, color="white", fontsize=9, va="top")
    legend = "   ".join(f"{class_names.get(i, i)}: {col}" for i, col in CLASS_COLOURS.items() if i in class_names)
    fig.suptitle(f"lesion contours ({legend})", color="white", fontsize=8)
    return to_data_uri(fig)


def overlay_mosaic(background: np.ndarray, overlay: np.ndarray, slices: Sequence[int], title: str,
                   cmap: str = "hot", vmin: float | None = None, vmax: float | None = None,
                   threshold: float | None = None, brain: np.ndarray | None = None) -> str:
    """A map (probability, uncertainty) over an anatomical image, with a colour bar."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(slices), figsize=(2.2 * len(slices), 2.6), squeeze=False, facecolor="black")
    lo, hi = _robust_limits(background, brain)
    vmax = float(np.nanmax(overlay)) if vmax is None else vmax
    vmin = 0.0 if vmin is None else vmin
    artist = None
    for c, z in enumerate(slices):
        ax = axes[0][c]
        ax.imshow(_axial(background, z), cmap="gray", vmin=lo, vmax=hi)
        data = _axial(overlay, z).astype(float)
        shown = np.ma.masked_less_equal(data, threshold if threshold is not None else vmin + 1e-6 * (vmax - vmin))
        artist = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1, alpha=0.75)
        ax.set_axis_off()
    if artist is not None:
        bar = fig.colorbar(artist, ax=axes[0].tolist(), fraction=0.02, pad=0.01)
        bar.ax.tick_params(colors="white", labelsize=7)
    fig.suptitle(title, color="white", fontsize=9)
    return to_data_uri(fig)


def lesion_crops(images: dict[str, np.ndarray], instances: np.ndarray, labels: Sequence[int],
                 overlays: dict[str, np.ndarray] | None = None, size: int = 24) -> str:
    """One row per lesion: crops of the inputs (and e.g. saliency) around its centroid."""
    plt = _plt()
    panels = dict(images)
    panels.update(overlays or {})
    fig, axes = plt.subplots(len(labels), len(panels), figsize=(1.9 * len(panels), 1.9 * len(labels)),
                             squeeze=False, facecolor="black")
    for r, label in enumerate(labels):
        coords = np.argwhere(instances == label)
        if coords.size == 0:
            continue
        cx, cy, cz = np.round(coords.mean(0)).astype(int)
        xs = slice(max(cx - size, 0), cx + size)
        ys = slice(max(cy - size, 0), cy + size)
        for c, (name, volume) in enumerate(panels.items()):
            ax = axes[r][c]
            crop = np.rot90(volume[xs, ys, cz])
            if overlays and name in overlays:
                limit = float(np.nanmax(np.abs(crop))) or 1.0
                ax.imshow(crop, cmap="RdBu_r", vmin=-limit, vmax=limit)
            else:
                lo, hi = _robust_limits(volume)
                ax.imshow(crop, cmap="gray", vmin=lo, vmax=hi)
            contour = np.rot90(instances[xs, ys, cz] == label)
            if contour.any():
                ax.contour(contour.astype(float), levels=[0.5], colors=["#00ff00"], linewidths=0.7)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(name, color="white", fontsize=8)
        axes[r][0].text(1, 3, f"#{label}", color="yellow", fontsize=8, va="top")
    return to_data_uri(fig)


# ------------------------------------------------------------------ group plots
def bar_or_box(values_by_group: dict[str, np.ndarray], title: str, ylabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    groups = list(values_by_group)
    data = [np.asarray(values_by_group[g], dtype=float) for g in groups]
    data = [d[np.isfinite(d)] for d in data]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(groups) + 1), [str(g) for g in groups])
    for i, d in enumerate(data, start=1):
        ax.scatter(np.full(d.size, i) + np.random.default_rng(i).uniform(-0.12, 0.12, d.size), d, s=8, alpha=0.6)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    return to_data_uri(fig)


def scatter(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, title: str, xlabel: str, ylabel: str,
            logx: bool = False) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    if groups is None:
        ax.scatter(x, y, s=10, alpha=0.6)
    else:
        for g in sorted({str(v) for v in groups}):
            sel = np.asarray([str(v) == g for v in groups])
            ax.scatter(np.asarray(x)[sel], np.asarray(y)[sel], s=10, alpha=0.6, label=g)
        ax.legend(fontsize=7, loc="best")
    if logx:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return to_data_uri(fig)


def curves(series: dict[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return to_data_uri(fig)


def coefficients(names: Sequence[str], values: Sequence[float], errors: Sequence[float] | None, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 0.35 * max(len(names), 3) + 1))
    y = np.arange(len(names))
    ax.barh(y, values, xerr=errors, color=["#d62728" if v > 0 else "#1f77b4" for v in values])
    ax.set_yticks(y, list(names), fontsize=8)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    return to_data_uri(fig)
