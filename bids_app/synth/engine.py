"""The synthetic subject: anatomy + lesions + per-site acquisition -> T1w, FLAIR, true masks.

Python API (used by the ``synth`` tool, training and benchmarks)::

    from bids_app.synth import load_templates, load_lesion_library, sample_site, generate_subject
    site = sample_site(rng, 0)
    subject = generate_subject(rng, site, resolution_mm=2.0)
    subject.t1w.data, subject.t1w.affine, subject.flair, subject.lesion_dseg, subject.brain_mask

Pipeline of one subject (all random draws come from one ``numpy.random.Generator``, split
with ``Generator.spawn`` into an anatomy stream and one stream per session, so results are
reproducible and a session does not depend on how many draws another one made):

1. *anatomy*: a random smooth deformation of MNI152NLin2009cAsym
   (:func:`~bids_app.synth.anatomy.random_deformation`), real WML from a few donor patients
   at their MNI positions, synthetic cortical lesions (:mod:`~bids_app.synth.lesions`);
2. *session*: follow-up sessions add new lesions (about 15 % of the baseline load) and a new
   head pose; every session renders its own images;
3. *rendering*: template maps and lesion fractions are pulled onto the T1w grid
   (the template grid at the working resolution), true labels are ``fraction >= 0.5`` inside
   the brain, images follow :mod:`~bids_app.synth.contrast`; the FLAIR is resampled onto its
   own grid (site in-plane spacing and slice thickness, head-sized field of view, optional
   rigid misalignment), and each image is stored in the site's axis orientation.

Pure numerics apart from reading the sources through :mod:`~bids_app.synth.sources`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from bids_app.core.imageio import Image
from bids_app.core.postprocess import label_components
from bids_app.synth import contrast as C
from bids_app.synth.anatomy import Deformation, random_deformation, random_pose, reorient, rigid_about, warp_maps
from bids_app.synth.lesions import (
    CL,
    WML,
    Occupancy,
    PlacedLesion,
    paint_fraction,
    sample_cl,
    sample_lesion_count,
    sample_wml,
)
from bids_app.synth.site import SiteParams, sample_site
from bids_app.synth.sources import LesionLibrary, TemplateSet, load_lesion_library, load_templates

#: default mean number of WML / CL drawn per subject
DEFAULT_WML_LOAD = 20.0
DEFAULT_CL_LOAD = 3.0
#: new lesions per follow-up session, as a share of the load
FOLLOWUP_SHARE = 0.15
#: FLAIR field of view: head bounding box plus this margin (mm) on every side
FLAIR_FOV_MARGIN_MM = 12.0


@dataclass(frozen=True)
class SyntheticSubject:
    """One synthetic session of one subject.

    Attributes
    ----------
    t1w : Image
        MPRAGE-like T1w or MP2RAGE UNIT1 (int16), in the site's T1w orientation.
    flair : Image
        FLAIR (int16) on its own grid and orientation, same world space as ``t1w``
        (up to the site's optional misalignment, recorded in ``metadata``).
    lesion_dseg : Image
        True lesion classes on the T1w grid (uint8: 0 background, 1 WML, 2 CL).
    brain_mask : Image
        Brain mask on the T1w grid (uint8).
    tissues : dict of str -> Image
        ``"GM"``, ``"WM"``, ``"CSF"`` probabilities (float32) on the T1w grid.
    metadata : dict
        Site, counts (``n_wml``, ``n_cl`` = connected components, 26-connectivity, of the
        true masks), volumes, lesion provenance, contrast draws, FLAIR geometry.
    """

    t1w: Image
    flair: Image
    lesion_dseg: Image
    brain_mask: Image
    tissues: dict
    metadata: dict

    @property
    def site(self) -> str:
        return self.metadata["site"]["name"]


@dataclass
class SubjectAnatomy:
    """Random anatomy of one subject in template space (shared by its sessions)."""

    deformation: Deformation
    lesions: list[PlacedLesion]
    occupancy: Occupancy
    age: int
    sex: str
    variation: float = 1.0
    session_lesions: list[list[PlacedLesion]] = field(default_factory=list)


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _brain_centre(templates: TemplateSet) -> np.ndarray:
    key = "brain_centre"
    if key not in templates.cache:
        ijk = np.array(ndi.center_of_mass(templates.brain >= 0.5))
        templates.cache[key] = templates.affine[:3, :3] @ ijk + templates.affine[:3, 3]
    return templates.cache[key]


def _head_box(templates: TemplateSet) -> np.ndarray:
    """World bounding box (2, 3) of the template head (T1w above 12 % of WM). Cached."""
    key = "head_box"
    if key not in templates.cache:
        head = (templates.t1w > 0.12) | (templates.brain >= 0.5)
        spans = [np.flatnonzero(head.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
        lo_ijk = np.array([s[0] for s in spans], dtype=np.float64)
        hi_ijk = np.array([s[-1] for s in spans], dtype=np.float64)
        lo = templates.affine[:3, :3] @ lo_ijk + templates.affine[:3, 3]
        hi = templates.affine[:3, :3] @ hi_ijk + templates.affine[:3, 3]
        templates.cache[key] = np.stack([np.minimum(lo, hi), np.maximum(lo, hi)])
    return templates.cache[key]


def _head_mask(templates: TemplateSet) -> np.ndarray:
    """Template head mask (float32 0/1): the largest smoothed-T1w component, holes filled. Cached."""
    key = "head_mask"
    if key not in templates.cache:
        smooth = ndi.gaussian_filter(templates.t1w.astype(np.float32), 1.0)
        head = smooth > 0.12
        labels, n = ndi.label(head)
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            head = labels == int(np.argmax(sizes))
        head = ndi.binary_closing(head, iterations=2)
        for axis in range(3):  # fill holes slice by slice (the head is open at the neck)
            head = np.moveaxis(np.stack([ndi.binary_fill_holes(s) for s in np.moveaxis(head, axis, 0)]), 0, axis)
        mask = (head | (templates.brain >= 0.5)).astype(np.float32)
        mask.flags.writeable = False
        templates.cache[key] = mask
    return templates.cache[key]


def sample_anatomy(
    rng: np.random.Generator,
    templates: TemplateSet,
    library: LesionLibrary,
    *,
    wml_load: float = DEFAULT_WML_LOAD,
    cl_load: float = DEFAULT_CL_LOAD,
    resolution_mm: float | None = None,
    variation: float = 1.0,
) -> SubjectAnatomy:
    """Draw a subject's deformation, demographics and baseline lesions (template space)."""
    centre = _brain_centre(templates)
    deformation = random_deformation(rng, templates.affine, templates.shape, centre, variation)
    age = int(rng.integers(20, 66))
    sex = "F" if rng.uniform() < 0.7 else "M"  # MS is ~2-3x more frequent in women
    occupancy = Occupancy(templates.shape, templates.affine)
    n_wml = sample_lesion_count(rng, wml_load, minimum=1 if wml_load > 0 else 0)
    n_cl = sample_lesion_count(rng, cl_load)
    wml = sample_wml(rng, library, templates, n_wml, occupancy,
                     min_volume_mm3=_min_lesion_mm3(resolution_mm or templates.resolution_mm))
    cl = sample_cl(rng, templates, n_cl, occupancy, resolution_mm=resolution_mm or templates.resolution_mm)
    return SubjectAnatomy(deformation, wml + cl, occupancy, age, sex, variation, [wml + cl])


def add_followup_lesions(
    rng: np.random.Generator,
    anatomy: SubjectAnatomy,
    templates: TemplateSet,
    library: LesionLibrary,
    *,
    wml_load: float = DEFAULT_WML_LOAD,
    cl_load: float = DEFAULT_CL_LOAD,
) -> list[PlacedLesion]:
    """New lesions of a follow-up session (appended to ``anatomy``); returns all lesions now present."""
    n_wml = sample_lesion_count(rng, FOLLOWUP_SHARE * wml_load)
    n_cl = sample_lesion_count(rng, FOLLOWUP_SHARE * cl_load)
    new = sample_wml(rng, library, templates, n_wml, anatomy.occupancy,
                     min_volume_mm3=_min_lesion_mm3(templates.resolution_mm))
    new += sample_cl(rng, templates, n_cl, anatomy.occupancy, resolution_mm=templates.resolution_mm)
    for lesion in new:
        lesion.info["new_in_session"] = len(anatomy.session_lesions) + 1
    anatomy.lesions = anatomy.lesions + new
    anatomy.session_lesions.append(list(anatomy.lesions))
    return list(anatomy.lesions)


def _min_lesion_mm3(resolution_mm: float) -> float:
    """Smallest library lesion drawn: 2.5 voxels of the working grid (smaller ones vanish)."""
    return 2.5 * float(resolution_mm) ** 3


def _bbox_slices(mask: np.ndarray, pad: int = 2) -> tuple[slice, ...] | None:
    if not mask.any():
        return None
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - pad, 0), min(int(i.max()) + pad + 1, n)) for i, n in zip(idx, mask.shape))


