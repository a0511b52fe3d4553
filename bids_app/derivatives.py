"""BIDS derivatives: names, sidecars, dataset-level files and atomic, all-or-nothing writes.

The names of every output come from one declarative file, ``data/io_spec.json``; this module
turns a *derivative record* (what a processing node produced) into a BIDS path, coerces the
data type by suffix (``mask`` -> uint8, ``dseg`` -> int16, ``probseg`` -> float32, as
niworkflows' DerivativesDataSink does), and writes the JSON sidecar.

A derivative record is a JSON-serialisable dict::

    {"key": "probseg",                      # an entry of io_spec.json
     "file": "/work/.../prob_WML.nii.gz",   # what the node wrote in its working directory
     "entities": {"label": "WML"},          # values of the spec's variable entities
     "sources": ["/data/bids/sub-01/anat/sub-01_T1w.nii.gz", ...],   # raw inputs
     "derived_from": [{"key": "probseg", "entities": {"label": "WML"}}],  # other outputs
     "metadata": {...}}                     # sidecar fields

:func:`commit_records` writes all the records of one session into a staging folder inside
the output directory and renames them into place only when every one of them was written,
so an interrupted or failing run never leaves half a file or half a session behind.
Dataset-level files (``dataset_description.json``, ``.bidsignore``) are written through a
temporary file and an atomic rename with identical content, so parallel participant jobs
(SLURM arrays) can write them at the same time.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import CannotCreateOutput, OutputIOError

#: BIDS entity order in file names (bids-specification entity table)
ENTITY_ORDER = [
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec", "dir", "run",
    "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split", "recording", "chunk", "seg",
    "res", "den", "label", "from", "to", "mode", "desc",
]
#: entities a derivative keeps from its sources (raw entities, not processing ones)
SOURCE_ENTITIES = ["sub", "ses", "acq", "ce", "rec", "run", "echo", "part", "inv"]
SUFFIX_DTYPES = {"mask": np.uint8, "dseg": np.int16, "probseg": np.float32}
DERIVATIVE_BIDS_VERSION = "1.10.0"
STAGING_PREFIX = ".msxplain-staging-"


@lru_cache(maxsize=1)
def io_spec() -> dict[str, Any]:
    """The parsed ``data/io_spec.json``."""
    return json.loads((Path(__file__).resolve().parent / "data" / "io_spec.json").read_text())


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
        raise _io_error(exc, path) from None


def _io_error(exc: OSError, path: Path):
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
# Writing the records of a session
# --------------------------------------------------------------------------------------
def _coerce_nifti(src: Path, dst: Path, suffix: str, dtype_name: str | None) -> None:
    import nibabel as nib

    img = nib.load(str(src))
    dtype = SUFFIX_DTYPES.get(suffix) or (np.dtype(dtype_name) if dtype_name else None)
    data = np.asanyarray(img.dataobj)
    if dtype is not None and data.dtype != dtype:
        if np.issubdtype(dtype, np.integer):
            data = np.rint(data)
        data = data.astype(dtype)
    out = nib.Nifti1Image(data, img.affine)
    qform = img.header.get_qform()
    out.set_qform(qform, code=1)
    out.set_sform(img.header.get_sform() if img.header["sform_code"] > 0 else qform, code=1)
    out.header.set_xyzt_units("mm", "sec")
    if np.issubdtype(data.dtype, np.floating):
        out.header.set_slope_inter(1.0, 0.0)
    nib.save(out, str(dst))


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


def commit_records(records: list[dict[str, Any]], output_dir: Path, bids_dir: Path,
                   common_metadata: dict[str, Any] | None = None,
                   spatial_reference: str | None = None) -> list[Path]:
    """Write all derivative records of one session, all or nothing.

    Every file and sidecar is first written into ``output_dir/.msxplain-staging-<uuid>/``
    (same file system, so the final renames are atomic), then moved into place. If anything
    fails, the staging folder is removed and nothing of this session is left in the output.

    ``spatial_reference`` (a raw file) becomes the ``SpatialReference`` of every image.

    Returns
    -------
    list of Path
        The final paths of the data files (not the sidecars).
    """
    output_dir = Path(output_dir)
    common_metadata = common_metadata or {}
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = output_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        staging.mkdir()
    except OSError as exc:
        raise _io_error(exc, output_dir) from None
    moves: list[tuple[Path, Path]] = []
    written: list[Path] = []
    try:
        seen: set[Path] = set()
        for record in records:
            rel = derivative_relpath(record["key"], record["sources"], record.get("entities"),
                                     record.get("source_suffix"))
            if rel in seen:
                raise ValueError(f"two records would both write {rel}")
            seen.add(rel)
            spec = output_spec(record["key"])
            staged = staging / rel
            staged.parent.mkdir(parents=True, exist_ok=True)
            src = Path(record["file"])
            suffix = parse_bids_name(rel)[1]
            if rel.name.endswith((".nii.gz", ".nii")):
                _coerce_nifti(src, staged, suffix, spec.get("dtype"))
            else:
                shutil.copyfile(src, staged)
            moves.append((staged, output_dir / rel))
            written.append(output_dir / rel)
            if rel.suffix != ".json":
                sidecar_rel = rel.with_name(rel.name.replace("".join(Path(rel.name).suffixes), ".json"))
                meta = sidecar_for(record, bids_dir, output_dir, common_metadata)
                if spatial_reference and rel.name.endswith((".nii.gz", ".nii")):
                    meta.setdefault("SpatialReference", bids_uri(spatial_reference, bids_dir))
                if record.get("lookup_table"):  # the dseg and its .tsv share this sidecar
                    meta.update(lookup_column_definitions(record["key"], tsv_columns(record["lookup_table"])))
                if rel.suffix == ".tsv":
                    undefined = undefined_tsv_columns(tsv_columns(src), meta)
                    if undefined:
                        raise ValueError(f"{rel.name}: columns {undefined} have no definition in the sidecar")
                (staging / sidecar_rel).write_text(dumps_json(meta))
                moves.append((staging / sidecar_rel, output_dir / sidecar_rel))
            if record.get("lookup_table"):
                lut_rel = rel.with_name(rel.name.replace("".join(Path(rel.name).suffixes), ".tsv"))
                shutil.copyfile(record["lookup_table"], staging / lut_rel)
                moves.append((staging / lut_rel, output_dir / lut_rel))
        for staged, final in moves:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
    except OSError as exc:
        raise _io_error(exc, output_dir) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def remove_stale_staging(output_dir: Path) -> None:
    """Remove staging folders left by killed runs (their sessions were never committed)."""
    if not Path(output_dir).is_dir():
        return
    for d in Path(output_dir).glob(f"{STAGING_PREFIX}*"):
        # another live run may be staging right now: only remove folders older than a day
        try:
            import time

            if time.time() - d.stat().st_mtime > 24 * 3600:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass
