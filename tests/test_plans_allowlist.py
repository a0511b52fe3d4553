"""Untrusted model folders: class names in plans.json, pinned plans/dataset files, the card schema.

The attacks here ran code on msxplain before the exact allow-lists of
:mod:`bids_app.core.plans_allowlist`: nnU-Net locates the network and layer classes of ``plans.json``
with ``pydoc.locate``, which follows attributes, so a name under an allowed prefix could reach
``torch.hub.load`` (importing a ``hubconf.py`` from a folder the plans name) or ``os.system``.
Each attack writes a marker file if its payload runs; the marker must stay absent.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from bids_app.core.plans_allowlist import (
    LAYER_CLASSES,
    NETWORK_CLASSES,
    check_dataset_json,
    check_plans,
    import_allowed,
)
from bids_app.core.segment import EnsemblePredictor, MemberInput, build_network
from bids_app.errors import BadInputData
from bids_app.model.card import CARD_NAME, MODEL_FILES, ModelCard, pin_model_files
from bids_app.model.checkpoints import load_member_weights
from bids_app.model.provenance import model_provenance
from bids_app.model.resolve import check_consistency, resolve_model, verify_members
from bids_app.testing import make_bids, run_cli

CONFIG = "3d_fullres"


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    dest = tmp_path / "model" / tiny_model.parent.name / tiny_model.name
    shutil.copytree(tiny_model, dest)
    return dest


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "pwned"
    monkeypatch.setenv("MSXPLAIN_PWNED", str(path))
    return path


def _hub_repo(tmp_path: Path) -> Path:
    """A torch.hub 'local repo' whose hubconf.py writes the marker when it is imported."""
    repo = tmp_path / "hubrepo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['MSXPLAIN_PWNED']).write_text('pwned')\n"
        "def entry(**kwargs):\n"
        "    import torch\n"
        "    return torch.nn.Identity()\n")
    return repo


def _hub_attack(plans: dict, repo: Path) -> dict:
    arch = plans["configurations"][CONFIG]["architecture"]
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.torch.hub.load"
    arch["arch_kwargs"] = {"repo_or_dir": str(repo), "model": "entry", "source": "local"}
    arch["_kw_requires_import"] = []
    return plans


def _plans(trainer_dir: Path) -> dict:
    return json.loads((trainer_dir / "plans.json").read_text())


def _write_and_repin(trainer_dir: Path, name: str, content: dict | str) -> None:
    """What an attacker who ships the whole folder does: change a file and the card's pin."""
    path = trainer_dir / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    card = json.loads((trainer_dir / CARD_NAME).read_text())
    card["files"] = pin_model_files(trainer_dir)
    (trainer_dir / CARD_NAME).write_text(json.dumps(card))


def _run(model, bids, out, *extra):
    return run_cli([bids, out, "participant", "--model", model, "-w", out.parent / "work", "--skull-stripped",
                    "yes", "--no-tta", "--no-lesion-features", "--skip-bids-validation", *extra])


# ------------------------------------------------------------------ the network class
def test_torch_hub_payload_in_network_class_never_runs(tiny_model, tmp_path, marker):
    plans = _hub_attack(_plans(tiny_model), _hub_repo(tmp_path))
    with pytest.raises(BadInputData, match=r"torch\.hub\.load.*not an nnU-Net network building block"):
        build_network(plans, CONFIG, 2, 3)
    with pytest.raises(BadInputData, match="not an nnU-Net network building block"):
        EnsemblePredictor(plans, json.loads((tiny_model / "dataset.json").read_text()),
                          [MemberInput("0", {}, None)], configuration=CONFIG)
    assert not marker.exists()


def test_torch_hub_payload_stops_the_run_before_anything(model_copy, tmp_path, marker, capsys):
    """The whole folder is the attacker's (card re-pinned): exit 65, the payload never runs."""
    _write_and_repin(model_copy, "plans.json", _hub_attack(_plans(model_copy), _hub_repo(tmp_path)))
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    assert _run(model_copy, bids, tmp_path / "out") == 65
    err = capsys.readouterr().err
    assert "torch.hub.load" in err and "not an nnU-Net network building block" in err
    assert not marker.exists() and not (tmp_path / "out" / "sub-01").exists()


