"""Viewer maps and lesion-table summaries of a :class:`~bids_app.core.explain.case.SaliencyStore`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from bids_app.core.explain.case import SaliencyStore
from bids_app.core.explain.config import SMOOTHGRAD_MAPS


def summary_maps(store: SaliencyStore, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Whole-grid maps for viewers, one per map name (all channels).

    Each voxel takes the value of the lesion it belongs to; elsewhere the value of largest
    ``|.|`` among the lesions whose crops cover it (0 where none does).

    Returns
    -------
    dict of name -> ndarray of float32, shape (Kc, X, Y, Z)
    """
    names = list(store.maps) if names is None else list(names)
    out = {}
    for name in names:
        crops = store.maps[name]
        kc = crops[0].shape[0] if crops else 1
        best = np.zeros((kc, *store.shape), np.float32)
        owned = np.zeros(store.shape, bool)
        for i, crop in enumerate(crops):
            sl = store.slices(i)
            region = best[(slice(None), *sl)]
            mine = store.instances[i] == store.labels[i]
            take = (np.abs(crop) > np.abs(region)) & ~owned[sl][None]
            take |= mine[None]
            region[take] = crop[take]
            owned[sl] |= mine
        out[name] = best
    return out


def _shell(mask: np.ndarray, width: int = 2) -> np.ndarray:
    return ndimage.maximum_filter(mask, size=2 * width + 1) & ~mask


def lesion_summaries(store: SaliencyStore, names: Sequence[str] | None = None,
                     rim_width: int = 2) -> dict[str, np.ndarray]:
    """Per-lesion saliency summaries for the lesion table.

    For each map and channel (column prefix ``<map>_<channel>_``):

    * ``peak_in`` / ``peak_out``: the signed value of largest ``|s|`` inside the lesion /
      inside its crop outside the lesion;
    * ``mean_in``: mean of ``s`` inside the lesion (signed);
    * ``rim_ratio``: mean ``|s|`` in the ``rim_width``-voxel shell (5x5x5 cube dilation minus
      the lesion) / mean ``|s|`` inside (NaN when the inside is all zero);
    * ``mass_in``: fraction of the crop's ``|s|`` mass inside the lesion (NaN for an all-zero map).

    Returns
    -------
    dict of column -> ndarray (L,), ``label`` first
    """
    names = list(store.maps) if names is None else list(names)
    cols: dict[str, np.ndarray] = {"label": np.asarray(store.labels, np.int64)}
    L = store.n_lesions
    for name in names:
        chans = store.map_channels(name)
        for c, cname in enumerate(chans):
            pref = f"{name}_{cname}" if name.split("@")[0] in SMOOTHGRAD_MAPS else name
            vals = {k: np.full(L, np.nan) for k in ("peak_in", "peak_out", "mean_in", "rim_ratio", "mass_in")}
            for i in range(L):
                s = store.maps[name][i][c].astype(np.float64)
                inside = store.instances[i] == store.labels[i]
                shell = _shell(inside, rim_width)
                a = np.abs(s)
                if inside.any():
                    vin = s[inside]
                    vals["peak_in"][i] = vin[np.argmax(np.abs(vin))]
                    vals["mean_in"][i] = vin.mean()
                    mean_abs_in = a[inside].mean()
                    if mean_abs_in > 0 and shell.any():
                        vals["rim_ratio"][i] = a[shell].mean() / mean_abs_in
                if (~inside).any():
                    vout = s[~inside]
                    vals["peak_out"][i] = vout[np.argmax(np.abs(vout))]
                total = a.sum()
                if total > 0:
                    vals["mass_in"][i] = a[inside].sum() / total
            for k, v in vals.items():
                cols[f"{pref}_{k}"] = v
    return cols
