"""The network sees its input as the model expects it (issue 21, item 1).

nnU-Net's ``SimpleITKIO`` and ``NibabelIO`` feed the network the file's stored voxel order,
``NibabelIOWithReorient`` the RAS+ one. A random-weight model whose plans name each reader is
run through msxplain's prediction node and through ``nnUNetPredictor`` (reading the same NIfTI
file with the same reader) for files stored RAS, LAS, LPS and permuted (sagittal): the
per-member probabilities agree within 1e-4, with and without mirroring. The last layer is
scaled so that the softmax is far from flat (a random network's is nearly 0.5 everywhere and
would hide orientation mistakes).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations as nio

from bids_app.errors import BadInputData, UsageError
from bids_app.model.card import CARD_NAME, ModelCard, infer_card, pin_model_files, sha256_file
from bids_app.model.orientation import input_orientation_rule
from bids_app.model.resolve import resolve_input_orientation, resolve_model
from bids_app.training.plans import make_plans

#: stored orientations of the test files: RAS, two flips, and a sagittal storage (axes permuted)
ORIENTATIONS = ("RAS", "LAS", "LPS", "PIL")
ZOOMS = (1.1, 1.3, 1.6)  # along the stored axes: anisotropic, so a permutation changes the spacing too
SHAPE = (18, 15, 12)
TOLERANCE = 1e-4
_REFERENCES: dict = {}  # nnUNetPredictor per (model, mirroring), initialised once


def _write_model(root: Path, reader: str, seed: int = 0, card_extra: dict | None = None) -> Path:
    """A one-fold, one-channel random-weight nnU-Net model whose plans name ``reader``."""
    from bids_app.core.segment import build_network

    trainer_dir = root / "Dataset777_Orient" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (trainer_dir / "fold_0").mkdir(parents=True)
    dataset = {"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "WML": 1}, "numTraining": 0,
               "file_ending": ".nii.gz"}
    plans = make_plans("Dataset777_Orient", n_channels=1, spacing_xyz=(1.0, 1.2, 1.4), patch_size_xyz=(16, 16, 16),
                       features=(4, 8, 16), median_shape_xyz=(24, 24, 20))
    plans["image_reader_writer"] = reader
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]  # as FLAMeS' plans
    (trainer_dir / "plans.json").write_text(json.dumps(plans))
    (trainer_dir / "dataset.json").write_text(json.dumps(dataset))
    torch.manual_seed(seed)
    net = build_network(plans, "3d_fullres", 1, 2)
    net.apply(net.initialize)
    with torch.no_grad():  # a far-from-flat softmax, so that a wrong orientation shows
        for layer in net.decoder.seg_layers:
            layer.weight.mul_(40.0)
            layer.bias.zero_()
    torch.save({"network_weights": net.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": 0,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                              "device": "cpu"},
                "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
               trainer_dir / "fold_0" / "checkpoint_final.pth")
    card = {"card_version": 1, "id": f"orient-{reader}", "channels": [
        {"index": 0, "name": "FLAIR", "queries": [{"suffix": "FLAIR"}]}], "labels": {"1": "WML"},
        "skull_stripped_input": False,
        "members": [{"fold": "0", "sha256": sha256_file(trainer_dir / "fold_0" / "checkpoint_final.pth")}],
        "files": pin_model_files(trainer_dir), **(card_extra or {})}
    (trainer_dir / CARD_NAME).write_text(json.dumps(card))
    return trainer_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(2)
    return {reader: _write_model(tmp_path_factory.mktemp(reader), reader)
            for reader in ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")}


def _affine(axcodes: str, zooms=ZOOMS) -> np.ndarray:
    """Voxel -> RAS+ mm for a grid stored with ``axcodes`` (e.g. 'PIL': i -> P, j -> I, k -> L)."""
    ornt = nio.axcodes2ornt(tuple(axcodes))
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for i, (axis, sign) in enumerate(ornt):
        affine[int(axis), i] = sign * zooms[i]
    affine[:3, 3] = [-14.0, 9.0, -11.0]
    return affine


def _case(seed: int = 5) -> np.ndarray:
    """A brain-like blob (zero outside, so nnU-Net crops) with bright spots, shape :data:`SHAPE`."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    inside = ((grid - np.array([0.1, -0.05, 0.0])[:, None, None, None]) ** 2 / np.array(
        [0.8, 0.7, 0.9])[:, None, None, None] ** 2).sum(0) <= 1.0
    image = rng.normal(100.0, 15.0, SHAPE) + 80.0 * (grid[0] > 0.3) + 40.0 * (grid[1] < -0.2)
    return (image * inside).astype(np.float32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _msxplain(trainer_dir: Path, image: Path, tta: bool, tmp: Path, mode: str = "auto") -> tuple[np.ndarray, dict]:
    """Member probabilities (C, X, Y, Z) of the prediction node on the stored grid, and its model.json."""
    from bids_app.interfaces.segment import PredictLesions

    img = nib.load(str(image))
    data = np.asarray(img.dataobj, np.float32)
    channels = _save(tmp / "channels.nii.gz", data[..., None], img.affine)
    mask = _save(tmp / "mask.nii.gz", (data != 0).astype(np.uint8), img.affine)
    node = PredictLesions(channels_file=str(channels), mask_file=str(mask), model_dir=str(trainer_dir),
                          members=["0"], device="cpu", tta=tta, num_threads=2, skull_stripped_input=False,
                          input_orientation=mode)
    result = node.run(cwd=str(tmp))
    probs = np.load(result.outputs.member_probs_file)
    assert probs.shape == (1, 2) + SHAPE
    return probs[0], json.loads(Path(result.outputs.model_file).read_text())["inference"]


def _nnunet(trainer_dir: Path, image: Path, reader: str, tta: bool) -> np.ndarray:
    """``nnUNetPredictor`` on the file read by ``reader``, probabilities (C, X, Y, Z) on the stored grid."""
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    key = (str(trainer_dir), tta)
    if key not in _REFERENCES:
        predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=tta, allow_tqdm=False, verbose=False)
        predictor.initialize_from_trained_model_folder(str(trainer_dir), use_folds=(0,))
        _REFERENCES[key] = predictor
    predictor = _REFERENCES[key]
    data, properties = recursive_find_reader_writer_by_name(reader)().read_images([str(image)])
    _, probs = predictor.predict_single_npy_array(data, properties, None, None, True)
    probs = np.asarray(probs, np.float32).transpose(0, 3, 2, 1)  # readers give (z, y, x): back to (x, y, z)
    if reader == "NibabelIOWithReorient":  # the array is RAS+: back to the stored voxel order
        affine = nib.load(str(image)).affine
        back = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.io_orientation(affine))
        probs = np.stack([nio.apply_orientation(p, back) for p in probs])
    return probs


