"""Write a synthetic multi-site BIDS dataset and its true-lesion derivative.

Layout (``--sessions 1`` drops the ``ses-`` level)::

    OUT_DIR/
      dataset_description.json  README  participants.tsv  participants.json  [sessions.json]
      code/msxplain_synth.json                        parameters, sites, lesion provenance
      sub-001/[sub-001_sessions.tsv]
      sub-001/[ses-01/]anat/sub-001[_ses-01]_acq-MPRAGE_T1w.nii.gz|_UNIT1.nii.gz (+ .json)
      sub-001/[ses-01/]anat/sub-001[_ses-01]_FLAIR.nii.gz (+ .json)
      derivatives/lesions/
        dataset_description.json  README  dseg.tsv
        sub-001/[ses-01/]anat/sub-001[_ses-01]_desc-lesions_dseg.nii.gz (+ .json)   0 bg, 1 WML, 2 CL
        sub-001/[ses-01/]anat/sub-001[_ses-01]_label-WML_mask.nii.gz (+ .json)
        sub-001/[ses-01/]anat/sub-001[_ses-01]_label-CL_mask.nii.gz (+ .json)
        sub-001/[ses-01/]anat/sub-001[_ses-01]_desc-brain_mask.nii.gz (+ .json)

Every random draw derives from ``numpy.random.SeedSequence(seed, spawn_key=...)`` per site and
per subject, so a subject does not depend on how many subjects are written, and the same
seed and parameters give byte-identical files (no timestamps, deterministic gzip headers).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from bids_app.errors import CannotCreateOutput, OutputIOError, UsageError
from bids_app.synth import site as site_mod
from bids_app.synth.engine import DEFAULT_CL_LOAD, DEFAULT_WML_LOAD, SyntheticSubject, generate_sessions
from bids_app.synth.sources import (
    DEFAULT_EXCLUDED_PATIENTS,
    LESJAK_2017,
    MNI2009C,
    TEMPLATE,
    load_lesion_library,
    load_templates,
)

LOG = logging.getLogger(__name__)

BIDS_VERSION = "1.10.0"
DERIVATIVE_NAME = "lesions"
#: dseg.tsv rows: index, name, abbreviation, color, mapping (BIDS generic label 7 = lesion)
DSEG_LABELS = (
    (1, "WhiteMatterLesion", "WML", "#ff4500", 7),
    (2, "CorticalLesion", "CL", "#00bfff", 7),
)


def _seed_rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key)))


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _tsv_text(columns: list[str], rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:g}"
        return str(v)

    lines = ["\t".join(columns)]
    lines += ["\t".join(cell(row.get(c)) for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


class _Out:
    """Writes files under one root, mapping OS errors to the BIDS-Apps exit codes."""

    def __init__(self, root: Path):
        self.root = root
        self.files: list[str] = []

    def path(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def text(self, rel: str, content: str) -> None:
        try:
            self.path(rel).write_text(content, encoding="utf-8")
        except OSError as exc:
            raise OutputIOError(f"Cannot write {rel} ({exc.strerror}).", path=str(self.root),
                                hint="check free space and permissions.") from exc
        self.files.append(rel)

    def json(self, rel: str, obj) -> None:
        self.text(rel, _json_text(obj))

    def nifti(self, rel: str, data: np.ndarray, affine: np.ndarray) -> None:
        from bids_app.core.imageio import save_image

        try:
            save_image(self.path(rel), data, affine)
        except OSError as exc:
            raise OutputIOError(f"Cannot write {rel} ({exc.strerror}).", path=str(self.root),
                                hint="check free space and permissions.") from exc
        self.files.append(rel)


def _prepare_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CannotCreateOutput("Output path exists and is not a folder.", path=str(out_dir),
                                     hint="choose a new or empty folder.")
        if any(out_dir.iterdir()):
            raise CannotCreateOutput("Output folder is not empty.", path=str(out_dir),
                                     hint="choose a new or empty folder (nothing is overwritten).")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CannotCreateOutput(f"Cannot create the output folder ({exc.strerror}).", path=str(out_dir),
                                 hint="check the path and permissions.") from exc
    return out_dir


def _readme(params: dict, n_subjects: int) -> str:
    return f"""# msxplain synthetic MS dataset

