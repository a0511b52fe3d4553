"""The model cache: registry names, Zenodo records (``doi:`` / ``zenodo:``) and URLs, pulled safely.

``--model`` (and ``msxplain-tools models``) accepts, besides a model folder or zip:

* a **registry name** (:data:`bids_app.model.registry.REGISTRY_FILE`, ``bids_app/data/registry.json``): ``demo`` is
  bundled; an entry with a remote ``source`` is pulled on first use;
* ``doi:10.5281/zenodo.<id>`` (or ``https://doi.org/10.5281/zenodo.<id>``) and ``zenodo:<id>``,
  optionally followed by ``/<file key>`` when the record holds several zips: the record is read
  through Zenodo's REST API (``GET <base>/api/records/<id>``, base ``https://zenodo.org`` or
  ``$MSXPLAIN_ZENODO_URL``), which gives each file's key, size, ``md5:`` checksum and link;
* an ``https://`` URL of an ``nnUNetv2_export_model_to_zip`` archive (``http://`` only to a
  loopback host: local mirrors and tests).

A pull downloads into ``<cache>/.downloads/<key>.zip.part`` (streamed, with a progress line;
an interrupted download continues with an HTTP ``Range`` request), checks the size and the
checksum (the registry's SHA-256 where it pins one, else Zenodo's md5) **before** unpacking,
unpacks with :func:`bids_app.model.archive.extract_model_archive` (path-traversal, link and size
checks) into a temporary folder, checks that it holds an nnU-Net trained model, writes
:data:`SOURCE_NAME` (the source, DOI, URL, size, md5 and the SHA-256 of what was fetched) and
renames the folder into place: ``<cache>/<key>/``. The cache is ``$MSXPLAIN_HOME/models``
(default: the platform's user cache folder, e.g. ``~/.cache/msxplain/models``); concurrent
pulls of one model serialize on a lock file (``fcntl.flock``), so the second finds the
first's entry. Nothing from a download is ever unpickled (``postprocessing.pkl`` and the like
are never read; checkpoints load weights-only, :func:`bids_app.model.checkpoints.load_checkpoint`).

Offline (``--offline`` or ``MSXPLAIN_OFFLINE=1``, :func:`bids_app.model.download.models_offline`): cached entries are
used, anything else is refused without a network call.

Exit codes: 404 or a file missing from the record, not in the cache when offline -> 66
(:class:`MissingInput`); timeout, refused or dropped connection, other HTTP errors -> 75
(:class:`TemporaryFailure`: a retry may succeed, and a dropped download resumes); wrong
checksum, wrong size (truncated file), not a zip or not an nnU-Net export -> 65
(:class:`BadInputData`, and nothing stays in the cache); an ambiguous record, a plain
``http://`` URL to another host -> 64 (:class:`UsageError`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bids_app.errors import BadInputData, CannotCreateOutput, MissingInput
from bids_app.model.download import (
    OFFLINE_ENV,
    check_url,
    choose_file,
    download,
    file_digests,
    models_offline,
    zenodo_record,
)
from bids_app.model.registry import RemoteSource, remote_source

LOGGER = logging.getLogger("bids_app.model.cache")

#: the record of where a pulled model came from, in each cache entry
SOURCE_NAME = "msxplain_source.json"
#: the folder of a cache entry that holds the unpacked export
ENTRY_MODEL_DIR = "model"
HOME_ENV = "MSXPLAIN_HOME"


def msxplain_home() -> Path:
    """``$MSXPLAIN_HOME``, else the platform's user cache folder for msxplain."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser().absolute()
    try:
        import platformdirs

        return Path(platformdirs.user_cache_dir("msxplain", appauthor=False))
    except ImportError:  # pragma: no cover - platformdirs comes with pybids' dependencies
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / "msxplain"


def models_cache() -> Path:
    """Where pulled models live: ``<msxplain_home()>/models``."""
    return msxplain_home() / "models"


# --------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock on ``lock_path`` (``fcntl.flock``; held until the block ends, released
    by the OS if the process dies). Without fcntl (Windows) nothing is locked."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise CannotCreateOutput(f"Cannot create the model cache ({exc.strerror}).", path=str(lock_path.parent),
                                 hint=f"set {HOME_ENV} to a writable folder.") from None
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                LOGGER.warning("Waiting for another msxplain process that is pulling the same model (%s)", lock_path)
                fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


