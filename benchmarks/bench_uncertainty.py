"""Benchmark of the uncertainty engine (issue 3): all measures on a 1 mm MNI-sized volume.

Compares :func:`bids_app.core.uncertainty.compute_uncertainty` (label-indexed reductions) with a
plain per-lesion loop written the way the reference code does it (MS_WML_uncs
``lesion_uncertainty_measures.py`` / ``patient_uncertainty_measures.py`` and interpret-lesion-unc
``uq/les_measures.py``): one whole-volume boolean mask per lesion, ``np.unique`` of
``mask * member_labels`` per member, whole-volume IoU / IoU_adj / Dice products.
The naive functions here are also the oracle of ``tests/core/test_uncertainty.py``.

Usage::

    python benchmarks/bench_uncertainty.py                   # full run (naive loop over all lesions)
    python benchmarks/bench_uncertainty.py --naive-lesions 12  # naive loop on 12 lesions, extrapolated

Prints wall times, peak traced memory (tracemalloc: numpy buffers included) and the speed-up.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

try:
    from bids_app.core import uncertainty as U
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bids_app.core import uncertainty as U


# --------------------------------------------------------------------------------------------
# synthetic ensemble
# --------------------------------------------------------------------------------------------

def synthetic_ensemble(shape=(182, 218, 182), n_members=5, n_lesions=60, seed=0):
    """Member lesion probabilities with lesions that members see differently.

    Each lesion is a blurred ellipsoid; every member shifts its centre by up to 1 voxel and scales
    its radii by 0.7-1.3; one lesion in five is seen by only 1-2 members; the background carries
    small member-specific noise so that every voxel measure is non-trivial.

    Returns
    -------
    member_probs : float32 (M, 2, X, Y, Z)
    brain : bool (X, Y, Z)
        An ellipsoid filling most of the box.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = [np.arange(s, dtype=np.float32) for s in shape]
    centre = np.array(shape, dtype=np.float32) / 2
    semi = np.array(shape, dtype=np.float32) * 0.45
    brain = (((grid[0][:, None, None] - centre[0]) / semi[0]) ** 2
             + ((grid[1][None, :, None] - centre[1]) / semi[1]) ** 2
             + ((grid[2][None, None, :] - centre[2]) / semi[2]) ** 2) <= 1.0
    lesion = rng.uniform(0, 0.02, size=(n_members,) + shape).astype(np.float32)
    lesion *= brain
    inside = np.argwhere(brain)
    for k in range(n_lesions):
        c = inside[rng.integers(len(inside))].astype(np.float32)
        radii = rng.uniform(1.2, 5.0, 3).astype(np.float32)
        seen = np.ones(n_members, dtype=bool)
        if k % 5 == 4:
            seen[:] = False
            seen[rng.choice(n_members, size=rng.integers(1, 3), replace=False)] = True
        for m in range(n_members):
            if not seen[m]:
                continue
            cm = c + rng.uniform(-1, 1, 3).astype(np.float32)
            rm = radii * rng.uniform(0.7, 1.3, 3).astype(np.float32)
            lo = np.maximum(0, np.floor(cm - rm - 3).astype(int))
            hi = np.minimum(shape, np.ceil(cm + rm + 4).astype(int))
            sl = tuple(slice(a, b) for a, b in zip(lo, hi))
            d = np.sqrt(sum(((grid[i][sl[i]] - cm[i]) / rm[i]).reshape([-1 if j == i else 1 for j in range(3)]) ** 2
                            for i in range(3)))
            peak = rng.uniform(0.6, 0.99)
            blob = (peak / (1.0 + np.exp((d - 1.0) * 6.0))).astype(np.float32)
            np.maximum(lesion[m][sl], blob, out=lesion[m][sl])
    return U.binary_member_probs(lesion), brain


# --------------------------------------------------------------------------------------------
# naive reference (binary case), written like the reference code
# --------------------------------------------------------------------------------------------

def naive_voxel_measures(lesion_probs, eps=1e-10):
    """MS_WML_uncs ``ensemble_uncertainties_classification`` on ``[p, 1 - p]`` stacked last."""
    probs = np.concatenate((lesion_probs[..., None], 1.0 - lesion_probs[..., None]), axis=-1)
    mean_probs = np.mean(probs, axis=0)
    mean_lprobs = np.mean(np.log(probs + eps), axis=0)
    conf = np.max(mean_probs, axis=-1)
    eoe = np.sum(mean_probs * -np.log(mean_probs + eps), axis=-1)
    exe = np.mean(np.sum(probs * -np.log(probs + eps), axis=-1), axis=0)
    mi = eoe - exe
    epkl = -np.sum(mean_probs * mean_lprobs, axis=-1) - exe
    return {"NC": -conf, "EoE": eoe, "ExE": exe, "MI": mi, "EPKL": epkl, "RMI": epkl - mi}


def _iou(a, b):
    return np.sum(a * b) / np.sum(a + b - a * b)


def _dsc(a, b):
    if np.sum(a) + np.sum(b) > 0:
        return 2 * (a * b).sum() / (a + b).sum()
    return 1.0


