"""Model names and sources: the registry of named models (``bids_app/data/registry.json``) and
the parsing of ``doi:`` / ``zenodo:`` / URL specs (no network; docs/models.md).

``--model`` (and ``msxplain-tools models``) accepts, besides a model folder or zip:

* a **registry name** (:data:`REGISTRY_FILE`, ``bids_app/data/registry.json``): ``demo`` is
  bundled; an entry with a remote ``source`` is pulled on first use
  (:func:`bids_app.model.cache.pull`);
* ``doi:10.5281/zenodo.<id>`` (or ``https://doi.org/10.5281/zenodo.<id>``) and ``zenodo:<id>``,
  optionally followed by ``/<file key>`` when the record holds several zips;
* an ``https://`` URL of an ``nnUNetv2_export_model_to_zip`` archive (``http://`` only to a
  loopback host: local mirrors and tests, :func:`bids_app.model.download.check_url`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_app import DATA_DIR
from bids_app.errors import BadInputData

#: the registry of named models shipped with msxplain
REGISTRY_FILE = DATA_DIR / "registry.json"
REGISTRY_VERSION = 1

_ZENODO_DOI = re.compile(r"^(?:doi:|https?://(?:dx\.)?doi\.org/)10\.5281/zenodo\.(\d+)(?:/(.+))?$", re.I)
_ZENODO_ID = re.compile(r"^zenodo:(\d+)(?:/(.+))?$", re.I)
_ZENODO_RECORD_URL = re.compile(r"^https://zenodo\.org/records?/(\d+)/?$", re.I)
_REGISTRY_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
        if sha is not None and not (isinstance(sha, str) and _HEX_SHA256.match(sha)):
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