def cached_entry(source: RemoteSource) -> Path | None:
    """The cache entry of ``source`` when it is complete (a folder is complete once renamed
    into place: it holds :data:`SOURCE_NAME` and the unpacked model)."""
    entry = models_cache() / source.cache_key
    if (entry / SOURCE_NAME).is_file() and (entry / ENTRY_MODEL_DIR).is_dir():
        return entry
    return None


def read_source_record(entry: Path) -> dict[str, Any]:
    try:
        data = json.loads((entry / SOURCE_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def pull(source: RemoteSource) -> Path:
    """The unpacked model folder of ``source``, from the cache or fetched now (see the module
    docstring for the checks). Returns ``<cache>/<key>/model``."""
    entry = cached_entry(source)
    if entry is not None:
        return _checked_entry(source, entry) / ENTRY_MODEL_DIR
    if models_offline():
        raise MissingInput(f"Model '{source.spec}' is not in the model cache and msxplain is offline "
                           f"({OFFLINE_ENV}=1 or --offline).", path=str(models_cache()),
                           hint=f"run 'msxplain-tools models pull {source.spec}' where there is a network (and "
                                f"copy {models_cache()} here, or set {HOME_ENV}), or pass a model folder or zip.")
    cache = models_cache()
    with _locked(cache / ".locks" / f"{source.cache_key}.lock"):
        entry = cached_entry(source)  # a concurrent pull may have finished it while we waited
        if entry is not None:
            return _checked_entry(source, entry) / ENTRY_MODEL_DIR
        return _pull_locked(source, cache) / ENTRY_MODEL_DIR


def _checked_entry(source: RemoteSource, entry: Path) -> Path:
    """A cached entry, refused when the registry pins another SHA-256 than the one fetched
    (the entry may have been pulled under another name, checked against Zenodo's md5 only)."""
    if source.sha256:
        fetched = read_source_record(entry).get("sha256")
        if fetched != source.sha256:
            raise BadInputData(f"The cached copy of {source.registry_name or source.spec} has SHA-256 {fetched}, "
                               f"the registry pins {source.sha256}.", path=str(entry),
                               hint="the record's file is not the one the registry names; report it.")
    return entry


def _pull_locked(source: RemoteSource, cache: Path) -> Path:
    from bids_app import __version__
    from bids_app.model.archive import extract_model_archive, find_trainer_dirs

    record_info: dict[str, Any] = {}
    if source.kind == "zenodo":
        record, files = zenodo_record(source.record)
        chosen = choose_file(files, source.file, source.record)
        url, key, size, md5 = check_url(chosen.url), chosen.key, chosen.size, chosen.md5
        metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
        record_info = {"zenodo_record": source.record, "doi": source.doi, "title": metadata.get("title"),
                       "version": metadata.get("version"),
                       "license": (metadata.get("license") or {}).get("id")
                       if isinstance(metadata.get("license"), dict) else metadata.get("license")}
    else:
        url, key, size, md5 = check_url(source.url), Path(urllib.parse.urlsplit(source.url).path).name, None, None
    size = source.size or size
    downloads = cache / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    part = downloads / f"{source.cache_key}.zip.part"
    label = source.registry_name or source.spec
    try:
        download(url, part, label=label, expected_size=size)
    except BadInputData:
        _remove(part)
        raise

    # size and checksum before anything is unpacked; a refusal leaves nothing behind
    got_size = part.stat().st_size
    sha256, got_md5 = file_digests(part)
    problem = None
    if size is not None and got_size != size:
        problem = (f"The download of {label} has {got_size} bytes, the record says {size} (truncated or "
                   "changed file).")
    elif source.sha256 and sha256 != source.sha256:
        problem = f"SHA-256 mismatch for {label}: got {sha256}, the registry pins {source.sha256}."
    elif not source.sha256 and md5 and got_md5 != md5:
        problem = f"MD5 mismatch for {label}: got {got_md5}, the record says {md5}."
    if problem:
        _remove(part)
        raise BadInputData(problem, path=url, hint="the download is corrupt or the file was replaced; it was "
                           "deleted. Run again, and report it if it repeats.")
    if not source.sha256 and not md5:
        LOGGER.warning("%s: no checksum to check the download against (only its size); its SHA-256 is %s",
                       label, sha256)
    tmp = Path(tempfile.mkdtemp(prefix=f".pull-{source.cache_key}-", dir=cache))
    try:
        try:
            extracted = extract_model_archive(part, tmp)
        except BadInputData as exc:
            raise BadInputData(f"The download of {label} is not a usable model archive: {exc.message}",
                               path=url, hint="msxplain needs an nnUNetv2_export_model_to_zip archive.") from None
        extracted.rename(tmp / ENTRY_MODEL_DIR)
        if not find_trainer_dirs(tmp / ENTRY_MODEL_DIR):
            raise BadInputData(f"The download of {label} is not an nnU-Net export (no plans.json + dataset.json "
                               "+ fold_*/ inside).", path=url,
                               hint="msxplain needs an nnUNetv2_export_model_to_zip archive.")
        if source.card is not None:
            from bids_app.model.card import CARD_NAME

            card, trainer_dir = registry_card_for(source.card, tmp / ENTRY_MODEL_DIR, label=label, url=url,
                                                  checked_against="registry sha256" if source.sha256 else
                                                  ("record md5" if md5 else "size only"))
            # in the trainer folder, where it wins over a card the archive may carry
            (trainer_dir / CARD_NAME).write_text(json.dumps(card, indent=1) + "\n")
        info = {
            "spec": source.spec,
            "registry_name": source.registry_name,
            "kind": source.kind,
            "source": f"doi:{source.doi}" if source.doi else source.url,
            **record_info,
            "file": key,
            "url": url,
            "size": got_size,
            "md5": got_md5,
            "sha256": sha256,
            "checked_against": "registry sha256" if source.sha256 else ("record md5" if md5 else "size only"),
            "fetched": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "msxplain_version": __version__,
        }
        (tmp / SOURCE_NAME).write_text(json.dumps(info, indent=1) + "\n")
        target = cache / source.cache_key
        tmp.rename(target)  # atomic: the entry appears complete or not at all
    except BaseException:
        _remove(tmp)
        _remove(part)
        raise
    _remove(part)
    LOGGER.info("Model %s fetched into %s (SHA-256 %s)", label, target, sha256)
    return target


def registry_card_for(card_file: Path, root: Path, *, label: str, url: str,
                      checked_against: str) -> tuple[dict[str, Any], Path]:
    """The registry's card for the export unpacked under ``root``, completed and checked against it,
    and the trainer folder it describes.

    A registry card may leave what only the release can tell to the pull: ``"members":
    "from-archive"`` becomes the ``fold_*`` checkpoints of the archive with their SHA-256, and a
    card without ``files`` gets the SHA-256 of ``plans.json`` and ``dataset.json``; the card then
    records ``"pinned_at_pull"`` (what was filled in, and what the archive was checked against).
    Checksums the card already pins (e.g. FLAMeS's published checkpoint digests) must match the
    archive, or the pull is refused before anything is cached.

    Parameters
    ----------
    card_file : Path
        The registry's card (``bids_app/data/cards/<name>.json``).
    root : Path
        The unpacked export.
    label, url : str
        For messages.
    checked_against : str
        What the archive's checksum was checked against (``registry sha256``, ``record md5``...).

    Returns
    -------
    card : dict
    trainer_dir : Path
        The export's ``<trainer>__<plans>__<configuration>`` folder the card names.

    Raises
    ------
    BadInputData
        The export has no trainer folder the card's ``nnunet`` section names, no checkpoint, or a
        file whose SHA-256 differs from the card's.
    """
    from bids_app.model.archive import find_trainer_dirs
    from bids_app.model.card import MEMBERS_FROM_ARCHIVE, ModelCard, member_checksums, pin_model_files, read_json_file

    card = read_json_file(card_file, "Registry model card", missing_hint="reinstall msxplain.")
    nnunet = card.get("nnunet") if isinstance(card.get("nnunet"), dict) else {}
    configuration = nnunet.get("configuration", "3d_fullres")
    # nnU-Net names a trained model <trainer>__<plans>__<configuration>; the card names what it knows
    folder = "__".join([str(nnunet[k]) for k in ("trainer", "plans") if nnunet.get(k)] + [configuration])
    candidates = [d for d in find_trainer_dirs(root) if d.name == folder or d.name.endswith(f"__{folder}")]
    if len(candidates) != 1:
        raise BadInputData(f"The download of {label} holds {len(candidates)} nnU-Net model folders named like "
                           f"*{folder}, its registry card needs exactly one.", path=url,
                           hint="the record's archive is not the release the registry names; report it.")
    trainer_dir = candidates[0]
    checkpoint = nnunet.get("checkpoint", "checkpoint_final.pth")
    archive_members = {m["fold"]: m["sha256"] for m in member_checksums(trainer_dir, checkpoint)}
    archive_files = pin_model_files(trainer_dir)
    filled = []
    if card.get("members") == MEMBERS_FROM_ARCHIVE:
        card["members"] = [{"fold": k, "sha256": v} for k, v in archive_members.items()]
        filled.append("members")
    else:
        for member in card.get("members") or []:
            pinned = str(member.get("sha256", "")).lower() if isinstance(member, dict) else ""
            got = archive_members.get(str(member.get("fold"))) if isinstance(member, dict) else None
            if pinned and got != pinned:
                raise BadInputData(f"The download of {label}: fold_{member.get('fold')}/{checkpoint} has SHA-256 "
                                   f"{got or 'none (missing)'}, the registry card pins {pinned}.", path=url,
                                   hint="the record's archive is not the release the registry names; report it.")
    if not card.get("files"):
        card["files"] = archive_files
        filled.append("files")
    elif {k: str(v).lower() for k, v in card["files"].items()} != archive_files:
        raise BadInputData(f"The download of {label}: plans.json or dataset.json differ from the registry card's "
                           "SHA-256.", path=url, hint="the record's archive is not the release the registry names; "
                           "report it.")
    if filled:
        card["pinned_at_pull"] = {"fields": filled, "archive_checked_against": checked_against}
    ModelCard.from_dict(card, source=f"{card_file} (completed from {label})")  # every field checked before caching
    return card, trainer_dir


def install_entry(entry: Path, models_dir: Path, name: str) -> Path:
    """Copy the cache entry ``entry`` (``<cache>/<key>``) to ``models_dir/name``, where ``--model name``
    finds it through ``$MSXPLAIN_MODELS`` without the cache, the network or a write (a container
    image's models, baked in at build time). The source record travels with the model, so its
    sidecars still name the DOI or URL and the archive's SHA-256.

    Returns
    -------
    Path
        ``models_dir/name``, which appears complete or not at all (copied beside, then renamed).

    Raises
    ------
    CannotCreateOutput
        ``models_dir/name`` exists already, or ``models_dir`` is not writable.
    """
    target = Path(models_dir) / name
    if target.exists():
        raise CannotCreateOutput(f"Cannot install {name}: {target} exists.", path=str(target),
                                 hint="remove it, or install under another name.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".install-{name}-", dir=target.parent))
        shutil.copytree(entry, tmp / "entry")
        (tmp / "entry").rename(target)
        tmp.rmdir()
    except OSError as exc:
        raise CannotCreateOutput(f"Cannot install {name} into {models_dir} ({exc.strerror or exc}).",
                                 path=str(models_dir), hint="choose a writable folder.") from None
    return target


def pull_spec(spec: str) -> Path | None:
    """The unpacked model folder for a registry name with a remote source or a
    ``doi:``/``zenodo:``/URL spec (pulled when not cached); None for anything else."""
    source = remote_source(spec)
    return pull(source) if source is not None else None


def source_of(trainer_dir: Path) -> dict[str, Any] | None:
    """The :data:`SOURCE_NAME` record of the cache entry that holds ``trainer_dir``, or None."""
    trainer_dir = Path(trainer_dir)
    for parent in list(trainer_dir.parents)[:4]:
        if parent.name == ENTRY_MODEL_DIR and (parent.parent / SOURCE_NAME).is_file():
            return read_source_record(parent.parent) or None
    return None


def cache_entries() -> list[tuple[Path, dict[str, Any]]]:
    cache = models_cache()
    if not cache.is_dir():
        return []
    return [(p, read_source_record(p)) for p in sorted(cache.iterdir())
            if not p.name.startswith(".") and (p / SOURCE_NAME).is_file()]
