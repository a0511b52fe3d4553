"""Model sources: registry names, Zenodo records (``doi:`` / ``zenodo:``) and URLs, pulled safely.

``--model`` (and ``msxplain-tools models``) accepts, besides a model folder or zip:

* a **registry name** (:data:`REGISTRY_FILE`, ``bids_app/data/registry.json``): ``demo`` is
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
unpacks with :func:`bids_app.model.models.extract_model_archive` (path-traversal, link and size
checks) into a temporary folder, checks that it holds an nnU-Net trained model, writes
:data:`SOURCE_NAME` (the source, DOI, URL, size, md5 and the SHA-256 of what was fetched) and
renames the folder into place: ``<cache>/<key>/``. The cache is ``$MSXPLAIN_HOME/models``
(default: the platform's user cache folder, e.g. ``~/.cache/msxplain/models``); concurrent
pulls of one model serialize on a lock file (``fcntl.flock``), so the second finds the
first's entry. Nothing from a download is ever unpickled (``postprocessing.pkl`` and the like
are never read; checkpoints load weights-only, :func:`bids_app.model.models.load_checkpoint`).

Offline (``--offline`` or ``MSXPLAIN_OFFLINE=1``, :func:`models_offline`): cached entries are
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
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_app import DATA_DIR
from bids_app.errors import BadInputData, CannotCreateOutput, MissingInput, TemporaryFailure, UsageError

LOGGER = logging.getLogger("bids_app.model.sources")

#: the registry of named models shipped with msxplain
REGISTRY_FILE = DATA_DIR / "registry.json"
REGISTRY_VERSION = 1
#: the record of where a pulled model came from, in each cache entry
SOURCE_NAME = "msxplain_source.json"
#: the folder of a cache entry that holds the unpacked export
ENTRY_MODEL_DIR = "model"
HOME_ENV = "MSXPLAIN_HOME"
OFFLINE_ENV = "MSXPLAIN_OFFLINE"
ZENODO_URL_ENV = "MSXPLAIN_ZENODO_URL"
ZENODO_URL = "https://zenodo.org"
#: seconds without an answer (connect or read) before a request fails
TIMEOUT_ENV = "MSXPLAIN_NET_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
#: a Zenodo record JSON is a few kB; refuse absurd ones
MAX_RECORD_BYTES = 16 * 1024**2
CHUNK = 1 << 20

_ZENODO_DOI = re.compile(r"^(?:doi:|https?://(?:dx\.)?doi\.org/)10\.5281/zenodo\.(\d+)(?:/(.+))?$", re.I)
_ZENODO_ID = re.compile(r"^zenodo:(\d+)(?:/(.+))?$", re.I)
_ZENODO_RECORD_URL = re.compile(r"^https://zenodo\.org/records?/(\d+)/?$", re.I)
_NNUNET_EXPORT_NAME = re.compile(r"^Dataset\d{3}_", re.I)
_REGISTRY_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HEX = {"md5": re.compile(r"^[0-9a-f]{32}$"), "sha256": re.compile(r"^[0-9a-f]{64}$")}


def models_offline() -> bool:
    """True when models must not be fetched: ``--offline`` or ``MSXPLAIN_OFFLINE=1``.

    Unlike :func:`bids_app.bids.templates.offline_mode`, ``TEMPLATEFLOW_HOME`` does not count: a
    TemplateFlow cache says nothing about model downloads.
    """
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


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


def net_timeout() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds.", hint=f"e.g. {TIMEOUT_ENV}=60.") from None
    return value if value > 0 else DEFAULT_TIMEOUT


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistryEntry:
    """One named model of :data:`REGISTRY_FILE`.

    Attributes
    ----------
    name : str
    title : str
    source : str
        ``bundled:<folder>`` (a model under ``bids_app/data/models``), or a remote source
        (``doi:...``, ``zenodo:<id>``, ``https://...``).
    file : str or None
        The file key in the Zenodo record (when it holds several files).
    sha256 : str or None
        The SHA-256 of the archive, pinned when known (checked instead of Zenodo's md5).
    size : int or None
    card : str or None
        A model card shipped with msxplain, relative to ``bids_app/data``, copied beside the
        unpacked model (the export itself has none).
    extra : dict
        Everything else (licence, citation, notes), shown by ``msxplain-tools models info``.
    """

    name: str
    title: str
    source: str
    file: str | None = None
    sha256: str | None = None
    size: int | None = None
    card: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bundled(self) -> bool:
        return self.source.startswith("bundled:")

    def card_file(self) -> Path | None:
        return (REGISTRY_FILE.parent / self.card) if self.card else None

    def remote_spec(self) -> str:
        return f"{self.source}/{self.file}" if self.file and not self.source.startswith(("http://", "https://")) \
            else self.source


def _registry_error(problem: str) -> BadInputData:
    return BadInputData(f"The model registry is invalid: {problem}.", path=str(REGISTRY_FILE),
                        hint="restore bids_app/data/registry.json from the msxplain release.")


def load_registry(path: Path | None = None) -> dict[str, RegistryEntry]:
    """The named models of the registry, validated."""
    path = path or REGISTRY_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _registry_error(f"cannot be read ({exc})") from None
    if not isinstance(data, dict) or data.get("registry_version") != REGISTRY_VERSION \
            or not isinstance(data.get("models"), dict):
        raise _registry_error(f"needs registry_version {REGISTRY_VERSION} and a 'models' object")
    entries = {}
    for name, raw in data["models"].items():
        if not _REGISTRY_NAME.match(name) or not isinstance(raw, dict):
            raise _registry_error(f"entry '{name}' (names are lower-case words; entries objects)")
        source = raw.get("source")
        if not isinstance(source, str) or not (source.startswith("bundled:") or parse_remote(source)):
            raise _registry_error(f"entry '{name}' has no valid 'source'")
        sha = raw.get("sha256")
        if sha is not None and not (isinstance(sha, str) and _HEX["sha256"].match(sha)):
            raise _registry_error(f"entry '{name}': 'sha256' must be 64 lower-case hex digits or null")
        card = raw.get("card")
        if card is not None and (not isinstance(card, str) or ".." in Path(card).parts or Path(card).is_absolute()):
            raise _registry_error(f"entry '{name}': 'card' must be a path inside bids_app/data")
        size = raw.get("size")
        if size is not None and not (isinstance(size, int) and size > 0):
            raise _registry_error(f"entry '{name}': 'size' must be a positive integer or null")
        known = {"title", "source", "file", "sha256", "size", "card"}
        entries[name] = RegistryEntry(name=name, title=str(raw.get("title", name)), source=source,
                                      file=raw.get("file"), sha256=sha, size=size, card=card,
                                      extra={k: v for k, v in raw.items() if k not in known})
    return entries


def registry_entry(name: str) -> RegistryEntry | None:
    return load_registry().get(name) if _REGISTRY_NAME.match(name or "") else None


# --------------------------------------------------------------------------------------
# Parsing a source
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteSource:
    """A remote model: a Zenodo record (and file key) or a direct URL."""

    spec: str
    kind: str  # "zenodo" or "url"
    record: str | None = None
    file: str | None = None
    url: str | None = None
    sha256: str | None = None  # pinned by the registry
    size: int | None = None
    registry_name: str | None = None
    card: Path | None = None

    @property
    def doi(self) -> str | None:
        return f"10.5281/zenodo.{self.record}" if self.kind == "zenodo" else None

    @property
    def cache_key(self) -> str:
        """The cache entry's folder name (known without the network)."""
        if self.kind == "zenodo":
            key = f"zenodo-{self.record}"
            if self.file:
                key += "-" + re.sub(r"[^A-Za-z0-9._-]+", "_", self.file)[:80]
            return key
        return "url-" + hashlib.sha256(self.url.encode()).hexdigest()[:16]


def parse_remote(spec: str) -> RemoteSource | None:
    """A :class:`RemoteSource` for ``doi:``/``zenodo:``/URL specs, else None (no network)."""
    spec = (spec or "").strip()
    for pattern in (_ZENODO_DOI, _ZENODO_ID):
        m = pattern.match(spec)
        if m:
            return RemoteSource(spec=spec, kind="zenodo", record=m.group(1), file=m.group(2) or None)
    m = _ZENODO_RECORD_URL.match(spec)
    if m:
        return RemoteSource(spec=spec, kind="zenodo", record=m.group(1))
    if spec.lower().startswith(("https://", "http://")):
        return RemoteSource(spec=spec, kind="url", url=spec)
    return None


def remote_source(spec: str) -> RemoteSource | None:
    """The remote source ``spec`` names: a registry entry with a remote source, or a
    ``doi:``/``zenodo:``/URL spec; None for bundled names, folders and files."""
    entry = registry_entry(spec)
    if entry is not None:
        if entry.bundled:
            return None
        base = parse_remote(entry.remote_spec())
        return RemoteSource(spec=spec, kind=base.kind, record=base.record, file=base.file, url=base.url,
                            sha256=entry.sha256, size=entry.size, registry_name=entry.name, card=entry.card_file())
    return parse_remote(spec)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str:
    """``https://`` anywhere, ``http://`` only to a loopback host (local mirrors, tests)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return url
    raise UsageError(f"Refusing to fetch a model from '{url}': only https:// URLs are used "
                     "(plain http:// only from this machine, 127.0.0.1 or localhost).",
                     hint="use the https:// address of the archive.")


# --------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------
class _SafeRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl)  # no downgrade to plain http on a redirect
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SafeRedirect)


def _network_error(url: str, exc: BaseException, what: str) -> TemporaryFailure:
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason):
        text = f"no answer within {net_timeout():g} s"
    else:
        text = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
    return TemporaryFailure(f"Cannot {what} from {url} ({text}).",
                            hint=f"check the network (or a proxy) and run again; a partial download resumes. "
                                 f"{TIMEOUT_ENV} sets the timeout, --offline uses only cached models.")


def _open(url: str, what: str, headers: dict[str, str] | None = None):
    """GET ``url``; HTTP errors other than 416 become msxplain errors (404 -> 66, else 75)."""
    if models_offline():
        raise MissingInput(f"Cannot {what}: msxplain is offline ({OFFLINE_ENV}=1 or --offline).",
                           hint="run once without --offline to fetch the model into the cache, or pass a "
                                "model folder or zip.")
    check_url(url)
    from bids_app import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"msxplain/{__version__}", **(headers or {})})
    try:
        return _OPENER.open(request, timeout=net_timeout())
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return exc
        if exc.code in (404, 410):
            raise MissingInput(f"Cannot {what}: {url} answered {exc.code} {exc.reason} (not found).",
                               hint="check the DOI, record id, file name or URL.") from None
        raise TemporaryFailure(f"Cannot {what}: {url} answered {exc.code} {exc.reason}.",
                               hint="run again later; a partial download resumes.") from None
    except UsageError:
        raise
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _network_error(url, exc, what) from None


def zenodo_base() -> str:
    return (os.environ.get(ZENODO_URL_ENV) or ZENODO_URL).rstrip("/")


@dataclass(frozen=True)
class RemoteFile:
    key: str
    url: str
    size: int | None
    md5: str | None


def _record_files(record: dict, base: str, record_id: str) -> list[RemoteFile]:
    """The files of a Zenodo record JSON, in either form: the legacy one (``files`` a list of
    ``{key|filename, size|filesize, checksum, links: {self|download}}``) or InvenioRDM's
    (``files: {entries: {...}}`` or a list, download link ``links.content``)."""
    files = record.get("files")
    if isinstance(files, dict):
        files = files.get("entries", [])
    if isinstance(files, dict):
        files = list(files.values())
    if not isinstance(files, list):
        raise BadInputData(f"Zenodo record {record_id} lists no files.", hint="check the record id.")
    out = []
    for item in files:
        if not isinstance(item, dict):
            continue
        key = item.get("key") or item.get("filename")
        if not isinstance(key, str) or not key:
            continue
        size = item.get("size", item.get("filesize"))
        checksum = item.get("checksum")
        md5 = None
        if isinstance(checksum, str):
            algo, _, value = checksum.partition(":")
            if not value:  # legacy deposit form: a bare md5
                algo, value = "md5", algo
            if algo.lower() == "md5" and _HEX["md5"].match(value.lower()):
                md5 = value.lower()
        links = item.get("links") if isinstance(item.get("links"), dict) else {}
        url = links.get("content") or links.get("download") or links.get("self")
        if not isinstance(url, str) or not url:
            url = f"{base}/api/records/{record_id}/files/{urllib.parse.quote(key)}/content"
        out.append(RemoteFile(key=key, url=url, size=int(size) if isinstance(size, int) and size >= 0 else None,
                              md5=md5))
    return out


def zenodo_record(record_id: str) -> tuple[dict, list[RemoteFile]]:
    """The record JSON and its files (``GET <base>/api/records/<id>``)."""
    base = zenodo_base()
    url = f"{base}/api/records/{record_id}"
    with contextlib.closing(_open(url, f"read Zenodo record {record_id}", {"Accept": "application/json"})) as resp:
        try:
            data = resp.read(MAX_RECORD_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(url, exc, f"read Zenodo record {record_id}") from None
    try:
        record = json.loads(data) if len(data) <= MAX_RECORD_BYTES else None
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise BadInputData(f"Zenodo record {record_id} is not a JSON record.", path=url,
                           hint=f"check the record id and {ZENODO_URL_ENV}.")
    return record, _record_files(record, base, record_id)


def choose_file(files: list[RemoteFile], wanted: str | None, record_id: str) -> RemoteFile:
    """The record's nnU-Net export: the file asked for, the only zip, or the only zip named
    like an nnU-Net dataset (``DatasetNNN_*.zip``); else a usage error listing the zips."""
    if wanted:
        for f in files:
            if f.key == wanted:
                return f
        raise MissingInput(f"Zenodo record {record_id} has no file '{wanted}' (files: "
                           f"{', '.join(f.key for f in files) or 'none'}).", hint="check the file name.")
    zips = [f for f in files if f.key.lower().endswith(".zip")]
    if len(zips) == 1:
        return zips[0]
    if not zips:
        raise BadInputData(f"Zenodo record {record_id} holds no zip archive (files: "
                           f"{', '.join(f.key for f in files) or 'none'}).",
                           hint="msxplain needs an nnUNetv2_export_model_to_zip archive.")
    named = [f for f in zips if _NNUNET_EXPORT_NAME.match(f.key)]
    if len(named) == 1:
        return named[0]
    raise UsageError(f"Zenodo record {record_id} holds several zips ({', '.join(f.key for f in zips)}).",
                     hint=f"name one: zenodo:{record_id}/<file>, e.g. zenodo:{record_id}/{zips[0].key}.")


# --------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------
@dataclass
class Download:
    path: Path
    size: int
    sha256: str
    md5: str


def _digests(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def download(url: str, part: Path, *, label: str, expected_size: int | None = None) -> None:
    """Stream ``url`` into ``part``, continuing a partial ``part`` with an HTTP Range request.

    Raises :class:`TemporaryFailure` when the connection drops or times out (``part`` is kept,
    so the next call resumes), :class:`BadInputData` when the server sends more than
    ``expected_size``.
    """
    from bids_app.app.progress import ProgressLine

    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()
        have = 0
    if expected_size is not None and have == expected_size and have > 0:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    resp = _open(url, "download the model", headers)
    with contextlib.closing(resp):
        status = getattr(resp, "status", None) or resp.getcode()
        if status == 416:  # nothing left to send: the part is complete (checked by the caller)
            return
        if status == 206 and have:
            mode = "ab"
            LOGGER.info("Resuming the download of %s at %.1f MB", label, have / 1e6)
        else:
            mode, have = "wb", 0
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        total = expected_size or (have + length if length is not None else None)
        line = ProgressLine(label, "download")
        received = 0
        try:
            with open(part, mode) as out:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except http.client.IncompleteRead as exc:
                        out.write(exc.partial)
                        received += len(exc.partial)
                        block = b""
                    except (OSError, http.client.HTTPException) as exc:
                        raise _network_error(url, exc, "download the model") from None
                    if not block:
                        break
                    out.write(block)
                    received += len(block)
                    if expected_size is not None and have + received > expected_size:
                        raise BadInputData(f"The download of {label} is larger than the {expected_size} bytes "
                                           "the record declares.", path=url, hint="the file on the server changed; "
                                           "do not use it.")
                    if total:
                        done = have + received
                        line.update(done / total, f"{done / 1e6:.1f} of {total / 1e6:.1f} MB")
        finally:
            line.close()
        if length is not None and received < length:
            raise TemporaryFailure(f"The connection dropped after {(have + received) / 1e6:.1f} MB of "
                                   f"{label} ({url}).", hint="run again: the download resumes where it stopped.")


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
    from bids_app.model.models import extract_model_archive, find_trainer_dirs

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
    sha256, got_md5 = _digests(part)
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
            from bids_app.model.models import CARD_NAME

            shutil.copyfile(source.card, tmp / ENTRY_MODEL_DIR / CARD_NAME)
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
