"""Lesion class names are data, not file names (issue 21 item 3): any name gets a BIDS-safe
``label-`` value that never collides with msxplain's own ``label-lesion`` union mask."""

from __future__ import annotations

import json
import shutil

import pytest

from bids_app.bids.validation import validate
from bids_app.errors import BadInputData
from bids_app.model.card import CARD_NAME, ModelCard, bids_label_value
from bids_app.testing import make_bids, run_cli


@pytest.mark.parametrize("name, value", [
    ("WML", "WML"), ("CL", "CL"), ("lesion", "lesionClass"), ("Lesion", "LesionClass"),
    ("white matter lesion", "whiteMatterLesion"), ("WML_1", "WML1"), ("CL-cortical", "CLCortical"),
    ("  ", "class3"), ("é", "class3"), ("lesion 2", "lesion2"),
])
def test_the_label_value_rule(name, value):
    assert bids_label_value(name, 3) == value


def _card(labels: dict) -> dict:
    return {"card_version": 1, "id": "x", "name": "x", "version": "1", "description": "x",
            "channels": [{"index": 0, "name": "FLAIR", "queries": [{"suffix": "FLAIR"}]}],
            "labels": labels, "members": [{"fold": "0"}]}


def test_cards_keep_the_names_and_derive_unique_values():
    card = ModelCard.from_dict(_card({"1": "lesion", "2": {"name": "white matter lesion"}}))
    assert [(lab.name, lab.bids_label) for lab in card.labels] == [("lesion", "lesionClass"),
                                                                   ("white matter lesion", "whiteMatterLesion")]
    twins = ModelCard.from_dict(_card({"1": "WML 1", "2": "WML_1"}))
    assert [lab.bids_label for lab in twins.labels] == ["WML11", "WML12"]
    chosen = ModelCard.from_dict(_card({"1": {"name": "juxtacortical lesion", "bids_label": "JCL"}}))
    assert chosen.labels[0].bids_label == "JCL"


@pytest.mark.parametrize("label, problem", [
    ({"name": "WML", "bids_label": "lesion"}, "bids_label"),
    ({"name": "WML", "bids_label": "W-M-L"}, "bids_label"),
    ({"name": ""}, "name"),
    ({"name": "a\nb"}, "name"),
])
def test_bad_label_fields_are_refused(label, problem):
    with pytest.raises(BadInputData, match=rf"labels\.1\.{problem}"):
        ModelCard.from_dict(_card({"1": label}))


@pytest.mark.slow
@pytest.mark.parametrize("names, values", [
    (("lesion", "white matter lesion"), ("lesionClass", "whiteMatterLesion")),
    (("WML_1", "CL-cortical"), ("WML1", "CLCortical")),
])
def test_any_label_names_run_to_validator_clean_outputs(tiny_model, tmp_path, names, values):
    model = tmp_path / "model" / tiny_model.parent.name / tiny_model.name
    shutil.copytree(tiny_model, model)
    card = json.loads((model / CARD_NAME).read_text())
    card["labels"] = {"1": {"name": names[0]}, "2": {"name": names[1]}}
    (model / CARD_NAME).write_text(json.dumps(card))
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    out = tmp_path / "out"
    code = run_cli([bids, out, "participant", "--model", model, "-w", tmp_path / "work", "--skull-stripped", "yes",
                    "--no-tta", "--nprocs", "1", "--no-lesion-features"])
    assert code == 0
    anat = out / "sub-01" / "anat"
    for name, value in zip(names, values):
        mask = anat / f"sub-01_label-{value}_mask.nii.gz"
        assert mask.is_file() and (anat / f"sub-01_label-{value}_probseg.nii.gz").is_file()
        assert json.loads(mask.with_name(mask.name.replace(".nii.gz", ".json")).read_text())["LabelName"] == name
    assert (anat / "sub-01_label-lesion_mask.nii.gz").is_file()  # msxplain's own union mask, untouched
    result = validate(out)
    assert result.errors == [], result.error_lines(10)