@pytest.mark.parametrize("tta", [False, True], ids=["no-mirroring", "mirroring"])
@pytest.mark.parametrize("axcodes", ORIENTATIONS)
@pytest.mark.parametrize("reader, mode", [("SimpleITKIO", "native"), ("NibabelIOWithReorient", "ras")])
def test_member_probabilities_equal_nnunet_with_the_plans_reader(models, tmp_path, reader, mode, axcodes, tta):
    """The card says nothing: the plans' reader decides (SimpleITKIO -> native, NibabelIOWithReorient -> ras)."""
    image = _save(tmp_path / "flair.nii.gz", _case(), _affine(axcodes))
    ours, info = _msxplain(models[reader], image, tta, tmp_path)
    ref = _nnunet(models[reader], image, reader, tta)
    assert info["input_orientation"] == mode
    assert info["input_orientation_reason"] == f"plans.json image_reader_writer {reader}"
    assert ref[1].max() > 0.9 and ref[1].min() < 0.1  # the softmax is not flat: a wrong orientation would show
    difference = float(np.abs(ours - ref).max())
    print(f"PARITY reader={reader} mode={mode} stored={axcodes} tta={tta} max|diff|={difference:.2e}")
    assert difference <= TOLERANCE


@pytest.mark.parametrize("axcodes", ["LPS", "PIL"])
def test_nibabelio_is_native_too(models, tmp_path, axcodes):
    image = _save(tmp_path / "flair.nii.gz", _case(6), _affine(axcodes))
    ours, info = _msxplain(models["NibabelIO"], image, False, tmp_path)
    assert info["input_orientation"] == "native"
    difference = float(np.abs(ours - _nnunet(models["NibabelIO"], image, "NibabelIO", False)).max())
    print(f"PARITY reader=NibabelIO mode=native stored={axcodes} tta=False max|diff|={difference:.2e}")
    assert difference <= TOLERANCE


