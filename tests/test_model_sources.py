"""Model sources (issue 13, item 1): registry names, ``doi:``/``zenodo:`` records and URLs, pulled
from a local imitation of Zenodo's REST API on 127.0.0.1 (never any other address).

The server serves an ``nnUNetv2_export_model_to_zip``-like archive of the tiny test model
(``DatasetNNN_*/Trainer__Plans__config/{plans.json,dataset.json,fold_*/checkpoint_final.pth}``,
the msxplain card, and a ``postprocessing.pkl`` that would write a marker file if anything
unpickled it).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import pickle
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest

from bids_app.cli.tools import main as tools_main
from bids_app.errors import BadInputData, MissingInput, TemporaryFailure, UsageError
from bids_app.testing import make_bids, run_cli


class _Unpickled:
    """Unpickling this writes ``marker``: proof that something unpickled the download."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def export_zip(trainer_dir: Path, marker: Path) -> bytes:
    """The tiny model as nnUNetv2_export_model_to_zip lays it out (plus the msxplain card)."""
    buf = io.BytesIO()
    base = trainer_dir.parent.parent
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(trainer_dir.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(base).as_posix())
        rel = trainer_dir.relative_to(base).as_posix()
        zf.writestr(f"{rel}/fold_0/debug.json", "{}")
        zf.writestr(f"{rel}/postprocessing.pkl", pickle.dumps(_Unpickled(marker)))
    return buf.getvalue()


