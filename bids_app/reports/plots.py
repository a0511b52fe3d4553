"""Plots of the group report (per-group values, scatter plots, curves, coefficients), as inline
PNG ``data:`` URIs (matplotlib, headless; :func:`bids_app.reports.figures.to_data_uri`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bids_app.reports.figures import pyplot, to_data_uri


def jitter(n: int, width: float = 0.18, seed: int = 0) -> np.ndarray:
    """Reproducible horizontal offsets of a strip plot's points."""
    return np.random.default_rng(seed).uniform(-width, width, int(n))


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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
    plt = pyplot()
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
