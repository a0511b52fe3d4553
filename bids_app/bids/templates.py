"""Template files through TemplateFlow: fetched once on first use, or strictly offline.

msxplain uses one template, MNI ICBM152 2009c nonlinear asymmetric (``MNI152NLin2009cAsym``):
its head T1w and brain mask (brain mask of unstripped inputs, MNI location of lesions) and
its GM/WM/CSF probability maps (lesion location classes, the synthetic data engine), at 1 and
2 mm. Two modes, as in the NiPreps tools:

* **Online** (the default on a machine with a network): a file missing from the TemplateFlow
  cache (``platformdirs.user_cache_dir('templateflow')``, i.e. ``~/.cache/templateflow`` on
  Linux) is fetched once by the TemplateFlow client, which prints what it downloads with a
  progress bar; later runs read the cache.
* **Offline** (``--offline``, ``MSXPLAIN_OFFLINE=1``, or ``TEMPLATEFLOW_HOME`` set, which is
  how containers and air-gapped clusters point at a pre-filled copy): the network is never
  touched and the templateflow package is not even imported. A missing file is a
  :class:`~bids_app.errors.MissingInput` that names the files and the command that fetches
  them once (``msxplain-tools fetch-templates``, run where there is a network).

``MSXPLAIN_TEMPLATEFLOW_URL`` replaces TemplateFlow's S3 address (an institutional mirror, or
the test suite's HTTP server on 127.0.0.1).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from bids_app.errors import MissingInput, UsageError

LOGGER = logging.getLogger("bids_app.bids.templates")

DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"
#: set to 1/true/yes to forbid any download (same as ``msxplain --offline``)
OFFLINE_ENV = "MSXPLAIN_OFFLINE"
#: base URL of a TemplateFlow S3 mirror (default: TemplateFlow's own)
MIRROR_ENV = "MSXPLAIN_TEMPLATEFLOW_URL"
#: the command that fills the cache once (printed in messages)
FETCH_COMMAND = "msxplain-tools fetch-templates"

#: the template maps msxplain reads at each resolution: key -> TemplateFlow query entities
TEMPLATE_MAPS: dict[str, dict[str, str | None]] = {
    "T1w": {"suffix": "T1w", "desc": None},
    "brain": {"suffix": "mask", "desc": "brain"},
    "GM": {"suffix": "probseg", "label": "GM"},
    "WM": {"suffix": "probseg", "label": "WM"},
    "CSF": {"suffix": "probseg", "label": "CSF"},
}
#: every template file msxplain may read: each map at 1 and 2 mm
REQUIRED_FILES: tuple[dict, ...] = tuple({"resolution": res, **entities}
                                         for res in (1, 2) for entities in TEMPLATE_MAPS.values())


def offline_mode() -> bool:
    """True when msxplain must not use the network (``--offline``, ``MSXPLAIN_OFFLINE`` or an
    explicit ``TEMPLATEFLOW_HOME``)."""
    flag = os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(os.environ.get("TEMPLATEFLOW_HOME"))


def templateflow_home() -> Path:
    """The TemplateFlow cache: ``$TEMPLATEFLOW_HOME``, else TemplateFlow's own default."""
    home = os.environ.get("TEMPLATEFLOW_HOME")
    if home:
        return Path(home).expanduser().absolute()
    from platformdirs import user_cache_dir  # what templateflow.conf.env uses, without importing templateflow

    return Path(user_cache_dir("templateflow")).absolute()


def template_filename(template: str = DEFAULT_TEMPLATE, *, resolution: int, suffix: str, desc: str | None = None,
                      label: str | None = None, extension: str = ".nii.gz") -> str:
    """TemplateFlow's file name, e.g. ``tpl-MNI152NLin2009cAsym_res-01_label-GM_probseg.nii.gz``."""
    parts = [f"tpl-{template}", f"res-{int(resolution):02d}"]
    if label:
        parts.append(f"label-{label}")
    if desc:
        parts.append(f"desc-{desc}")
    return "_".join(parts) + f"_{suffix}{extension}"


def local_template_file(template: str = DEFAULT_TEMPLATE, **query) -> Path | None:
    """The file in the cache when it is really there (TemplateFlow's skeleton holds empty
    placeholders for files not yet fetched), else None. Never touches the network."""
    path = templateflow_home() / f"tpl-{template}" / template_filename(template, **query)
    return path if path.is_file() and path.stat().st_size > 0 else None