**Synthetic data: no real person was scanned.** Written by `msxplain-tools synth`
(seed {params['seed']}, {n_subjects} subjects, {params['sites']} sites, {params['sessions']} session(s) each,
{params['resolution_mm']} mm T1w grid{', skull-stripped' if params['skull_stripped'] else ''}).

- Anatomy: the MNI ICBM152 2009c nonlinear asymmetric template ({TEMPLATE}, via TemplateFlow)
  with a random smooth deformation per subject.
- White-matter lesions: real expert-consensus lesion components of the open MS database of
  Lesjak et al. (2017, CC-BY), placed at their MNI positions (patient07 excluded by default:
  it is kept as a real held-out case). Cortical lesions are synthetic blobs at the GM boundary.
- Each site has its own scanner, T1-weighted contrast (`acq-MPRAGE_T1w` or MP2RAGE `UNIT1`),
  FLAIR geometry, tissue and lesion contrast, bias field, noise, blur and axis orientation.
  The FLAIR lies on its own grid in the same world space as the T1w image.
- True lesion masks on the T1w grid: `derivatives/lesions/` (`desc-lesions_dseg`: 1 WML, 2 CL;
  binary `label-WML_mask`, `label-CL_mask`; `desc-brain_mask`). `n_wml`/`n_cl` in
  `participants.tsv` count connected components (26-connectivity) of the true masks
  (first session when there are several; per-session counts in `sub-*_sessions.tsv`).
- All parameters, site draws and the provenance of every lesion: `code/msxplain_synth.json`.

Sources to cite:
- {LESJAK_2017}
- {MNI2009C}