@pytest.mark.parametrize("name", [
    "os.system",
    "dynamic_network_architectures.architectures.unet.torch.hub.load",
    "dynamic_network_architectures.architectures.unet.PlainConvUNet.__init__",
    "dynamic_network_architectures.architectures.PlainConvUNet",  # a prefix match is not enough
    "torch.nn.Conv3d",  # a real class, but not a network
    " dynamic_network_architectures.architectures.unet.PlainConvUNet",
])
def test_network_class_must_match_exactly(tiny_model, name):
    plans = _plans(tiny_model)
    plans["configurations"][CONFIG]["architecture"]["network_class_name"] = name
    with pytest.raises(BadInputData, match="network class"):
        check_plans(plans, CONFIG)


# ------------------------------------------------------------------ the layer classes (_kw_requires_import)
@pytest.mark.parametrize("key, name, kwargs_key, kwargs", [
    ("nonlin", "torch.nn.parallel.distributed.os.system", "nonlin_kwargs", {"command": "touch {marker}"}),
    ("nonlin", "os.system", "nonlin_kwargs", {"command": "touch {marker}"}),
    ("norm_op", "torch.nn.modules.activation.torch.hub.load", "norm_op_kwargs",
     {"repo_or_dir": "{repo}", "model": "entry", "source": "local"}),
    ("dropout_op", "torch.nn.modules.dropout.torch.hub.load", "dropout_op_kwargs",
     {"repo_or_dir": "{repo}", "model": "entry", "source": "local"}),
    ("conv_op", "torch.nn.modules.conv.F.torch.hub.load", None, None),
    ("conv_op", "torch.nn.LeakyReLU", None, None),  # allowed class, wrong role
])
def test_layer_payloads_never_run(tiny_model, tmp_path, marker, key, name, kwargs_key, kwargs):
    repo = _hub_repo(tmp_path)
    plans = _plans(tiny_model)
    arch_kwargs = plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]
    arch_kwargs[key] = name
    if kwargs_key:
        arch_kwargs[kwargs_key] = json.loads(json.dumps(kwargs).replace("{marker}", str(marker))
                                             .replace("{repo}", str(repo)))
    with pytest.raises(BadInputData, match=f"'{key}'.*not an nnU-Net network building block"):
        build_network(plans, CONFIG, 2, 3)
    assert not marker.exists()


def test_only_known_keys_are_imported_and_the_rest_is_plain_data(tiny_model):
    plans = _plans(tiny_model)
    arch = plans["configurations"][CONFIG]["architecture"]
    arch["_kw_requires_import"].append("n_stages")
    with pytest.raises(BadInputData, match=r"arch_kwargs\['n_stages'\]"):
        check_plans(plans, CONFIG)
    plans = _plans(tiny_model)
    arch = plans["configurations"][CONFIG]["architecture"]
    arch["_kw_requires_import"].remove("nonlin")  # the name would reach the constructor as a string
    with pytest.raises(BadInputData, match=r"torch\.nn\.LeakyReLU.*arch_kwargs\['nonlin'\]"):
        check_plans(plans, CONFIG)
    plans = _plans(tiny_model)
    plans["configurations"][CONFIG]["architecture"]["arch_kwargs"]["nonlin_kwargs"] = {"x": "builtins.eval"}
    with pytest.raises(BadInputData, match="builtins.eval"):
        check_plans(plans, CONFIG)


# ------------------------------------------------------------------ the other names nnU-Net resolves
@pytest.mark.parametrize("key, value, message", [
    ("preprocessor_name", "load_pickle", "preprocessor"),
    ("resampling_fn_data", "save_pickle", "resampling function"),
    ("resampling_fn_seg", "os", "resampling function"),
    ("resampling_fn_probabilities", "subprocess", "resampling function"),
    ("normalization_schemes", ["ZScoreNormalization", "os"], r"normalization_schemes\[1\]"),
    ("resampling_fn_data_kwargs", {"order": "os.system"}, "os.system"),
    ("previous_stage", "3d_lowres", "cascade"),
    ("inherits_from", CONFIG, "inherits from itself"),
])
def test_configuration_names_are_allow_listed(tiny_model, key, value, message):
    plans = _plans(tiny_model)
    plans["configurations"][CONFIG][key] = value
    dataset = json.loads((tiny_model / "dataset.json").read_text())
    with pytest.raises(BadInputData, match=message):
        EnsemblePredictor(plans, dataset, [MemberInput("0", {}, None)], configuration=CONFIG)


