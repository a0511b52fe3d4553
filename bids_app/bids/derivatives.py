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
the output directory, then swaps the whole session folder (``sub-X/[ses-Y/]anat``) in with two
renames (old folder aside, new folder into place); a journal in the staging folder lets the next
run finish or roll back a swap that was interrupted (:func:`remove_stale_staging`), so an
interrupted or failing run never leaves half a file, half a session or a mix of two runs behind.
Dataset-level files (``dataset_description.json``, ``.bidsignore``) are written through a
temporary file and an atomic rename with identical content, so parallel participant jobs
(SLURM arrays) can write them at the same time.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
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
SUFFIX_DTYPES = {"mask": np.uint8, "dseg": np.int16, "probseg": np.float32}
DERIVATIVE_BIDS_VERSION = "1.10.0"
STAGING_PREFIX = ".msxplain-staging-"


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
    """Write all derivative records of one session, all or nothing, replacing its previous outputs.

    Every file and sidecar is first written into ``output_dir/.msxplain-staging-<owner>-<id>/new/``
    (same file system, so the renames are atomic); the session folder is then swapped in as one
    unit (:func:`swap_in`). If anything fails, the previous outputs of the session (if any) stay
    as they were and the staging folder is removed.

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
        staging = output_dir / staging_name()
        staging.mkdir()
    except OSError as exc:
        raise _io_error(exc, output_dir) from None
    new = staging / "new"
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
            staged = new / rel
            staged.parent.mkdir(parents=True, exist_ok=True)
            src = Path(record["file"])
            suffix = parse_bids_name(rel)[1]
            if rel.name.endswith((".nii.gz", ".nii")):
                _coerce_nifti(src, staged, suffix, spec.get("dtype"))
            else:
                shutil.copyfile(src, staged)
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
                (new / sidecar_rel).write_text(dumps_json(meta))
            if record.get("lookup_table"):
                lut_rel = rel.with_name(rel.name.replace("".join(Path(rel.name).suffixes), ".tsv"))
                shutil.copyfile(record["lookup_table"], new / lut_rel)
        folders = {rel.parent for rel in seen}
        if len(folders) != 1:  # the swap replaces one folder: a session's records share it
            raise ValueError(f"the records of one session go to {len(folders)} folders: {sorted(map(str, folders))}")
        swap_in(staging, output_dir, folders.pop())
    except OSError as exc:
        raise _io_error(exc, output_dir) from None
    finally:
        try:  # deletes the old outputs after a swap, puts them back after a failed one
            recover_swap(staging, output_dir)
        except OSError:  # they could not be put back: the journal stays for the next run
            pass
    return written


# --------------------------------------------------------------------------------------
# Staging folders, the session swap and its recovery
# --------------------------------------------------------------------------------------
#: the journal of a swap: written once the new folder is complete, before anything is moved
SWAP_JOURNAL = "swap.json"


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def staging_name(pid: int | None = None) -> str:
    """``.msxplain-staging-<host>.<pid>-<random>``: the owner is named so that a folder left by a
    killed process can be told from one a live run is writing (:func:`staging_owner`)."""
    return f"{STAGING_PREFIX}{_host()}.{os.getpid() if pid is None else pid}-{uuid.uuid4().hex[:12]}"


def staging_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that created a staging folder; None for an older name."""
    import re

    match = re.fullmatch(re.escape(STAGING_PREFIX) + r"(.+)\.(\d+)-[0-9a-f]{12}", name)
    return (match.group(1), int(match.group(2))) if match else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _abandoned(folder: Path, max_age_s: float = 24 * 3600) -> bool:
    """Whether no live process owns a staging folder: its owner ran on this host and is gone, or
    (another host, an old name) it has not changed for ``max_age_s``."""
    owner = staging_owner(folder.name)
    if owner is not None and owner[0] == _host():
        return owner[1] != os.getpid() and not _pid_alive(owner[1])
    try:
        return time.time() - folder.stat().st_mtime > max_age_s
    except OSError:
        return False