Licence: CC-BY-4.0 (attribution to the sources above).
"""


def _raw_description(params: dict, version: str) -> dict:
    return {
        "Name": "msxplain synthetic multiple sclerosis dataset",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC-BY-4.0",
        "Authors": ["msxplain contributors"],
        "Acknowledgements": "Lesion shapes: Lesjak et al. 2017 (CC-BY). Anatomy: MNI ICBM152 2009c (Fonov et al. "
                            "2011; copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, MNI, "
                            "McGill University).",
        "HowToAcknowledge": f"Cite {LESJAK_2017}; and {MNI2009C}.",
        "ReferencesAndLinks": [
            "https://doi.org/10.1007/s12021-017-9348-7",
            "https://github.com/muschellij2/open_ms_data",
            "https://doi.org/10.1016/j.neuroimage.2010.07.033",
            "https://www.templateflow.org",
        ],
        "GeneratedBy": [{
            "Name": "msxplain-tools synth",
            "Version": version,
            "Description": "synthetic MS data engine; seed=" + str(params["seed"]) + "; parameters: "
                           + json.dumps(params, sort_keys=True),
        }],
        "SourceDatasets": [
            {"URL": "https://github.com/muschellij2/open_ms_data", "DOI": "doi:10.1007/s12021-017-9348-7"},
            {"URL": "https://github.com/templateflow/tpl-MNI152NLin2009cAsym"},
        ],
    }


def _derivative_description(params: dict, version: str) -> dict:
    return {
        "Name": "msxplain synthetic dataset: true lesion masks",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "License": "CC-BY-4.0",
        "Authors": ["msxplain contributors"],
        "GeneratedBy": [{
            "Name": "msxplain-tools synth",
            "Version": version,
            "Description": f"ground truth written together with the raw images; seed={params['seed']}",
        }],
        "DatasetLinks": {"raw": "../../"},
        "SourceDatasets": [{"URL": "bids:raw:"}],
    }


PARTICIPANT_COLUMNS = ["participant_id", "age", "sex", "site", "scanner", "t1_contrast", "n_wml", "n_cl"]


def _participants_json(site_names: list[str]) -> dict:
    return {
        "participant_id": {"Description": "Subject label (synthetic)."},
        "age": {"Description": "Age drawn uniformly in [20, 65] (synthetic).", "Units": "year"},
        "sex": {"Description": "Sex drawn with P(F) = 0.7 (synthetic).",
                "Levels": {"F": "female", "M": "male"}},
        "site": {"Description": "Synthetic acquisition site (scanner, contrast and geometry draws).",
                 "Levels": {name: f"synthetic site {name}" for name in site_names}},
        "scanner": {"Description": "Manufacturer, model and field strength of the site's (synthetic) scanner."},
        "t1_contrast": {"Description": "T1-weighted sequence of the site.",
                        "Levels": {"MPRAGE": "MPRAGE-like T1w (acq-MPRAGE_T1w)",
                                   "MP2RAGE": "MP2RAGE uniform image (UNIT1)"}},
        "n_wml": {"Description": "Number of white-matter lesions in the true mask (26-connected components; "
                                 "first session)."},
        "n_cl": {"Description": "Number of cortical lesions in the true mask (26-connected components; "
                                "first session)."},
    }


SESSION_COLUMNS = ["session_id", "n_wml", "n_cl", "wml_volume_mm3", "cl_volume_mm3"]
SESSIONS_JSON = {
    "session_id": {"Description": "Session label."},
    "n_wml": {"Description": "Number of white-matter lesions in the true mask (26-connected components)."},
    "n_cl": {"Description": "Number of cortical lesions in the true mask (26-connected components)."},
    "wml_volume_mm3": {"Description": "Volume of the true WML mask.", "Units": "mm^3"},
    "cl_volume_mm3": {"Description": "Volume of the true CL mask.", "Units": "mm^3"},
}


def _dseg_tsv() -> str:
    rows = [{"index": i, "name": n, "abbreviation": a, "color": c, "mapping": m} for i, n, a, c, m in DSEG_LABELS]
    return _tsv_text(["index", "name", "abbreviation", "color", "mapping"], rows)


def _write_session(out: _Out, subject: SyntheticSubject, site: site_mod.SiteParams, sub: str, ses: str | None,
                   resolution_mm: float) -> None:
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + "anat"
    t1_name = f"{prefix}_{site.t1_suffix}.nii.gz"
    flair_name = f"{prefix}_FLAIR.nii.gz"
    out.nifti(f"{folder}/{t1_name}", subject.t1w.data, subject.t1w.affine)
    out.json(f"{folder}/{t1_name[:-7]}.json", site_mod.t1_sidecar(site))
    out.nifti(f"{folder}/{flair_name}", subject.flair.data, subject.flair.affine)
    out.json(f"{folder}/{flair_name[:-7]}.json", site_mod.flair_sidecar(site, resolution_mm))

    t1_uri = f"bids:raw:{folder}/{t1_name}"
    flair_uri = f"bids:raw:{folder}/{flair_name}"
    deriv = f"derivatives/{DERIVATIVE_NAME}/{folder}"
    dseg = np.asarray(subject.lesion_dseg.data, dtype=np.uint8)
    aff = subject.lesion_dseg.affine
    out.nifti(f"{deriv}/{prefix}_desc-lesions_dseg.nii.gz", dseg, aff)
    out.json(f"{deriv}/{prefix}_desc-lesions_dseg.json", {
        "Manual": False,
        "Description": "True lesion classes of the synthetic images (0 background, 1 white-matter lesion, "
                       "2 cortical lesion; see dseg.tsv): partial-volume lesion fraction >= 0.5 inside the brain.",
        "Sources": [t1_uri, flair_uri],
        "SpatialReference": t1_uri,
    })
    for label, value, text in (("WML", 1, "white-matter lesions"), ("CL", 2, "cortical lesions")):
        out.nifti(f"{deriv}/{prefix}_label-{label}_mask.nii.gz", (dseg == value).astype(np.uint8), aff)
        out.json(f"{deriv}/{prefix}_label-{label}_mask.json", {
            "Type": "Lesion",
            "Description": f"True mask of the {text} (label {value} of the desc-lesions dseg).",
            "Sources": [t1_uri, flair_uri],
            "SpatialReference": t1_uri,
        })
    out.nifti(f"{deriv}/{prefix}_desc-brain_mask.nii.gz", np.asarray(subject.brain_mask.data, np.uint8),
              subject.brain_mask.affine)
    out.json(f"{deriv}/{prefix}_desc-brain_mask.json", {
        "Type": "Brain",
        "Description": "True brain mask (deformed template brain mask, fraction >= 0.5).",
        "Sources": [t1_uri],
        "SpatialReference": t1_uri,
    })


def write_dataset(
    out_dir: str | os.PathLike,
    n_subjects: int,
    seed: int = 0,
    *,
    sites: int = 2,
    sessions: int = 1,
    resolution_mm: float = 1.0,
    wml_load: float = DEFAULT_WML_LOAD,
    cl_load: float = DEFAULT_CL_LOAD,
    t1_contrast: str = "mixed",
    flair_slice_thickness: tuple[float, float] = (1.0, 3.0),
    orientation: str = "mixed",
    misalign_mm: float = 0.0,
    skull_stripped: bool = False,
    anatomy_variation: float = 1.0,
    templates_dir: str | os.PathLike | None = None,
    lesion_dir: str | os.PathLike | None = None,
    exclude_patients: tuple[str, ...] = DEFAULT_EXCLUDED_PATIENTS,
) -> dict:
    """Write a synthetic BIDS dataset with true lesion masks.

    Parameters
    ----------
    out_dir : path-like
        New or empty folder.
    n_subjects : int
        Number of subjects (>= 1); subject ``i`` (0-based) is scanned at site ``i % sites``.
    seed : int
        Master seed (>= 0).
    sites, sessions : int
        Number of sites and of sessions per subject (``ses-`` entities when > 1).
    resolution_mm : float
        Isotropic T1w voxel size (0.5-4 mm).
    wml_load, cl_load : float
        Mean number of white-matter / cortical lesions drawn per subject.
    t1_contrast : {"mixed", "mprage", "mp2rage"}
    flair_slice_thickness : (float, float)
        FLAIR slice-thickness range (mm).
    orientation : {"mixed", "ras"}
    misalign_mm : float
        Rigid FLAIR-vs-T1w offset bound (mm and degrees); 0 = aligned in world space.
    skull_stripped : bool
    anatomy_variation : float
        Scales the random deformations (0 = template anatomy).
    templates_dir, lesion_dir : path-like, optional
    exclude_patients : tuple of str
        Lesion-library patients left out (``patient07`` by default).

    Returns
    -------
    dict
        ``{"out_dir", "n_files", "participants": [...], "sites": [...]}``.

    Raises
    ------
    UsageError, CannotCreateOutput, OutputIOError, MissingInput, BadInputData
    """
    from bids_app import __version__

    if int(n_subjects) < 1:
        raise UsageError(f"--n-subjects must be >= 1, got {n_subjects}.", hint="e.g. --n-subjects 3.")
    if int(sites) < 1:
        raise UsageError(f"--sites must be >= 1, got {sites}.", hint="e.g. --sites 2.")
    if int(sessions) < 1:
        raise UsageError(f"--sessions must be >= 1, got {sessions}.", hint="e.g. --sessions 2.")
    if int(seed) < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}.", hint="use a non-negative integer.")
    if wml_load < 0 or cl_load < 0:
        raise UsageError("Lesion loads must be >= 0.", hint="e.g. --wml-load 20 --cl-load 3.")
    if anatomy_variation < 0 or anatomy_variation > 3:
        raise UsageError(f"--anatomy-variation {anatomy_variation} is outside [0, 3].", hint="use 1 (default).")
    n_subjects, sites, sessions, seed = int(n_subjects), int(sites), int(sessions), int(seed)

    # sources first (user errors before anything is written)
    templates = load_templates(resolution_mm, templates_dir)
    library = load_lesion_library(lesion_dir, exclude=exclude_patients)
    site_params: list[site_mod.SiteParams] = []
    for k in range(sites):  # sequential: each site avoids the scanners of the previous ones
        site_params.append(site_mod.sample_site(
            _seed_rng(seed, 0, k), k, t1_contrast=t1_contrast, flair_slice_thickness=tuple(flair_slice_thickness),
            orientation=orientation, misalign_mm=misalign_mm,
            avoid_scanners=frozenset(f"{s.manufacturer} {s.model}" for s in site_params)))
    root = _prepare_out_dir(Path(out_dir))
    out = _Out(root)
    params = {
        "seed": seed, "n_subjects": n_subjects, "sites": sites, "sessions": sessions,
        "resolution_mm": float(resolution_mm), "wml_load": float(wml_load), "cl_load": float(cl_load),
        "t1_contrast": t1_contrast, "flair_slice_thickness": [float(v) for v in flair_slice_thickness],
        "orientation": orientation, "misalign_mm": float(misalign_mm), "skull_stripped": bool(skull_stripped),
        "anatomy_variation": float(anatomy_variation), "exclude_patients": list(library.excluded),
        "template": TEMPLATE,
    }
    width = max(3, len(str(n_subjects)))
    ses_width = max(2, len(str(sessions)))
    participants: list[dict] = []
    provenance_subjects: list[dict] = []
    for i in range(n_subjects):
        sub = f"{i + 1:0{width}d}"
        site = site_params[i % sites]
        LOG.info("synth: sub-%s (%s, %s) ...", sub, site.name, site.t1_contrast)
        results = generate_sessions(
            _seed_rng(seed, 1, i), site, sessions, resolution_mm, wml_load=wml_load, cl_load=cl_load,
            skull_stripped=skull_stripped, anatomy_variation=anatomy_variation, templates=templates,
            library=library,
        )
        session_rows = []
        for s, subject in enumerate(results):
            ses = f"{s + 1:0{ses_width}d}" if sessions > 1 else None
            _write_session(out, subject, site, sub, ses, float(resolution_mm))
            m = subject.metadata
            session_rows.append({"session_id": f"ses-{ses}" if ses else None, "n_wml": m["n_wml"], "n_cl": m["n_cl"],
                                 "wml_volume_mm3": m["wml_volume_mm3"], "cl_volume_mm3": m["cl_volume_mm3"]})
            provenance_subjects.append({
                "participant_id": f"sub-{sub}", "session_id": f"ses-{ses}" if ses else None,
                "n_wml": m["n_wml"], "n_cl": m["n_cl"], "wml_volume_mm3": m["wml_volume_mm3"],
                "cl_volume_mm3": m["cl_volume_mm3"], "flair_voxel_mm": m["flair_voxel_mm"],
                "flair_misalignment": m["flair_misalignment"], "session_pose": m["session_pose"],
                "lesions_placed": m["lesions_placed"],
            })
        if sessions > 1:
            out.text(f"sub-{sub}/sub-{sub}_sessions.tsv", _tsv_text(SESSION_COLUMNS, session_rows))
        first = results[0].metadata
        participants.append({
            "participant_id": f"sub-{sub}", "age": first["age"], "sex": first["sex"], "site": site.name,
            "scanner": site.scanner, "t1_contrast": site.t1_contrast, "n_wml": first["n_wml"], "n_cl": first["n_cl"],
        })

    out.json("dataset_description.json", _raw_description(params, __version__))
    out.text("README", _readme(params, n_subjects))
    out.text("participants.tsv", _tsv_text(PARTICIPANT_COLUMNS, participants))
    out.json("participants.json", _participants_json([s.name for s in site_params]))
    if sessions > 1:
        out.json("sessions.json", SESSIONS_JSON)
    out.json("code/msxplain_synth.json", {
        "generator": f"msxplain-tools synth {__version__}",
        "parameters": params,
        "sources": {"lesion_masks": LESJAK_2017, "template": MNI2009C,
                    "library_patients": list(library.patients), "library_lesions": library.n_lesions},
        "sites": [s.to_dict() for s in site_params],
        "sessions": provenance_subjects,
    })
    d = f"derivatives/{DERIVATIVE_NAME}"
    out.json(f"{d}/dataset_description.json", _derivative_description(params, __version__))
    out.text(f"{d}/README", "# True lesion masks of the msxplain synthetic dataset\n\n"
             "Written by `msxplain-tools synth` together with the raw images (see ../../README).\n"
             "`desc-lesions_dseg`: 0 background, 1 white-matter lesion (WML), 2 cortical lesion (CL), on the grid\n"
             "of the session's T1w/UNIT1 image. `label-WML_mask` / `label-CL_mask`: the same classes as binary\n"
             "masks. `desc-brain_mask`: the true brain mask. Labels are defined in `dseg.tsv`.\n")
    out.text(f"{d}/dseg.tsv", _dseg_tsv())
    return {
        "out_dir": str(root),
        "n_files": len(out.files),
        "participants": participants,
        "sites": [s.to_dict() for s in site_params],
    }