@pytest.mark.parametrize("key, value, message", [
    ("label_manager", "recursive_find_python_class", "label manager"),
    ("image_reader_writer", "BaseReaderWriter", "image reader-writer"),
    ("transpose_forward", [0, 0, 1], "transpose_forward"),
])
def test_top_level_names_are_allow_listed(tiny_model, key, value, message):
    plans = _plans(tiny_model)
    plans[key] = value
    with pytest.raises(BadInputData, match=message):
        check_plans(plans, CONFIG)


def test_inherited_configuration_is_checked_as_resolved(tiny_model, marker, tmp_path):
    plans = _plans(tiny_model)
    parent = plans["configurations"][CONFIG]
    plans["configurations"]["evil"] = {"inherits_from": CONFIG, "batch_size": 1}
    assert check_plans(plans, "evil")["architecture"] == parent["architecture"]
    _hub_attack(plans, _hub_repo(tmp_path))  # the parent now carries the payload
    with pytest.raises(BadInputData, match="network class"):
        build_network(plans, "evil", 2, 3)
    assert not marker.exists()


def test_allow_lists_name_real_modules_and_standard_plans_pass(tiny_model):
    import torch

    for name in NETWORK_CLASSES:
        assert issubclass(import_allowed(name, "network"), torch.nn.Module)
    for role, table in LAYER_CLASSES.items():
        for name in table:
            cls = import_allowed(name, role)
            assert issubclass(cls, torch.nn.Module)
            assert name in (f"torch.nn.{cls.__name__}", f"{cls.__module__}.{cls.__name__}")
    plans = _plans(tiny_model)  # nnU-Net's spelling: torch.nn.modules.conv.Conv3d, torch.nn.LeakyReLU
    assert check_plans(plans, CONFIG, n_channels=2)["preprocessor_name"] == "DefaultPreprocessor"
    assert type(build_network(plans, CONFIG, 2, 3)).__name__ == "PlainConvUNet"


def test_plans_before_nnunet_2_4_are_checked_and_build(tiny_model):
    """Old plans have no 'architecture': nnU-Net builds the names from 'UNet_class_name'."""
    plans = _plans(tiny_model)
    config = plans["configurations"][CONFIG]
    kwargs = config.pop("architecture")["arch_kwargs"]
    config.update({"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": kwargs["features_per_stage"][0],
                   "unet_max_num_features": kwargs["features_per_stage"][-1],
                   "n_conv_per_stage_encoder": kwargs["n_conv_per_stage"],
                   "n_conv_per_stage_decoder": kwargs["n_conv_per_stage_decoder"],
                   "conv_kernel_sizes": kwargs["kernel_sizes"], "pool_op_kernel_sizes": kwargs["strides"],
                   "num_pool_per_axis": [len(kwargs["strides"]) - 1] * 3})
    reference = build_network(_plans(tiny_model), CONFIG, 2, 3)
    with pytest.warns(UserWarning, match="old nnU-Net plans format"):
        legacy = build_network(json.loads(json.dumps(plans)), CONFIG, 2, 3)
    assert legacy.state_dict().keys() == reference.state_dict().keys()
    config["UNet_class_name"] = "os.system"
    with pytest.raises(BadInputData, match="UNet_class_name"):
        build_network(plans, CONFIG, 2, 3)