def swap_in(staging: Path, output_dir: Path, unit: Path) -> None:
    """Replace ``output_dir/unit`` by ``staging/new/unit`` as one unit.

    Steps: write ``staging/swap.json`` (the journal), move the old folder to ``staging/old``,
    move the new folder into place (the commit point). A failure before the commit point puts
    the old folder back; a process killed in between leaves the journal, and
    :func:`recover_swap` finishes (after the commit point) or rolls back (before it).

    Raises
    ------
    OSError
        The swap failed; the previous outputs are in place again (or, when even that failed,
        :func:`recover_swap` puts them back).
    """
    target = Path(output_dir) / unit
    journal = staging / SWAP_JOURNAL
    with open(journal, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"target": Path(unit).as_posix()}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    target.parent.mkdir(parents=True, exist_ok=True)
    moved_old = False
    if target.exists():
        os.replace(target, staging / "old")
        moved_old = True
    try:
        os.replace(staging / "new" / unit, target)  # the commit point
    except OSError:
        if moved_old:
            try:
                os.replace(staging / "old", target)
            except OSError:
                pass  # recover_swap tries again, now or at the next start
        raise


def recover_swap(staging: Path, output_dir: Path) -> str:
    """Finish or roll back the swap recorded in an abandoned staging folder, then remove it.

    Returns
    -------
    str
        ``"finished"`` (the new folder was in place: the old one is deleted), ``"rolled back"``
        (the old folder is put back), or ``"removed"`` (no swap had started).
    """
    outcome = "removed"
    if not staging.exists():
        return outcome
    try:
        target_rel = json.loads((staging / SWAP_JOURNAL).read_text())["target"]
    except (OSError, ValueError, KeyError, TypeError):
        target_rel = None
    if target_rel is not None and ".." not in Path(target_rel).parts:
        target = Path(output_dir) / target_rel
        if (staging / "new" / target_rel).exists():  # the commit point was not reached
            if (staging / "old").exists() and not target.exists():
                os.replace(staging / "old", target)
            outcome = "rolled back"
        else:
            outcome = "finished"
    shutil.rmtree(staging, ignore_errors=True)
    return outcome


def remove_stale_staging(output_dir: Path) -> list[tuple[Path, str]]:
    """Recover or remove the staging folders that killed runs left (their swaps, see :func:`swap_in`).

    Folders a live run may still be writing are left alone (see :func:`_abandoned`).

    Returns
    -------
    list of (Path, str)
        Each folder handled and what was done (see :func:`recover_swap`).
    """
    done: list[tuple[Path, str]] = []
    if not Path(output_dir).is_dir():
        return done
    for folder in sorted(Path(output_dir).glob(f"{STAGING_PREFIX}*")):
        if folder.is_dir() and _abandoned(folder):
            try:
                done.append((folder, recover_swap(folder, output_dir)))
            except OSError:
                pass
    return done


def remove_staging_of(output_dir: Path, pids: Iterable[int]) -> list[Path]:
    """Recover and remove the staging folders that the given (ended) processes of this host created."""
    pids = set(pids)
    removed = []
    for folder in sorted(Path(output_dir).glob(f"{STAGING_PREFIX}*")):
        owner = staging_owner(folder.name)
        if owner is not None and owner[0] == _host() and owner[1] in pids:
            try:
                recover_swap(folder, output_dir)
                removed.append(folder)
            except OSError:
                pass
    return removed


def remove_session_outputs(output_dir: Path, unit: Path) -> bool:
    """Remove a session's outputs (``unit`` = ``sub-X/[ses-Y/]anat``) as one unit: moved aside with
    one rename, then deleted. Used when the latest attempt of a session failed, so that outputs
    of an earlier run never stand beside the error of the latest one.

    Returns
    -------
    bool
        True when there was something to remove.
    """
    target = Path(output_dir) / unit
    if not target.exists():
        return False
    staging = Path(output_dir) / staging_name()
    staging.mkdir()
    try:
        os.replace(target, staging / "old")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True
