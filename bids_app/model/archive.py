"""Safe extraction of model archives (``nnUNetv2_export_model_to_zip`` zips).

Model files are untrusted input (a model zip from the internet can carry code): archives are
extracted with path-traversal, link, size and compression-ratio checks, into a temporary
folder that is renamed into place.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from bids_app.errors import BadInputData
from bids_app.model.card import sha256_file

#: archive limits: refuse zip bombs and absurd archives
MAX_ARCHIVE_UNCOMPRESSED_BYTES = 8 * 1024**3
MAX_ARCHIVE_MEMBERS = 20000
MAX_COMPRESSION_RATIO = 200


def default_cache_dir() -> Path:
    base = os.environ.get("MSXPLAIN_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "msxplain" / "models"


def _check_archive_member(info: zipfile.ZipInfo, archive: Path) -> None:
    name = info.filename
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise BadInputData(f"Model archive contains a symbolic link '{name}'.", path=str(archive),
                           hint="links are refused for safety; re-create the archive without links.")
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts or "\\" in name:
        raise BadInputData(f"Model archive member '{name}' would be written outside the extraction folder.",
                           path=str(archive), hint="the archive is malformed or malicious; do not use it.")
    if info.file_size and info.compress_size and info.file_size / max(info.compress_size, 1) > MAX_COMPRESSION_RATIO:
        raise BadInputData(f"Model archive member '{name}' has a suspicious compression ratio.", path=str(archive),
                           hint="the archive looks like a zip bomb; do not use it.")


def extract_model_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract a model zip safely into ``cache_dir/<sha256 of the zip>`` and return that folder.

    The extraction goes to a temporary folder that is renamed into place, so an interrupted
    extraction never leaves a half model behind, and a second run reuses the first.
    """
    archive = archive.resolve()
    digest = sha256_file(archive)
    target = cache_dir / digest[:16]
    if target.is_dir():
        return target
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise BadInputData(f"Model archive is corrupt ({exc}).", path=str(archive), hint="re-download it.") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ARCHIVE_MEMBERS:
            raise BadInputData(f"Model archive has {len(infos)} members (limit {MAX_ARCHIVE_MEMBERS}).",
                               path=str(archive), hint="this is not an nnU-Net model export.")
        total = 0
        for info in infos:
            _check_archive_member(info, archive)
            total += info.file_size
        if total > MAX_ARCHIVE_UNCOMPRESSED_BYTES:
            raise BadInputData(f"Model archive would extract to {total / 1024**3:.1f} GiB "
                               f"(limit {MAX_ARCHIVE_UNCOMPRESSED_BYTES / 1024**3:.0f} GiB).",
                               path=str(archive), hint="this is not a plausible nnU-Net model export.")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from bids_app.errors import CannotCreateOutput

            raise CannotCreateOutput(f"Cannot create the model cache ({exc.strerror}).", path=str(cache_dir),
                                     hint="set MSXPLAIN_CACHE to a writable folder.") from None
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
        try:
            root_resolved = tmp.resolve()
            for info in infos:
                dest = (tmp / info.filename).resolve()
                if root_resolved not in dest.parents and dest != root_resolved:
                    raise BadInputData(f"Model archive member '{info.filename}' escapes the extraction folder.",
                                       path=str(archive), hint="do not use this archive.")
                if info.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                written = 0
                with zf.open(info) as src, open(dest, "wb") as out:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        written += len(block)
                        if written > info.file_size:
                            raise BadInputData(f"Model archive member '{info.filename}' is larger than declared.",
                                               path=str(archive), hint="the archive is malformed; do not use it.")
                        out.write(block)
            try:
                tmp.rename(target)
            except OSError:
                if not target.is_dir():  # a concurrent run may have won the race
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_trainer_dirs(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that look like nnU-Net trained models."""
    found = []
    for plans in sorted(root.rglob("plans.json")):
        d = plans.parent
        if (d / "dataset.json").is_file() and any(p.is_dir() for p in d.glob("fold_*")):
            found.append(d)
    return found
