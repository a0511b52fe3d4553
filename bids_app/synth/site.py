"""Per-site acquisition parameters: the domain shift between synthetic scanners.

A *site* fixes the scanner (manufacturer, model, field strength), the T1-weighted sequence
(MPRAGE-like ``acq-MPRAGE_T1w`` or MP2RAGE ``UNIT1``), the FLAIR geometry (in-plane spacing,
slice thickness, 2D or 3D), tissue and lesion contrast, bias-field strength, noise level,
blur, the stored axis orientation and an optional rigid T1w/FLAIR misalignment. Every
parameter is drawn from the ranges in :data:`RANGES` by :func:`sample_site`; the ranges are
documented in ``docs/synth.md``. Intensities are relative to white matter (WM = 1).

Pure: no file access.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from bids_app.errors import UsageError

#: documented sampling ranges (uniform unless stated). Keys are used in docs/synth.md.
RANGES: dict[str, tuple[float, float]] = {
    # tissue intensity relative to WM
    "mprage_gm": (0.55, 0.70),
    "mprage_csf": (0.12, 0.30),
    "mprage_nonbrain": (0.8, 1.2),
    "unit1_gm": (0.62, 0.75),
    "unit1_csf": (0.05, 0.18),
    "unit1_nonbrain": (0.6, 1.0),
    "flair_gm": (1.10, 1.35),
    "flair_csf": (0.08, 0.30),
    "flair_nonbrain": (0.6, 1.0),
    # white-matter lesions relative to WM (site centre of a +-0.15/0.07 per-lesion spread)
    "flair_wml": (1.30, 2.00),
    "t1_wml": (0.60, 0.95),
    # cortical lesions relative to GM
    "flair_cl": (1.00, 1.20),
    "t1_cl": (0.85, 0.97),
    # stored WM intensity (integer images)
    "mprage_scale": (350.0, 1200.0),
    "unit1_scale": (2600.0, 3100.0),
    "flair_scale": (250.0, 900.0),
    # acquisition: SNR of WM (noise sigma = 1/SNR), log bias-field std, PSF sigma (voxels)
    "t1_snr": (15.0, 45.0),
    "unit1_snr": (20.0, 50.0),
    "flair_snr": (12.0, 35.0),
    "bias_1.5T": (0.03, 0.10),
    "bias_3T": (0.06, 0.20),
    "bias_unit1": (0.01, 0.04),
    "t1_blur_vox": (0.0, 0.5),
    "flair_blur_vox": (0.0, 0.4),
    "flair_inplane_factor": (0.9, 1.15),
}

#: scanners: (manufacturer, model, field strength T, station name)
SCANNERS: tuple[tuple[str, str, float], ...] = (
    ("Siemens", "Prisma_fit", 3.0),
    ("Siemens", "Skyra", 3.0),
    ("Siemens", "Aera", 1.5),
    ("Siemens", "Avanto", 1.5),
    ("GE", "DISCOVERY MR750", 3.0),
    ("GE", "SIGNA Artist", 1.5),
    ("Philips", "Ingenia", 3.0),
    ("Philips", "Achieva", 1.5),
)
T1_CONTRASTS = ("mixed", "mprage", "mp2rage")
ORIENTATIONS = ("ras", "mixed")
#: axis codes a site may store its images in with ``orientation="mixed"`` (RAS-ish: flips only)
MIXED_AXCODES: tuple[str, ...] = ("RAS", "LAS")


@dataclass(frozen=True)
class SiteParams:
    """Acquisition and contrast parameters of one synthetic site (all draws are fixed here).

    Intensities are relative to WM (= 1); ``*_scale`` is the stored integer value of WM.
    ``flair_voxel_factor`` multiplies the working resolution for the FLAIR in-plane spacing;
    ``flair_slice_mm`` is the FLAIR slice thickness (along world z), at least the working
    resolution. ``misalign_mm``/``misalign_deg`` bound the per-session rigid FLAIR offset.
    """

    name: str
    index: int
    manufacturer: str
    model: str
    field_strength: float
    t1_contrast: str  # "MPRAGE" | "MP2RAGE"
    t1_gm: float
    t1_csf: float
    t1_nonbrain: float
    t1_scale: float
    t1_snr: float
    t1_bias: float
    t1_blur_vox: float
    t1_wml: tuple[float, float]
    t1_cl: tuple[float, float]
    flair_gm: float
    flair_csf: float
    flair_nonbrain: float
    flair_scale: float
    flair_snr: float
    flair_bias: float
    flair_blur_vox: float
    flair_wml: tuple[float, float]
    flair_cl: tuple[float, float]
    flair_voxel_factor: float
    flair_slice_mm: float
    t1_axcodes: str
    flair_axcodes: str
    misalign_mm: float
    misalign_deg: float

    @property
    def scanner(self) -> str:
        return f"{self.manufacturer} {self.model} {self.field_strength:g}T"

    @property
    def t1_suffix(self) -> str:
        """BIDS ``acq-MPRAGE_T1w`` or ``UNIT1``."""
        return "UNIT1" if self.t1_contrast == "MP2RAGE" else "acq-MPRAGE_T1w"

    def flair_is_2d(self, resolution_mm: float) -> bool:
        return self.flair_slice_mm > 1.5 * self.flair_voxel_factor * resolution_mm

    def to_dict(self) -> dict:
        out = asdict(self)
        out["scanner"] = self.scanner
        return out


def _u(rng: np.random.Generator, key: str) -> float:
    lo, hi = RANGES[key]
    return float(rng.uniform(lo, hi))


def _lesion_range(rng: np.random.Generator, key: str, half_width: float,
                  clip: tuple[float, float]) -> tuple[float, float]:
    centre = _u(rng, key)
    lo = max(clip[0], centre - half_width)
    hi = min(clip[1], centre + half_width)
    return (round(lo, 4), round(hi, 4))


def sample_site(
    rng: np.random.Generator | int,
    index: int = 0,
    *,
    t1_contrast: str = "mixed",
    flair_slice_thickness: tuple[float, float] = (1.0, 3.0),
    orientation: str = "mixed",
    misalign_mm: float = 0.0,
    name: str | None = None,
    avoid_scanners: tuple[str, ...] | frozenset = (),
) -> SiteParams:
    """Draw the parameters of one site.

    Parameters
    ----------
    rng : numpy Generator or int
        Source of randomness (an int seeds a new PCG64 generator).
    index : int
        Site number (0-based), used for the default name ``site01``...
    t1_contrast : {"mixed", "mprage", "mp2rage"}
        ``mixed`` draws MP2RAGE with probability 0.4 (then a 3 T Siemens scanner).
    flair_slice_thickness : (float, float)
        Range (mm) of the FLAIR slice thickness; the value is raised to the working
        resolution when the subject is generated.
    orientation : {"ras", "mixed"}
        ``mixed`` stores T1w and FLAIR, independently, as RAS or LAS.
    misalign_mm : float
        Bound of the rigid FLAIR-vs-T1w offset per session: translations up to this many mm
        and rotations up to this many degrees per axis (0 = aligned in world space).
    name : str, optional
        Site name (default ``site{index + 1:02d}``).
    avoid_scanners : collection of str
        ``"Manufacturer model"`` strings already used by other sites; avoided while another
        compatible scanner remains (so that sites differ).

    Returns
    -------
    SiteParams
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if t1_contrast not in T1_CONTRASTS:
        raise UsageError(f"Unknown T1 contrast {t1_contrast!r}.", hint=f"use one of {', '.join(T1_CONTRASTS)}.")
    if orientation not in ORIENTATIONS:
        raise UsageError(f"Unknown orientation mode {orientation!r}.", hint=f"use one of {', '.join(ORIENTATIONS)}.")
    lo, hi = (float(v) for v in flair_slice_thickness)
    if not (0.3 <= lo <= hi <= 10.0):
        raise UsageError(f"FLAIR slice thickness range {lo}-{hi} mm is invalid.",
                         hint="give MIN MAX with 0.3 <= MIN <= MAX <= 10 mm.")
    if misalign_mm < 0 or misalign_mm > 20:
        raise UsageError(f"--misalign-mm {misalign_mm} is outside [0, 20].", hint="use a few mm, e.g. 2.")

    # fixed draw order: adding a parameter at the end keeps earlier draws stable
    u_contrast = float(rng.uniform())
    if t1_contrast == "mixed":
        is_mp2rage = u_contrast < 0.4
    else:
        is_mp2rage = t1_contrast == "mp2rage"
    if is_mp2rage:
        candidates = [s for s in SCANNERS if s[0] == "Siemens" and s[2] == 3.0]
    else:
        candidates = list(SCANNERS)
    unused = [s for s in candidates if f"{s[0]} {s[1]}" not in set(avoid_scanners)]
    pool = unused or candidates
    manufacturer, model, field_strength = pool[int(rng.integers(len(pool)))]

    if is_mp2rage:
        t1_gm, t1_csf, t1_nonbrain = _u(rng, "unit1_gm"), _u(rng, "unit1_csf"), _u(rng, "unit1_nonbrain")
        t1_scale, t1_snr, t1_bias = _u(rng, "unit1_scale"), _u(rng, "unit1_snr"), _u(rng, "bias_unit1")
    else:
        t1_gm, t1_csf, t1_nonbrain = _u(rng, "mprage_gm"), _u(rng, "mprage_csf"), _u(rng, "mprage_nonbrain")
        t1_scale, t1_snr = _u(rng, "mprage_scale"), _u(rng, "t1_snr")
        t1_bias = _u(rng, "bias_3T" if field_strength >= 3 else "bias_1.5T")
    t1_blur = _u(rng, "t1_blur_vox")
    t1_wml = _lesion_range(rng, "t1_wml", 0.07, (0.55, 0.97))
    t1_cl = _lesion_range(rng, "t1_cl", 0.03, (0.82, 0.99))

    flair_gm, flair_csf, flair_nonbrain = _u(rng, "flair_gm"), _u(rng, "flair_csf"), _u(rng, "flair_nonbrain")
    flair_scale, flair_snr = _u(rng, "flair_scale"), _u(rng, "flair_snr")
    flair_bias = _u(rng, "bias_3T" if field_strength >= 3 else "bias_1.5T")
    flair_blur = _u(rng, "flair_blur_vox")
    flair_wml = _lesion_range(rng, "flair_wml", 0.15, (1.25, 2.1))
    flair_cl = _lesion_range(rng, "flair_cl", 0.05, (0.98, 1.25))
    flair_factor = _u(rng, "flair_inplane_factor")
    flair_slice = float(rng.uniform(lo, hi))

    codes_t1 = int(rng.integers(len(MIXED_AXCODES)))
    codes_flair = int(rng.integers(len(MIXED_AXCODES)))
    if orientation == "ras":
        t1_axcodes = flair_axcodes = "RAS"
    else:
        t1_axcodes, flair_axcodes = MIXED_AXCODES[codes_t1], MIXED_AXCODES[codes_flair]

    return SiteParams(
        name=name or f"site{index + 1:02d}",
        index=int(index),
        manufacturer=manufacturer,
        model=model,
        field_strength=float(field_strength),
        t1_contrast="MP2RAGE" if is_mp2rage else "MPRAGE",
        t1_gm=round(t1_gm, 4),
        t1_csf=round(t1_csf, 4),
        t1_nonbrain=round(t1_nonbrain, 4),
        t1_scale=round(t1_scale, 2),
        t1_snr=round(t1_snr, 2),
        t1_bias=round(t1_bias, 4),
        t1_blur_vox=round(t1_blur, 3),
        t1_wml=t1_wml,
        t1_cl=t1_cl,
        flair_gm=round(flair_gm, 4),
        flair_csf=round(flair_csf, 4),
        flair_nonbrain=round(flair_nonbrain, 4),
        flair_scale=round(flair_scale, 2),
        flair_snr=round(flair_snr, 2),
        flair_bias=round(flair_bias, 4),
        flair_blur_vox=round(flair_blur, 3),
        flair_wml=flair_wml,
        flair_cl=flair_cl,
        flair_voxel_factor=round(flair_factor, 4),
        flair_slice_mm=round(flair_slice, 3),
        t1_axcodes=t1_axcodes,
        flair_axcodes=flair_axcodes,
        misalign_mm=float(misalign_mm),
        misalign_deg=float(misalign_mm),
    )