def test_the_wrong_orientation_is_visible(models, tmp_path):
    """Sensitivity of the parity test: the RAS+ path on a SimpleITKIO model and a sagittal file is
    not nnU-Net's (what msxplain did before), and the user's override reaches the node."""
    image = _save(tmp_path / "flair.nii.gz", _case(), _affine("PIL"))
    ours, info = _msxplain(models["SimpleITKIO"], image, False, tmp_path, mode="ras")
    assert info["input_orientation"] == "ras" and info["input_orientation_reason"] == "--input-orientation"
    assert np.abs(ours - _nnunet(models["SimpleITKIO"], image, "SimpleITKIO", False)).max() > 0.1


def test_explanations_land_on_the_stored_voxels(models, tmp_path):
    """Native: the same array stored with two affines (RAS and sagittal PIL) is the same network
    input, so its saliency maps on the stored grid are identical. RAS+: the sagittal file gives
    the maps of its RAS+ copy, mapped back to the stored grid (and not the native ones)."""
    from bids_app.interfaces.explain import ExplainLesions

    data = _case()
    instances = np.zeros(SHAPE, np.int16)
    instances[10:14, 4:8, 5:8] = 1
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, _affine("PIL")))
    to_stored = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.io_orientation(_affine("PIL")))
    to_ras = nio.ornt_transform(nio.io_orientation(_affine("PIL")), nio.axcodes2ornt("RAS"))
    cases = {("RAS", "native"): (data, instances, _affine("RAS")),
             ("PIL", "native"): (data, instances, _affine("PIL")),
             ("PIL", "ras"): (data, instances, _affine("PIL")),
             ("canonical", "ras"): (np.asarray(canonical.dataobj, np.float32),
                                    nio.apply_orientation(instances, to_ras).astype(np.int16), canonical.affine)}
    maps = {}
    for (name, mode), (image, inst, affine) in cases.items():
        work = tmp_path / f"{name}-{mode}"
        work.mkdir()
        channels = _save(work / "channels.nii.gz", image[..., None], affine)
        mask = _save(work / "mask.nii.gz", (image != 0).astype(np.uint8), affine)
        inst_file = _save(work / "instances.nii.gz", inst, affine)
        (work / "lesions.json").write_text(json.dumps({"label": [1], "class_index": [1], "n_voxels": [48]}))
        node = ExplainLesions(channels_file=str(channels), channel_names=["FLAIR"], mask_file=str(mask),
                              instances_file=str(inst_file), lesions_file=str(work / "lesions.json"),
                              model_dir=str(models["SimpleITKIO"]), members=["0"], device="cpu", num_threads=2,
                              skull_stripped_input=False, input_orientation=mode,
                              explain_config={"n_samples": 2, "max_groups": 2, "margin_mm": 4.0},
                              sources=[str(channels)])
        result = node.run(cwd=str(work))
        maps[name, mode] = {Path(r["file"]).name: np.asarray(nib.load(r["file"]).dataobj)
                            for r in result.outputs.derivatives if r["key"] == "saliency"}
        assert maps[name, mode], "no saliency map written"
        for volume in maps[name, mode].values():
            assert np.abs(volume[inst > 0]).min() > 0  # every lesion voxel holds the lesion's own map
    for name, volume in maps["RAS", "native"].items():
        np.testing.assert_allclose(maps["PIL", "native"][name], volume, atol=1e-5)
        np.testing.assert_allclose(maps["PIL", "ras"][name],
                                   nio.apply_orientation(maps["canonical", "ras"][name], to_stored), atol=1e-5)
    assert any(np.abs(maps["PIL", "ras"][name] - volume).max() > 1e-3
               for name, volume in maps["PIL", "native"].items())


# --------------------------------------------------------------------------------------
# The rule: card field, plans reader, override
# --------------------------------------------------------------------------------------
def _card(**extra) -> ModelCard:
    return ModelCard.from_dict({"id": "x", "channels": [{"name": "FLAIR", "queries": [{"suffix": "FLAIR"}]}],
                                "labels": {"1": "WML"}, "members": [{"fold": "0"}], **extra})