def _lesion_weight(frac: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Partial-volume weight: the fraction on labelled voxels and their 26-neighbours, else 0."""
    out = np.zeros_like(frac)
    box = _bbox_slices(label)
    if box is None:
        return out
    near = ndi.binary_dilation(label[box], structure=np.ones((3, 3, 3), bool))
    out[box] = np.where(near, np.clip(frac[box], 0.0, 1.0), 0.0)
    return out


def _severity_map(rng: np.random.Generator, weight: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-lesion severity in [0, 1] painted on the lesion support (0 elsewhere)."""
    labels, n = label_components(weight > 0, connectivity=26)
    severity = rng.uniform(0.0, 1.0, n).astype(np.float32)
    table = np.concatenate([[0.0], severity]).astype(np.float32)
    return table[labels], n


def _ratio(severity: np.ndarray, lo_hi: tuple[float, float], increasing: bool) -> np.ndarray:
    lo, hi = lo_hi
    if increasing:
        return (lo + severity * (hi - lo)).astype(np.float32)
    return (hi - severity * (hi - lo)).astype(np.float32)


def flair_geometry(site: SiteParams, resolution_mm: float,
                   head_box_mm: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine of a site's FLAIR grid (axial slices along world z).

    In-plane spacing ``resolution * flair_voxel_factor``; slice thickness
    ``max(flair_slice_mm, resolution)`` (contiguous slices); field of view = head box +
    :data:`FLAIR_FOV_MARGIN_MM`, centred on the head.
    """
    inplane = resolution_mm * site.flair_voxel_factor
    thick = max(site.flair_slice_mm, resolution_mm)
    spacing = np.array([inplane, inplane, thick])
    lo = head_box_mm[0] - FLAIR_FOV_MARGIN_MM
    hi = head_box_mm[1] + FLAIR_FOV_MARGIN_MM
    shape = np.maximum(np.ceil((hi - lo) / spacing).astype(int), 2)
    centre = (lo + hi) / 2.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = centre - spacing * (shape - 1) / 2.0
    return tuple(int(s) for s in shape), affine


def render_session(
    rng: np.random.Generator,
    anatomy: SubjectAnatomy,
    site: SiteParams,
    templates: TemplateSet,
    *,
    lesions: list[PlacedLesion] | None = None,
    session_index: int = 0,
    skull_stripped: bool = False,
    library_voxel_mm: float = 1.0,
) -> SyntheticSubject:
    """Render the images and true masks of one session (see module docstring)."""
    r = templates.resolution_mm
    centre = _brain_centre(templates)
    head_box = _head_box(templates)
    lesions = anatomy.lesions if lesions is None else lesions

    # fixed draw order
    pose = random_pose(rng, centre, anatomy.variation)
    deformation = anatomy.deformation.with_pose(pose) if session_index > 0 else anatomy.deformation

    shape, affine = templates.shape, templates.affine
    wml_tpl = paint_fraction([les.points for les in lesions if les.cls == WML], shape, affine, library_voxel_mm)
    cl_tpl = paint_fraction([les.points for les in lesions if les.cls == CL], shape, affine, library_voxel_mm)
    unit1 = site.t1_contrast == "MP2RAGE"
    need_head = unit1 and not skull_stripped
    maps = [templates.t1w, templates.brain, templates.gm, templates.wm, templates.csf, wml_tpl, cl_tpl]
    warped = warp_maps(maps + ([_head_mask(templates)] if need_head else []), affine, shape, affine, deformation,
                       sparse=(False,) * 5 + (True, True) + ((False,) if need_head else ()))
    t1h, brain, gm, wm, csf, wml_f, cl_f = warped[:7]
    head = warped[7] if need_head else None
    brain_mask = brain >= 0.5
    wml_label = (wml_f >= 0.5) & brain_mask
    cl_label = (cl_f >= 0.5) & brain_mask & ~wml_label
    w_wml = _lesion_weight(wml_f, wml_label) * brain
    w_cl = _lesion_weight(cl_f, cl_label) * brain * (~wml_label)
    sev_wml, _ = _severity_map(rng, w_wml)
    sev_cl, _ = _severity_map(rng, w_cl)
    n_wml = label_components(wml_label, 26)[1]
    n_cl = label_components(cl_label, 26)[1]
    dseg = np.zeros(shape, dtype=np.uint8)
    dseg[wml_label] = WML
    dseg[cl_label] = CL

    # ---- T1w (MPRAGE-like) or UNIT1 on the T1w grid
    t1 = C.tissue_image(gm, wm, csf, brain, t1h, i_gm=site.t1_gm, i_csf=site.t1_csf, i_nonbrain=site.t1_nonbrain)
    t1 = C.blend_lesions(t1, w_wml, _ratio(sev_wml, site.t1_wml, increasing=False), 1.0)
    t1 = C.blend_lesions(t1, w_cl, _ratio(sev_cl, site.t1_cl, increasing=False), site.t1_gm)
    t1 = C.psf_blur(t1, site.t1_blur_vox)
    t1 = t1 * C.bias_field(rng, shape, affine, site.t1_bias, centre)
    if unit1:
        t1 = C.gaussian_noise(rng, t1, 1.0 / site.t1_snr)
        t1_max = 4095.0
        if not skull_stripped:
            t1 = C.salt_and_pepper_background(rng, t1, head, t1_max / site.t1_scale)
    else:
        t1 = C.rician(rng, t1, 1.0 / site.t1_snr)
        t1_max = 32767.0
    if skull_stripped:
        t1 = t1 * brain_mask
    t1_int = C.to_integer(t1, site.t1_scale, t1_max)

    # ---- FLAIR: fine image on the T1w grid, then its own grid
    fl = C.tissue_image(gm, wm, csf, brain, t1h, i_gm=site.flair_gm, i_csf=site.flair_csf,
                        i_nonbrain=site.flair_nonbrain)
    fl = C.blend_lesions(fl, w_wml, _ratio(sev_wml, site.flair_wml, increasing=True), 1.0)
    fl = C.blend_lesions(fl, w_cl, _ratio(sev_cl, site.flair_cl, increasing=True), site.flair_gm)
    f_shape, f_affine = flair_geometry(site, r, head_box)
    f_spacing = np.abs(np.diag(f_affine)[:3])
    sigma = np.sqrt(np.maximum(f_spacing ** 2 - r ** 2, 0.0)) / 2.355 / r
    sigma = np.sqrt(sigma ** 2 + site.flair_blur_vox ** 2)
    fl = C.psf_blur(fl, sigma)
    angles = rng.uniform(-1.0, 1.0, 3) * site.misalign_deg
    shift = rng.uniform(-1.0, 1.0, 3) * site.misalign_mm
    misalign = rigid_about(centre, angles, shift)
    # FLAIR voxel (header) -> world where the anatomy is actually sampled
    sampling_affine = misalign @ f_affine
    fl_grid, brain_fl = warp_maps([fl, brain], affine, f_shape, sampling_affine, None)
    fl_grid = fl_grid * C.bias_field(rng, f_shape, f_affine, site.flair_bias, centre)
    fl_grid = C.rician(rng, fl_grid, 1.0 / site.flair_snr)
    if skull_stripped:
        fl_grid = fl_grid * (brain_fl >= 0.5)
    fl_int = C.to_integer(fl_grid, site.flair_scale)

    # ---- orientation
    t1_data, t1_aff = reorient(t1_int, affine, site.t1_axcodes)
    dseg_data, _ = reorient(dseg, affine, site.t1_axcodes)
    brain_data, _ = reorient(brain_mask.astype(np.uint8), affine, site.t1_axcodes)
    tissues = {name: Image(reorient(arr, affine, site.t1_axcodes)[0], t1_aff)
               for name, arr in (("GM", gm), ("WM", wm), ("CSF", csf))}
    fl_data, fl_aff = reorient(fl_int, f_affine, site.flair_axcodes)

    voxel_ml = r ** 3
    metadata = {
        "site": site.to_dict(),
        "session_index": session_index,
        "resolution_mm": r,
        "skull_stripped": bool(skull_stripped),
        "age": anatomy.age,
        "sex": anatomy.sex,
        "n_wml": int(n_wml),
        "n_cl": int(n_cl),
        "wml_volume_mm3": float(wml_label.sum() * voxel_ml),
        "cl_volume_mm3": float(cl_label.sum() * voxel_ml),
        "lesions_placed": [
            {"class": "WML" if les.cls == WML else "CL", "volume_mm3_1mm": les.volume_mm3, **les.info}
            for les in lesions
        ],
        "flair_voxel_mm": [round(float(v), 4) for v in f_spacing],
        "flair_shape": list(f_shape),
        "flair_misalignment": np.round(misalign, 6).tolist(),
        "session_pose": np.round(deformation.pose, 6).tolist(),
    }
    return SyntheticSubject(
        t1w=Image(t1_data, t1_aff),
        flair=Image(fl_data, fl_aff),
        lesion_dseg=Image(dseg_data, t1_aff),
        brain_mask=Image(brain_data, t1_aff),
        tissues=tissues,
        metadata=metadata,
    )


def _sources(resolution_mm, templates, library, templates_dir, lesion_dir):
    if templates is None:
        templates = load_templates(resolution_mm, templates_dir)
    elif abs(templates.resolution_mm - resolution_mm) > 1e-6:
        raise ValueError(f"templates are at {templates.resolution_mm} mm, not {resolution_mm} mm")
    if library is None:
        library = load_lesion_library(lesion_dir)
    return templates, library


def generate_sessions(
    rng_or_seed,
    site: SiteParams | None = None,
    n_sessions: int = 1,
    resolution_mm: float = 1.0,
    *,
    wml_load: float = DEFAULT_WML_LOAD,
    cl_load: float = DEFAULT_CL_LOAD,
    skull_stripped: bool = False,
    anatomy_variation: float = 1.0,
    templates: TemplateSet | None = None,
    library: LesionLibrary | None = None,
    templates_dir=None,
    lesion_dir=None,
) -> list[SyntheticSubject]:
    """Generate ``n_sessions`` sessions of one subject at one site.

    Session 1 has the baseline lesions; each follow-up adds new ones
    (:data:`FOLLOWUP_SHARE` of the loads) and a new head pose.

    Parameters
    ----------
    rng_or_seed : numpy Generator or int
    site : SiteParams, optional
        Drawn from the generator when omitted.
    resolution_mm : float
        T1w voxel size (isotropic), 0.5-4 mm.
    wml_load, cl_load : float
        Mean number of white-matter / cortical lesions drawn (over-dispersed counts; at
        least one WML when ``wml_load > 0``). Lesions that vanish at coarse resolutions
        (true fraction below 0.5 everywhere) are not counted.
    skull_stripped : bool
        Brain-only images (zero outside the brain mask) instead of heads.
    anatomy_variation : float
        Scales the random deformation and head pose (0 = the template anatomy exactly).
    templates, library : preloaded sources (else loaded with ``templates_dir``/``lesion_dir``).

    Returns
    -------
    list of SyntheticSubject
    """
    if n_sessions < 1:
        raise ValueError("n_sessions must be >= 1")
    rng = _as_rng(rng_or_seed)
    templates, library = _sources(resolution_mm, templates, library, templates_dir, lesion_dir)
    if site is None:
        site = sample_site(rng)
    streams = rng.spawn(1 + 2 * n_sessions)
    anatomy = sample_anatomy(streams[0], templates, library, wml_load=wml_load, cl_load=cl_load,
                             resolution_mm=resolution_mm, variation=anatomy_variation)
    out = []
    for s in range(n_sessions):
        if s > 0:
            add_followup_lesions(streams[1 + 2 * s], anatomy, templates, library, wml_load=wml_load, cl_load=cl_load)
        out.append(render_session(streams[2 + 2 * s], anatomy, site, templates, session_index=s,
                                  skull_stripped=skull_stripped, library_voxel_mm=library.voxel_mm))
    return out


def generate_subject(
    rng_or_seed,
    site: SiteParams | None = None,
    resolution_mm: float = 1.0,
    *,
    wml_load: float = DEFAULT_WML_LOAD,
    cl_load: float = DEFAULT_CL_LOAD,
    skull_stripped: bool = False,
    anatomy_variation: float = 1.0,
    templates: TemplateSet | None = None,
    library: LesionLibrary | None = None,
    templates_dir=None,
    lesion_dir=None,
) -> SyntheticSubject:
    """Generate one synthetic subject (one session); see :func:`generate_sessions`.

    The same seed (or a generator in the same state) and parameters give identical arrays.
    """
    return generate_sessions(
        rng_or_seed, site, 1, resolution_mm, wml_load=wml_load, cl_load=cl_load, skull_stripped=skull_stripped,
        anatomy_variation=anatomy_variation, templates=templates, library=library, templates_dir=templates_dir,
        lesion_dir=lesion_dir,
    )[0]