# --------------------------------------------------------------------------------------------
# BIDS sidecar metadata of the synthetic scanners
# --------------------------------------------------------------------------------------------


def _common_metadata(site: SiteParams) -> dict:
    return {
        "Manufacturer": site.manufacturer,
        "ManufacturersModelName": site.model,
        "MagneticFieldStrength": site.field_strength,
        "DeviceSerialNumber": f"SYNTH{site.index + 1:04d}",
        "StationName": f"SYNTH_{site.name.upper()}",
        "SoftwareVersions": "msxplain synthetic",
        "InstitutionName": f"Synthetic site {site.name}",
        "InstitutionAddress": "none (synthetic data)",
        "InstitutionalDepartmentName": "none (synthetic data)",
        "ReceiveCoilName": "HeadNeck_20" if site.manufacturer == "Siemens" else "Head 32ch",
        "ReceiveCoilActiveElements": "HEA;HEP",
        "CoilCombinationMethod": "sos",
        "MatrixCoilMode": "SENSE" if site.manufacturer == "Philips" else "GRAPPA",
        "NonlinearGradientCorrection": True,
    }


def t1_sidecar(site: SiteParams) -> dict:
    """Plausible sidecar of the site's T1-weighted image (MPRAGE-like or MP2RAGE UNIT1)."""
    meta = _common_metadata(site)
    three_t = site.field_strength >= 3
    if site.t1_contrast == "MP2RAGE":
        meta.update({
            "MRAcquisitionType": "3D",
            "PulseSequenceType": "MP2RAGE",
            "ScanningSequence": "GR\\IR",
            "SequenceVariant": "SK\\SP\\MP",
            "SequenceName": "*tfl3d1_16",
            "PulseSequenceDetails": "MP2RAGE (Marques 2010); UNIT1 = uniform image of the two inversions, "
                                    "TI1 0.7 s / TI2 2.5 s, flip angles 4/5 deg (synthetic)",
            "RepetitionTimePreparation": 5.0,
            "RepetitionTimeExcitation": 0.0069,
            "EchoTime": 0.00298,
            "FlipAngle": 4,
            "DwellTime": 5.6e-06,
        })
    elif site.manufacturer == "GE":
        meta.update({
            "MRAcquisitionType": "3D",
            "PulseSequenceType": "IR-FSPGR (BRAVO)",
            "ScanningSequence": "GR\\IR",
            "SequenceVariant": "SS\\SP\\MP",
            "SequenceName": "efgre3d",
            "PulseSequenceDetails": "3D inversion-prepared fast spoiled gradient echo (MPRAGE-like, synthetic)",
            "RepetitionTime": 0.0082 if three_t else 0.0105,
            "EchoTime": 0.0032 if three_t else 0.0042,
            "InversionTime": 0.45 if three_t else 0.6,
            "FlipAngle": 12,
            "DwellTime": 7.8e-06,
        })
    elif site.manufacturer == "Philips":
        meta.update({
            "MRAcquisitionType": "3D",
            "PulseSequenceType": "3D T1-TFE",
            "ScanningSequence": "GR\\IR",
            "SequenceVariant": "SK\\SP\\MP",
            "SequenceName": "T1TFE",
            "PulseSequenceDetails": "3D inversion-prepared turbo field echo (MPRAGE-like, synthetic)",
            "RepetitionTime": 0.0081 if three_t else 0.0075,
            "EchoTime": 0.0037 if three_t else 0.0035,
            "InversionTime": 1.0 if three_t else 0.95,
            "FlipAngle": 8,
            "DwellTime": 6.5e-06,
        })
    else:
        meta.update({
            "MRAcquisitionType": "3D",
            "PulseSequenceType": "MPRAGE",
            "ScanningSequence": "GR\\IR",
            "SequenceVariant": "SK\\SP\\MP",
            "SequenceName": "*tfl3d1_16ns",
            "PulseSequenceDetails": "3D magnetisation-prepared rapid gradient echo (synthetic)",
            "RepetitionTime": 2.3 if three_t else 2.16,
            "EchoTime": 0.00298 if three_t else 0.00363,
            "InversionTime": 0.9 if three_t else 1.1,
            "FlipAngle": 9 if three_t else 15,
            "DwellTime": 7.1e-06,
        })
    return meta