def _iou_adj(cc_pred, y_pred, y_multi):
    k_labels = np.unique(y_multi * cc_pred).tolist()
    if 0 in k_labels:
        k_labels.remove(0)
    if k_labels:
        k_mask = np.isin(y_multi, test_elements=k_labels).astype(float)
        k_minus_q = k_mask - (y_pred - cc_pred) * k_mask
        return np.sum(cc_pred * k_mask) / np.sum(cc_pred + k_minus_q > 0.0)
    return 0.0


def _max_ious(cc_mask, mem_labs):
    ious, masks = [], []
    for m in range(mem_labs.shape[0]):
        best, best_mask = 0.0, np.zeros_like(cc_mask)
        for lab in np.unique(cc_mask * mem_labs[m]):
            if lab != 0:
                cand = (mem_labs[m] == lab).astype(float)
                iou = _iou(cc_mask, cand)
                if iou > best:
                    best, best_mask = iou, cand
        ious.append(best)
        masks.append(best_mask)
    return ious, np.stack(masks)


def naive_single_lesion(cc_label, ens_lab, vox_maps, mem_labs, mem_labs_plus, mem_probs, eps=1e-5):
    """One lesion, whole-volume operations throughout (reference style)."""
    cc_mask = (ens_lab == cc_label).astype(float)
    res = {"label": int(cc_label)}
    for name, u in vox_maps.items():
        res[f"mean_{name}"] = np.sum(u * cc_mask) / np.sum(cc_mask)
        if name != "NC":
            with np.errstate(divide="ignore", invalid="ignore"):
                res[f"logsum_{name}"] = np.sum(np.log(u[cc_mask == 1]))
    ious, cc_masks = _max_ious(cc_mask, mem_labs)
    res["LSU"] = 1 - np.mean(ious)
    if mem_labs_plus is not None:
        res["LSU+"] = 1 - np.mean(_max_ious(cc_mask, mem_labs_plus)[0])
    y_pred = (ens_lab > 0).astype(float)
    res["ddu_adj"] = 1 - np.mean([_iou_adj(cc_mask, y_pred, ml) for ml in mem_labs])
    res["ddu_fast"] = 1 - np.mean([_iou(cc_mask, (ml > 0).astype(float)) for ml in mem_labs])
    n_m = mem_probs.shape[0]
    p_cc = np.asarray([pm[cc_mask == 1] for pm in mem_probs])
    res["srmi"] = np.log(p_cc.mean(axis=0) + eps).mean() - np.log(p_cc + eps).mean()
    smi = 0.0
    for i_m, mm in enumerate(cc_masks):
        if mm[mm == 1].size:
            sel = mm == 1
            smi += np.sum(np.log(np.stack([mem_probs[k][sel] for k in range(n_m)]).mean(axis=0) + eps)
                          - np.log(mem_probs[i_m][sel] + eps)) / np.sum(mm)
    res["smi"] = -smi / n_m
    with np.errstate(divide="ignore", invalid="ignore"):
        p1 = p_cc.mean(axis=1).prod()
        res["seoe"] = -p1 * np.log(p1)
        pairs = [_dsc(a, b) for i, a in enumerate(cc_masks) for j, b in enumerate(cc_masks) if i > j]
        res["avg_pwdice"] = np.mean(pairs) if n_m > 1 else np.nan
        vols = [np.sum(mm) for mm in cc_masks]
        res["vvc"] = np.std(vols) / np.mean(vols)
        res["global_iou"] = np.sum(np.prod(cc_masks, axis=0) > 0) / np.sum(np.sum(cc_masks, axis=0) > 0)
    return res


def naive_lesion_uncertainty(ens_lab, vox_maps, mem_labs, mem_labs_plus, mem_probs, labels=None, eps=1e-5):
    """Loop over lesions (``labels``: default all), each touching the whole volume."""
    if labels is None:
        labels = [lab for lab in np.unique(ens_lab) if lab != 0]
    return [naive_single_lesion(lab, ens_lab, vox_maps, mem_labs, mem_labs_plus, mem_probs, eps) for lab in labels]


def naive_patient(ens_mask, mem_masks, mem_masks_plus, vox_maps, brain):
    """Reference ``global_scale_measures`` + ``voxel_scale_measures`` (maps reused, not recomputed)."""
    out = {"PSU": 1 - np.mean([_iou(ens_mask, m) for m in mem_masks]),
           "PSU+": 1 - np.mean([_iou(ens_mask, m) for m in mem_masks_plus])}
    for k, v in vox_maps.items():
        out["avg. " + k] = np.mean(v * brain)
        out["avg. scaled " + k] = np.mean((v - v.min()) / (v.max() - v.min()) * brain)
    return out


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------

THRESHOLD = 0.5
MIN_SIZE = 4  # reference l_min = 3
CONNECTIVITY = 18
MEMBER_THRESHOLDS = (0.45, 0.5, 0.55, 0.5, 0.4)


def run_fast(member_probs, brain, member_thresholds):
    return U.compute_uncertainty(member_probs, threshold=THRESHOLD, min_size=MIN_SIZE, connectivity=CONNECTIVITY,
                                 member_thresholds=member_thresholds, brain_mask=brain, affine=np.eye(4))


