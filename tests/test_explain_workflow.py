"""The participant level with explanations and the saliency refiner (tiny model, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_app.bids.validation import validate
from bids_app.testing import make_bids, run_cli

ANAT = "sub-01/anat"


def random_refiner(path: Path) -> Path:
    """A valid refiner fitted on random features (its predictions are what is checked)."""
    from bids_app.core.explain import refiner as R

    names = R.feature_names()
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, len(names)))
    y = X[:, 0] + 0.5 * rng.normal(size=40) > 0
    model = R.fit_refiner(X, y, names, class_weight="balanced", C=1.0, threshold=0.5)
    path.write_text(json.dumps(model))
    return path


@pytest.fixture(scope="module")
def explain_run(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    # an LAS grid: the network runs on RAS+, so the store and maps must be flipped back
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [40, -48, -40]
    bids = make_bids(root / "bids", subjects=("01",), affine=affine)
    refiner = random_refiner(root / "refiner.json")
    out, work = root / "out", root / "work"
    argv = [bids, out, "participant", "--model", tiny_model, "-w", work, "--skull-stripped", "yes", "--no-tta",
            "--nprocs", "2", "--no-lesion-features", "--explain-samples", "3", "--explain-max-lesions", "3",
            "--refiner", refiner, "--refine", "0.5"]
    code = run_cli(argv)
    return {"code": code, "bids": bids, "out": out, "work": work, "argv": argv, "refiner": refiner}


def test_explanations_are_written_with_sidecars_and_validate(explain_run):
    assert explain_run["code"] == 0
    anat = explain_run["out"] / ANAT
    names = sorted(p.name for p in anat.iterdir())
    for expected in ("sub-01_desc-lesions_saliency.npz", "sub-01_desc-lesions_saliency.json",
                     "sub-01_desc-smoothgradmaxFLAIR_saliency.nii.gz", "sub-01_desc-smoothgradmeanT1w_saliency.nii.gz",
                     "sub-01_desc-gradcampp_saliency.nii.gz", "sub-01_desc-gradcam_saliency.json",
                     "sub-01_desc-refined_dseg.nii.gz", "sub-01_desc-refined_dseg.tsv",
                     "sub-01_label-lesion_desc-refined_mask.nii.gz", "sub-01_label-lesion_desc-refined_mask.json"):
        assert expected in names, expected
    for image in anat.glob("*saliency.nii.gz"):
        sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Sources"] and sidecar["msxplain"]["Model"]["Members"]
        assert sidecar["msxplain"]["Parameters"]["Explanations"]["SmoothGradSamples"] == 3
    result = validate(explain_run["out"])
    assert result.errors == [], result.error_lines(10)


def test_store_is_on_the_input_grid_and_matches_the_maps(explain_run):
    from bids_app.formats.saliency_store import load_store

    anat = explain_run["out"] / ANAT
    store = load_store(anat / "sub-01_desc-lesions_saliency.npz")
    instances = np.asarray(nib.load(anat / "sub-01_desc-instances_dseg.nii.gz").dataobj).astype(int)
    assert store.shape == instances.shape
    sizes = np.bincount(instances.ravel())[1:]
    largest = np.sort(np.argsort(-sizes, kind="stable")[:3] + 1)
    assert list(store.labels) == list(largest)
    smax = nib.load(anat / "sub-01_desc-smoothgradmaxFLAIR_saliency.nii.gz")
    assert np.allclose(smax.affine, nib.load(anat / "sub-01_desc-instances_dseg.nii.gz").affine)
    flair = store.channel_names.index("FLAIR")
    for i, label in enumerate(store.labels):
        crop = instances[store.slices(i)]
        assert np.array_equal(crop, store.instances[i])  # the crop geometry is right after the flip back
        inside = crop == label
        assert inside.any()
        stored = store.maps["smoothgrad_max"][i][flair]
        # the store keeps float16 of each crop scaled to [-1, 1] (docs/explain.md): 2**-11 relative
        np.testing.assert_allclose(np.asarray(smax.dataobj)[store.slices(i)][inside], stored[inside], rtol=0,
                                   atol=float(np.abs(stored).max()) * 2.0 ** -10)


def test_lesion_table_has_saliency_and_refiner_columns(explain_run):
    from bids_app.core.explain import refiner as R
    from bids_app.formats.saliency_store import load_store

    anat = explain_run["out"] / ANAT
    table = pd.read_csv(anat / "sub-01_lesions.tsv", sep="\t", na_values=["n/a"])
    dictionary = json.loads((anat / "sub-01_lesions.json").read_text())
    for column in ("explained", "smoothgrad_max_FLAIR_peak_in", "smoothgrad_mean_T1w_rim_ratio",
                   "gradcampp_mass_in", "p_true_lesion", "refined_keep"):
        assert column in table.columns and column in dictionary, column
    store = load_store(anat / "sub-01_desc-lesions_saliency.npz")
    assert table["explained"].sum() == store.n_lesions == min(3, len(table))
    # p_true_lesion is the refiner applied to the radiomics of the written store
    refiner = json.loads(explain_run["refiner"].read_text())
    features, names = R.saliency_features(store, "smoothgrad_max", None)
    expected = R.predict_refiner(refiner, features, names)
    rows = table.set_index("label").loc[store.labels]
    np.testing.assert_allclose(rows["p_true_lesion"].to_numpy(), expected, rtol=1e-6)
    assert table.loc[table["explained"] == 0, "p_true_lesion"].isna().all()
    keep = table["p_true_lesion"].isna() | (table["p_true_lesion"] >= 0.5)
    assert (table["refined_keep"] == keep.astype(int)).all()


def test_refined_segmentation_drops_exactly_the_rejected_lesions(explain_run):
    anat = explain_run["out"] / ANAT
    table = pd.read_csv(anat / "sub-01_lesions.tsv", sep="\t", na_values=["n/a"])
    instances = np.asarray(nib.load(anat / "sub-01_desc-instances_dseg.nii.gz").dataobj).astype(int)
    dseg = np.asarray(nib.load(anat / "sub-01_desc-lesions_dseg.nii.gz").dataobj)
    refined = np.asarray(nib.load(anat / "sub-01_desc-refined_dseg.nii.gz").dataobj)
    dropped = table.loc[table["refined_keep"] == 0, "label"].to_numpy()
    expected = np.where(np.isin(instances, dropped), 0, dseg)
    assert np.array_equal(refined, expected)
    sidecar = json.loads((anat / "sub-01_desc-refined_dseg.json").read_text())
    assert sidecar["RefinementThreshold"] == 0.5 and sorted(sidecar["DroppedLabels"]) == sorted(dropped.tolist())
    summary = json.loads((anat / "sub-01_summary.json").read_text())
    assert summary["refinement"]["n_dropped"] == len(dropped)
    assert summary["explanations"]["n_explained"] == int(table["explained"].sum())


def test_changing_the_refine_threshold_does_not_recompute_the_saliency(explain_run):
    from bids_app.formats.saliency_store import load_store

    anat = explain_run["out"] / ANAT
    store_file = anat / "sub-01_desc-lesions_saliency.npz"
    before = store_file.read_bytes()
    explain_node = next(explain_run["work"].rglob("explain/result_explain.pklz"))
    mtime = explain_node.stat().st_mtime_ns
    argv = list(explain_run["argv"])
    argv[argv.index("--refine") + 1] = "0.99"
    assert run_cli(argv) == 0
    assert explain_node.stat().st_mtime_ns == mtime  # cached
    assert store_file.read_bytes() == before
    table = pd.read_csv(anat / "sub-01_lesions.tsv", sep="\t", na_values=["n/a"])
    keep = table["p_true_lesion"].isna() | (table["p_true_lesion"] >= 0.99)
    assert (table["refined_keep"] == keep.astype(int)).all()
    assert load_store(store_file).n_lesions == int(table["explained"].sum())


def test_refine_without_a_refiner_is_a_usage_error(tiny_model, tmp_path):
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    code = run_cli([bids, tmp_path / "out", "participant", "--model", tiny_model, "-w", tmp_path / "work",
                    "--refine", "--skip-bids-validation"])
    assert code == 64
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


def test_a_refiner_file_that_is_not_a_refiner_is_refused(tiny_model, tmp_path):
    bids = make_bids(tmp_path / "bids", subjects=("01",))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    code = run_cli([bids, tmp_path / "out", "participant", "--model", tiny_model, "-w", tmp_path / "work",
                    "--explain", "--refiner", bad, "--skip-bids-validation"])
    assert code == 65
