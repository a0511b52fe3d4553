"""Writing one session's derivatives all or nothing: staging, the session swap and its recovery.

:func:`commit_records` writes all the records of one session (see :mod:`bids_app.bids.derivatives`
for what a record is and how it is named) into a staging folder inside the output directory,
then swaps the whole session folder (``sub-X/[ses-Y/]anat``) in with two renames (old folder
aside, new folder into place); a journal in the staging folder lets the next run finish or roll
back a swap that was interrupted (:func:`remove_stale_staging`), so an interrupted or failing run
never leaves half a file, half a session or a mix of two runs behind (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bids_app.bids.derivatives import (
    bids_uri,
    derivative_relpath,
    dumps_json,
    io_error,
    lookup_column_definitions,
    output_spec,
    parse_bids_name,
    sidecar_for,
    tsv_columns,
    undefined_tsv_columns,
)

#: data type of an image by its BIDS suffix (as niworkflows' DerivativesDataSink)
SUFFIX_DTYPES = {"mask": np.uint8, "dseg": np.int16, "probseg": np.float32}
#: name prefix of the staging folders inside the output directory
STAGING_PREFIX = ".msxplain-staging-"


def _already_conformant(img, src: Path, dst: Path, dtype) -> bool:
    """Whether the file at ``src`` is byte for byte what :func:`_coerce_nifti` would write (up to
    gzip's own header): same compression, the wanted dtype without scaling, qform = sform with
    code 1, mm/s units, no extensions. Files written by ``core.imageio.save_image`` are; copying
    them saves a decompress and a recompress per image (issue 17: 2.7 s of 2.8 s of a session's
    commit)."""
    header = img.header
    same_compression = src.name.endswith(".nii.gz") == dst.name.endswith(".nii.gz")
    # nibabel moves the scaling of a loaded file into its array proxy (the header then says none)
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    return (same_compression and src.name.endswith((".nii", ".nii.gz"))
            and (dtype is None or header.get_data_dtype() == np.dtype(dtype))
            and int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
            and np.array_equal(header.get_qform(), header.get_sform())
            and header.get_xyzt_units() == ("mm", "sec")
            and float(slope) == 1.0 and float(inter) == 0.0
            and len(header.extensions) == 0)


def _coerce_nifti(src: Path, dst: Path, suffix: str, dtype_name: str | None) -> None:
    import nibabel as nib

    img = nib.load(str(src))
    dtype = SUFFIX_DTYPES.get(suffix) or (np.dtype(dtype_name) if dtype_name else None)
    if _already_conformant(img, src, dst, dtype):
        shutil.copyfile(src, dst)
        return
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
        raise io_error(exc, output_dir) from None
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
        raise io_error(exc, output_dir) from None
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