def run_naive(member_probs, brain, member_thresholds, n_lesions=None):
    """Returns (results, seconds outside the lesion loop, seconds of the loop, lesions looped)."""
    t0 = time.perf_counter()
    lesion_probs = member_probs[:, 1]
    vox = naive_voxel_measures(lesion_probs)
    seg = U.ensemble_segmentation(member_probs, THRESHOLD, MIN_SIZE, CONNECTIVITY)
    segs = U.member_segmentations(member_probs, THRESHOLD, MIN_SIZE, CONNECTIVITY)
    segs_plus = U.member_segmentations(member_probs, list(member_thresholds), MIN_SIZE, CONNECTIVITY)
    mem_labs = np.stack([s.instances for s in segs])
    mem_labs_plus = np.stack([s.instances for s in segs_plus])
    patient = naive_patient((seg.instances > 0).astype(float), [(m > 0).astype(float) for m in mem_labs],
                            [(m > 0).astype(float) for m in mem_labs_plus], vox, brain)
    t1 = time.perf_counter()
    labels = list(range(1, seg.n_lesions + 1))
    if n_lesions is not None:
        labels = labels[:n_lesions]
    rows = naive_lesion_uncertainty(seg.instances, vox, mem_labs, mem_labs_plus, lesion_probs, labels)
    t2 = time.perf_counter()
    return (seg, rows, patient), t1 - t0, t2 - t1, len(labels)


def compare(fast, naive_rows):
    """Largest relative difference |fast - naive| / max(1, |naive|) per measure (finite pairs).

    The naive voxel measures run in float32 (as the reference does on float32 inputs), ours in
    float64 stored as float32, so logsums over hundreds of voxels differ around 1e-7 relative.
    """
    table = fast.lesions.set_index("label")
    worst = {}
    for row in naive_rows:
        for key, ref in row.items():
            if key == "label":
                continue
            ours = float(table.loc[row["label"], key])
            if np.isfinite(ref) and np.isfinite(ours):
                worst[key] = max(worst.get(key, 0.0), abs(ours - float(ref)) / max(1.0, abs(float(ref))))
            elif not (np.isnan(ref) and np.isnan(ours)) and ref != ours:
                worst[key] = float("inf")
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(182, 218, 182))
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--lesions", type=int, default=75, help="lesions drawn (75 give 59 ensemble lesions)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the vectorised engine (median)")
    ap.add_argument("--naive-lesions", type=int, default=None,
                    help="loop the naive implementation over this many lesions and extrapolate (default: all)")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args(argv)

    t = time.perf_counter()
    member_probs, brain = synthetic_ensemble(tuple(args.shape), args.members, args.lesions)
    member_thresholds = [MEMBER_THRESHOLDS[m % len(MEMBER_THRESHOLDS)] for m in range(args.members)]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {__import__('os').cpu_count()} CPUs, "
          f"python {platform.python_version()}, numpy {np.__version__}")
    print(f"volume {tuple(args.shape)}, M = {args.members}, input {member_probs.nbytes / 2**20:.0f} MiB "
          f"(float32, (M, 2, X, Y, Z)); synthetic data built in {time.perf_counter() - t:.1f} s")

    # first run: traced (peak extra memory incl. numpy buffers) and warms imports / page cache
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    t = time.perf_counter()
    fast = run_fast(member_probs, brain, member_thresholds)
    t_first = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(max(1, args.repeats)):
        t = time.perf_counter()
        run_fast(member_probs, brain, member_thresholds)
        times.append(time.perf_counter() - t)
    t_fast = float(np.median(times))
    n = fast.segmentation.n_lesions
    print(f"lesions: {n} ensemble lesions; columns: {len(fast.lesions.columns)}; patient keys: {len(fast.patient)}")
    print(f"vectorised compute_uncertainty: {t_fast:.2f} s wall (median of {len(times)}; first, traced run "
          f"{t_first:.2f} s), peak traced extra memory {peak / 2**20:.0f} MiB, "
          f"max RSS growth {(rss1 - rss0) / 1024:.0f} MiB")
    if args.skip_naive:
        return 0

    (seg, rows, _), t_fixed, t_loop, looped = run_naive(member_probs, brain, member_thresholds, args.naive_lesions)
    per_lesion = t_loop / max(looped, 1)
    t_naive = t_fixed + per_lesion * n
    note = "" if looped == n else f" (loop timed on {looped} of {n} lesions, extrapolated linearly)"
    print(f"naive per-lesion loop: {t_fixed:.2f} s outside the loop + {per_lesion:.2f} s per lesion "
          f"-> {t_naive:.1f} s{note}")
    print(f"speed-up: {t_naive / t_fast:.1f}x")
    worst = compare(fast, rows)
    bad = {k: v for k, v in worst.items() if not v <= 1e-4}
    print(f"agreement on {looped} lesions: max relative diff = {max(worst.values()) if worst else 0:.2e}"
          + (f"; MISMATCH {bad}" if bad else ""))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