# ------------------------------------------------------------------ dataset.json
@pytest.mark.parametrize("content, message", [
    ("{not json", "dataset.json is not valid JSON"),
    ("[1, 2]", "dataset.json is not a JSON object"),
    (json.dumps({"labels": {"background": 0, "WML": 1, "CL": 2}}), "no 'channel_names'"),
    (json.dumps({"channel_names": {"0": "T1w", "1": "FLAIR"}}), "no 'labels'"),
    (json.dumps({"channel_names": {"0": "T1w", "1": "FLAIR"},
                 "labels": {"background": 0, "WML": [1, 2], "CL": 2}}), "region-based"),
    (json.dumps({"channel_names": {"0": "T1w", "1": "FLAIR"}, "labels": {"background": 0, "WML": 1, "CL": 2},
                 "overwrite_image_reader_writer": "BaseReaderWriter"}), "reader-writer"),
])
def test_invalid_dataset_json_is_bad_input(model_copy, content, message):
    _write_and_repin(model_copy, "dataset.json", content)
    with pytest.raises(BadInputData, match=message):
        check_consistency(resolve_model(str(model_copy)))
    (model_copy / CARD_NAME).unlink()  # and when the card is inferred from it
    with pytest.raises(BadInputData, match=message):
        resolve_model(str(model_copy))


def test_invalid_dataset_json_exits_65(model_copy, tmp_path, capsys):
    _write_and_repin(model_copy, "dataset.json", "{not json")
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    assert _run(model_copy, bids, tmp_path / "out") == 65
    assert "dataset.json is not valid JSON" in capsys.readouterr().err


def test_check_dataset_json_returns_the_channels():
    assert check_dataset_json({"channel_names": {"1": "FLAIR", "0": "T1w"},
                               "labels": {"background": 0, "WML": 1}}) == {0: "T1w", 1: "FLAIR"}


# ------------------------------------------------------------------ pinned plans.json / dataset.json
@pytest.mark.parametrize("name", MODEL_FILES)
def test_tampered_plans_or_dataset_json_is_refused(model_copy, name):
    path = model_copy / name
    path.write_text(path.read_text() + " ")  # still valid JSON: only the checksum can tell
    model = resolve_model(str(model_copy))
    with pytest.raises(BadInputData, match=f"Checksum mismatch for {name}"):
        check_consistency(model)
    with pytest.raises(BadInputData, match=f"Checksum mismatch for {name}"):
        load_member_weights(model, ["0"])  # what each prediction node calls


def test_tampered_plans_json_exits_65_before_processing(model_copy, tmp_path, capsys):
    path = model_copy / "plans.json"
    path.write_text(path.read_text().replace('"batch_size": 2', '"batch_size": 3'))
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    assert _run(model_copy, bids, tmp_path / "out") == 65
    err = capsys.readouterr().err
    assert "Checksum mismatch for plans.json" in err and "Fix:" in err
    assert not (tmp_path / "out" / "sub-01").exists()


def test_cards_msxplain_writes_pin_the_files(tiny_model):
    for model in (resolve_model(str(tiny_model)), resolve_model("demo")):
        assert model.card.files == pin_model_files(model.trainer_dir)
        check_consistency(model)
        assert verify_members(model, list(model.card.members)[:1])
        provenance = model_provenance(model, list(model.card.members)[:1])
        assert provenance["Files"] == model.card.files and provenance["FilesPinnedByCard"]


def test_legacy_card_without_pins_warns_and_runs(model_copy, caplog):
    card = json.loads((model_copy / CARD_NAME).read_text())
    del card["files"]
    (model_copy / CARD_NAME).write_text(json.dumps(card))
    model = resolve_model(str(model_copy))
    with caplog.at_level(logging.WARNING, logger="bids_app.model.resolve"):
        check_consistency(model)
    assert "pins no SHA-256 for plans.json and dataset.json" in caplog.text
    assert verify_members(model, ["0"])
    assert model_provenance(model, ["0"])["FilesPinnedByCard"] is False


def test_inferred_card_pins_the_files_now(model_copy):
    (model_copy / CARD_NAME).unlink()
    model = resolve_model(str(model_copy))
    assert model.card.inferred and model.card.files == pin_model_files(model_copy)


# ------------------------------------------------------------------ card schema
def _card(tiny_model) -> dict:
    return json.loads((tiny_model / CARD_NAME).read_text())


