"""BIDS derivatives: names, sidecars, readers and dataset-level files.

The names of every output come from one declarative file, ``data/io_spec.json``; this module
turns a *derivative record* (what a processing node produced) into a BIDS path and its JSON
sidecar, and finds the outputs of a session by the same names.

A derivative record is a JSON-serialisable dict::

    {"key": "probseg",                      # an entry of io_spec.json
     "file": "/work/.../prob_WML.nii.gz",   # what the node wrote in its working directory
     "entities": {"label": "WML"},          # values of the spec's variable entities
     "sources": ["/data/bids/sub-01/anat/sub-01_T1w.nii.gz", ...],   # raw inputs
     "derived_from": [{"key": "probseg", "entities": {"label": "WML"}}],  # other outputs
     "metadata": {...}}                     # sidecar fields

Writing a session's records all or nothing (staging, the session swap, its recovery, the data
type by suffix) is :mod:`bids_app.bids.commit`. Readers (the group level, the reports) find outputs through the
same spec: :func:`session_folders`, :func:`find_outputs`, :func:`output_path`.
Dataset-level files (``dataset_description.json``, ``.bidsignore``) are written through a
temporary file and an atomic rename with identical content, so parallel participant jobs
(SLURM arrays) can write them at the same time.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from bids_app import DATA_DIR
from bids_app.errors import CannotCreateOutput, OutputIOError

#: BIDS entity order in file names (bids-specification entity table)
ENTITY_ORDER = [
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec", "dir", "run",
    "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split", "recording", "chunk", "seg",
    "res", "den", "label", "from", "to", "mode", "desc",
]
#: entities a derivative keeps from its sources (raw entities, not processing ones)
SOURCE_ENTITIES = ["sub", "ses", "acq", "ce", "rec", "run", "echo", "part", "inv"]
DERIVATIVE_BIDS_VERSION = "1.10.0"


@lru_cache(maxsize=1)
def io_spec() -> dict[str, Any]:
    """The parsed ``data/io_spec.json``."""
    return json.loads((DATA_DIR / "io_spec.json").read_text())


def output_spec(key: str) -> dict[str, Any]:
    try:
        return io_spec()["outputs"][key]
    except KeyError:
        raise KeyError(f"'{key}' is not declared in data/io_spec.json") from None


def parse_bids_name(path: str | os.PathLike) -> tuple[dict[str, str], str, str]:
    """Split a BIDS file name into entities, suffix and extension.

    >>> parse_bids_name("sub-01_ses-a_acq-MPRAGE_run-2_T1w.nii.gz")
    ({'sub': '01', 'ses': 'a', 'acq': 'MPRAGE', 'run': '2'}, 'T1w', '.nii.gz')
    """
    name = Path(path).name
    stem, dot, rest = name.partition(".")
    extension = dot + rest if dot else ""
    parts = stem.split("_")
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if sep:
            entities[key] = value
    return entities, parts[-1], extension


def build_name(entities: dict[str, str], suffix: str, extension: str) -> str:
    """Assemble a BIDS file name with entities in the specification's order."""
    unknown = set(entities) - set(ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown BIDS entities: {sorted(unknown)}")
    parts = [f"{k}-{entities[k]}" for k in ENTITY_ORDER if entities.get(k) not in (None, "")]
    return "_".join(parts + [suffix]) + extension


def shared_entities(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """The source entities that all files share (niworkflows' rule for combined sources)."""
    common: dict[str, str] | None = None
    for p in paths:
        ents = {k: v for k, v in parse_bids_name(p)[0].items() if k in SOURCE_ENTITIES}
        common = ents if common is None else {k: v for k, v in common.items() if ents.get(k) == v}
    return common or {}


def subject_dir(entities: dict[str, str]) -> Path:
    d = Path(f"sub-{entities['sub']}")
    if entities.get("ses"):
        d = d / f"ses-{entities['ses']}"
    return d / "anat"


def session_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The session folders of an output dataset (``sub-X/anat`` and ``sub-X/ses-Y/anat``), sorted."""
    root = Path(output_dir)
    folders = list(root.glob("sub-*/anat")) + list(root.glob("sub-*/ses-*/anat"))
    return sorted(f for f in folders if f.is_dir())


def _matches(path: Path, spec: dict[str, Any], entities: dict[str, str]) -> bool:
    ents, suffix, extension = parse_bids_name(path)
    fixed = spec.get("entities", {})
    allowed = set(SOURCE_ENTITIES) | set(fixed) | set(spec.get("variable", []))
    return ("sub" in ents and extension == spec["extension"]
            and spec["suffix"] in ("{source}", suffix)
            and all(ents.get(k) == v for k, v in fixed.items())
            and not set(ents) - allowed
            and all(ents.get(k) == v for k, v in entities.items()))


def find_outputs(folder: str | os.PathLike, key: str, **entities: str) -> list[Path]:
    """The files of one session folder that are output ``key`` of io_spec.json, sorted.

    A file matches when its suffix and extension are the spec's, it carries the spec's fixed
    entities, and no entity beyond the sources' ones and the spec's variable ones (so
    ``probseg`` does not match the ``desc-member<fold>`` files of ``member_probseg``).

    Parameters
    ----------
    folder : path
        A session folder (``sub-X/[ses-Y/]anat``, see :func:`session_folders`).
    key : str
        An output of io_spec.json.
    **entities
        Values the variable entities must have, e.g. ``to="MNI152NLin2009cAsym"``.
    """
    spec = output_spec(key)
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and _matches(p, spec, entities))


def output_path(folder: str | os.PathLike, prefix: str, key: str, **entities: str) -> Path:
    """Where output ``key`` of the session ``prefix`` (its shared entities, e.g. ``sub-01_ses-a``) is.

    Parameters
    ----------
    folder : path
        The session folder.
    prefix : str
        The session's file-name prefix: what its ``*_summary.json`` is named before ``_summary``.
    key : str
        An output of io_spec.json whose suffix is fixed (not ``{source}``).
    **entities
        Values of the output's variable entities.
    """
    spec = output_spec(key)
    ents = parse_bids_name(f"{prefix}_x")[0]
    ents.update(spec.get("entities", {}))
    ents.update(entities)
    return Path(folder) / build_name(ents, spec["suffix"], spec["extension"])


def session_prefix(path: str | os.PathLike) -> str:
    """The file-name prefix of the session an output belongs to: its source entities
    (``sub-01_ses-a`` for ``sub-01_ses-a_desc-lesions_dseg.nii.gz``)."""
    ents = parse_bids_name(path)[0]
    return "_".join(f"{k}-{ents[k]}" for k in ENTITY_ORDER if k in SOURCE_ENTITIES and ents.get(k))


def sidecar_path(path: str | os.PathLike, extension: str = ".json") -> Path:
    """The file beside ``path`` with another extension (its JSON sidecar, a dseg's ``.tsv``)."""
    path = Path(path)
    return path.with_name(path.name.replace("".join(path.suffixes), extension))


def derivative_relpath(key: str, sources: list[str], entities: dict[str, str] | None = None,
                       source_suffix: str | None = None) -> Path:
    """Relative path (inside the output dataset) of an output declared in io_spec.json."""
    spec = output_spec(key)
    entities = dict(entities or {})
    extra = set(entities) - set(spec.get("variable", []))
    if extra:
        raise ValueError(f"output '{key}' does not take entities {sorted(extra)}")
    ents = shared_entities(sources)
    if "sub" not in ents:
        raise ValueError(f"cannot name output '{key}': its sources share no subject ({sources})")
    ents.update(spec.get("entities", {}))
    ents.update({k: v for k, v in entities.items() if v not in (None, "")})
    suffix = spec["suffix"]
    if suffix == "{source}":
        suffix = source_suffix or parse_bids_name(sources[0])[1]
    return subject_dir(ents) / build_name(ents, suffix, spec["extension"])


def bids_uri(path: str | os.PathLike, dataset_root: str | os.PathLike, dataset_name: str = "raw") -> str:
    """``bids:<name>:<relative path>`` for a file inside a linked dataset (``bids::`` = this one)."""
    rel = Path(os.path.abspath(path)).relative_to(Path(os.path.abspath(dataset_root)))
    return f"bids:{dataset_name}:{rel.as_posix()}"


# --------------------------------------------------------------------------------------
# Atomic dataset-level files
# --------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CannotCreateOutput(f"Cannot write into the output folder ({exc.strerror}).", path=str(path.parent),
                                 hint="check that it exists, is writable and has free space.") from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise io_error(exc, path) from None


def io_error(exc: OSError, path: Path):
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputIOError("No space left while writing derivatives; nothing was left half-written.",
                             path=str(path), hint="free disk space or choose another output folder, then re-run.")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CannotCreateOutput(f"Cannot write derivatives ({exc.strerror}).", path=str(path),
                                  hint="make the output folder writable, or choose another one.")
    return OutputIOError(f"I/O error while writing derivatives ({exc.strerror}).", path=str(path),
                         hint="check the file system, then re-run; finished sessions are kept.")


def dumps_json(data: Any) -> str:
    """Deterministic JSON (sorted keys, 2-space indent, numpy types converted, NaN as null)."""

    def convert(obj):
        if isinstance(obj, dict):
            return {str(k): convert(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [convert(v) for v in obj]
        if isinstance(obj, np.ndarray):
            return convert(obj.tolist())
        if isinstance(obj, (np.integer,)):
            return int(obj)
        if isinstance(obj, (np.floating, float)):
            value = float(obj)
            return value if np.isfinite(value) else None
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, Path):
            return str(obj)
        return obj

    return json.dumps(convert(data), indent=2, sort_keys=True, allow_nan=False) + "\n"


#: the tool's own entry in ``Authors`` of the derivative dataset
TOOL_AUTHORS = ("msxplain developers",)


def dataset_authors(model_card: dict[str, Any] | None = None) -> list[str]:
    """``Authors`` of the derivative dataset: the model card's authors, then the tool's.

    Parameters
    ----------
    model_card : dict, optional
        The raw model card; its ``authors`` (a list of names, or one string with names
        separated by ``;``) are listed first, when it has any.

    Returns
    -------
    list of str
        One name per entry (BIDS), without duplicates, ending with ``TOOL_AUTHORS``.
    """
    names: list[str] = []
    raw = (model_card or {}).get("authors") or []
    if isinstance(raw, str):
        raw = raw.split(";")
    for name in list(raw) + list(TOOL_AUTHORS):
        name = str(name.get("name", "") if isinstance(name, dict) else name).strip()
        if name and name not in names:
            names.append(name)
    return names


def dataset_description(bids_dir: Path, version: str, source_description: dict | None = None,
                        authors: list[str] | None = None) -> dict[str, Any]:
    """The derivative dataset's ``dataset_description.json`` content.

    ``authors`` (default: the tool's, :data:`TOOL_AUTHORS`) become ``Authors``; see
    :func:`dataset_authors`.
    """
    generated = {
        "Name": "msxplain",
        "Version": version,
        "Description": "MS lesion segmentation (nnU-Net ensemble) with voxel, lesion and patient uncertainty "
                       "and instance-level explanations",
        "CodeURL": "https://github.com/msxplain/msxplain",
    }
    container_type = os.environ.get("MSXPLAIN_CONTAINER_TYPE")
    if container_type:
        container = {"Type": container_type}
        tag = os.environ.get("MSXPLAIN_CONTAINER_TAG")
        if tag:
            container["Tag"] = tag
        generated["Container"] = container
    desc: dict[str, Any] = {
        "Name": "msxplain derivatives",
        "BIDSVersion": DERIVATIVE_BIDS_VERSION,
        "DatasetType": "derivative",
        "Authors": list(authors) if authors else list(TOOL_AUTHORS),
        "GeneratedBy": [generated],
        "DatasetLinks": {"raw": Path(os.path.abspath(bids_dir)).as_uri()},
    }
    source = {"URL": Path(os.path.abspath(bids_dir)).as_uri()}
    if source_description:
        if source_description.get("DatasetDOI"):
            source["DOI"] = str(source_description["DatasetDOI"])
        if source_description.get("Name"):
            desc["Name"] = f"msxplain derivatives of {source_description['Name']}"
        if source_description.get("License"):
            desc["License"] = source_description["License"]
    desc["SourceDatasets"] = [source]
    return desc


def write_dataset_files(output_dir: Path, bids_dir: Path, version: str, authors: list[str] | None = None) -> None:
    """Write ``dataset_description.json``, ``.bidsignore`` and ``README`` atomically.

    ``authors``: see :func:`dataset_authors` (the participant level passes the model card's).
    Without them (the group level, which has no model), the ``Authors`` an earlier run wrote
    into this output folder are kept.
    """
    source = None
    try:
        source = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    if not authors:
        try:
            previous = json.loads((Path(output_dir) / "dataset_description.json").read_text())
            kept = previous.get("Authors") if isinstance(previous, dict) else None
            if isinstance(kept, list) and all(isinstance(a, str) for a in kept):
                authors = kept
        except (OSError, json.JSONDecodeError):
            pass
    atomic_write_text(output_dir / "dataset_description.json",
                      dumps_json(dataset_description(bids_dir, version, source, authors)))
    atomic_write_text(output_dir / ".bidsignore", "\n".join(io_spec()["bidsignore"]) + "\n")
    readme = output_dir / "README"
    if not readme.exists():
        atomic_write_text(readme, README_TEXT)


README_TEXT = """msxplain derivatives
====================

Multiple-sclerosis lesion segmentation with an nnU-Net ensemble, with voxel-, lesion- and
patient-scale uncertainty. Every file has a JSON sidecar naming its sources (BIDS URIs), the
model (id and checkpoint SHA-256) and every parameter. Files with non-standard suffixes
(uncertainty, lesion tables, summaries) are listed in .bidsignore and documented in the
msxplain README.
"""


# --------------------------------------------------------------------------------------
# Sidecars and tables of the records
# --------------------------------------------------------------------------------------
def tsv_columns(path: str | os.PathLike) -> list[str]:
    """The column names of a TSV file (its header line)."""
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").rstrip("\r")
    return header.split("\t") if header else []


def lookup_column_definitions(key: str, columns: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Definitions (io_spec.json ``columns``) of the lookup-table columns of a dseg output.

    They go into the JSON sidecar that the dseg image and its ``.tsv`` share (BIDS inheritance),
    so that every column of the table is defined there.

    Raises
    ------
    ValueError
        A column that io_spec.json does not define for this output.
    """
    defined = output_spec(key).get("columns", {})
    missing = [c for c in columns if c not in defined]
    if missing:
        raise ValueError(f"lookup table of output '{key}' has columns {missing} that data/io_spec.json does not "
                         "define")
    return {c: dict(defined[c]) for c in columns}


def undefined_tsv_columns(columns: Iterable[str], sidecar: dict[str, Any]) -> list[str]:
    """The columns of a TSV that its JSON sidecar does not define (a dict with a ``Description``)."""
    return [c for c in columns if not (isinstance(sidecar.get(c), dict) and sidecar[c].get("Description"))]


def resolve_record(record: dict[str, Any], output_dir: Path) -> Path:
    """Destination path of a record."""
    return output_dir / derivative_relpath(
        record["key"], record["sources"], record.get("entities"), record.get("source_suffix"))


def sidecar_for(record: dict[str, Any], bids_dir: Path, output_dir: Path, common: dict[str, Any]) -> dict[str, Any]:
    """The JSON sidecar of one record: spec description + record metadata + provenance."""
    spec = output_spec(record["key"])
    meta: dict[str, Any] = {"Description": spec["description"]}
    sources = [bids_uri(s, bids_dir) for s in record.get("sources", [])]
    for d in record.get("derived_from", []):
        rel = derivative_relpath(d["key"], record["sources"], d.get("entities"), d.get("source_suffix"))
        sources.append(f"bids::{rel.as_posix()}")
    meta["Sources"] = sources
    meta.update(record.get("metadata", {}))
    meta.update(common)
    return meta