def flair_sidecar(site: SiteParams, resolution_mm: float) -> dict:
    """Plausible sidecar of the site's FLAIR (3D or 2D axial, by slice thickness)."""
    meta = _common_metadata(site)
    two_d = site.flair_is_2d(resolution_mm)
    thickness = max(site.flair_slice_mm, resolution_mm)
    if two_d:
        meta.update({
            "MRAcquisitionType": "2D",
            "PulseSequenceType": "2D turbo spin echo FLAIR",
            "ScanningSequence": "SE\\IR",
            "SequenceVariant": "SK\\SP\\MP",
            "SequenceName": "*tir2d1_15",
            "PulseSequenceDetails": "2D axial fluid-attenuated inversion recovery (synthetic)",
            "RepetitionTime": 9.0,
            "EchoTime": 0.09,
            "InversionTime": 2.5,
            "FlipAngle": 150,
            "SliceThickness": round(thickness, 3),
            "DwellTime": 1.0e-05,
        })
    else:
        meta.update({
            "MRAcquisitionType": "3D",
            "PulseSequenceType": "3D variable-flip-angle turbo spin echo FLAIR",
            "ScanningSequence": "SE\\IR",
            "SequenceVariant": "SK\\SP\\MP",
            "SequenceName": "*spcir_278",
            "PulseSequenceDetails": "3D fluid-attenuated inversion recovery (SPACE/CUBE/VISTA-like, synthetic)",
            "RepetitionTime": 5.0,
            "EchoTime": 0.393 if site.field_strength >= 3 else 0.336,
            "InversionTime": 1.8,
            "FlipAngle": 120,
            "SliceThickness": round(thickness, 3),
            "DwellTime": 3.6e-06,
        })
    return meta