def _set(card: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = card
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    elif value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return card


_DELETE = object()

BAD_FIELDS = [
    # (where to change, new value, the field the message must name)
    ("labels.1.name", _DELETE, "labels.1.name"),
    ("labels.1.name", "W\tM\tL", "labels.1.name"),  # any printable name is data (its label- value is derived)
    ("labels.1.bids_label", "W M L", "labels.1.bids_label"),
    ("labels.1", 7, "labels.1"),
    ("labels.2.name", "WML", "labels"),
    ("labels.1.long_name", 3, "labels.1.long_name"),
    ("postprocessing.connectivity", "six", "postprocessing.connectivity"),
    ("postprocessing.connectivity", 8, "postprocessing.connectivity"),
    ("postprocessing.threshold", "0.5", "postprocessing.threshold"),
    ("postprocessing.threshold", 1.5, "postprocessing.threshold"),
    ("postprocessing.min_lesion_size", 2.5, "postprocessing.min_lesion_size"),
    ("postprocessing.member_thresholds", {"9": 0.5}, "postprocessing.member_thresholds.9"),
    ("postprocessing.member_thresholds", {"0": "high"}, "postprocessing.member_thresholds.0"),
    ("postprocessing", [1], "postprocessing"),
    ("refiner", "refiner.json", "refiner"),
    ("refiner", {"file": "../../refiner.json", "sha256": "0" * 64}, "refiner.file"),
    ("refiner", {"file": "refiner.json"}, "refiner.sha256"),
    ("reference_lesion_load", "1%", "reference_lesion_load"),
    ("reference_channel", 5, "reference_channel"),
    ("demo", "yes", "demo"),
    ("skull_stripped_input", 1, "skull_stripped_input"),
    ("name", ["x"], "name"),
    ("nnunet", "3d_fullres", "nnunet"),
    ("nnunet.configuration", 3, "nnunet.configuration"),
    ("nnunet.checkpoint", "../../../etc/passwd", "nnunet.checkpoint"),
    ("channels.0.name", 3, "channels[0].name"),
    ("channels.0.index", "0", "channels[0].index"),
    ("channels.1.required", "no", "channels[1].required"),
    ("channels.1.queries", [{"suffix": {"$ne": "x"}}], "channels[1].queries[0].suffix"),
    ("channels.1.name", "t1w", "channels"),
    ("members.0.fold", "../../x", "members[0].fold"),
    ("members.1.fold", "0", "members[1].fold"),
    ("members.0.sha256", 12, "members[0].sha256"),
    ("files.plans.json", "abc", "files.plans.json"),
    ("files", {"plans.json": "0" * 64}, "files"),
    ("files", {"plans.json": "0" * 64, "dataset.json": "0" * 64, "../x": "0" * 64}, "files.../x"),
]


@pytest.mark.parametrize("where, value, field", BAD_FIELDS, ids=[f"{w}={v!r}"[:60] for w, v, _ in BAD_FIELDS])
def test_each_bad_card_field_is_named(tiny_model, where, value, field):
    card = _card(tiny_model)
    if where.startswith("files."):  # "plans.json" has a dot: set it by hand
        card["files"]["plans.json"] = value
    else:
        _set(card, where, value)
    with pytest.raises(BadInputData) as info:
        ModelCard.from_dict(card, source="card.json")
    assert f"'{field}'" in str(info.value) or f"key '{field}'" in str(info.value), str(info.value)
    assert info.value.exit_code == 65


def test_bad_card_field_exits_65_with_its_name(model_copy, tmp_path, capsys):
    card = _card(model_copy)
    del card["labels"]["1"]["name"]
    (model_copy / CARD_NAME).write_text(json.dumps(card))
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    assert _run(model_copy, bids, tmp_path / "out") == 65
    assert "Model card field 'labels.1.name' is missing" in capsys.readouterr().err


def test_valid_cards_still_parse(tiny_model):
    card = _card(tiny_model)
    card["labels"]["1"] = "WML"  # the short form of {"name": "WML"}
    card["version"] = 2
    card["postprocessing"]["member_thresholds"] = {"0": 0.4, "1": 0.5}
    parsed = ModelCard.from_dict(card)
    assert parsed.label_name(1) == "WML" and parsed.version == "2" and parsed.member_thresholds == {"0": 0.4, "1": 0.5}
    assert parsed.files == card["files"]