def test_rule_follows_override_then_card_then_reader():
    plans_sitk = {"image_reader_writer": "SimpleITKIO"}
    plans_reorient = {"image_reader_writer": "NibabelIOWithReorient"}
    assert input_orientation_rule(_card(), plans_sitk, {}) == ("native", "plans.json image_reader_writer SimpleITKIO")
    assert input_orientation_rule(_card(), plans_reorient, {})[0] == "ras"
    assert input_orientation_rule(_card(), {"image_reader_writer": "NibabelIO"}, {})[0] == "native"
    assert input_orientation_rule(_card(), {}, {"overwrite_image_reader_writer": "NibabelIOWithReorient"}) == (
        "ras", "dataset.json overwrite_image_reader_writer NibabelIOWithReorient")
    assert input_orientation_rule(_card(), {}, {"overwrite_image_reader_writer": "None"}) == (
        "native", "nnU-Net's default reader for .nii.gz SimpleITKIO")
    assert input_orientation_rule(_card(input_orientation="ras"), plans_sitk, {}) == (
        "ras", "model card input_orientation")
    assert input_orientation_rule(_card(input_orientation="ras"), plans_sitk, {}, "native") == (
        "native", "--input-orientation")
    with pytest.raises(BadInputData, match="Tiff3DIO reader, which reads no NIfTI") as info:
        input_orientation_rule(_card(), {"image_reader_writer": "Tiff3DIO"}, {})
    assert info.value.exit_code == 65 and "--input-orientation" in str(info.value.hint)
    assert input_orientation_rule(_card(), {"image_reader_writer": "Tiff3DIO"}, {}, "ras")[0] == "ras"
    assert input_orientation_rule(_card(input_orientation="native"), {"image_reader_writer": "Tiff3DIO"},
                                  {})[0] == "native"
    with pytest.raises(UsageError):
        input_orientation_rule(_card(), plans_sitk, {}, "LPS")


@pytest.mark.parametrize("value", ["RAS", "LPS", "", 1, None, ["ras"]])
def test_card_field_is_validated(value):
    if value is None:  # null: the field is absent
        assert _card(input_orientation=None).input_orientation is None
        return
    with pytest.raises(BadInputData, match="'input_orientation' is .*expected \"native\" or \"ras\"") as info:
        _card(input_orientation=value)
    assert info.value.exit_code == 65


def test_inferred_card_takes_the_plans_reader(models, tmp_path):
    for reader, expected in (("SimpleITKIO", "native"), ("NibabelIOWithReorient", "ras"), ("Tiff3DIO", None)):
        trainer_dir = _write_model(tmp_path / reader, reader)
        (trainer_dir / CARD_NAME).unlink()
        card = infer_card(trainer_dir)
        assert card.get("input_orientation") == expected
        model = resolve_model(str(trainer_dir))
        if expected is None:
            with pytest.raises(BadInputData, match="reads no NIfTI"):
                resolve_input_orientation(model)
            assert resolve_input_orientation(model, "native") == ("native", "--input-orientation")
        else:
            assert resolve_input_orientation(model) == (expected, "model card input_orientation")


def test_bundled_models_keep_ras():
    """The demo model (and the tiny test model) read with NibabelIOWithReorient: unchanged outputs."""
    from bids_app.training.plans import make_plans as plans_of_tiny

    demo = resolve_model("demo")
    assert demo.card.input_orientation is None
    assert resolve_input_orientation(demo) == ("ras", "plans.json image_reader_writer NibabelIOWithReorient")
    assert input_orientation_rule(_card(), plans_of_tiny("x", 1), {})[0] == "ras"


def test_option_reaches_the_settings():
    from bids_app.cli.parser import build_parser

    parser = build_parser()
    help_text = parser.format_help()
    assert "--input-orientation" in help_text
    ns = parser.parse_args(["bids", "out", "participant", "--input-orientation", "native"])
    assert ns.input_orientation == "native"
    assert parser.parse_args(["bids", "out", "participant"]).input_orientation == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["bids", "out", "participant", "--input-orientation", "LPS"])


def test_sidecar_parameters_record_the_orientation(tmp_path):
    from bids_app.workflows.base import PipelineSettings

    settings = PipelineSettings(
        bids_dir=tmp_path, output_dir=tmp_path, trainer_dir=tmp_path, card_file=tmp_path / "card.json",
        label_indices=(1,), label_names=("WML",), label_entities=("WML",), reference_channel=0,
        skull_stripped_input=True, members=("0",),
        device="cpu", tta=False, threshold=0.5, min_lesion_size=3, connectivity=18,
        save_member_probabilities=False, omp_nthreads=1,
        network_orientation=("native", "plans.json image_reader_writer SimpleITKIO"))
    parameters = settings.parameters()
    assert parameters["NetworkInputOrientation"] == "native"
    assert parameters["NetworkInputOrientationSource"] == "plans.json image_reader_writer SimpleITKIO"
