"""Tests of bids_app.core.uncertainty: reference values, analytic cases, the per-lesion-loop
oracle (benchmarks/bench_uncertainty.py, written like the reference code) and purity."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bids_app.core import uncertainty as U
from bids_app.core.postprocess import lesion_geometry, segment_lesions

EPS = 1e-5  # structural ε
ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_uncertainty", ROOT / "benchmarks" / "bench_uncertainty.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readonly(*arrays):
    out = []
    for a in arrays:
        a = np.array(a, copy=True)
        a.flags.writeable = False
        out.append(a)
    return out


# --------------------------------------------------------------------------------------------
# voxel measures
# --------------------------------------------------------------------------------------------

def test_reference_single_voxel_values():
    """§2.10: M = 3, p = [0.9, 0.6, 0.3] (authors' functions)."""
    probs = U.binary_member_probs(np.array([0.9, 0.6, 0.3]).reshape(3, 1, 1, 1), dtype=np.float64)
    maps = U.voxel_uncertainty(probs, dtype=np.float64)
    expected = {"NC": -0.6, "EoE": 0.673012, "ExE": 0.536320, "MI": 0.136692, "EPKL": 0.304452, "RMI": 0.167760}
    assert list(maps) == list(U.VOXEL_MEASURES)
    for name, value in expected.items():
        assert maps[name].shape == (1, 1, 1)
        assert maps[name].item() == pytest.approx(value, abs=5e-7), name


def test_uniform_members_give_ln2_and_zero_epistemic():
    probs = U.binary_member_probs(np.full((3, 1, 1, 1), 0.5), dtype=np.float64)
    maps = U.voxel_uncertainty(probs, dtype=np.float64)
    assert maps["EoE"].item() == pytest.approx(math.log(2), abs=1e-9)
    assert maps["ExE"].item() == pytest.approx(math.log(2), abs=1e-9)
    for name in ("MI", "EPKL", "RMI"):
        assert maps[name].item() == 0.0


def test_identical_members_multiclass_are_exactly_zero():
    rng = np.random.default_rng(0)
    one = rng.dirichlet([1, 1, 1], size=(6, 5, 4)).transpose(3, 0, 1, 2)  # (C, X, Y, Z)
    probs = np.repeat(one[None], 4, axis=0)
    maps = U.voxel_uncertainty(probs, dtype=np.float64)
    for name in ("MI", "EPKL", "RMI"):
        assert np.all(maps[name] == 0.0), name
    np.testing.assert_allclose(maps["EoE"], maps["ExE"], atol=1e-12)


def _brute_voxel(p, eps=1e-10):
    """Per-voxel loop over the §2.3 formulas (C classes)."""
    m, c = p.shape[:2]
    flat = p.reshape(m, c, -1)
    out = {k: np.zeros(flat.shape[2]) for k in U.VOXEL_MEASURES}
    for v in range(flat.shape[2]):
        q = flat[:, :, v]
        pbar = q.mean(0)
        eoe = -sum(pbar[k] * math.log(pbar[k] + eps) for k in range(c))
        exe = np.mean([-sum(q[i, k] * math.log(q[i, k] + eps) for k in range(c)) for i in range(m)])
        epkl = -sum(pbar[k] * np.mean([math.log(q[i, k] + eps) for i in range(m)]) for k in range(c)) - exe
        vals = {"NC": -pbar.max(), "EoE": eoe, "ExE": exe, "MI": eoe - exe, "EPKL": epkl, "RMI": epkl - (eoe - exe)}
        for k in vals:
            out[k][v] = vals[k]
    return {k: v.reshape(p.shape[2:]) for k, v in out.items()}


def test_multiclass_voxel_measures_match_brute_force_and_blocks(monkeypatch):
    rng = np.random.default_rng(1)
    p = rng.dirichlet([0.5, 0.5, 0.5], size=(4, 7, 5, 3)).transpose(0, 4, 1, 2, 3)  # (M, C, X, Y, Z)
    expected = _brute_voxel(p)
    monkeypatch.setattr(U.voxel, "_BLOCK_VOXELS", 16)  # several blocks along X, partial last block
    got = U.voxel_uncertainty(p, dtype=np.float64)
    for name in U.VOXEL_MEASURES:
        np.testing.assert_allclose(got[name], np.maximum(expected[name], 0) if name in ("MI", "EPKL", "RMI")
                                   else expected[name], atol=1e-12, err_msg=name)
    sub = U.voxel_uncertainty(p, measures=["RMI", "NC"])
    assert list(sub) == ["RMI", "NC"] and sub["RMI"].dtype == np.float32


def test_binary_layout_equals_two_class_input():
    rng = np.random.default_rng(2)
    lesion = rng.uniform(size=(3, 4, 4, 4))
    stacked = U.binary_member_probs(lesion, dtype=np.float64)
    assert stacked.shape == (3, 2, 4, 4, 4)
    np.testing.assert_array_equal(stacked[:, 1], lesion)
    np.testing.assert_allclose(stacked.sum(axis=1), 1.0)


@pytest.mark.parametrize("bad", [np.nan, -0.1, 1.5])
def test_out_of_range_probabilities_are_refused(bad):
    probs = U.binary_member_probs(np.full((2, 3, 3, 3), 0.5))
    probs[0, 1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        U.voxel_uncertainty(probs)
    with pytest.raises(ValueError, match="shape"):
        U.voxel_uncertainty(probs[0])


# --------------------------------------------------------------------------------------------
# analytic lesion cases
# --------------------------------------------------------------------------------------------

def _two_lesion_case():
    """M = 3; lesion A (8 voxels) seen identically by all, lesion B (4 voxels) by member 0 only."""
    lesion = np.zeros((3, 12, 8, 8))
    lesion[:, 1:3, 1:3, 1:3] = 0.9  # A
    lesion[0, 7:9, 4:6, 4] = 0.9  # B, only member 0 (mean 0.3)
    return U.binary_member_probs(lesion, dtype=np.float64)


def test_lesion_seen_by_one_member_and_identical_lesion():
    probs = _two_lesion_case()
    seg = U.ensemble_segmentation(probs, 0.25, 1, 26)
    assert seg.n_lesions == 2
    table = U.lesion_uncertainty(probs, seg, 0.25, 1, 26)
    assert list(table.columns[:3]) == ["label", "class", "n_members_matched"]
    assert "LSU+" not in table.columns and "logsum_NC" not in table.columns
    a, b = table.iloc[0], table.iloc[1]
    size_a, size_b = 8, 4
    # A: all members agree exactly
    assert a["n_members_matched"] == 3
    for col in ("LSU", "ddu_adj", "vvc"):
        assert a[col] == 0.0, col
    assert a["ddu_fast"] == pytest.approx(1 - (size_a / (size_a + size_b) + 1 + 1) / 3)
    assert a["avg_pwdice"] == 1.0 and a["global_iou"] == 1.0
    assert a["srmi"] == pytest.approx(0.0, abs=1e-12) and a["smi"] == pytest.approx(0.0, abs=1e-12)
    assert a["mean_MI"] == 0.0 and a["logsum_MI"] == -np.inf  # MI = 0 exactly -> ln 0 = -inf (documented)
    assert a["seoe"] == pytest.approx(-(0.9 ** 3) * math.log(0.9 ** 3))
    # B: one member of three
    assert b["n_members_matched"] == 1
    assert b["LSU"] == pytest.approx(2 / 3)
    assert b["ddu_adj"] == pytest.approx(2 / 3)  # member 0: K' = B, Q ∩ K' = ∅ -> IoU_adj = 1
    assert b["ddu_fast"] == pytest.approx(1 - (size_b / (size_a + size_b)) / 3)
    assert b["vvc"] == pytest.approx(math.sqrt(2))  # std([s,0,0]) / mean = sqrt(2)
    assert b["avg_pwdice"] == pytest.approx(1 / 3)  # pairs (1,0), (2,0) -> 0; (2,1) both empty -> 1
    assert b["global_iou"] == 0.0
    assert np.isnan(b["seoe"])  # P = 0.9 * 0 * 0 = 0 -> -0 ln 0 = NaN (reference; documented)
    assert b["smi"] == pytest.approx(-(math.log(0.3 + EPS) - math.log(0.9 + EPS)) / 3)
    assert b["srmi"] == pytest.approx(math.log(0.3 + EPS) - (math.log(0.9 + EPS) + 2 * math.log(EPS)) / 3)
    # patient: member 0 = ensemble, members 1, 2 = A only
    pat = U.patient_uncertainty(probs, seg, 0.25, 1, 26, lesion_table=table)
    assert pat["PSU"] == pytest.approx(1 - (1 + 2 * size_a / (size_a + size_b)) / 3)
    assert pat["n_nonfinite_seoe"] == 1 and pat["avg_seoe"] == pytest.approx(a["seoe"])
    assert pat["n_nonfinite_logsum_MI"] == 1
    assert pat["avg_LSU"] == pytest.approx((0 + 2 / 3) / 2)
    assert pat["avg_scaled_LSU"] == pytest.approx(0.5)  # scaled to [0, 1] within the scan
    assert pat["brain_mask_given"] is False


def test_no_lesion_member_vvc_and_global_iou_nan():
    """An ensemble lesion no member reproduces (min size removes the members' pieces)."""
    lesion = np.zeros((2, 10, 6, 6))
    lesion[0, 2:4, 2, 2] = 0.8  # member 0: voxels x = 2, 3
    lesion[1, 4:6, 2, 2] = 0.8  # member 1: voxels x = 4, 5
    lesion[:, 2:6, 2, 2] += 0.1  # ensemble mean >= 0.4 on x = 2..5 (4 voxels); members see 2 voxels each
    probs = U.binary_member_probs(np.clip(lesion, 0, 1), dtype=np.float64)
    seg = U.ensemble_segmentation(probs, 0.4, 3, 6)
    assert seg.n_lesions == 1
    table = U.lesion_uncertainty(probs, seg, 0.4, 3, 6)
    row = table.iloc[0]
    assert row["n_members_matched"] == 0 and row["LSU"] == 1.0 and row["ddu_adj"] == 1.0
    assert np.isnan(row["vvc"]) and np.isnan(row["global_iou"])
    assert row["avg_pwdice"] == 1.0  # both members empty
    assert row["smi"] == 0.0


def test_matching_tie_takes_smallest_member_label():
    """L (5 voxels) meets two member-0 lesions with IoU 2/5 each: the first label is matched."""
    lesion = np.zeros((2, 7, 3, 3))
    lesion[0, 0:2, 1, 1] = 0.9
    lesion[0, 3:5, 1, 1] = 0.6
    lesion[1, 0:5, 1, 1] = 0.9
    probs = U.binary_member_probs(lesion, dtype=np.float64)
    seg = U.ensemble_segmentation(probs, 0.4, 1, 6)
    assert seg.n_lesions == 1 and seg.instances.sum() == 5
    row = U.lesion_uncertainty(probs, seg, 0.4, 1, 6).iloc[0]
    assert row["LSU"] == pytest.approx(1 - (2 / 5 + 1) / 2)
    pbar = probs[:, 1, 0:5, 1, 1].mean(axis=0)
    member1 = np.mean(np.log(pbar + EPS) - np.log(0.9 + EPS))
    member0_first = 0.0  # on voxels 0, 1: pbar = 0.9 = p_0
    assert row["smi"] == pytest.approx(-(member0_first + member1) / 2)
    # IoU_adj of member 0 sums both pieces: 4 / 5
    assert row["ddu_adj"] == pytest.approx(1 - (4 / 5 + 1) / 2)


def test_empty_prediction():
    probs = U.binary_member_probs(np.full((3, 6, 6, 6), 0.1), dtype=np.float64)
    seg = U.ensemble_segmentation(probs, 0.5, 1, 18)
    assert seg.n_lesions == 0
    table = U.lesion_uncertainty(probs, seg, 0.5, 1, 18, member_thresholds=[0.05, 0.5, 0.5])
    assert len(table) == 0 and "LSU+" in table.columns and "logsum_RMI" in table.columns
    pat = U.patient_uncertainty(probs, seg, 0.5, 1, 18, lesion_table=table, member_thresholds=[0.05, 0.5, 0.5])
    assert pat["n_lesions"] == 0
    assert pat["PSU"] == 0.0  # IoU(∅, ∅) = 1: ensemble and members agree there is no lesion
    assert pat["PSU+"] == pytest.approx(1 - (0 + 1 + 1) / 3)  # member 0 at 0.05 segments everything
    assert np.isnan(pat["avg_LSU"]) and pat["n_nonfinite_LSU"] == 0
    geo = pd.DataFrame(lesion_geometry(seg.instances, 0, np.eye(4)))
    assert len(geo) == 0 and geo.columns[0] == "label"


def test_member_thresholds_add_plus_variants():
    probs = _two_lesion_case()
    seg = U.ensemble_segmentation(probs, 0.25, 1, 26)
    table = U.lesion_uncertainty(probs, seg, 0.25, 1, 26, member_thresholds=[0.95, 0.5, 0.5])
    # member 0 sees nothing at 0.95; members 1, 2 see A exactly
    assert table["LSU+"].tolist() == pytest.approx([1 / 3, 1.0])
    assert table["LSU"].tolist() == pytest.approx([0.0, 2 / 3])
    with pytest.raises(ValueError, match="one entry per member"):
        U.lesion_uncertainty(probs, seg, 0.25, 1, 26, member_thresholds=[0.5, 0.5])


def test_multiclass_lesion_measures_equal_binary_on_class_probability():
    """Separate WML (1) and CL (2) lesions: class-c measures = binary measures on p[c]."""
    rng = np.random.default_rng(3)
    m, shape = 3, (16, 12, 10)
    cls = np.zeros((m, 3) + shape)
    for k in range(m):
        cls[k, 1, 2:5, 2:5, 2:5] = rng.uniform(0.5, 0.9, (3, 3, 3))
        cls[k, 1, 2:4, 7:9, 2:4] = rng.uniform(0.3, 0.9, (2, 2, 2))
        cls[k, 2, 10:13, 3:6, 5:8] = rng.uniform(0.4, 0.9, (3, 3, 3))
        cls[k, 2, 10 + k % 2:12 + k % 2, 8:10, 6:8] = 0.8
    cls[:, 0] = 1 - cls[:, 1] - cls[:, 2]
    seg = U.ensemble_segmentation(cls, 0.5, 2, 18)
    table = U.lesion_uncertainty(cls, seg, 0.5, 2, 18)
    structural = [c for c in U.STRUCTURAL_MEASURES if c in table.columns]
    assert set(table["class"]) == {1, 2}
    for c in (1, 2):
        binary = U.binary_member_probs(cls[:, c], dtype=np.float64)
        seg_c = U.ensemble_segmentation(binary, 0.5, 2, 18)
        table_c = U.lesion_uncertainty(binary, seg_c, 0.5, 2, 18)
        ours = table[table["class"] == c]
        assert len(ours) == len(table_c) > 0
        np.testing.assert_allclose(ours[structural].to_numpy(dtype=float), table_c[structural].to_numpy(dtype=float),
                                   atol=1e-12, err_msg=f"class {c}")
    pat = U.patient_uncertainty(cls, seg, 0.5, 2, 18, lesion_table=table)
    assert {"PSU[1]", "PSU[2]", "n_lesions[1]", "n_lesions[2]"} <= set(pat)


# --------------------------------------------------------------------------------------------
# the per-lesion-loop oracle
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,connectivity", [(0, 18), (1, 6), (2, 26)])
def test_matches_reference_style_loop(seed, connectivity):
    bench = _bench()
    probs, brain = bench.synthetic_ensemble((40, 44, 36), n_members=4, n_lesions=14, seed=seed)
    probs = probs.astype(np.float64)
    thr, min_size, plus = 0.5, 3, [0.45, 0.55, 0.5, 0.4]
    seg = U.ensemble_segmentation(probs, thr, min_size, connectivity)
    assert seg.n_lesions >= 5
    vox = U.voxel_uncertainty(probs, dtype=np.float64)
    table = U.lesion_uncertainty(probs, seg, thr, min_size, connectivity, member_thresholds=plus, voxel_maps=vox)
    segs = U.member_segmentations(probs, thr, min_size, connectivity)
    segs_plus = U.member_segmentations(probs, plus, min_size, connectivity)
    rows = bench.naive_lesion_uncertainty(seg.instances, vox, np.stack([s.instances for s in segs]),
                                          np.stack([s.instances for s in segs_plus]), probs[:, 1])
    naive = pd.DataFrame(rows)
    assert naive["label"].tolist() == table["label"].tolist()
    for col in naive.columns:
        np.testing.assert_allclose(table[col].to_numpy(dtype=float), naive[col].to_numpy(dtype=float),
                                   rtol=1e-9, atol=1e-9, err_msg=col)
    # same values when the voxel measures are computed at the lesion voxels only
    table2 = U.lesion_uncertainty(probs, seg, thr, min_size, connectivity, member_thresholds=plus)
    pd.testing.assert_frame_equal(table, table2, rtol=1e-9, atol=1e-12)
    # patient: PSU / PSU+ and the reference whole-volume voxel aggregates
    pat = U.patient_uncertainty(probs, seg, thr, min_size, connectivity, lesion_table=table, member_thresholds=plus,
                                brain_mask=brain, voxel_maps=vox)
    ref = bench.naive_patient((seg.instances > 0).astype(float), [(s.instances > 0).astype(float) for s in segs],
                              [(s.instances > 0).astype(float) for s in segs_plus], vox, brain)
    assert pat["PSU"] == pytest.approx(ref["PSU"]) and pat["PSU+"] == pytest.approx(ref["PSU+"])
    for name in U.VOXEL_MEASURES:
        assert pat[f"avg_{name}_wholevolume_ref"] == pytest.approx(ref[f"avg. {name}"], rel=1e-9)
        assert pat[f"avg_scaled_{name}_wholevolume_ref"] == pytest.approx(ref[f"avg. scaled {name}"], rel=1e-9)
        assert pat[f"avg_{name}"] == pytest.approx(vox[name][brain].mean(), rel=1e-9)


def test_a_segmentation_read_back_gives_the_same_result():
    """The workflow segments once (PostProcess) and hands the maps to the uncertainty node:
    rebuilding the segmentation from its two maps gives exactly the results of segmenting again."""
    from bids_app.core.postprocess import segmentation_from_maps

    bench = _bench()
    probs, brain = bench.synthetic_ensemble((30, 34, 28), n_members=3, n_lesions=8, seed=5)
    settings = {"threshold": 0.4, "min_size": 2, "connectivity": 26, "brain_mask": brain}
    fresh = U.compute_uncertainty(probs, **settings)
    seg = U.ensemble_segmentation(probs, 0.4, 2, 26)
    assert seg.n_lesions > 3
    again = U.compute_uncertainty(probs, **settings,
                                  segmentation=segmentation_from_maps(seg.dseg.copy(), seg.instances.copy()))
    pd.testing.assert_frame_equal(fresh.lesions, again.lesions)
    assert fresh.patient == again.patient
    with pytest.raises(ValueError, match="does not match"):
        U.compute_uncertainty(probs, **settings, segmentation=segmentation_from_maps(seg.dseg[:-1], seg.instances[:-1]))


def test_compute_uncertainty_bundles_all_stages():
    bench = _bench()
    probs, brain = bench.synthetic_ensemble((30, 34, 28), n_members=3, n_lesions=8, seed=4)
    affine = np.diag([0.9, 1.1, 1.2, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    res = U.compute_uncertainty(probs, threshold=0.5, min_size=3, connectivity=18, brain_mask=brain, affine=affine,
                                member_thresholds=[0.5, 0.45, 0.55])
    les = res.lesions
    assert list(les.columns[:2]) == ["label", "class"] and les["label"].tolist() == list(range(1, len(les) + 1))
    assert {"centroid_x_mm", "volume_mm3", "LSU+", "logsum_EPKL"} <= set(les.columns)
    np.testing.assert_allclose(les["volume_mm3"], les["n_voxels"] * 0.9 * 1.1 * 1.2)
    first = np.argwhere(res.segmentation.instances == 1).mean(axis=0)
    centroid = les.loc[0, ["centroid_x_vox", "centroid_y_vox", "centroid_z_vox"]].to_numpy(float)
    np.testing.assert_allclose(centroid, first)
    np.testing.assert_allclose(les.loc[0, ["centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]].to_numpy(float),
                               affine[:3, :3] @ first + affine[:3, 3])
    assert res.parameters["connectivity"] == 18 and res.parameters["min_lesion_size_voxels"] == 3
    assert res.parameters["eps_voxel"] == 1e-10 and res.parameters["eps_struct"] == 1e-5
    assert res.patient["brain_mask_given"] is True and "PSU+" in res.patient
    assert set(res.voxel_maps) == set(U.VOXEL_MEASURES) and res.voxel_maps["MI"].dtype == np.float32
    painted = U.paint_lesions(res.segmentation.instances, les["LSU"].to_numpy())
    assert painted[res.segmentation.instances == 0].max() == 0
    np.testing.assert_allclose(painted[res.segmentation.instances == 2], les.loc[1, "LSU"], rtol=1e-6)
    # reference segmentation helper gives the same lesions
    ref = segment_lesions(probs.mean(axis=0, dtype=np.float64), [1], 0.5, 3, 18)
    np.testing.assert_array_equal(ref.instances, res.segmentation.instances)


# --------------------------------------------------------------------------------------------
# purity: inputs are never modified
# --------------------------------------------------------------------------------------------

def test_functions_do_not_modify_inputs():
    probs = _two_lesion_case()
    (ro_probs,) = _readonly(probs)
    brain = np.ones(probs.shape[2:], dtype=bool)
    (ro_brain,) = _readonly(brain)
    lesion = probs[:, 1].copy()
    (ro_lesion,) = _readonly(lesion)
    U.binary_member_probs(ro_lesion)
    vox = U.voxel_uncertainty(ro_probs)
    ro_vox = dict(zip(vox, _readonly(*vox.values())))
    seg = U.ensemble_segmentation(ro_probs, 0.25, 1, 26)
    inst_before = seg.instances.copy()
    segs = U.member_segmentations(ro_probs, 0.25, 1, 26)
    table = U.lesion_uncertainty(ro_probs, seg, 0.25, 1, 26, voxel_maps=ro_vox, member_segs=segs,
                                 member_thresholds=[0.3, 0.3, 0.3])
    table_copy = table.copy()
    U.patient_uncertainty(ro_probs, seg, 0.25, 1, 26, lesion_table=table, brain_mask=ro_brain, voxel_maps=ro_vox,
                          member_segs=segs)
    (ro_inst,) = _readonly(seg.instances)
    lesion_geometry(ro_inst, seg.n_lesions, np.eye(4))
    U.paint_lesions(ro_inst, table["LSU"].to_numpy())
    U.compute_uncertainty(ro_probs, threshold=0.25, min_size=1, connectivity=26, brain_mask=ro_brain)
    np.testing.assert_array_equal(ro_probs, probs)
    np.testing.assert_array_equal(seg.instances, inst_before)
    pd.testing.assert_frame_equal(table, table_copy)


def test_lesion_types_line_up_with_the_lesion_table():
    """Evaluation on the ensemble's own labels gives one type per table row (lesion retention)."""
    from bids_app.core.metrics.detection import classify_lesions
    from bids_app.core.metrics.retention import lesion_retention_curve

    bench = _bench()
    probs, _ = bench.synthetic_ensemble((30, 34, 28), n_members=3, n_lesions=10, seed=5)
    res = U.compute_uncertainty(probs, threshold=0.5, min_size=3, connectivity=18)
    ref = res.segmentation.instances > 0
    ref[:, :, : ref.shape[2] // 2] = False  # drop half of the lesions from the "reference"
    types = classify_lesions(None, ref, "iou_adj", 0.1, 18, pred_instances=res.segmentation.instances)
    assert types.pred_type.size == len(res.lesions)
    curve = lesion_retention_curve(types.pred_type, res.lesions["LSU"].to_numpy(), types.counts["FNL"], "LF1")
    assert 0.0 <= curve.auc <= 1.0 and curve.aac == pytest.approx(1 - curve.auc)


def test_ensemble_mean_of_logits_is_nnunets_mean_of_logits():
    """softmax(mean_m log p_m) == softmax(mean_m z_m): the per-voxel logsumexp cancels."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 4.0, (4, 3, 5, 6, 7))
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = (np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)).astype(np.float32)
    mean_logits = logits.mean(axis=0)
    expected = np.exp(mean_logits - mean_logits.max(axis=0)) / np.exp(mean_logits - mean_logits.max(axis=0)).sum(0)
    got = U.ensemble_mean(probs, "logits")
    assert got.dtype == np.float64 and got.shape == (3, 5, 6, 7)
    assert np.abs(got - expected).max() < 1e-6
    assert np.allclose(got.sum(axis=0), 1.0)
    assert np.array_equal(U.ensemble_mean(probs), probs.mean(axis=0, dtype=np.float64))
    # the two means differ (a geometric mean weighs a confident member more than an arithmetic one)
    assert np.abs(got - U.ensemble_mean(probs)).max() > 0.05


def test_ensemble_mean_of_logits_survives_zero_probabilities():
    probs = np.zeros((2, 2, 1, 1, 2), np.float32)
    probs[:, 0, 0, 0, 0] = 1.0  # both members: background, lesion underflowed to exactly 0
    probs[0, 1, 0, 0, 1], probs[1, 1, 0, 0, 1] = 1.0, 1.0
    got = U.ensemble_mean(probs, "logits")
    assert np.isfinite(got).all() and got[0, 0, 0, 0] == 1.0 and got[1, 0, 0, 1] == 1.0
    with pytest.raises(ValueError, match="mean must be one of"):
        U.ensemble_mean(probs, "median")
    seg = U.ensemble_segmentation(probs, 0.5, 1, 26, mean="logits")
    assert seg.n_lesions == 1
