"""Template files through TemplateFlow, strictly offline.

TemplateFlow downloads missing files on demand; msxplain must never touch the network at
run time (air-gapped clusters, ``--network none`` containers), so a template is looked up
only in an existing ``$TEMPLATEFLOW_HOME`` (the container bakes one in at build time) and a
missing file is a clear error, not a download.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingInput

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"


def templateflow_home() -> Path:
    return Path(os.environ.get("TEMPLATEFLOW_HOME", Path.home() / ".cache" / "templateflow"))


def template_file(template: str = DEFAULT_TEMPLATE, **query) -> Path:
    """One template file, e.g. ``template_file(resolution=2, suffix="T1w", desc=None)``.

    Raises
    ------
    MissingInput
        No TemplateFlow folder, or the file is not in it.
    """
    home = templateflow_home()
    if not (home / f"tpl-{template}").is_dir():
        raise MissingInput(f"TemplateFlow template {template} is not available offline.", path=str(home),
                           hint=f"set TEMPLATEFLOW_HOME to a folder holding tpl-{template} "
                                "(the container image has one; tests copy ../shared/data/templateflow).")
    os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
    query.setdefault("extension", ".nii.gz")
    try:
        from templateflow import api

        found = api.get(template, raise_empty=True, **query)
    except Exception as exc:  # noqa: BLE001 - templateflow raises several types
        raise MissingInput(f"TemplateFlow has no {template} file for {query} ({type(exc).__name__}).",
                           path=str(home), hint="add the file to TEMPLATEFLOW_HOME.") from None
    if isinstance(found, list):
        if len(found) != 1:
            raise MissingInput(f"TemplateFlow query {query} is ambiguous for {template} ({len(found)} files).",
                               path=str(home), hint="report this as a bug.")
        found = found[0]
    path = Path(found)
    if not path.is_file() or path.stat().st_size == 0:
        raise MissingInput(f"TemplateFlow file {path.name} is missing or empty (not downloaded).", path=str(path),
                           hint="populate TEMPLATEFLOW_HOME with the real files.")
    return path


def brain_mask_template() -> tuple[Path, Path]:
    """Head T1w and brain mask of MNI152NLin2009cAsym at 2 mm (enough for an affine fit)."""
    return (template_file(resolution=2, suffix="T1w", desc=None),
            template_file(resolution=2, suffix="mask", desc="brain"))


def feature_templates(atlas: str = "auto", atlas_lut: str | None = None) -> dict[str, Path]:
    """Template files of the lesion-feature stage.

    ``atlas``: ``auto`` takes TemplateFlow's ``desc-HOparc`` dseg when the local TemplateFlow
    folder has one (with the ``.tsv`` beside it; it is not part of the official TemplateFlow
    archive, see docs/features.md), ``none`` uses no atlas (no ventricle distance, no
    infratentorial/periventricular classes), or a path to a dseg on the template grid with
    ``atlas_lut`` (index, name, location_class; default: the ``.tsv`` beside it).
    """
    from .errors import MissingInput, UsageError

    files = {"t1w": template_file(resolution=2, suffix="T1w", desc=None),
             "mask": template_file(resolution=2, suffix="mask", desc="brain"),
             "gm": template_file(resolution=1, suffix="probseg", label="GM"),
             "wm": template_file(resolution=1, suffix="probseg", label="WM")}
    if atlas == "auto":
        try:
            files["atlas"] = template_file(resolution=1, suffix="dseg", desc="HOparc")
        except MissingInput:
            return files
    elif atlas and atlas != "none":
        files["atlas"] = Path(atlas)
        if not files["atlas"].is_file():
            raise MissingInput("The --atlas file does not exist.", path=atlas, hint="check the path.")
    else:
        return files
    lut = Path(atlas_lut) if atlas_lut else Path(str(files["atlas"]).replace(".nii.gz", ".tsv"))
    if not lut.is_file():
        raise UsageError("The atlas has no lookup table (index, name, location_class).", path=str(lut),
                         hint="pass --atlas-lut TSV.")
    files["atlas_lut"] = lut
    return files
