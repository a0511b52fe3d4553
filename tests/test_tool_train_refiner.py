"""``msxplain-tools train-refiner`` end to end on hand-made saliency stores and reference masks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from bids_app.cli.tools import main as tools_main
from bids_app.core.explain import SaliencyStore
from bids_app.core.explain import refiner as R
from bids_app.formats.saliency_store import save_store

SHAPE = (40, 36, 30)
AFFINE = np.diag([1.0, 1.0, 1.2, 1.0])


def _subject(rng, n=6):
    """A store with n lesions (alternately TP and FP) and the reference mask that says so."""
    inst = np.zeros(SHAPE, np.int32)
    ref = np.zeros(SHAPE, np.uint8)
    maps, crops, bbox, is_tp = [], [], [], []
    for lab in range(1, n + 1):
        c = np.array([6 + 5 * (lab - 1), rng.integers(8, 28), rng.integers(8, 22)])
        r = rng.integers(1, 3)
        inst[tuple(slice(v - r, v + r + 1) for v in c)] = lab
        tp = lab % 2 == 1
        is_tp.append(tp)
        if tp:
            ref[tuple(c)] = 1
    for lab in range(1, n + 1):
        where = np.argwhere(inst == lab)
        lo = np.maximum(where.min(0) - 4, 0)
        hi = np.minimum(where.max(0) + 5, SHAPE)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        shape = inst[sl].shape
        m = rng.normal(size=(2, *shape)).astype(np.float32) * 0.05
        if is_tp[lab - 1]:  # a true lesion: strong, positive saliency inside, negative rim
            m[:, inst[sl] == lab] += rng.uniform(2.0, 3.0)
        else:  # a false positive: weak and diffuse
            m += rng.normal(size=(2, *shape)).astype(np.float32) * 0.5
        maps.append(m)
        crops.append(inst[sl].copy())
        bbox.append([lo, hi])
    st = SaliencyStore(shape=SHAPE, zooms=(1.0, 1.0, 1.2), labels=np.arange(1, n + 1, dtype=np.int32),
                       classes=np.ones(n, np.int32), bbox=np.asarray(bbox, np.int32),
                       maps={"smoothgrad_max": maps, "smoothgrad_mean": maps}, instances=crops,
                       channel_names=["T1w", "FLAIR"])
    return st, ref, np.array(is_tp)


def _dataset(tmp_path: Path, subjects=("01", "02", "03", "04"), reference_beside=False):
    rng = np.random.default_rng(0)
    out, refdir = tmp_path / "out", tmp_path / "ref"
    truth = {}
    for sub in subjects:
        st, ref, is_tp = _subject(rng)
        anat = out / f"sub-{sub}" / "ses-1" / "anat"
        save_store(anat / f"sub-{sub}_ses-1_desc-lesions_saliency.npz", st, affine=AFFINE)
        where = anat if reference_beside else refdir / f"sub-{sub}" / "ses-1" / "anat"
        where.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(ref, AFFINE), str(where / f"sub-{sub}_ses-1_desc-lesions_dseg.nii.gz"))
        truth[sub] = is_tp
    return out, refdir, truth


def test_train_refiner_from_stores_and_table(tmp_path, capsys):
    out, refdir, truth = _dataset(tmp_path)
    model_path = tmp_path / "refiner.json"
    table = tmp_path / "table.tsv"
    rc = tools_main(["train-refiner", str(model_path), "--inputs", str(out), "--reference-dir", str(refdir),
                     "--save-table", str(table)])
    assert rc == 0
    model = json.loads(model_path.read_text())
    assert model["format"] == "msxplain-saliency-refiner" and len(model["feature_names"]) == 93
    assert model["n_train"] == {"TP": 12, "FP": 12}
    assert model["classifier"]["class_weight"] == {"FP": 0.29, "TP": 0.71}
    assert model["map"] == "smoothgrad_max" and model["threshold"] == 0.5
    assert len(model["inputs"]["stores"]) == 4
    fit = model["training_fit"]
    assert fit["TP_kept"] + fit["FP_rejected"] >= 20  # separable on these made-up saliency patterns
    df = pd.read_csv(table, sep="\t")
    assert list(df.columns[:3]) == ["source", "label", "is_tp"] and len(df) == 24
    expected = np.concatenate([truth[s] for s in sorted(truth)]).astype(int)
    assert np.array_equal(df["is_tp"].to_numpy(), expected)
    # p_true_lesion from the saved model reproduces the training table
    p = R.predict_refiner(model, df[model["feature_names"]].to_numpy())
    assert np.mean((p >= 0.5) == expected.astype(bool)) >= 0.8
    # the table alone trains the same model
    again = tmp_path / "again.json"
    assert tools_main(["train-refiner", str(again), "--tables", str(table)]) == 0
    np.testing.assert_allclose(json.loads(again.read_text())["coef"], model["coef"], rtol=1e-6, atol=1e-9)
    assert "12 TP and 12 FP" in capsys.readouterr().out


def test_reference_beside_the_store_and_balanced(tmp_path):
    out, _, _ = _dataset(tmp_path, subjects=("01", "02"), reference_beside=True)
    model_path = tmp_path / "m.json"
    assert tools_main(["train-refiner", str(model_path), "--inputs", str(out), "--class-weight", "balanced",
                       "--threshold", "0.3"]) == 0
    model = json.loads(model_path.read_text())
    assert model["classifier"]["class_weight"] == "balanced" and model["threshold"] == 0.3


def test_errors(tmp_path, capsys):
    out, refdir, _ = _dataset(tmp_path, subjects=("01",))
    # no reference found beside the store
    assert tools_main(["train-refiner", str(tmp_path / "m.json"), "--inputs", str(out)]) == 66
    assert "No reference mask" in capsys.readouterr().err
    # nothing given
    assert tools_main(["train-refiner", str(tmp_path / "m.json")]) == 64
    # no stores under the folder
    (tmp_path / "empty").mkdir()
    assert tools_main(["train-refiner", str(tmp_path / "m.json"), "--inputs", str(tmp_path / "empty")]) == 66
    # a reference on another grid
    bad = refdir / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_desc-lesions_dseg.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), AFFINE), str(bad))
    assert tools_main(["train-refiner", str(tmp_path / "m.json"), "--inputs", str(out),
                       "--reference-dir", str(refdir)]) == 65
    assert "differs from the saliency store's grid" in capsys.readouterr().err
    # only one class
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), AFFINE), str(bad))
    assert tools_main(["train-refiner", str(tmp_path / "m.json"), "--inputs", str(out),
                       "--reference-dir", str(refdir)]) == 65
    assert not (tmp_path / "m.json").exists()
