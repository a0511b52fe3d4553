"""Model resolution, model cards, checksums, safe archives and safe checkpoint loading."""

from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest
import torch

from bids_app.errors import BadInputData, MissingInput
from bids_app.model.archive import extract_model_archive
from bids_app.model.card import CARD_NAME, sha256_file
from bids_app.model.checkpoints import load_checkpoint, load_member_weights
from bids_app.model.resolve import MODELS_PATH_ENV, resolve_model, verify_members


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    dest = tmp_path / "model" / tiny_model.parent.name / tiny_model.name
    shutil.copytree(tiny_model, dest)
    return dest


def zip_model(trainer_dir: Path, out: Path, prefix: str = "") -> Path:
    """An archive laid out like nnUNetv2_export_model_to_zip (paths relative to nnUNet_results)."""
    root = trainer_dir.parent.parent
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(trainer_dir.rglob("*")):
            if f.is_file():
                zf.write(f, prefix + str(f.relative_to(root)))
    return out


def test_resolve_folder_and_card(tiny_model):
    model = resolve_model(str(tiny_model.parent.parent))  # any folder above the trainer folder
    assert model.trainer_dir == tiny_model
    assert model.card.id == "msxplain-tiny-test" and [lab.name for lab in model.card.labels] == ["WML", "CL"]
    assert model.card.members.keys() == {"0", "1", "2"}


def test_resolve_zip_and_reuse_cache(tiny_model, tmp_path):
    archive = zip_model(tiny_model, tmp_path / "m.zip", prefix="release/")
    first = resolve_model(str(archive), cache_dir=tmp_path / "cache")
    second = resolve_model(str(archive), cache_dir=tmp_path / "cache")
    assert first.trainer_dir == second.trainer_dir and first.trainer_dir.is_dir()
    assert verify_members(first, ["0", "1", "2"])


def test_resolve_by_name_from_models_path(tiny_model, tmp_path, monkeypatch):
    shutil.copytree(tiny_model.parent.parent, tmp_path / "zoo" / "mymodel")
    monkeypatch.setenv(MODELS_PATH_ENV, str(tmp_path / "zoo"))
    assert resolve_model("mymodel").card.id == "msxplain-tiny-test"
    with pytest.raises(MissingInput, match="not found.*mymodel"):
        resolve_model("no-such-model")


def test_checksum_mismatch_is_refused_before_loading(model_copy):
    ckpt = model_copy / "fold_1" / "checkpoint_final.pth"
    ckpt.write_bytes(ckpt.read_bytes()[:-10] + b"0123456789")
    model = resolve_model(str(model_copy))
    with pytest.raises(BadInputData, match="Checksum mismatch for fold_1"):
        load_member_weights(model, ["0", "1"])


def test_missing_fold(model_copy):
    shutil.rmtree(model_copy / "fold_2")
    model = resolve_model(str(model_copy))
    with pytest.raises(MissingInput, match="fold_2"):
        verify_members(model, ["0", "1", "2"])


