"""Lesion loads for the domain-randomised generator: heavy-tailed volumes, locations, confluence.

Real white-matter lesion shapes from the library (Lesjak et al., Neuroinformatics 2017,
doi:10.1007/s12021-017-9348-7; patient07 excluded by :func:`~bids_app.synth.sources.load_lesion_library`)
are placed on a 1 mm world lattice (:class:`LesionCanvas`) until a *target total volume* drawn
from a log-normal distribution (:class:`LoadDistribution`) is reached. Every library lesion is
classified by where it lands on the template (:func:`classify_library`):

* ``infratentorial``: at least half of it in a box around the brainstem and cerebellum;
* ``periventricular``: within 3 mm of the lateral ventricles (template CSF, deep, large components);
* ``juxtacortical``: within 2 mm of cortical grey matter;
* ``deep_wm``: the rest.

Each lesion of a subject picks a location from a per-subject mix (Dirichlet around
:data:`DEFAULT_LOCATION_MIX`) and a real lesion of that class at its MNI position (mirrored or
not); when the class has no fitting lesion left, a real shape is *translated* (integer mm, shape
unchanged) onto a random seed of that class (this is how the under-represented infratentorial
and juxtacortical lesions are covered). Heavy loads are made *confluent* like the real 30-50 mL
loads of the library: real periventricular components are stacked around the ventricles with
overlaps allowed, then merged by a morphological closing. Lesion voxels in template CSF
(ventricles) or outside the brain are dropped, so periventricular lesions stop at the
ventricle wall. See ``docs/synth.md`` ("Domain-randomised mode (issue 14)").

Pure numerics (numpy/scipy); templates and library are read-only inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np
from scipy import ndimage as ndi

from bids_app.synth.anatomy import sample_points
from bids_app.synth.sources import LesionLibrary, TemplateSet

LOCATIONS: tuple[str, ...] = ("periventricular", "deep_wm", "juxtacortical", "infratentorial")
#: mean share of lesions per location (Dirichlet mean); periventricular and juxtacortical
#: lesions dominate MS loads, infratentorial ones are rarer (McDonald 2017 criteria locations)
DEFAULT_LOCATION_MIX: tuple[float, ...] = (0.40, 0.27, 0.23, 0.10)
#: a placement keeps a lesion when this share of its voxels is brain tissue (not CSF)
MIN_KEPT_FRACTION = 0.7
#: and the mean template WM probability over the kept voxels reaches this
MIN_MEAN_WM = 0.35
#: while more than this volume (mm^3) is missing, library lesions are drawn with probability
#: proportional to volume ** SIZE_BIAS (else uniformly, which favours the many small lesions)
SIZE_BIAS_ABOVE_MM3 = 10_000.0
SIZE_BIAS = 0.5
_PV, _DEEP, _JC, _INFRA = range(4)


@dataclass(frozen=True)
class LoadDistribution:
    """Log-normal distribution of the total WML volume of a subject (mL).

    ``V = median_ml * exp(sigma_log * Z)``, ``Z ~ N(0, 1)``, clipped to ``[min_ml, max_ml]``.
    Defaults: median 8 mL, 10th percentile 1.8 mL, 90th percentile 35 mL, P(V > 50 mL) = 5.6 %
    (:meth:`quantile`). The 27 library patients (patient07 excluded) have median 14.3 mL,
    10th/90th percentiles 1.0/37.1 mL and a maximum of 52.2 mL; the default is shifted towards
    the lighter loads of typical relapsing-remitting cohorts while keeping the library's heavy tail.
    """

    median_ml: float = 8.0
    sigma_log: float = 1.15
    min_ml: float = 0.2
    max_ml: float = 120.0

    def quantile(self, q: float) -> float:
        """Analytic quantile (mL) of the unclipped log-normal."""
        return float(self.median_ml * np.exp(self.sigma_log * NormalDist().inv_cdf(q)))

    def exceedance(self, volume_ml: float) -> float:
        """P(V > volume_ml) of the unclipped log-normal."""
        return float(1.0 - NormalDist().cdf(np.log(volume_ml / self.median_ml) / self.sigma_log))


def sample_wml_volume_ml(rng: np.random.Generator, dist: LoadDistribution = LoadDistribution(),
                         size: int | None = None):
    """Draw total WML volumes (mL) from ``dist``; a float, or an array of ``size`` values."""
    v = dist.median_ml * np.exp(dist.sigma_log * rng.standard_normal(size))
    v = np.clip(v, dist.min_ml, dist.max_ml)
    return float(v) if size is None else v


# --------------------------------------------------------------------------------------------
# template regions
# --------------------------------------------------------------------------------------------


def _world_axes(templates: TemplateSet):
    zooms = np.sqrt((templates.affine[:3, :3] ** 2).sum(axis=0))
    return zooms, np.meshgrid(*[templates.affine[a, 3] + zooms[a] * np.arange(templates.shape[a]) for a in range(3)],
                              indexing="ij", sparse=True)


def template_regions(templates: TemplateSet) -> dict[str, np.ndarray]:
    """Location maps on the template grid (cached in ``templates.cache``).

    Returns
    -------
    dict
        ``infratentorial``, ``ventricles``, ``cortex``, ``deep_gm`` (bool, shape of the template);
        ``infra_f32`` (the infratentorial mask as float32, for point sampling);
        ``d_vent``, ``d_cortex`` (float32, mm to the nearest ventricle / cortex voxel).

    Notes
    -----
    In MNI152NLin2009cAsym world mm: infratentorial = (y < -38 and z < -18) or the brainstem
    column (|x| < 15, -45 < y < -12, z < -8); ventricles = template CSF >= 0.5 at least 8 mm
    inside the brain mask, |x| < 35, z > -10, above the tentorium, components >= 1 mL (the two
    lateral ventricles, about 40 mL together at 1 mm); cortex = GM >= 0.5 within 4 mm of
    extra-ventricular CSF or the brain edge and <= 25 mm deep; deep GM = GM >= 0.3, >= 20 mm deep,
    not cortex. Coarse boxes, honest about being so: they only steer where lesions go.
    """
    key = "randomised_regions"
    if key in templates.cache:
        return templates.cache[key]
    zooms, (x, y, z) = _world_axes(templates)
    brain = templates.brain >= 0.5
    depth = ndi.distance_transform_edt(brain, sampling=zooms)
    infra = brain & (((y < -38) & (z < -18)) | ((np.abs(x) < 15) & (y > -45) & (y < -12) & (z < -8)))
    vent = (templates.csf >= 0.5) & (depth >= 8.0) & ~infra & (np.abs(x) < 35) & (z > -10)
    labels, n = ndi.label(vent)
    if n:
        sizes = np.bincount(labels.ravel()) * float(np.prod(zooms))
        sizes[0] = 0
        vent = sizes[labels] >= 1000.0
    vent_near = ndi.binary_dilation(vent, iterations=max(1, int(round(3.0 / zooms[0]))))
    ext_csf = (~brain) | ((templates.csf >= 0.3) & ~vent_near)
    d_ext = ndi.distance_transform_edt(~ext_csf, sampling=zooms)
    cortex = brain & (templates.gm >= 0.5) & (d_ext <= 4.0) & (depth <= 25.0) & ~infra
    deep_gm = brain & (templates.gm >= 0.3) & (depth >= 20.0) & ~cortex & ~infra
    out = {
        "infratentorial": infra,
        "infra_f32": infra.astype(np.float32),
        "ventricles": vent,
        "cortex": cortex,
        "deep_gm": deep_gm,
        "d_vent": ndi.distance_transform_edt(~vent, sampling=zooms).astype(np.float32) if vent.any()
        else np.full(templates.shape, 1e3, np.float32),
        "d_cortex": ndi.distance_transform_edt(~cortex, sampling=zooms).astype(np.float32),
    }
    for arr in out.values():
        arr.flags.writeable = False
    templates.cache[key] = out
    return out


def _seed_pools(templates: TemplateSet) -> list[np.ndarray]:
    """Flat template indices where a translated lesion may be centred, per location (cached)."""
    key = "randomised_seeds"
    if key in templates.cache:
        return templates.cache[key]
    reg = template_regions(templates)
    wm, csf = templates.wm, templates.csf
    cerebral = ~reg["infratentorial"]
    pools = [
        (wm >= 0.5) & (reg["d_vent"] <= 5.0) & cerebral,
        (wm >= 0.6) & (reg["d_vent"] > 6.0) & (reg["d_cortex"] > 4.0) & cerebral,
        (wm >= 0.3) & (reg["d_cortex"] <= 3.0) & cerebral,
        (wm >= 0.4) & (csf < 0.3) & reg["infratentorial"],
    ]
    out = [np.flatnonzero(p) for p in pools]
    templates.cache[key] = out
    return out


# --------------------------------------------------------------------------------------------
# library classification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LibraryClasses:
    """Where each library lesion lands on the template, unflipped (column 0) and mirrored (1).

    Attributes
    ----------
    location : ndarray of int8, shape (L, 2)
        Index into :data:`LOCATIONS`.
    eligible : ndarray of bool, shape (L, 2)
        Kept fraction >= :data:`MIN_KEPT_FRACTION` and mean WM >= :data:`MIN_MEAN_WM`.
    valid_points : tuple of 2 ndarray of bool, each shape (M,)
        Per library voxel: brain (>= 0.5) and not CSF (< 0.5) at that position.
    kept_mm3 : ndarray of float64, shape (L, 2)
        Volume left after dropping invalid voxels.
    """

    location: np.ndarray
    eligible: np.ndarray
    valid_points: tuple[np.ndarray, np.ndarray]
    kept_mm3: np.ndarray


def _point_stats(templates: TemplateSet, pts: np.ndarray, full: bool = True) -> dict[str, np.ndarray]:
    """Per-point validity (brain, not CSF) and WM probability; with ``full`` also the location maps."""
    aff = templates.affine
    brain = sample_points(templates.brain, aff, pts, order=1)
    csf = sample_points(templates.csf, aff, pts, order=1)
    out = {"valid": (brain >= 0.5) & (csf < 0.5), "wm": sample_points(templates.wm, aff, pts, order=1)}
    if full:
        reg = template_regions(templates)
        out["infra"] = sample_points(reg["infra_f32"], aff, pts, order=0) > 0.5
        out["d_vent"] = sample_points(reg["d_vent"], aff, pts, order=1)
        out["d_cortex"] = sample_points(reg["d_cortex"], aff, pts, order=1)
    return out


def _classify(stats: dict[str, np.ndarray], starts: np.ndarray, counts: np.ndarray, voxel_mm3: float):
    """Per-segment location, eligibility and kept volume from per-point statistics."""
    valid = stats["valid"]
    kept = np.add.reduceat(valid.astype(np.float64), starts)
    wm_kept = np.add.reduceat(np.where(valid, stats["wm"], 0.0), starts) / np.maximum(kept, 1)
    infra = np.add.reduceat(stats["infra"].astype(np.float64), starts) / counts
    d_vent = np.minimum.reduceat(stats["d_vent"], starts)
    d_ctx = np.minimum.reduceat(stats["d_cortex"], starts)
    loc = np.where(infra >= 0.5, _INFRA, np.where(d_vent <= 3.0, _PV, np.where(d_ctx <= 2.0, _JC, _DEEP)))
    eligible = (kept / counts >= MIN_KEPT_FRACTION) & (wm_kept >= MIN_MEAN_WM)
    return loc.astype(np.int8), eligible, kept * voxel_mm3


def classify_library(library: LesionLibrary, templates: TemplateSet) -> LibraryClasses:
    """Location class and eligibility of every library lesion on this template (cached)."""
    key = ("randomised_classes", id(library))
    if key in templates.cache:
        return templates.cache[key]
    starts = library.offsets[:-1]
    counts = np.maximum(np.diff(library.offsets), 1).astype(np.float64)
    locs, elig, kept, valid = [], [], [], []
    for flip in (False, True):
        pts = np.asarray(library.coords, dtype=np.float64).copy()
        if flip:
            pts[:, 0] = -pts[:, 0]
        stats = _point_stats(templates, pts)
        loc, ok, k = _classify(stats, starts, counts, library.voxel_mm ** 3)
        locs.append(loc)
        elig.append(ok)
        kept.append(k)
        valid.append(stats["valid"])
    out = LibraryClasses(np.stack(locs, 1), np.stack(elig, 1), (valid[0], valid[1]), np.stack(kept, 1))
    templates.cache[key] = out
    return out


# --------------------------------------------------------------------------------------------
# the 1 mm canvas
# --------------------------------------------------------------------------------------------

_OFFS27 = np.array([[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)], dtype=np.int64)


class LesionCanvas:
    """Union of placed lesion voxels on the 1 mm integer world lattice covering the template.

    Library voxel centres sit at integer world mm (FSL MNI152 1 mm grid), so are mirrored and
    integer-translated lesions: the union's voxel count is the lesion volume in mm^3.
    """

    def __init__(self, templates: TemplateSet):
        zooms = np.sqrt((templates.affine[:3, :3] ** 2).sum(axis=0))
        lo = templates.affine[:3, 3] - zooms / 2.0
        hi = lo + np.asarray(templates.shape) * zooms
        self.origin = np.ceil(lo + 0.5 - 1e-6).astype(np.int64)
        self.shape = tuple(int(s) for s in (np.floor(hi - 0.5 + 1e-6).astype(np.int64) - self.origin + 1))
        self.mask = np.zeros(self.shape, dtype=bool)
        self._count = 0
        strides = np.array([self.shape[1] * self.shape[2], self.shape[2], 1], dtype=np.int64)
        self._flat_offsets = _OFFS27 @ strides

    def index(self, points: np.ndarray) -> np.ndarray | None:
        """Flat lattice indices of points (N, 3); ``None`` when any point is outside."""
        ijk = np.rint(np.asarray(points, dtype=np.float64)).astype(np.int64) - self.origin
        if ijk.size == 0 or np.any(ijk < 0) or np.any(ijk >= np.asarray(self.shape)):
            return None
        return np.unique(np.ravel_multi_index(tuple(ijk.T), self.shape))

    def touches(self, flat: np.ndarray) -> bool:
        """Whether any placed voxel is within one voxel (26-neighbourhood) of ``flat``.

        Neighbours are taken as flat-index offsets (clamped to the lattice): a lesion on the
        lattice's outer face would wrap, but lesions lie inside the brain, far from it.
        """
        flat_mask = self.mask.reshape(-1)
        if flat_mask[flat].any():
            return True
        near = (flat[:, None] + self._flat_offsets[None, :]).reshape(-1)
        np.clip(near, 0, flat_mask.size - 1, out=near)
        return bool(flat_mask[near].any())

    def add(self, flat: np.ndarray) -> None:
        flat_mask = self.mask.reshape(-1)
        self._count += int(np.count_nonzero(~flat_mask[flat]))
        flat_mask[flat] = True

    def set_mask(self, mask: np.ndarray) -> None:
        """Replace the placed voxels (e.g. after merging)."""
        self.mask[...] = mask
        self._count = int(np.count_nonzero(self.mask))

    @property
    def volume_mm3(self) -> int:
        return self._count

    def points(self, mask: np.ndarray | None = None) -> np.ndarray:
        """World coordinates (N, 3, float32) of the set voxels (of ``mask`` if given)."""
        ijk = np.argwhere(self.mask if mask is None else mask)
        return (ijk + self.origin).astype(np.float32)


# --------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------


@dataclass
class LesionDraw:
    """The WML of one subject in template world space.

    Attributes
    ----------
    points : ndarray of float32, shape (N, 3)
        World mm of the 1 mm lesion voxels (union, merged where confluent).
    target_ml, volume_ml : float
        Drawn target and placed volume (before warping to the subject grid).
    confluent : bool
    location_mix : list of float
        The subject's location shares (order of :data:`LOCATIONS`).
    lesions : list of dict
        Provenance per placed lesion: patient, component, flipped, location, relocated (shift mm).
    """

    points: np.ndarray
    target_ml: float
    volume_ml: float
    confluent: bool
    location_mix: list
    lesions: list = field(default_factory=list)

    def summary(self) -> dict:
        counts = {name: 0 for name in LOCATIONS}
        for les in self.lesions:
            counts[les["location"]] += 1
        return {"target_ml": round(self.target_ml, 3), "volume_ml": round(self.volume_ml, 3),
                "confluent": self.confluent, "location_mix": [round(v, 4) for v in self.location_mix],
                "n_placed": len(self.lesions), "placed_per_location": counts}


@dataclass(frozen=True)
class PlacementParams:
    """Ranges of the lesion placement (see :func:`place_wml`)."""

    location_mix: tuple[float, ...] = DEFAULT_LOCATION_MIX
    location_concentration: float = 8.0      # Dirichlet concentration around the mix
    confluent_min_ml: float = 15.0           # loads above this may be confluent...
    p_confluent: float = 0.75                # ...with this probability
    always_confluent_ml: float = 40.0        # loads above this are always confluent (as in the library)
    confluent_share: tuple[float, float] = (0.6, 0.9)   # share of the target stacked periventricularly
    closing_radius_mm: tuple[int, int] = (1, 3)         # merge radius (integer mm, upper bound excluded)
    max_lesions: int = 600

    def to_dict(self) -> dict:
        return asdict(self)


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius ** 2 + 1e-9


class _Placer:
    def __init__(self, rng, library, templates, min_volume_mm3):
        self.rng, self.library, self.templates = rng, library, templates
        self.classes = classify_library(library, templates)
        self.canvas = LesionCanvas(templates)
        self.used = np.zeros(library.n_lesions, dtype=bool)
        self.volumes = library.volumes_mm3
        self.big_enough = self.volumes >= min_volume_mm3
        self.seeds = _seed_pools(templates)
        self.records: list[dict] = []

    def _pts(self, idx: int, flip: bool) -> np.ndarray:
        lib = self.library
        pts = lib.lesion_coords(idx, flip=flip)
        return pts[self.classes.valid_points[int(flip)][lib.offsets[idx]:lib.offsets[idx + 1]]]

    def _commit(self, flat, idx, flip, loc, shift=None) -> None:
        self.canvas.add(flat)
        self.used[idx] = True
        self.records.append({"patient": str(self.library.patient[idx]), "component": int(self.library.component[idx]),
                             "flipped": bool(flip), "location": LOCATIONS[loc],
                             "relocated_mm": None if shift is None else [int(s) for s in shift]})

    def at_mni(self, loc: int, max_mm3: float, allow_touch: bool, size_bias: float = 0.0, tries: int = 6) -> bool:
        """Place an unused library lesion of class ``loc`` at its MNI position (or mirrored).

        Candidates are drawn with probability proportional to ``volume ** size_bias``.
        """
        c = self.classes
        ok = (c.eligible & (c.location == loc) & (c.kept_mm3 <= max_mm3)) & (self.big_enough & ~self.used)[:, None]
        cand = np.argwhere(ok)
        if len(cand) == 0:
            return False
        p = None
        if size_bias > 0:
            p = c.kept_mm3[cand[:, 0], cand[:, 1]] ** size_bias
            p = p / p.sum()
        for _ in range(min(tries, len(cand))):
            idx, col = cand[int(self.rng.choice(len(cand), p=p))]
            flat = self.canvas.index(self._pts(int(idx), bool(col)))
            if flat is None or (not allow_touch and self.canvas.touches(flat)):
                continue
            self._commit(flat, int(idx), bool(col), loc)
            return True
        return False

    def relocated(self, loc: int, max_mm3: float, allow_touch: bool, tries: int = 6) -> bool:
        """Translate a real shape (integer mm) onto a random seed of class ``loc``."""
        lib, tpl = self.library, self.templates
        cand = np.flatnonzero(self.big_enough & (self.volumes <= max_mm3))
        pool = self.seeds[loc]
        if cand.size == 0 or pool.size == 0:
            return False
        for _ in range(tries):
            idx = int(cand[int(self.rng.integers(cand.size))])
            flip = bool(self.rng.uniform() < 0.5)
            pts = lib.lesion_coords(idx, flip=flip).astype(np.float64)
            ijk = np.asarray(np.unravel_index(int(pool[int(self.rng.integers(pool.size))]), tpl.shape), np.float64)
            target = tpl.affine[:3, :3] @ ijk + tpl.affine[:3, 3]
            shift = np.rint(target - pts.mean(axis=0))
            pts = pts + shift
            stats = _point_stats(tpl, pts, full=False)
            valid = stats["valid"]
            if valid.mean() < MIN_KEPT_FRACTION or stats["wm"][valid].mean() < MIN_MEAN_WM:
                continue
            flat = self.canvas.index(pts[valid])
            if flat is None or (not allow_touch and self.canvas.touches(flat)):
                continue
            self._commit(flat, idx, flip, loc, shift)
            return True
        return False


def place_wml(
    rng: np.random.Generator,
    library: LesionLibrary,
    templates: TemplateSet,
    target_ml: float,
    *,
    params: PlacementParams = PlacementParams(),
    min_volume_mm3: float = 2.5,
) -> LesionDraw:
    """Place real lesion shapes until their union reaches ``target_ml`` (within a few %).

    1. Draw the subject's location mix ``Dirichlet(concentration * mix)`` and whether the load is
       confluent (``target >= confluent_min_ml`` with probability ``p_confluent``; always above
       ``always_confluent_ml``).
    2. Confluent: stack periventricular lesions (at their MNI positions first, then translated
       onto periventricular seeds), overlaps allowed, up to ``share * target``; then close the
       union with a ball of radius 1-2 mm (merging neighbours into confluent caps), keeping
       only tissue voxels.
    3. Fill the rest: each lesion picks a location from the mix and a real lesion of it that
       fits the remaining volume and touches no earlier lesion; when none is left at MNI
       positions, a real shape is translated onto a seed of that location. While more than
       10 mL are missing, candidates are drawn with probability proportional to the square root
       of their volume (:data:`SIZE_BIAS`), else uniformly. After 20 failed
       tries in a row lesions may touch (merge); the loop ends at 97 % of the target, after
       80 failures in a row or at ``max_lesions``.

    Parameters
    ----------
    rng : numpy Generator
    library : LesionLibrary
    templates : TemplateSet
    target_ml : float
        Total WML volume wanted (mL).
    params : PlacementParams
    min_volume_mm3 : float
        Smallest library lesion used (2.5 voxels of the working grid keeps lesions visible).

    Returns
    -------
    LesionDraw
    """
    target = float(target_ml) * 1000.0
    mix = rng.dirichlet(params.location_concentration * np.asarray(params.location_mix, dtype=np.float64))
    coin = rng.uniform()
    confluent = bool(target_ml >= params.always_confluent_ml
                     or (target_ml >= params.confluent_min_ml and coin < params.p_confluent))
    placer = _Placer(rng, library, templates, min_volume_mm3)
    canvas = placer.canvas
    if confluent:
        goal = rng.uniform(*params.confluent_share) * target
        misses = 0
        while canvas.volume_mm3 < goal and misses < 40 and len(placer.records) < params.max_lesions:
            room = goal - canvas.volume_mm3 + 0.1 * target
            if not (placer.at_mni(_PV, room, True) or placer.relocated(_PV, min(room, 3000.0), True)):
                misses += 1
        radius = int(rng.integers(*params.closing_radius_mm))
        mask = canvas.mask
        pad = radius + 1
        idx = np.argwhere(mask)
        if idx.size:
            lo = np.maximum(idx.min(0) - pad, 0)
            hi = np.minimum(idx.max(0) + pad + 1, np.asarray(canvas.shape))
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
            closed = ndi.binary_closing(mask[box], structure=_ball(radius)) | mask[box]
            new = closed & ~mask[box]
            if new.any():
                ijk = np.argwhere(new) + lo
                pts = (ijk + canvas.origin).astype(np.float64)
                ok = _point_stats(templates, pts, full=False)["valid"]
                merged = mask.copy()
                merged[tuple(ijk[ok].T)] = True
                canvas.set_mask(merged)
    misses = 0
    while canvas.volume_mm3 < 0.97 * target and misses < 80 and len(placer.records) < params.max_lesions:
        remaining = target - canvas.volume_mm3
        room = remaining + max(0.15 * target, 30.0)
        loc = int(rng.choice(len(LOCATIONS), p=mix))
        touch = misses >= 20  # a crowded brain: let new lesions merge with earlier ones
        # heavy loads favour larger lesions: lesion counts grow more slowly than volume in real
        # cohorts (the library: 100-392 lesions at 49-52 mL, 20-40 at about 1 mL)
        bias = SIZE_BIAS if remaining > SIZE_BIAS_ABOVE_MM3 else 0.0
        if placer.at_mni(loc, room, touch, bias) or placer.relocated(loc, min(room, 5000.0), touch):
            misses = 0
        else:
            misses += 1
    volume = canvas.volume_mm3
    return LesionDraw(canvas.points(), float(target_ml), volume / 1000.0, confluent, mix.tolist(), placer.records)
