"""Domain-randomised synthetic MS subjects for training models that generalise (issue 14, item 1).

After SynthSeg (Billot et al., Medical Image Analysis 2023, doi:10.1016/j.media.2023.102789) and
its lesion variants, and MindGlide for MS segmentation from any contrast (Goebl et al., Nature
Communications 2025, doi:10.1038/s41467-025-58274-8): every quantity a network should ignore is
drawn at random, so real scans are one more draw. One subject is

1. *anatomy*: MNI152NLin2009cAsym through a random smooth deformation
   (:func:`~bids_app.synth.anatomy.random_deformation`, strength drawn per subject);
2. *lesions*: real white-matter lesion shapes up to a heavy-tailed total volume with a
   location mix and confluent periventricular loads (:mod:`~bids_app.synth.lesion_load`), plus
   synthetic cortical lesions (:func:`~bids_app.synth.lesions.sample_cl`);
3. *intensities*, per channel (T1w-like channel 0, FLAIR-like channel 1): a Gaussian per label
   (WM, infratentorial WM, cortical/deep/infratentorial GM, ventricular/external CSF, WML, CL)
   with random mean and standard deviation, mixed by the tissue probabilities (partial volume).
   With probability ``p_realistic`` a channel keeps a realistic ordering (ranges set from the
   real patient07 images, see ``docs/synth.md``): FLAIR lesions hyperintense to WM and GM,
   T1w lesions hypo- to isointense; otherwise means are uniform in [0, 1], lesions only keeping
   a minimum contrast to WM. Smooth texture, per-lesion intensity heterogeneity (rim/core
   profile and smooth noise) and a logistic partial-volume edge at lesion borders;
4. *acquisition*, per channel: bias field, random resolution and slice thickness with noise
   on the acquired grid (:mod:`~bids_app.synth.acquisition`), gamma, random global scale;
   zero outside the brain (skull-stripped, as the demo model trains).

Pure numerics: templates and library are inputs (read by :mod:`~bids_app.synth.sources`),
nothing is read or written here. All draws come from one ``numpy.random.Generator``, split
into independent streams (anatomy, lesions, intensities, one per channel's acquisition).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage as ndi

from bids_app.core.imageio import Image
from bids_app.core.postprocess import label_components
from bids_app.synth import acquisition as A
from bids_app.synth.anatomy import random_deformation, warp_maps
from bids_app.synth.contrast import bias_field
from bids_app.synth.lesion_load import (
    LoadDistribution,
    PlacementParams,
    place_wml,
    sample_wml_volume_ml,
    template_regions,
)
from bids_app.synth.lesions import CL, WML, Occupancy, footprint, paint_fraction, sample_cl, sample_lesion_count
from bids_app.synth.sources import LesionLibrary, TemplateSet

CHANNELS: tuple[str, ...] = ("T1w", "FLAIR")
#: intensity labels (a Gaussian each, per channel)
LABELS: tuple[str, ...] = ("WM", "WM_infra", "GM_cortex", "GM_deep", "GM_infra", "CSF_vent", "CSF_ext", "WML", "CL")
#: realistic means relative to WM = 1 (CL relative to cortical GM), widened around patient07
#: (T1: GM/WM 0.72, CSF/WM 0.18, WML/WM 0.82 [IQR 0.70-0.92], lesion core 0.70;
#: FLAIR: GM/WM 1.15, CSF/WM 0.59 incl. partial volume, WML/WM 1.37 [IQR 1.25-1.52], core 1.56);
#: GM and CSF centred a little below/above those so that the same measurement on the blurred,
#: partial-volume images lands near patient07 (benchmarks/bench_synth_randomised.py intensity)
REALISTIC_MEANS: dict[str, dict[str, tuple[float, float]]] = {
    "T1w": {"WM_infra": (0.88, 1.05), "GM_cortex": (0.50, 0.80), "GM_deep": (0.58, 0.92), "GM_infra": (0.50, 0.80),
            "CSF_vent": (0.02, 0.25), "CSF_ext": (0.02, 0.30), "WML": (0.50, 1.00), "CL": (0.80, 1.00)},
    "FLAIR": {"WM_infra": (0.95, 1.20), "GM_cortex": (1.05, 1.45), "GM_deep": (1.00, 1.45), "GM_infra": (1.02, 1.40),
              "CSF_vent": (0.03, 0.45), "CSF_ext": (0.05, 0.60), "WML": (1.15, 2.20), "CL": (1.00, 1.30)},
}
#: top-level keys of :attr:`RandomisedSubject.params`
PARAM_KEYS: tuple[str, ...] = ("resolution_mm", "deformation", "lesions", "cortical_lesions", "intensities",
                               "texture_sigma_mm", "lesion_heterogeneity", "partial_volume", "acquisition",
                               "volumes", "randomisation")


@dataclass(frozen=True)
class RandomisationParams:
    """Ranges of the domain-randomised generator (``(lo, hi)`` = uniform unless said otherwise).

    Attributes
    ----------
    p_realistic : float
        Per channel: probability of a realistic T1w-/FLAIR-like ordering (:data:`REALISTIC_MEANS`)
        instead of uniform random means in [0, 1].
    min_lesion_contrast : float
        Random orderings: ``|mean(WML) - mean(WM)|`` at least this (CL vs cortical GM: half of it).
    label_cv : (lo, hi)
        Per-label standard deviation relative to the brightest tissue mean (realistic: to its own mean).
    texture_sigma_mm : (lo, hi)
        Smoothing of the per-label Gaussian texture field.
    deformation_variation : (lo, hi)
        Scales :data:`~bids_app.synth.anatomy.DEFORM_DEFAULTS` (1 = RMS 2.5 mm, rotation 4 deg...).
    load : LoadDistribution
        Total WML volume (log-normal, median 8 mL, 90th percentile 35 mL, 5.6 % above 50 mL).
    placement : PlacementParams
        Location mix and confluence (:mod:`~bids_app.synth.lesion_load`).
    cl_mean : (lo, hi), p_no_cl : float
        Mean number of cortical lesions (over-dispersed count); probability of none.
    lesion_jitter : float
        Per-lesion relative change of the lesion-WM contrast, uniform in +- this.
    rim_amplitude, noise_amplitude : (lo, hi)
        Per subject maxima of the per-lesion rim/core (+-) and smooth-noise contrast modulation.
    rim_length_mm, heterogeneity_sigma_mm : (lo, hi)
        Decay length of the rim profile; smoothing of the within-lesion noise.
    pv_tau_mm : (lo, hi)
        Width of the logistic partial-volume edge of lesions (0.5 mm off the border:
        weights 0.65-0.92 inside, 0.08-0.35 outside at the defaults).
    p_isotropic, isotropic_mm, inplane_mm, slice_mm, slice_axis_p :
        Acquired voxel size per channel (:func:`~bids_app.synth.acquisition.random_spacing`);
        slices sagittal/coronal/axial with these weights.
    bias_log_sd : (lo, hi)
        Standard deviation of the log bias field (cubic polynomial).
    noise_sd : (lo, hi)
        Noise standard deviation relative to the brightest tissue mean (Rician with ``p_rician``).
    log_gamma_sd : float
        ``gamma = exp(N(0, log_gamma_sd))``.
    log_scale : (lo, hi)
        Global intensity scale ``exp(U(lo, hi))``.
    """

    p_realistic: float = 0.5
    min_lesion_contrast: float = 0.12
    label_cv: tuple[float, float] = (0.0, 0.06)
    texture_sigma_mm: tuple[float, float] = (0.5, 1.5)
    deformation_variation: tuple[float, float] = (0.5, 2.0)
    load: LoadDistribution = field(default_factory=LoadDistribution)
    placement: PlacementParams = field(default_factory=PlacementParams)
    cl_mean: tuple[float, float] = (0.0, 8.0)
    p_no_cl: float = 0.3
    lesion_jitter: float = 0.25
    rim_amplitude: tuple[float, float] = (0.0, 0.6)
    noise_amplitude: tuple[float, float] = (0.0, 0.3)
    rim_length_mm: tuple[float, float] = (0.7, 2.5)
    heterogeneity_sigma_mm: tuple[float, float] = (0.7, 2.0)
    pv_tau_mm: tuple[float, float] = (0.2, 0.8)
    p_isotropic: float = 0.35
    isotropic_mm: tuple[float, float] = (0.9, 1.5)
    inplane_mm: tuple[float, float] = (0.7, 1.3)
    slice_mm: tuple[float, float] = (1.5, 6.5)
    slice_axis_p: tuple[float, float, float] = (0.15, 0.15, 0.7)
    bias_log_sd: tuple[float, float] = (0.0, 0.3)
    noise_sd: tuple[float, float] = (0.005, 0.06)
    p_rician: float = 0.7
    log_gamma_sd: float = 0.25
    log_scale: tuple[float, float] = (0.0, 7.0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RandomisedSubject:
    """One domain-randomised subject on the template grid (RAS, nibabel order).

    Attributes
    ----------
    images : dict of str -> ndarray of float32, shape (X, Y, Z)
        ``"T1w"`` and ``"FLAIR"`` (channel order :data:`CHANNELS`), zero outside the brain mask.
    labels : ndarray of uint8, shape (X, Y, Z)
        0 background, 1 WML, 2 CL.
    brain_mask : ndarray of uint8, shape (X, Y, Z)
    affine : ndarray of float64, shape (4, 4)
    params : dict
        Every drawn parameter (keys :data:`PARAM_KEYS`), JSON-serialisable.
    tissues : ndarray of uint8 or None
        With ``return_tissues``: 0 outside, 1 CSF, 2 GM, 3 WM (largest warped probability).
    """

    images: dict
    labels: np.ndarray
    brain_mask: np.ndarray
    affine: np.ndarray
    params: dict
    tissues: np.ndarray | None = None

    @property
    def t1w(self) -> Image:
        return Image(self.images["T1w"], self.affine)

    @property
    def flair(self) -> Image:
        return Image(self.images["FLAIR"], self.affine)

    @property
    def lesion_dseg(self) -> Image:
        return Image(self.labels, self.affine)

    def stack(self) -> np.ndarray:
        """Channels as one float32 array, shape (2, X, Y, Z), order :data:`CHANNELS`."""
        return np.stack([self.images[c] for c in CHANNELS]).astype(np.float32)


# --------------------------------------------------------------------------------------------
# intensity draws
# --------------------------------------------------------------------------------------------


def _u(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = lo_hi
    return float(lo + (hi - lo) * rng.uniform())


def sample_label_intensities(rng: np.random.Generator, channel: str, params: RandomisationParams
                             ) -> dict:
    """Means and standard deviations of every label in one channel.

    Realistic (probability ``p_realistic``): WM = 1, the other labels in :data:`REALISTIC_MEANS`
    with the orderings CSF < GM < WM (T1w) or CSF < WM < GM (FLAIR); WML in [0.5, 1] x WM on
    T1w (hypo- to isointense) and above both WM + 0.15 and cortical GM + 0.05 on FLAIR; CL
    relative to cortical GM. Random: every mean uniform in [0, 1], then WML moved to at least
    ``min_lesion_contrast`` from WM and CL to half of it from cortical GM.

    Returns
    -------
    dict with ``mode`` ("realistic" or "random"), ``means`` and ``stds`` (label -> float).
    """
    realistic = bool(rng.uniform() < params.p_realistic)
    means: dict[str, float] = {}
    if realistic:
        r = REALISTIC_MEANS[channel]
        means["WM"] = 1.0
        for label in ("WM_infra", "GM_cortex", "GM_deep", "GM_infra", "CSF_vent", "CSF_ext"):
            means[label] = _u(rng, r[label])
        if channel == "T1w":
            means["WML"] = _u(rng, r["WML"])
        else:
            lo = max(r["WML"][0], 1.15, means["GM_cortex"] + 0.05)
            means["WML"] = _u(rng, (lo, max(lo, r["WML"][1])))
        means["CL"] = means["GM_cortex"] * _u(rng, r["CL"])
        stds = {k: v * _u(rng, params.label_cv) for k, v in means.items()}
    else:
        for label in LABELS:
            means[label] = float(rng.uniform())
        c = params.min_lesion_contrast
        means["WML"] = _push_away(rng, means["WML"], means["WM"], c)
        means["CL"] = _push_away(rng, means["CL"], means["GM_cortex"], c / 2.0)
        top = max(means.values())
        stds = {k: top * _u(rng, params.label_cv) for k in means}
    return {"mode": "realistic" if realistic else "random",
            "means": {k: round(float(v), 6) for k, v in means.items()},
            "stds": {k: round(float(v), 6) for k, v in stds.items()}}


def _push_away(rng: np.random.Generator, value: float, reference: float, gap: float) -> float:
    """``value`` unchanged when ``|value - reference| >= gap``, else redrawn on an allowed side in [0, 1]."""
    if abs(value - reference) >= gap:
        return value
    sides = [s for s in (-1, 1) if 0.0 <= reference + s * gap <= 1.0] or [1]
    side = sides[int(rng.integers(len(sides)))]
    lo, hi = (reference + gap, max(reference + gap, 1.0)) if side > 0 else (min(0.0, reference - gap), reference - gap)
    return float(lo + (hi - lo) * rng.uniform())


# --------------------------------------------------------------------------------------------
# template-space rendering
# --------------------------------------------------------------------------------------------


def _region_weights(templates: TemplateSet) -> dict[str, np.ndarray]:
    """Smooth (sigma 2 mm) infratentorial, deep-GM and ventricle indicators (float32, cached)."""
    key = "randomised_weights"
    if key in templates.cache:
        return templates.cache[key]
    reg = template_regions(templates)
    sigma = 2.0 / templates.resolution_mm
    out = {}
    for name, mask in (("infra", reg["infratentorial"]), ("deep", reg["deep_gm"]),
                       ("vent", ndi.binary_dilation(reg["ventricles"]))):
        w = ndi.gaussian_filter(mask.astype(np.float32), sigma)
        w.flags.writeable = False
        out[name] = w
    templates.cache[key] = out
    return out


#: the tissue labels (lesion labels excluded), order of :func:`tissue_basis`
TISSUE_LABELS: tuple[str, ...] = LABELS[:7]


def tissue_basis(templates: TemplateSet) -> tuple[np.ndarray, ...]:
    """Partial-volume share of each of :data:`TISSUE_LABELS` per voxel (float32 maps, cached).

    Tissue probabilities are sharpened (``p_t^2``, rescaled to the same sum: the template is an
    average, blurrier than one brain), renormalised to sum <= 1, the missing share counts as external CSF,
    and each tissue is split smoothly by region (WM: cerebral / infratentorial; GM: cortical /
    deep / infratentorial; CSF: ventricular / external), so the maps sum to 1 everywhere.
    """
    key = "randomised_basis"
    if key in templates.cache:
        return templates.cache[key]
    w = _region_weights(templates)
    gm, wm, csf = templates.gm, templates.wm, templates.csf
    total = gm + wm + csf
    # the template is an average of 152 brains, blurrier than any one brain: sharpen the tissue
    # shares (p^2, renormalised to the same total), which brings the GM/WM and CSF/WM contrasts
    # measured on the images closer to patient07's (docs/synth.md)
    sq = gm * gm + wm * wm + csf * csf
    sharpen = total / np.maximum(sq, 1e-6)
    gm, wm, csf = gm * gm * sharpen, wm * wm * sharpen, csf * csf * sharpen
    scale = 1.0 / np.maximum(total, 1.0)
    infra = w["infra"]
    deep = np.minimum(w["deep"], 1.0 - infra)
    wm_s, gm_s, csf_s = wm * scale, gm * scale, csf * scale
    missing = np.clip(1.0 - total, 0.0, 1.0)
    basis = (wm_s * (1.0 - infra), wm_s * infra, gm_s * (1.0 - deep - infra), gm_s * deep, gm_s * infra,
             csf_s * w["vent"], csf_s * (1.0 - w["vent"]) + missing)
    basis = tuple(b.astype(np.float32) for b in basis)
    for b in basis:
        b.flags.writeable = False
    templates.cache[key] = basis
    return basis


def tissue_means(templates: TemplateSet, values: dict[str, float]) -> np.ndarray:
    """Partial-volume mixture ``sum_k share_k(x) v_k`` of per-label values (float32, template grid).

    ``values`` maps every name of :data:`TISSUE_LABELS` to a number; shares from :func:`tissue_basis`.
    """
    basis = tissue_basis(templates)
    out = np.zeros(templates.shape, dtype=np.float32)
    for name, b in zip(TISSUE_LABELS, basis):
        out += np.float32(values[name]) * b
    return out


def soft_lesion_weight(frac: np.ndarray, tau_mm: float, zooms, pad: int = 3) -> np.ndarray:
    """Logistic partial-volume weight ``1 / (1 + exp(-d / tau))`` of a lesion mask (float32).

    ``d`` is the signed distance (mm) to the border of ``frac >= 0.5`` (positive inside, half a
    voxel at the outermost lesion voxel, minus half a voxel at its outside neighbour), so
    border voxels get intermediate weights and the label ``frac >= 0.5`` is unchanged;
    computed in the lesions' bounding box padded by ``pad`` voxels, 0 elsewhere.
    """
    out = np.zeros(frac.shape, dtype=np.float32)
    mask = frac >= 0.5
    if not mask.any():
        return out
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, np.asarray(frac.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    m = mask[box]
    z = np.asarray(zooms, dtype=np.float64)
    half = 0.5 * float(z.min())
    inside = ndi.distance_transform_edt(m, sampling=z) - half
    outside = ndi.distance_transform_edt(~m, sampling=z) - half
    d = np.where(m, inside, -outside)
    out[box] = (1.0 / (1.0 + np.exp(-d / max(float(tau_mm), 1e-3)))).astype(np.float32)
    return out


def lesion_modulation(rng: np.random.Generator, frac: np.ndarray, zooms, *, jitter: float, rim_amp: float,
                      noise_amp: float, rim_length_mm: float, noise_sigma_mm: float) -> tuple[np.ndarray, int]:
    """Within-lesion contrast multiplier ``m(x)`` (float32, 1 outside lesions) and the lesion count.

    Per connected lesion ``c`` (26-connectivity of ``frac >= 0.5``, dilated by one voxel so that
    the partial-volume border belongs to it): ``m = 1 + j_c + a_c (rim(x) - 0.5) + b_c n(x)``,
    ``j_c ~ U(-jitter, jitter)``, ``a_c ~ U(-rim_amp, rim_amp)`` (positive: brighter rim,
    negative: brighter core), ``rim = exp(-depth / rim_length)``, ``b_c ~ U(0, noise_amp)``,
    ``n`` unit smooth noise; clipped to >= 0.25 so a lesion keeps its sign of contrast.
    """
    out = np.ones(frac.shape, dtype=np.float32)
    mask = frac >= 0.5
    if not mask.any():
        return out, 0
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, np.asarray(frac.shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    m = mask[box]
    labels, n = label_components(m, connectivity=26)
    grown = ndi.grey_dilation(labels, footprint=np.ones((3, 3, 3), bool))
    labels = np.where(labels > 0, labels, grown)
    z = np.asarray(zooms, dtype=np.float64)
    depth = ndi.distance_transform_edt(m, sampling=z)
    rim = np.exp(-depth / max(rim_length_mm, 1e-3)).astype(np.float32)
    noise = ndi.gaussian_filter(rng.standard_normal(m.shape).astype(np.float32), noise_sigma_mm / z)
    noise /= float(noise.std()) or 1.0
    j = np.concatenate([[0.0], rng.uniform(-jitter, jitter, n)]).astype(np.float32)
    a = np.concatenate([[0.0], rng.uniform(-rim_amp, rim_amp, n)]).astype(np.float32)
    b = np.concatenate([[0.0], rng.uniform(0.0, noise_amp, n)]).astype(np.float32)
    mod = 1.0 + j[labels] + a[labels] * (rim - 0.5) + b[labels] * noise
    out[box] = np.where(labels > 0, np.maximum(mod, 0.25), 1.0).astype(np.float32)
    return out, int(n)


# --------------------------------------------------------------------------------------------
# the subject
# --------------------------------------------------------------------------------------------


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _channel_image(templates: TemplateSet, draw: dict, texture: np.ndarray, w_wml: np.ndarray, mod_wml: np.ndarray,
                   w_cl: np.ndarray, mod_cl: np.ndarray) -> np.ndarray:
    """Noise-free template-space image of one channel (tissues, texture, lesions blended by weight)."""
    means, stds = draw["means"], draw["stds"]
    img = tissue_means(templates, means) + tissue_means(templates, stds) * texture
    wm, wml = np.float32(means["WM"]), np.float32(means["WML"])
    lesion = wm + (wml - wm) * mod_wml + np.float32(stds["WML"]) * texture
    img = (1.0 - w_wml) * img + w_wml * lesion
    gm, cl = np.float32(means["GM_cortex"]), np.float32(means["CL"])
    cortical = gm + (cl - gm) * mod_cl + np.float32(stds["CL"]) * texture
    img = (1.0 - w_cl) * img + w_cl * cortical
    return img.astype(np.float32)


def _acquire(rng: np.random.Generator, image: np.ndarray, brain: np.ndarray, top: float, templates: TemplateSet,
             centre: np.ndarray, params: RandomisationParams) -> tuple[np.ndarray, dict]:
    """Bias field, resolution/slice thickness with noise, gamma, brain mask, global scale."""
    r = templates.resolution_mm
    log_sd = _u(rng, params.bias_log_sd)
    img = image * bias_field(rng, templates.shape, templates.affine, log_sd, centre)
    spacing, axis = A.random_spacing(rng, p_isotropic=params.p_isotropic, isotropic_mm=params.isotropic_mm,
                                     inplane_mm=params.inplane_mm, slice_mm=params.slice_mm,
                                     slice_axis_p=params.slice_axis_p)
    noise = _u(rng, params.noise_sd) * top
    rician = bool(rng.uniform() < params.p_rician)
    img = A.simulate_resolution(rng, img, spacing, r, noise_sd=noise, rician=rician)
    gamma = float(np.exp(params.log_gamma_sd * rng.standard_normal()))
    img = A.apply_gamma(img, gamma, brain)
    scale = float(np.exp(_u(rng, params.log_scale)))
    img = (img * brain) * np.float32(scale / max(top, 1e-6))
    info = {"bias_log_sd": round(log_sd, 6), "spacing_mm": [round(s, 4) for s in spacing],
            "slice_axis": None if axis is None else "xyz"[axis], "noise_sd": round(noise, 6), "rician": rician,
            "gamma": round(gamma, 6), "scale": round(scale, 6)}
    return img.astype(np.float32), info


def generate_randomised_subject(
    rng_or_seed,
    templates: TemplateSet,
    library: LesionLibrary,
    *,
    resolution_mm: float | None = None,
    params: RandomisationParams = RandomisationParams(),
    return_tissues: bool = False,
) -> RandomisedSubject:
    """Draw one domain-randomised subject (see the module docstring).

    Parameters
    ----------
    rng_or_seed : numpy Generator or int
        Equal seeds (or generators in equal states) give identical arrays and parameters.
    templates : TemplateSet
        The working grid (e.g. ``load_templates(1.0)``); the output lies on it.
    library : LesionLibrary
        Real lesion shapes (``load_lesion_library()`` leaves patient07 out).
    resolution_mm : float, optional
        Checked against ``templates.resolution_mm`` when given.
    params : RandomisationParams
    return_tissues : bool
        Also return the hard tissue labels (one more warp; for benchmarks).

    Returns
    -------
    RandomisedSubject
        Images float32 (X, Y, Z) zero outside the brain, labels uint8 (0, 1 WML, 2 CL), params.

    Raises
    ------
    ValueError
        ``resolution_mm`` differs from the templates' resolution.
    """
    from bids_app.synth.engine import _brain_centre

    r = float(templates.resolution_mm)
    if resolution_mm is not None and abs(float(resolution_mm) - r) > 1e-6:
        raise ValueError(f"templates are at {r} mm, not {resolution_mm} mm")
    rng = _as_rng(rng_or_seed)
    s_anat, s_les, s_int, s_t1, s_fl = rng.spawn(5)
    shape, affine = templates.shape, templates.affine
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    centre = _brain_centre(templates)

    # 1. anatomy
    variation = _u(s_anat, params.deformation_variation)
    deformation = random_deformation(s_anat, affine, shape, centre, variation)

    # 2. lesions (template space)
    target = sample_wml_volume_ml(s_les, params.load)
    draw = place_wml(s_les, library, templates, target, params=params.placement, min_volume_mm3=2.5 * r ** 3)
    occupancy = Occupancy(shape, affine)
    if draw.points.size:
        fp = footprint(draw.points, shape, affine)
        if fp is not None:
            occupancy.add(fp)
    cl_mean = _u(s_les, params.cl_mean)
    n_cl = 0 if s_les.uniform() < params.p_no_cl else sample_lesion_count(s_les, cl_mean)
    cls = sample_cl(s_les, templates, n_cl, occupancy, resolution_mm=r)
    wml_frac = paint_fraction([draw.points] if draw.points.size else [], shape, affine, library.voxel_mm)
    cl_frac = paint_fraction([c.points for c in cls], shape, affine, 1.0)
    cl_frac[wml_frac >= 0.5] = 0.0

    # 3. intensities (template space)
    tau = _u(s_int, params.pv_tau_mm)
    w_wml = soft_lesion_weight(wml_frac, tau, zooms)
    w_cl = soft_lesion_weight(cl_frac, tau, zooms) * (1.0 - w_wml)
    het = {"jitter": params.lesion_jitter, "rim_amp": _u(s_int, params.rim_amplitude),
           "noise_amp": _u(s_int, params.noise_amplitude), "rim_length_mm": _u(s_int, params.rim_length_mm),
           "noise_sigma_mm": _u(s_int, params.heterogeneity_sigma_mm)}
    mod_wml, _ = lesion_modulation(s_int, wml_frac, zooms, **het)
    mod_cl, _ = lesion_modulation(s_int, cl_frac, zooms, **het)
    tex_sigma = _u(s_int, params.texture_sigma_mm)
    texture = ndi.gaussian_filter(s_int.standard_normal(shape, dtype=np.float32), tex_sigma / r)
    texture /= np.float32(float(texture.std()) or 1.0)
    draws = {ch: sample_label_intensities(s_int, ch, params) for ch in CHANNELS}
    images_tpl = [_channel_image(templates, draws[ch], texture, w_wml, mod_wml, w_cl, mod_cl) for ch in CHANNELS]
    del texture, w_wml, w_cl, mod_wml, mod_cl

    # 4. deform onto the subject grid
    t1, fl, brain_w, wml_w, cl_w = warp_maps(images_tpl + [templates.brain, wml_frac, cl_frac], affine, shape, affine,
                                             deformation, sparse=(False, False, False, True, True))
    del images_tpl
    brain = brain_w >= 0.5
    wml_label = (wml_w >= 0.5) & brain
    cl_label = (cl_w >= 0.5) & brain & ~wml_label
    labels = np.zeros(shape, dtype=np.uint8)
    labels[wml_label] = WML
    labels[cl_label] = CL
    tissues = None
    if return_tissues:
        hard = (np.argmax(np.stack([templates.csf, templates.gm, templates.wm]), axis=0) + 1).astype(np.float32)
        hard[templates.brain < 0.5] = 0.0
        tissues = (warp_maps([hard], affine, shape, affine, deformation, order=0)[0] * brain).astype(np.uint8)

    # 5. acquisition per channel
    images, acq = {}, {}
    for ch, img, stream in zip(CHANNELS, (t1, fl), (s_t1, s_fl)):
        top = max(draws[ch]["means"].values())
        images[ch], acq[ch] = _acquire(stream, img, brain, top, templates, centre, params)

    voxel_mm3 = r ** 3
    params_out = {
        "resolution_mm": r,
        "deformation": {"variation": round(variation, 6), "affine": np.round(deformation.affine, 6).tolist()},
        "lesions": {**draw.summary(), "placed": draw.lesions},
        "cortical_lesions": {"mean": round(cl_mean, 4), "n_drawn": int(n_cl), "n_placed": len(cls),
                             "placed": [{"volume_mm3_1mm": c.volume_mm3, **c.info} for c in cls]},
        "intensities": draws,
        "texture_sigma_mm": round(tex_sigma, 6),
        "lesion_heterogeneity": {k: round(float(v), 6) for k, v in het.items()},
        "partial_volume": {"tau_mm": round(tau, 6)},
        "acquisition": acq,
        "volumes": {"wml_mm3": float(wml_label.sum() * voxel_mm3), "cl_mm3": float(cl_label.sum() * voxel_mm3),
                    "n_wml": int(label_components(wml_label, 26)[1]), "n_cl": int(label_components(cl_label, 26)[1])},
        "randomisation": params.to_dict(),
    }
    return RandomisedSubject(images=images, labels=labels, brain_mask=brain.astype(np.uint8),
                             affine=np.asarray(affine, dtype=np.float64), params=params_out, tissues=tissues)