def template_file(template: str = DEFAULT_TEMPLATE, **query) -> Path:
    """One template file, e.g. ``template_file(resolution=2, suffix="T1w")``; fetched on first use
    unless offline.

    Raises
    ------
    MissingInput
        Offline and not in the cache, or the download failed; the message names the file and
        the command that fetches it.
    """
    path = local_template_file(template, **query)
    if path is not None:
        return path
    name = template_filename(template, **query)
    home = templateflow_home()
    if offline_mode():
        raise MissingInput(
            f"Template file {name} is not in the TemplateFlow cache and msxplain is offline.", path=str(home),
            hint=f"fetch the templates once with '{FETCH_COMMAND}' on a machine with a network (it fills "
                 "this folder; copy it to offline machines), or run without --offline/TEMPLATEFLOW_HOME so "
                 "msxplain fetches them on first use.")
    return fetch_template_files([dict(query)], template)[0]


def fetch_template_files(queries: list[dict] | tuple[dict, ...] = REQUIRED_FILES,
                         template: str = DEFAULT_TEMPLATE) -> list[Path]:
    """Fetch template files with the TemplateFlow client into :func:`templateflow_home` (files
    already there are not downloaded again); TemplateFlow prints each URL and a progress bar.

    Raises
    ------
    MissingInput
        A file cannot be fetched (no network, unknown file); nothing half-downloaded is kept
        (TemplateFlow truncates failed downloads back to placeholders).
    """
    home = templateflow_home()
    found: list[Path] = []
    client = None
    for query in queries:
        local = local_template_file(template, **query)
        if local is not None:
            found.append(local)
            continue
        name = template_filename(template, **query)
        if client is None:
            client = _client(home)
        LOGGER.info("Fetching %s from TemplateFlow (first use; cached in %s)", name, home)
        try:
            # desc/label None explicitly: TemplateFlow would otherwise also match e.g. desc-brain_T1w
            result = client.get(template, raise_empty=True, extension=".nii.gz",
                                **{"desc": None, "label": None, **query})
        except Exception as exc:  # noqa: BLE001 - requests, RuntimeError and plain Exception from templateflow
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise MissingInput(f"Cannot fetch template file {name} ({detail}).", path=str(home),
                               hint=f"check the network connection and retry; on a machine without one, run "
                                    f"'{FETCH_COMMAND}' elsewhere and copy the TemplateFlow folder, then set "
                                    "TEMPLATEFLOW_HOME to it.") from None
        path = Path(result[0] if isinstance(result, list) else result)
        if not path.is_file() or path.stat().st_size == 0:
            raise MissingInput(f"TemplateFlow returned an empty file for {name}.", path=str(path),
                               hint=f"delete it and run '{FETCH_COMMAND}' again.")
        found.append(path)
    return found


def _client(home: Path):
    """A TemplateFlow client on ``home`` (its skeleton is unpacked from the package, offline)."""
    try:
        from templateflow.client import TemplateFlowClient
    except ImportError:  # pragma: no cover - templateflow is a dependency
        raise MissingInput("The templateflow package is not installed.", hint="re-run scripts/install.sh.") from None
    kwargs = {"root": home, "autoupdate": False}
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        kwargs["s3_root"] = mirror.rstrip("/")
    return TemplateFlowClient(**kwargs)


def missing_template_files(queries=REQUIRED_FILES, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Names of the files not yet in the cache."""
    return [template_filename(template, **q) for q in queries if local_template_file(template, **q) is None]


def brain_mask_template() -> tuple[Path, Path]:
    """Head T1w and brain mask of MNI152NLin2009cAsym at 2 mm (enough for an affine fit)."""
    return (template_file(resolution=2, suffix="T1w"),
            template_file(resolution=2, suffix="mask", desc="brain"))


def feature_templates(atlas: str = "auto", atlas_lut: str | None = None) -> dict[str, Path]:
    """Template files of the lesion-feature stage.

    ``atlas``: ``auto`` takes a ``desc-HOparc`` dseg when the local TemplateFlow folder holds
    one (with the ``.tsv`` beside it). It is not a TemplateFlow file: niworkflows 0.0.5 derived
    it from the FSL Harvard-Oxford atlases (FSL licence), so it is never fetched, only used
    when a user or a container put it there (see docs/features.md). ``none`` uses no atlas
    (no ventricle distance, no infratentorial/periventricular classes); anything else is a
    path to a dseg on the template grid, with ``atlas_lut`` (index, name, location_class;
    default: the ``.tsv`` beside it).
    """
    t1w, mask = brain_mask_template()
    files = {"t1w": t1w,
             "mask": mask,
             "gm": template_file(resolution=1, suffix="probseg", label="GM"),
             "wm": template_file(resolution=1, suffix="probseg", label="WM")}
    if atlas == "auto":
        found = local_template_file(resolution=1, suffix="dseg", desc="HOparc")
        if found is None:
            return files
        files["atlas"] = found
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