class ZenodoImitation(http.server.ThreadingHTTPServer):
    """``GET /api/records/<id>`` (legacy or InvenioRDM JSON) and ``GET /files/<name>`` (Range)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.records: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_next: set[str] = set()  # send half the file, then close the connection
        self.truncate: set[str] = set()  # send half the file as if it were all of it
        self.hang: set[str] = set()  # answer nothing for 5 s
        self.delay = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add_record(self, record_id: str, files: dict[str, bytes], *, form: str = "legacy",
                   md5: dict[str, str] | None = None) -> None:
        entries = []
        for key, data in files.items():
            self.blobs[key] = data
            item = {"key": key, "size": len(data),
                    "checksum": "md5:" + (md5 or {}).get(key, hashlib.md5(data).hexdigest())}
            if form == "legacy":
                item["links"] = {"self": f"{self.base}/files/{key}"}
            else:  # InvenioRDM: links.self is the metadata, links.content the bytes
                item["links"] = {"self": f"{self.base}/api/records/{record_id}/files/{key}",
                                 "content": f"{self.base}/files/{key}"}
            entries.append(item)
        if form == "legacy":
            body = {"id": int(record_id), "metadata": {"title": f"record {record_id}"}, "files": entries}
        else:
            body = {"id": record_id, "metadata": {"title": f"record {record_id}"},
                    "files": {"enabled": True, "entries": {e["key"]: e for e in entries}}}
        self.records[record_id] = body

    def file_requests(self, key: str) -> list[str | None]:
        return [rng for path, rng in self.requests if path == f"/files/{key}"]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        server: ZenodoImitation = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        m = re.fullmatch(r"/api/records/(\d+)", self.path)
        if m and m.group(1) in server.records:
            return self._send(200, json.dumps(server.records[m.group(1)]).encode(), "application/json")
        m = re.fullmatch(r"/files/(.+)", self.path)
        if not m or m.group(1) not in server.blobs:
            return self._send(404, b'{"status": 404, "message": "not found"}', "application/json")
        key, data = m.group(1), server.blobs[m.group(1)]
        if key in server.hang:
            time.sleep(5)
            return
        time.sleep(server.delay)
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                return self._send(416, b"", "text/plain")
        body = data[start:]
        if key in server.truncate:
            body = body[: len(body) // 2]
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if key in server.drop_next:
            server.drop_next.discard(key)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _send(self, code: int, body: bytes, ctype: str):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory):
    marker = tmp_path_factory.mktemp("marker") / "UNPICKLED"
    data = export_zip(tiny_model, marker)
    return data, marker


@pytest.fixture
def zenodo(export, monkeypatch, tmp_path):
    """The imitation server with record 1001 (legacy form) and 1002 (InvenioRDM form), and
    MSXPLAIN_HOME / MSXPLAIN_ZENODO_URL pointing at a fresh cache and the server."""
    data, _ = export
    server = ZenodoImitation()
    server.add_record("1001", {"Dataset990_MsxplainTiny.zip": data, "README.md": b"# readme\n"})
    server.add_record("1002", {"tiny_export.zip": data}, form="rdm")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MSXPLAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MSXPLAIN_ZENODO_URL", server.base)
    monkeypatch.setenv("MSXPLAIN_NET_TIMEOUT", "10")
    monkeypatch.delenv("MSXPLAIN_OFFLINE", raising=False)
    yield server
    server.shutdown()
    server.server_close()


def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "home" / "models"


def cache_left(tmp_path: Path) -> list[str]:
    """Everything in the cache but the lock files and the empty .downloads folder."""
    root = cache_dir(tmp_path)
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".locks" not in p.parts and p != root / ".downloads")


def test_pull_by_doi_then_by_zenodo_id_uses_one_cache_entry(zenodo, export, tmp_path):
    from bids_app.model.cache import source_of
    from bids_app.model.checkpoints import load_member_weights
    from bids_app.model.provenance import model_provenance
    from bids_app.model.resolve import resolve_model

    data, marker = export
    model = resolve_model("doi:10.5281/zenodo.1001")
    assert model.trainer_dir.is_relative_to(cache_dir(tmp_path) / "zenodo-1001")
    assert model.card.id == "msxplain-tiny-test" and not model.card.inferred
    record = source_of(model.trainer_dir)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["md5"] == hashlib.md5(data).hexdigest() and record["size"] == len(data)
    assert record["doi"] == "10.5281/zenodo.1001" and record["file"] == "Dataset990_MsxplainTiny.zip"
    assert record["checked_against"] == "record md5"
    block = model_provenance(model, ["0"])["Source"]
    assert block["DOI"] == "10.5281/zenodo.1001" and block["ArchiveSHA256"] == record["sha256"]
    assert len(zenodo.file_requests("Dataset990_MsxplainTiny.zip")) == 1

    again = resolve_model("zenodo:1001")  # same record: the cache, no request at all
    assert again.trainer_dir == model.trainer_dir
    assert len(zenodo.requests) == 2  # the record and the file, once
    load_member_weights(again, ["0"])  # weights-only; postprocessing.pkl is never read
    assert not marker.exists()
    assert not list((cache_dir(tmp_path) / ".downloads").iterdir())  # no partial left


def test_pull_command_reads_the_invenio_rdm_form_and_reuses_the_cache_offline(zenodo, tmp_path, capsys):
    assert tools_main(["models", "pull", "zenodo:1002"]) == 0
    assert "SHA-256 of the archive" in capsys.readouterr().out
    zenodo.shutdown()  # no server: the cache must do
    assert tools_main(["models", "verify", "zenodo:1002"]) == 0
    assert "verified" in capsys.readouterr().out
    assert tools_main(["models", "pull", "--offline", "doi:10.5281/zenodo.1002"]) == 0
    assert tools_main(["models", "info", "--offline", "zenodo:1002"]) == 0
    assert "sha256" in capsys.readouterr().out
    assert tools_main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "zenodo-1002" in out and "demo" in out
    # offline, a model not in the cache is refused without a request
    n = len(zenodo.requests)
    assert tools_main(["models", "pull", "--offline", "zenodo:1001"]) == 66
    assert "offline" in capsys.readouterr().err
    assert len(zenodo.requests) == n


def test_a_dropped_connection_resumes_with_a_range_request(zenodo, export, tmp_path, capsys):
    from bids_app.model.resolve import resolve_model

    data, _ = export
    key = "Dataset990_MsxplainTiny.zip"
    zenodo.drop_next.add(key)
    assert tools_main(["models", "pull", "zenodo:1001"]) == TemporaryFailure.exit_code
    err = capsys.readouterr().err
    assert "connection dropped" in err and "resumes" in err
    part = cache_dir(tmp_path) / ".downloads" / "zenodo-1001.zip.part"
    half = part.stat().st_size
    assert 0 < half < len(data)
    assert not (cache_dir(tmp_path) / "zenodo-1001").exists()

    model = resolve_model("zenodo:1001")
    assert zenodo.file_requests(key) == [None, f"bytes={half}-"]
    assert model.card.id == "msxplain-tiny-test" and not part.exists()
    from bids_app.model.cache import source_of

    assert source_of(model.trainer_dir)["sha256"] == hashlib.sha256(data).hexdigest()


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(zenodo, export, tmp_path, capsys):
    data, _ = export
    zenodo.add_record("1003", {"bad.zip": data}, md5={"bad.zip": "0" * 32})
    assert tools_main(["models", "pull", "zenodo:1003"]) == BadInputData.exit_code
    assert "MD5 mismatch" in capsys.readouterr().err
    assert cache_left(tmp_path) == []


def test_a_truncated_file_is_refused_and_nothing_is_cached(zenodo, export, tmp_path, capsys):
    data, _ = export
    zenodo.add_record("1004", {"short.zip": data})
    zenodo.truncate.add("short.zip")
    assert tools_main(["models", "pull", "zenodo:1004"]) == BadInputData.exit_code
    assert "truncated" in capsys.readouterr().err
    assert cache_left(tmp_path) == []


def test_an_archive_that_is_no_nnunet_export_is_refused(zenodo, tmp_path, capsys):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes/readme.txt", "no model here")
    zenodo.add_record("1005", {"Dataset001_Nothing.zip": buf.getvalue()})
    assert tools_main(["models", "pull", "zenodo:1005"]) == BadInputData.exit_code
    assert "not an nnU-Net export" in capsys.readouterr().err
    assert cache_left(tmp_path) == []
    zenodo.add_record("1006", {"model.zip": b"this is no zip at all"})
    assert tools_main(["models", "pull", "zenodo:1006"]) == BadInputData.exit_code
    assert "not a usable model archive" in capsys.readouterr().err
    assert cache_left(tmp_path) == []


def test_not_found_and_timeout_have_clear_messages(zenodo, export, tmp_path, monkeypatch, capsys):
    data, _ = export
    assert tools_main(["models", "pull", "zenodo:9999"]) == MissingInput.exit_code
    err = capsys.readouterr().err
    assert "404" in err and "not found" in err and "record" in err
    assert tools_main(["models", "pull", "zenodo:1001/other.zip"]) == MissingInput.exit_code
    assert "has no file 'other.zip'" in capsys.readouterr().err
    zenodo.add_record("1007", {"slow.zip": data})
    zenodo.hang.add("slow.zip")
    monkeypatch.setenv("MSXPLAIN_NET_TIMEOUT", "1")
    assert tools_main(["models", "pull", "zenodo:1007"]) == TemporaryFailure.exit_code
    err = capsys.readouterr().err
    assert "no answer within 1 s" in err and "slow.zip" in err
    assert not (cache_dir(tmp_path) / "zenodo-1007").exists()


def test_a_record_with_several_zips_needs_a_file_name(zenodo, export, tmp_path, capsys):
    from bids_app.model.resolve import resolve_model

    data, _ = export
    zenodo.add_record("1008", {"a.zip": data, "b.zip": data})
    assert tools_main(["models", "pull", "zenodo:1008"]) == UsageError.exit_code
    err = capsys.readouterr().err
    assert "several zips (a.zip, b.zip)" in err and "zenodo:1008/a.zip" in err
    model = resolve_model("zenodo:1008/b.zip")
    assert model.trainer_dir.is_relative_to(cache_dir(tmp_path) / "zenodo-1008-b.zip")


def test_urls_https_only_except_loopback(zenodo, tmp_path, capsys):
    from bids_app.model.resolve import resolve_model

    assert tools_main(["models", "pull", "http://example.org/model.zip"]) == UsageError.exit_code
    assert "only https://" in capsys.readouterr().err
    model = resolve_model(f"{zenodo.base}/files/Dataset990_MsxplainTiny.zip")  # a direct URL
    from bids_app.model.cache import source_of

    record = source_of(model.trainer_dir)
    assert record["kind"] == "url" and record["checked_against"] == "size only"
    assert record["source"].endswith("/files/Dataset990_MsxplainTiny.zip")


def test_two_concurrent_pulls_end_with_one_intact_entry(zenodo, tmp_path):
    from bids_app.model.resolve import resolve_model, verify_members

    zenodo.delay = 0.5  # both pulls are under way before the file comes
    results, errors = [], []

    def pull():
        try:
            results.append(resolve_model("zenodo:1001"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2
    assert results[0].trainer_dir == results[1].trainer_dir
    assert len(zenodo.file_requests("Dataset990_MsxplainTiny.zip")) == 1
    entries = [p.name for p in cache_dir(tmp_path).iterdir() if not p.name.startswith(".")]
    assert entries == ["zenodo-1001"]
    assert not [p for p in cache_dir(tmp_path).iterdir() if p.name.startswith(".pull-")]
    verify_members(results[0], list(results[0].card.members))


def test_a_registry_entry_pins_the_sha256_and_ships_the_card(zenodo, export, tiny_model, tmp_path, monkeypatch,
                                                            capsys):
    from bids_app.model import cache as model_cache
    from bids_app.model import registry as model_registry
    from bids_app.model.card import CARD_NAME
    from bids_app.model.resolve import resolve_model

    data, _ = export
    buf = io.BytesIO()  # the export without a card: the registry's card is used
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith(CARD_NAME):
                dst.writestr(info, src.read(info))
    bare = buf.getvalue()
    zenodo.add_record("1010", {"Dataset990_MsxplainTiny.zip": bare, "other.zip": b"x"})
    zenodo.add_record("1011", {"Dataset990_MsxplainTiny.zip": bare})
    card = json.loads((tiny_model / CARD_NAME).read_text())
    card["id"] = "tiny-from-registry"
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "tiny.json").write_text(json.dumps(card))
    registry = {"registry_version": 1, "models": {
        "tiny": {"title": "tiny", "source": "doi:10.5281/zenodo.1010", "file": "Dataset990_MsxplainTiny.zip",
                 "sha256": hashlib.sha256(bare).hexdigest(), "size": len(bare), "card": "cards/tiny.json"},
        "tiny-badpin": {"title": "tiny", "source": "zenodo:1011", "sha256": "0" * 64, "card": "cards/tiny.json"},
        "tiny-badpin-cached": {"title": "tiny", "source": "zenodo:1010", "file": "Dataset990_MsxplainTiny.zip",
                               "sha256": "0" * 64}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    monkeypatch.setattr(model_registry, "REGISTRY_FILE", tmp_path / "registry.json")

    model = resolve_model("tiny")
    assert model.card.id == "tiny-from-registry"
    record = model_cache.source_of(model.trainer_dir)
    assert record["registry_name"] == "tiny" and record["checked_against"] == "registry sha256"
    assert tools_main(["models", "pull", "tiny-badpin"]) == BadInputData.exit_code
    assert "SHA-256 mismatch" in capsys.readouterr().err
    assert not list((cache_dir(tmp_path) / ".downloads").iterdir())
    assert not (cache_dir(tmp_path) / "zenodo-1011").exists()
    # the same file, cached under the record's name: the pin is checked on the cached copy too
    assert tools_main(["models", "pull", "tiny-badpin-cached"]) == BadInputData.exit_code
    assert "the registry pins" in capsys.readouterr().err
    assert tools_main(["models", "info", "tiny"]) == 0
    assert "cards/tiny.json" in capsys.readouterr().out


def test_the_shipped_registry_is_valid_and_demo_is_bundled():
    from bids_app.model.registry import load_registry, remote_source
    from bids_app.model.resolve import BUNDLED_MODELS_DIR, resolve_model

    registry = load_registry()
    assert registry["demo"].bundled and registry["demo"].card_file().is_file()
    assert remote_source("demo") is None
    model = resolve_model("demo")
    assert model.trainer_dir.is_relative_to(BUNDLED_MODELS_DIR)
    from bids_app.model.provenance import model_provenance

    assert model_provenance(model, ["0"])["Source"] == {"Kind": "bundled"}


def test_a_registry_card_is_completed_from_the_checked_archive(zenodo, export, tiny_model, tmp_path, monkeypatch,
                                                               capsys):
    """``"members": "from-archive"`` and no ``files``: the pull pins the archive's checkpoints, plans.json
    and dataset.json in the card it writes; a card pinning other checkpoints is refused, nothing cached."""
    from bids_app.model import registry as model_registry
    from bids_app.model.card import CARD_NAME, MEMBERS_FROM_ARCHIVE, sha256_file
    from bids_app.model.resolve import resolve_model, verify_members

    data, _ = export
    zenodo.add_record("1020", {"Dataset990_MsxplainTiny.zip": data})
    zenodo.add_record("1021", {"Dataset990_MsxplainTiny.zip": data})
    card = json.loads((tiny_model / CARD_NAME).read_text())
    card.pop("files", None)
    template = {**card, "id": "tiny-template", "members": MEMBERS_FROM_ARCHIVE}
    wrong = {**card, "id": "tiny-wrong", "members": [{"fold": "0", "sha256": "1" * 64}]}
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "template.json").write_text(json.dumps(template))
    (tmp_path / "cards" / "wrong.json").write_text(json.dumps(wrong))
    registry = {"registry_version": 1, "models": {
        "tiny-template": {"title": "t", "source": "zenodo:1020", "card": "cards/template.json"},
        "tiny-wrong": {"title": "t", "source": "zenodo:1021", "card": "cards/wrong.json"}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    monkeypatch.setattr(model_registry, "REGISTRY_FILE", tmp_path / "registry.json")

    model = resolve_model("tiny-template")
    assert model.card.id == "tiny-template"
    assert model.card.members == {f: sha256_file(tiny_model / f"fold_{f}" / "checkpoint_final.pth")
                                  for f in ("0", "1", "2")}
    assert model.card.files == {n: sha256_file(tiny_model / n) for n in ("plans.json", "dataset.json")}
    assert model.card.raw["pinned_at_pull"] == {"fields": ["members", "files"],
                                                "archive_checked_against": "record md5"}
    assert verify_members(model, ["0", "1", "2"])
    assert tools_main(["models", "pull", "tiny-wrong"]) == BadInputData.exit_code
    err = capsys.readouterr().err
    assert "fold_0/checkpoint_final.pth has SHA-256" in err and "the registry card pins 1111" in err
    assert not (cache_dir(tmp_path) / "zenodo-1021").exists()


def test_a_model_installed_for_an_image_runs_by_name_offline_without_a_cache(zenodo, export, tmp_path,
                                                                               monkeypatch, capsys):
    """What ``--build-arg MSXPLAIN_MODELS=...`` does (Dockerfile, Singularity.def): pull, install into a
    models folder and verify; then the model resolves by name offline with an empty, read-only model cache,
    and its provenance still names the DOI and the archive's SHA-256."""
    from bids_app.model import registry as model_registry
    from bids_app.model.cache import HOME_ENV
    from bids_app.model.provenance import model_provenance
    from bids_app.model.resolve import MODELS_PATH_ENV, resolve_model

    data, _ = export
    zenodo.add_record("1030", {"Dataset990_MsxplainTiny.zip": data})
    registry = {"registry_version": 1, "models": {"tiny-baked": {"title": "t", "source": "doi:10.5281/zenodo.1030"}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    monkeypatch.setattr(model_registry, "REGISTRY_FILE", tmp_path / "registry.json")
    models_dir = tmp_path / "opt-models"
    assert tools_main(["models", "pull", "--install-into", str(models_dir), "tiny-baked"]) == 0
    assert "installed as" in capsys.readouterr().out
    assert tools_main(["models", "pull", "--install-into", str(models_dir), "tiny-baked"]) != 0  # exists: refused

    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()
    empty_home.chmod(0o555)
    monkeypatch.setenv(HOME_ENV, str(empty_home))
    monkeypatch.setenv(MODELS_PATH_ENV, str(models_dir))
    monkeypatch.setenv("MSXPLAIN_OFFLINE", "1")
    model = resolve_model("tiny-baked")
    assert model.trainer_dir.is_relative_to(models_dir / "tiny-baked")
    source = model_provenance(model, ["0"])["Source"]
    assert source["DOI"] == "10.5281/zenodo.1030" and source["ArchiveSHA256"] == hashlib.sha256(data).hexdigest()
    assert list(empty_home.iterdir()) == []


def test_the_published_models_cards_are_valid_once_completed(tiny_model, tmp_path):
    """The shipped cards of flames and cl-benchmark parse once a pull has completed them; the
    FLAMeS card's published checkpoint digests refuse any other archive (here the tiny model)."""
    from bids_app.model.cache import registry_card_for
    from bids_app.model.card import ModelCard
    from bids_app.model.registry import load_registry, remote_source

    registry = load_registry()
    assert remote_source("flames").record == "17955359" and remote_source("flames").file == "Dataset004_WML.zip"
    assert remote_source("cl-benchmark").doi == "10.5281/zenodo.15911797"
    root = tmp_path / "export"
    shutil.copytree(tiny_model, root / "Dataset301_CL_Multisite" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    card, trainer_dir = registry_card_for(registry["cl-benchmark"].card_file(), root, label="cl-benchmark", url="u",
                                          checked_against="record md5")
    assert trainer_dir.parent.name == "Dataset301_CL_Multisite"
    parsed = ModelCard.from_dict(card)
    assert [c.name for c in parsed.channels] == ["T1w"] and [lab.name for lab in parsed.labels] == ["CL"]
    assert parsed.skull_stripped_input and parsed.connectivity == 26 and set(parsed.members) == {"0", "1", "2"}
    shutil.copytree(tiny_model, root / "Dataset004_WML" / "nnUNetTrainer_8000epochs__nnUNetPlans__3d_fullres")
    with pytest.raises(BadInputData, match="the registry card pins 4fc7db24"):
        registry_card_for(registry["flames"].card_file(), root / "Dataset004_WML", label="flames", url="u",
                          checked_against="record md5")


def test_models_offline_ignores_templateflow_home(monkeypatch):
    from bids_app.model.download import models_offline

    monkeypatch.setenv("TEMPLATEFLOW_HOME", "/tmp")
    monkeypatch.delenv("MSXPLAIN_OFFLINE", raising=False)
    assert not models_offline()
    monkeypatch.setenv("MSXPLAIN_OFFLINE", "1")
    assert models_offline()


@pytest.mark.slow
def test_participant_run_with_a_doi_records_the_source_in_the_sidecars(zenodo, export, tmp_path):
    data, marker = export
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    out = tmp_path / "out"
    code = run_cli([bids, out, "participant", "--model", "doi:10.5281/zenodo.1001", "-w", tmp_path / "work",
                    "--skull-stripped", "yes", "--no-lesion-features", "--nprocs", "1"])
    assert code == 0
    sha = hashlib.sha256(data).hexdigest()
    sidecars = [p for p in out.rglob("sub-01*.json") if "10.5281/zenodo.1001" in p.read_text()]
    assert sidecars, sorted(str(p) for p in out.rglob("*.json"))
    for path in sidecars:
        assert sha in path.read_text()
    assert not marker.exists()
