"""The per-lesion saliency store: one compressed ``.npz`` file per session.

The store holds, for every explained lesion, its saliency maps as **crops of the input
grid** with their geometry, so that the maps align with the input image without any
resampling and take a few hundred kB instead of one full volume per lesion and map.
:func:`save_store` / :func:`load_store` are the only functions that read or write it; the
numbers are computed by :func:`bids_app.core.explain.explain_case`.

Format (version 1; ``numpy.savez_compressed``, every entry a plain array, no pickle):

=========================  ===============  ====================================================
key                        dtype / shape    content
=========================  ===============  ====================================================
``format``                 str ()           ``"msxplain-saliency-store"``
``version``                int64 ()         1
``meta``                   str ()           JSON: parameters, provenance, ``shape``, ``zooms``,
                                            ``channel_names``, ``maps`` (name -> channel names),
                                            optional ``affine`` (4x4, voxel -> RAS+ mm)
``labels``                 int32 (L,)       lesion labels of the instance map, ascending
``classes``                int32 (L,)       model class index of each lesion
``bbox``                   int32 (L, 2, 3)  ``[start, stop)`` of each crop on the input grid,
                                            axes X, Y, Z (nibabel voxel order)
``instances``              int32 (N,)       the instance map inside every crop, crops
                                            flattened in C order and concatenated in lesion order
``map.<name>.data``        float16 (Nc,)    per lesion the (Kc, sx, sy, sz) crop divided by its
                                            per-channel scale, flattened and concatenated
``map.<name>.scale``       float32 (L, Kc)  per lesion and channel max ``|value|`` (0: all zero)
=========================  ===============  ====================================================

A value is ``float32(data) * scale``: float16 of values scaled to ``[-1, 1]`` keeps a
relative precision of 2**-11 (about 5e-4) of each lesion's and channel's largest ``|value|``;
values below about 6e-8 of it become 0. Map names: ``smoothgrad_mean``, ``smoothgrad_max``
(Kc = number of input channels, raw signed gradients in logit per normalised-intensity
unit), ``gradcam``, ``gradcampp`` (Kc = 1, in [0, 1]); per-member maps add ``@<fold>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bids_app.core.explain import SaliencyStore
from bids_app.errors import BadInputData, MissingInput

STORE_FORMAT = "msxplain-saliency-store"
STORE_VERSION = 1


def _sizes(bbox: np.ndarray) -> np.ndarray:
    return (bbox[:, 1, :] - bbox[:, 0, :]).astype(np.int64)


def save_store(path: str | os.PathLike, store: SaliencyStore, affine: np.ndarray | None = None) -> Path:
    """Write ``store`` to ``path`` (``.npz``, compressed); returns the path.

    Parameters
    ----------
    path : path-like
        Written atomically (a temporary file beside it, then renamed).
    store : SaliencyStore
    affine : ndarray (4, 4) or None
        Voxel -> scanner RAS+ transform of the input grid, kept in the metadata so that
        readers can check references against it.
    """
    path = Path(path)
    L = store.n_lesions
    bbox = np.asarray(store.bbox, np.int32).reshape(L, 2, 3)
    sizes = _sizes(bbox)
    meta = dict(store.meta)
    meta.update({
        "shape": [int(s) for s in store.shape],
        "zooms": [float(z) for z in store.zooms],
        "channel_names": list(store.channel_names),
        "maps": {name: store.map_channels(name) for name in store.maps},
    })
    if affine is not None:
        meta["affine"] = np.asarray(affine, float).tolist()
    arrays: dict[str, np.ndarray] = {
        "format": np.array(STORE_FORMAT),
        "version": np.array(STORE_VERSION, np.int64),
        "meta": np.array(json.dumps(meta, default=_json_default)),
        "labels": np.asarray(store.labels, np.int32),
        "classes": np.asarray(store.classes, np.int32),
        "bbox": bbox,
    }
    if L and (np.any(bbox[:, 0] < 0) or np.any(bbox[:, 1] > np.asarray(store.shape)) or np.any(sizes <= 0)):
        raise ValueError(f"crop boxes must lie inside the grid {tuple(store.shape)}")
    for i in range(L):
        if tuple(store.instances[i].shape) != tuple(sizes[i]):
            raise ValueError(f"lesion {i}: instance crop {store.instances[i].shape} does not match its bbox")
    arrays["instances"] = (np.concatenate([np.asarray(c, np.int32).ravel() for c in store.instances])
                           if L else np.zeros(0, np.int32))
    for name, crops in store.maps.items():
        if len(crops) != L:
            raise ValueError(f"map {name!r} has {len(crops)} crops for {L} lesions")
        kc = crops[0].shape[0] if L else 0
        scale = np.zeros((L, kc), np.float32)
        parts = []
        for i, crop in enumerate(crops):
            crop = np.asarray(crop, np.float32)
            if crop.shape != (kc, *sizes[i]):
                raise ValueError(f"map {name!r}, lesion {i}: shape {crop.shape} != {(kc, *sizes[i])}")
            s = np.abs(crop).reshape(kc, -1).max(axis=1) if crop.size else np.zeros(kc, np.float32)
            scale[i] = s
            safe = np.where(s > 0, s, 1.0).reshape(kc, 1, 1, 1)
            parts.append((crop / safe).astype(np.float16).ravel())
        arrays[f"map.{name}.data"] = np.concatenate(parts) if parts else np.zeros(0, np.float16)
        arrays[f"map.{name}.scale"] = scale
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def load_store(path: str | os.PathLike) -> SaliencyStore:
    """Read a store written by :func:`save_store` (maps as float32).

    Raises
    ------
    MissingInput
        The file does not exist.
    BadInputData
        Not a saliency store, a newer version, or inconsistent sizes.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInput("Saliency store does not exist.", path=str(path), hint="check the path.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile / ValueError for corrupt files
        raise BadInputData(f"Cannot read the saliency store ({type(exc).__name__}).", path=str(path),
                           hint="the file is corrupt or not an .npz store; re-run the explanation.") from None
    if str(arrays.get("format", "")) != STORE_FORMAT:
        raise BadInputData("Not an msxplain saliency store.", path=str(path),
                           hint="give the *_saliency.npz files written by msxplain.")
    version = int(arrays["version"])
    if version > STORE_VERSION:
        raise BadInputData(f"Saliency store version {version} is newer than this msxplain reads ({STORE_VERSION}).",
                           path=str(path), hint="upgrade msxplain.")
    meta = json.loads(str(arrays["meta"]))
    labels = arrays["labels"].astype(np.int32)
    L = len(labels)
    bbox = arrays["bbox"].astype(np.int32).reshape(L, 2, 3)
    sizes = _sizes(bbox)
    if L and (np.any(bbox[:, 0] < 0) or np.any(bbox[:, 1] > np.asarray(meta["shape"])) or np.any(sizes <= 0)):
        raise BadInputData("Saliency store is inconsistent (crop boxes outside the grid).", path=str(path),
                           hint="re-run the explanation.")
    vols = sizes.prod(axis=1)
    offsets = np.concatenate([[0], np.cumsum(vols)])
    inst = arrays["instances"]
    if inst.size != offsets[-1]:
        raise BadInputData("Saliency store is inconsistent (instance crops vs bounding boxes).", path=str(path),
                           hint="re-run the explanation.")
    instances = [inst[offsets[i]:offsets[i + 1]].reshape(sizes[i]).astype(np.int32) for i in range(L)]
    maps = {}
    for key in arrays:
        if not (key.startswith("map.") and key.endswith(".data")):
            continue
        name = key[4:-5]
        data = arrays[key]
        scale = arrays[f"map.{name}.scale"].astype(np.float32)
        kc = scale.shape[1] if scale.ndim == 2 else 0
        moff = np.concatenate([[0], np.cumsum(vols * kc)])
        if data.size != moff[-1]:
            raise BadInputData(f"Saliency store is inconsistent (map {name}).", path=str(path),
                               hint="re-run the explanation.")
        maps[name] = [data[moff[i]:moff[i + 1]].astype(np.float32).reshape(kc, *sizes[i])
                      * scale[i].reshape(kc, 1, 1, 1) for i in range(L)]
    return SaliencyStore(
        shape=tuple(int(s) for s in meta["shape"]), zooms=tuple(float(z) for z in meta["zooms"]),
        labels=labels, classes=arrays["classes"].astype(np.int32), bbox=bbox, maps=maps, instances=instances,
        channel_names=list(meta["channel_names"]), meta=meta,
    )
