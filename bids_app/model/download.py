"""Downloads of models: HTTPS only, the Zenodo REST API, resumable streamed downloads.

A Zenodo record is read through its REST API (``GET <base>/api/records/<id>``, base
``https://zenodo.org`` or ``$MSXPLAIN_ZENODO_URL``), which gives each file's key, size, ``md5:``
checksum and link. A download streams into a ``.part`` file with a progress line; an
interrupted download continues with an HTTP ``Range`` request. What is done with the file
(checksums, unpacking, the cache entry) is :mod:`bids_app.model.cache`.

Offline (``--offline`` or ``MSXPLAIN_OFFLINE=1``, :func:`models_offline`): no network call is made.

Exit codes: 404 or a file missing from the record -> 66 (:class:`MissingInput`); timeout,
refused or dropped connection, other HTTP errors -> 75 (:class:`TemporaryFailure`: a retry may
succeed, and a dropped download resumes); more bytes than declared, not a record -> 65
(:class:`BadInputData`); an ambiguous record, a plain ``http://`` URL to another host -> 64
(:class:`UsageError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import BadInputData, MissingInput, TemporaryFailure, UsageError

LOGGER = logging.getLogger("bids_app.model.download")

OFFLINE_ENV = "MSXPLAIN_OFFLINE"
ZENODO_URL_ENV = "MSXPLAIN_ZENODO_URL"
ZENODO_URL = "https://zenodo.org"
#: seconds without an answer (connect or read) before a request fails
TIMEOUT_ENV = "MSXPLAIN_NET_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
#: a Zenodo record JSON is a few kB; refuse absurd ones
MAX_RECORD_BYTES = 16 * 1024**2
CHUNK = 1 << 20

_NNUNET_EXPORT_NAME = re.compile(r"^Dataset\d{3}_", re.I)
_HEX_MD5 = re.compile(r"^[0-9a-f]{32}$")


def models_offline() -> bool:
    """True when models must not be fetched: ``--offline`` or ``MSXPLAIN_OFFLINE=1``.

    Unlike :func:`bids_app.bids.templates.offline_mode`, ``TEMPLATEFLOW_HOME`` does not count: a
    TemplateFlow cache says nothing about model downloads.
    """
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")



def net_timeout() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV} must be a number of seconds.", hint=f"e.g. {TIMEOUT_ENV}=60.") from None
    return value if value > 0 else DEFAULT_TIMEOUT



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
            if algo.lower() == "md5" and _HEX_MD5.match(value.lower()):
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
def file_digests(path: Path) -> tuple[str, str]:
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
    from bids_app.progress import ProgressLine

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