def test_card_errors(model_copy):
    card = json.loads((model_copy / CARD_NAME).read_text())
    del card["channels"]
    (model_copy / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(BadInputData, match="channels"):
        resolve_model(str(model_copy))
    (model_copy / CARD_NAME).write_text("{not json")
    with pytest.raises(BadInputData, match="not valid JSON"):
        resolve_model(str(model_copy))


def test_card_inferred_from_dataset_json(model_copy):
    (model_copy / CARD_NAME).unlink()
    model = resolve_model(str(model_copy))
    assert model.card.inferred and model.card_path is None
    assert [c.name for c in model.card.channels] == ["T1w", "FLAIR"]
    assert model.card.channels[1].queries == ({"suffix": "FLAIR"},)
    assert model.card.members["0"] == sha256_file(model_copy / "fold_0" / "checkpoint_final.pth")


def test_a_node_infers_the_card_the_run_inferred(model_copy):
    """Without a card file the nodes are given none (no inferred card is written anywhere) and
    resolve the same card from plans.json and dataset.json as the run did."""
    from bids_app.interfaces.segment import node_model
    from bids_app.model.provenance import model_provenance
    from bids_app.workflows.base import _card_trait

    (model_copy / CARD_NAME).unlink()
    run_model = resolve_model(str(model_copy.parent.parent))
    settings = type("Settings", (), {"card_file": run_model.card_path})()
    node = node_model(str(run_model.trainer_dir), _card_trait(settings))
    assert node.card == run_model.card and node.card_path is None
    assert model_provenance(node, ["0"], {}) == model_provenance(run_model, ["0"], {})


def _zip_with(tmp_path, name, members):
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, data, mode in members:
            info = zipfile.ZipInfo(arcname)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def test_archive_path_traversal_refused(tmp_path):
    bad = _zip_with(tmp_path, "evil.zip", [("../../outside.txt", b"x", None)])
    with pytest.raises(BadInputData, match="outside the extraction folder"):
        extract_model_archive(bad, tmp_path / "cache")
    assert not (tmp_path / "outside.txt").exists()
    absolute = _zip_with(tmp_path, "abs.zip", [("/etc/evil", b"x", None)])
    with pytest.raises(BadInputData, match="outside"):
        extract_model_archive(absolute, tmp_path / "cache")


def test_archive_symlink_refused(tmp_path):
    bad = _zip_with(tmp_path, "link.zip", [("model/link", b"/etc/passwd", stat.S_IFLNK | 0o777)])
    with pytest.raises(BadInputData, match="symbolic link"):
        extract_model_archive(bad, tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob("link")) if (tmp_path / "cache").exists() else True


def test_archive_bomb_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/zeros.bin", b"\0" * (20 * 1024 * 1024))
    with pytest.raises(BadInputData, match="zip bomb"):
        extract_model_archive(bomb, tmp_path / "cache")


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(BadInputData):
        resolve_model(str(bad), cache_dir=tmp_path / "cache")


class _Payload:
    """Unpickling this runs a command: the classic malicious-checkpoint payload."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MSXPLAIN_PWNED']}",))


def test_malicious_checkpoint_is_refused_and_never_runs(tiny_model, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MSXPLAIN_PWNED", str(marker))
    checkpoint = torch.load(tiny_model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["logging"] = _Payload()
    evil = tmp_path / "checkpoint_final.pth"
    torch.save(checkpoint, evil)
    with pytest.raises(BadInputData, match="refused"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_real_nnunet_checkpoint_globals_are_allowed(tiny_model, tmp_path):
    """nnU-Net's trainer stores numpy scalars/dtypes in 'logging' and '_best_ema'."""
    import numpy as np

    checkpoint = torch.load(tiny_model / "fold_0" / "checkpoint_final.pth", weights_only=False)
    checkpoint["_best_ema"] = np.float64(0.93)
    checkpoint["logging"] = {"ema_fg_dice": [np.float32(0.5), np.float64(0.7)], "mean_fg_dice": [np.float64(0.1)]}
    path = tmp_path / "c.pth"
    torch.save(checkpoint, path)
    loaded = load_checkpoint(path)
    assert "network_weights" in loaded


def test_bundled_refiner_is_checksum_verified(model_copy):
    import json

    from bids_app.model.card import sha256_file
    from bids_app.model.resolve import model_refiner

    assert model_refiner(resolve_model(str(model_copy))) is None  # the card names none
    refiner = model_copy / "refiner.json"
    refiner.write_text(json.dumps({"format": "msxplain-saliency-refiner"}))
    card_file = model_copy / CARD_NAME
    card = json.loads(card_file.read_text())
    card["refiner"] = {"file": "refiner.json", "sha256": sha256_file(refiner)}
    card_file.write_text(json.dumps(card))
    assert model_refiner(resolve_model(str(model_copy))) == refiner
    refiner.write_text(json.dumps({"format": "tampered"}))
    with pytest.raises(BadInputData, match="Checksum mismatch for the refiner"):
        model_refiner(resolve_model(str(model_copy)))
    refiner.unlink()
    with pytest.raises(MissingInput, match="refiner that is not there"):
        model_refiner(resolve_model(str(model_copy)))
