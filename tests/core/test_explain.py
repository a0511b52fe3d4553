"""Instance saliency (bids_app.core.explain) and its store (bids_app.formats.saliency_store)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_app.core import explain as E
from bids_app.core.explain import crops as explain_crops
from bids_app.core.explain import network as explain_network
from bids_app.testing import make_case

torch.set_num_threads(2)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

class SmallNet(torch.nn.Module):
    """Conv -> InstanceNorm -> LeakyReLU (inplace) -> Conv -> LeakyReLU -> 1x1 head, 3 classes."""

    def __init__(self, seed=0, k=2):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = torch.nn.Sequential(
            torch.nn.Conv3d(k, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True),
            torch.nn.LeakyReLU(0.01, inplace=True), torch.nn.Conv3d(4, 4, 3, padding=1),
            torch.nn.LeakyReLU(0.01, inplace=True))
        self.head = torch.nn.Conv3d(4, 3, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.head(self.body(x))


def _blob_case(shape=(12, 14, 10), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(size=(2, *shape))
    lesions = np.zeros(shape, np.int32)
    lesions[4:7, 5:8, 3:6] = 1
    lesions[9:11, 2:4, 6:8] = 2
    data[1][lesions > 0] += 2.0
    return data, lesions


def _score(net, x, mask, cls):
    return (net(x)[0, cls] * mask).sum()


def _fd_grad(net, x, mask, cls, points, h=1e-5):
    out = []
    for c, i, j, k in points:
        xp, xm = x.clone(), x.clone()
        xp[0, c, i, j, k] += h
        xm[0, c, i, j, k] -= h
        with torch.no_grad():
            out.append(float((_score(net, xp, mask, cls) - _score(net, xm, mask, cls)) / (2 * h)))
    return np.array(out)


def _points(shape, rng, n=10):
    return [(int(rng.integers(2)), *[int(rng.integers(s)) for s in shape]) for _ in range(n)]


def _r(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _predictor(trainer_dir, folds=("0", "1", "2")):
    from bids_app.model.ensemble import load_ensemble
    from bids_app.model.resolve import resolve_model

    return load_ensemble(resolve_model(str(trainer_dir)), list(folds), tta=False, num_threads=2).predictor


@pytest.fixture(scope="module")
def tiny_case(tiny_model):
    """The tiny ensemble, a synthetic case, its segmentation and its explanations in crop and full mode."""
    from bids_app.core.postprocess import segment_lesions

    predictor = _predictor(tiny_model)
    image, _ = make_case(3, shape=(40, 48, 40))
    probs = predictor.predict(image, (2.0, 2.0, 2.0))
    seg = segment_lesions(probs.mean(0), [1, 2], 0.5, min_size=20, connectivity=18)
    assert seg.n_lesions >= 2
    cfg = dict(n_samples=2, max_groups=2, seed=1)
    crop = E.explain_case(predictor, image, (2.0, 2.0, 2.0), seg.instances, seg.instance_class,
                          E.ExplainConfig(mode="crop", **cfg), channel_names=["T1w", "FLAIR"])
    full = E.explain_case(predictor, image, (2.0, 2.0, 2.0), seg.instances, seg.instance_class,
                          E.ExplainConfig(mode="full", **cfg), channel_names=["T1w", "FLAIR"])
    return {"predictor": predictor, "image": image, "seg": seg, "crop": crop, "full": full}


# ------------------------------------------------------------------------------------------
# gradients against finite differences
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_stats", ["live", "window"])
def test_smallnet_gradient_matches_finite_differences(norm_stats):
    data, lesions = _blob_case()
    net = SmallNet().double()
    cfg = E.ExplainConfig(n_samples=1, noise_level=0.0, methods=("smoothgrad",), mode="full", norm_stats=norm_stats,
                          max_groups=1, dtype="float64")
    res = E.explain_network_space([net], data, lesions, {1: 1, 2: 2}, cfg, patch_size=data.shape[1:])
    rng = np.random.default_rng(1)
    for r in res:
        assert [lo for lo, _ in r.box] == [0, 0, 0]  # stride 1: the box starts at the volume
        ref_net = E.prepare_networks([net], torch.device("cpu"), torch.float64)[0]
        x = torch.from_numpy(data)[None].double()
        if norm_stats == "window":
            ref_net._msx_norms[0].mode = "record"
            with torch.no_grad():
                ref_net(x)
            explain_network.set_norm_mode(ref_net._msx_norms, "frozen", [n.recorded for n in ref_net._msx_norms])
        mask = torch.from_numpy(lesions == r.label).double()
        pts = _points(lesions.shape, rng)
        pts += [(1, *map(int, np.argwhere(lesions == r.label)[0]))]
        fd = _fd_grad(ref_net, x, mask, r.lesion_class, pts)
        sl = [tuple(p[j + 1] - r.box[j][0] for j in range(3)) for p in pts]
        ours = np.array([r.maps["smoothgrad_mean"][p[0]][s] for p, s in zip(pts, sl)])
        np.testing.assert_allclose(ours, fd, rtol=1e-5, atol=1e-7)
        # with one group the max aggregation is the plain gradient
        np.testing.assert_allclose(r.maps["smoothgrad_max"], r.maps["smoothgrad_mean"])


def test_frozen_statistics_reproduce_live_logits_on_the_window():
    data, lesions = _blob_case()
    net = E.prepare_networks([SmallNet().double()], torch.device("cpu"), torch.float64)[0]
    x = torch.from_numpy(data)[None]
    window = {1: [(0, s) for s in lesions.shape]}
    stats = explain_crops.record_window_stats([net], torch.from_numpy(data), window, 1 << 20, 4)
    with torch.no_grad():
        live = net(x)
        explain_network.set_norm_mode(net._msx_norms, "frozen", [(m[None], v[None]) for m, v in stats[0][1]])
        frozen = net(x)
    explain_network.set_norm_mode(net._msx_norms, "live")
    torch.testing.assert_close(live, frozen)


def test_a_subset_of_lesions_is_explained_alone():
    data, lesions = _blob_case()
    lesions = lesions.copy()
    lesions[1:3, 10:12, 1:3] = 3
    cfg = E.ExplainConfig(n_samples=1, noise_level=0.0, methods=("smoothgrad",), max_groups=1, margin_mm=2)
    (res,) = E.explain_network_space([SmallNet()], data, lesions, {1: 1}, cfg)
    assert res.label == 1 and res.n_voxels == int((lesions == 1).sum())
    both = E.explain_network_space([SmallNet()], data, lesions, {1: 1, 3: 2}, cfg)
    assert [r.n_voxels for r in both] == [int((lesions == 1).sum()), int((lesions == 3).sum())]
    np.testing.assert_allclose(both[0].maps["smoothgrad_mean"], res.maps["smoothgrad_mean"], rtol=1e-5, atol=1e-7)


def test_max_aggregation_is_exact_for_small_lesions():
    """max |.| over per-voxel gradients (sign kept) == a brute-force loop over lesion voxels."""
    data, lesions = _blob_case()
    net = SmallNet(seed=3).double()
    cfg = E.ExplainConfig(n_samples=1, noise_level=0.0, methods=("smoothgrad",), mode="full", norm_stats="live",
                          max_groups=64, dtype="float64")
    (res,) = [r for r in E.explain_network_space([net], data, lesions, {1: 1, 2: 2}, cfg) if r.label == 2]
    assert res.n_groups == int((lesions == 2).sum())
    ref_net = E.prepare_networks([net], torch.device("cpu"), torch.float64)[0]
    x = torch.from_numpy(data)[None].clone().requires_grad_(True)
    z = ref_net(x)[0, 2]
    best = torch.zeros_like(x)
    for v in np.argwhere(lesions == 2):
        (g,) = torch.autograd.grad(z[tuple(v)], x, retain_graph=True)
        best = torch.where(g.abs() > best.abs(), g, best)
    np.testing.assert_allclose(res.maps["smoothgrad_max"], best[0].numpy(), rtol=1e-6, atol=1e-12)  # maps are float32


def test_tiny_nnunet_gradient_matches_finite_differences(tiny_model):
    predictor = _predictor(tiny_model, ("0",))
    (net,), _ = E.member_networks(predictor)
    net = net.double()
    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, 16, 16, 16))
    lesions = np.zeros((16, 16, 16), np.int32)
    lesions[6:10, 7:10, 5:9] = 1
    data[1][lesions > 0] += 2.5
    cfg = E.ExplainConfig(n_samples=1, noise_level=0.0, methods=("smoothgrad",), mode="full", norm_stats="live",
                          max_groups=1, dtype="float64")
    (res,) = E.explain_network_space([net], data, lesions, {1: 1}, cfg)
    ref = E.prepare_networks([net], torch.device("cpu"), torch.float64)[0]
    x = torch.from_numpy(data)[None]
    pts = _points(lesions.shape, rng, 6) + [(1, 7, 8, 6)]
    fd = _fd_grad(ref, x, torch.from_numpy(lesions == 1).double(), 1, pts, h=1e-6)
    ours = np.array([res.maps["smoothgrad_mean"][c][i, j, k] for c, i, j, k in pts])
    np.testing.assert_allclose(ours, fd, rtol=1e-4, atol=1e-6)


def test_ensemble_mean_is_the_mean_of_the_members():
    data, lesions = _blob_case()
    nets = [SmallNet(seed=s) for s in (0, 1)]
    common = dict(n_samples=3, noise_level=0.05, methods=("smoothgrad",), max_groups=2, seed=5)
    mean = E.explain_network_space(nets, data, lesions, {1: 1, 2: 2}, E.ExplainConfig(members="mean", **common),
                                   member_names=["a", "b"])
    each = E.explain_network_space(nets, data, lesions, {1: 1, 2: 2}, E.ExplainConfig(members="each", **common),
                                   member_names=["a", "b"])
    for m, e in zip(mean, each):
        assert set(e.maps) == {"smoothgrad_mean@a", "smoothgrad_mean@b", "smoothgrad_max@a", "smoothgrad_max@b"}
        both = (e.maps["smoothgrad_mean@a"] + e.maps["smoothgrad_mean@b"]) / 2
        np.testing.assert_allclose(m.maps["smoothgrad_mean"], both, rtol=1e-4, atol=1e-6)


def test_mirroring_averages_flipped_gradients():
    data, lesions = _blob_case()
    net = SmallNet(seed=2).double()
    base = dict(n_samples=1, noise_level=0.0, methods=("smoothgrad",), max_groups=1, dtype="float64",
                norm_stats="live", mode="full")
    plain = E.explain_network_space([net], data, lesions, {1: 1}, E.ExplainConfig(**base))[0]
    mirrored = E.explain_network_space([net], data, lesions, {1: 1}, E.ExplainConfig(mirror_axes=(0,), **base))[0]
    # explicitly: gradient of S for the network applied to the flipped input, flipped back
    flipped = E.explain_network_space([net], data[:, ::-1].copy(), lesions[::-1].copy(), {1: 1},
                                      E.ExplainConfig(**base))[0]
    assert plain.box == mirrored.box
    expected = (plain.maps["smoothgrad_mean"] + flipped.maps["smoothgrad_mean"][:, ::-1]) / 2
    np.testing.assert_allclose(mirrored.maps["smoothgrad_mean"], expected, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------

def test_counter_noise_is_a_function_of_the_voxel():
    big = E.counter_noise(3, [0, 1], 2, (-2, 0, 5), (10, 12, 8))
    sub = E.counter_noise(3, [1], 2, (1, 4, 7), (4, 5, 3))
    torch.testing.assert_close(sub[0], big[1][:, 3:7, 4:9, 2:5])
    again = E.counter_noise(3, [0, 1], 2, (-2, 0, 5), (10, 12, 8))
    assert torch.equal(big, again)
    many = E.counter_noise(0, [0, 1], 2, (0, 0, 0), (40, 40, 40)).double()
    assert abs(float(many.mean())) < 0.01 and abs(float(many.std()) - 1) < 0.01
    flat = many.reshape(4, -1)
    corr = np.corrcoef(flat.numpy())
    assert np.abs(corr - np.eye(4)).max() < 0.01  # samples and channels independent
    shifted = float((many[0, 0, 1:] * many[0, 0, :-1]).mean())
    assert abs(shifted) < 0.01  # neighbouring voxels independent


# ------------------------------------------------------------------------------------------
# geometry: input grid <-> network space
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zooms", [(1.7, 2.1, 2.6), (2.0, 2.0, 7.0)])
def test_network_to_input_equals_nnunet_export(tiny_model, zooms):
    predictor = _predictor(tiny_model, ("0",))
    image, _ = make_case(11, shape=(36, 44, 30))
    data, props = predictor.preprocess(image, zooms)
    geom = E.predictor_geometry(predictor, props, tuple(data.shape[1:]), image.shape[1:])
    assert (geom.nearest_axis is not None) == (zooms[2] == 7.0)
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, *data.shape[1:])).astype(np.float32)
    ours, box = E.network_to_input(maps, geom, full=True)
    # nnU-Net's own export chain: resample -> insert into the crop -> transpose back
    cm, pm = predictor.configuration_manager, predictor.plans_manager
    spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
    res = cm.resampling_fn_probabilities(maps, props["shape_after_cropping_and_before_resampling"], cm.spacing,
                                         spacing_t)
    full = np.zeros((2, *props["shape_before_cropping"]), np.float32)
    sl = tuple(slice(a, b) for a, b in props["bbox_used_for_cropping"])
    full[(slice(None), *sl)] = res
    full = full.transpose([0] + [i + 1 for i in pm.transpose_backward]).transpose(0, 3, 2, 1)
    assert ours.shape == full.shape == (2, 36, 44, 30)
    np.testing.assert_allclose(ours, full, atol=1e-4)
    # a sub-box maps to the same values as the whole volume there
    nbox = [(3, data.shape[1] - 5), (4, 20), (2, data.shape[3] - 1)]
    part, ibox = E.network_to_input(maps[(slice(None), *[slice(a, b) for a, b in nbox])], geom, nbox)
    np.testing.assert_allclose(part, ours[(slice(None), *[slice(a, b) for a, b in ibox])], atol=1e-5)


@pytest.mark.parametrize("zooms", [(2.0, 2.0, 2.0), (1.3, 1.0, 2.4)])
def test_instances_round_trip(tiny_model, zooms):
    predictor = _predictor(tiny_model, ("0",))
    image, labels = make_case(5, shape=(40, 44, 36))
    from bids_app.core.postprocess import label_components

    inst, n = label_components(labels > 0, 26)
    data, props = predictor.preprocess(image, zooms)
    geom = E.predictor_geometry(predictor, props, tuple(data.shape[1:]), image.shape[1:])
    net = E.instances_to_network(inst, geom)
    assert net.shape == tuple(data.shape[1:]) and net.dtype == np.int32
    assert set(np.unique(net)) == set(np.unique(inst))  # no lesion lost
    onehot = np.stack([net == k for k in range(n + 1)]).astype(np.float32)
    back, _ = E.network_to_input(onehot, geom, full=True)
    back[0][back.sum(0) == 0] = 1  # outside nnU-Net's crop = background
    rec = back.argmax(0)
    if zooms == (2.0, 2.0, 2.0):  # the plan spacing: only nnU-Net's crop and transposition
        assert np.array_equal(rec, inst)
        return
    for k in range(1, n + 1):
        a, b = inst == k, rec == k
        if a.sum() >= 20:  # resampled to 2 mm and back: small blobs lose their edges
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.6


# ------------------------------------------------------------------------------------------
# the tiny ensemble end to end
# ------------------------------------------------------------------------------------------

def test_crop_mode_agrees_with_full_mode(tiny_case):
    crop, full = tiny_case["crop"], tiny_case["full"]
    assert np.array_equal(crop.bbox, full.bbox) and np.array_equal(crop.labels, full.labels)
    for name in ("smoothgrad_mean", "smoothgrad_max", "gradcampp"):
        for i in range(crop.n_lesions):
            r = _r(crop.maps[name][i], full.maps[name][i])
            assert r >= 0.95, (name, i, r)


def test_store_geometry_and_content(tiny_case):
    st, seg = tiny_case["crop"], tiny_case["seg"]
    assert st.shape == (40, 48, 40) and st.channel_names == ["T1w", "FLAIR"]
    assert list(st.labels) == list(range(1, seg.n_lesions + 1))
    assert np.array_equal(st.classes, seg.instance_class)
    for i in range(st.n_lesions):
        sl = st.slices(i)
        assert np.array_equal(st.instances[i], seg.instances[sl])
        mine = st.instances[i] == st.labels[i]
        assert mine.sum() == (seg.instances == st.labels[i]).sum()  # the crop holds the whole lesion
        for name in ("smoothgrad_mean", "smoothgrad_max"):
            assert st.maps[name][i].shape == (2, *mine.shape)
            a = np.abs(st.maps[name][i]).sum(0)
            assert a[mine].mean() > a[~mine].mean()  # saliency concentrates on the lesion
        for name in ("gradcam", "gradcampp"):
            assert st.maps[name][i].shape == (1, *mine.shape)
            assert st.maps[name][i].max() == pytest.approx(1.0) and st.maps[name][i].min() >= 0
    meta = st.meta
    assert meta["cams"]["gradcampp"] == {"layer": "decoder.stages.0", "layer_path": "decoder.stages[-2]",
                                         "formulation": "gradcampp-elementwise"}
    assert meta["deep_supervision"] is False and meta["mirroring"] is None
    assert meta["sigma"] > 0 and meta["margin_vox"][0] >= 4  # >= 7 mm at 2 mm
    assert all((hi - lo) % 4 == 0 for box in meta["network_crops"].values() for lo, hi in box)


def test_explain_case_does_not_modify_inputs(tiny_case):
    predictor, image, seg = tiny_case["predictor"], tiny_case["image"], tiny_case["seg"]
    image0, inst0 = image.copy(), seg.instances.copy()
    one = (seg.instances == 1).astype(np.int32)
    st = E.explain_case(predictor, image, (2.0, 2.0, 2.0), one, np.array([1]),
                        E.ExplainConfig(n_samples=1, methods=("gradcampp",)))
    assert np.array_equal(image, image0) and np.array_equal(seg.instances, inst0)
    assert list(st.maps) == ["gradcampp"] and st.n_lesions == 1
    empty = E.explain_case(predictor, image, (2.0, 2.0, 2.0), np.zeros_like(one), np.zeros(0, np.int32))
    assert empty.n_lesions == 0 and empty.maps == {}


# ------------------------------------------------------------------------------------------
# store, summaries
# ------------------------------------------------------------------------------------------

def _hand_store():
    rng = np.random.default_rng(0)
    inst = np.zeros((20, 18, 16), np.int32)
    inst[4:8, 4:8, 4:8] = 1
    inst[9:12, 6:9, 5:8] = 2
    bbox = np.array([[[1, 1, 1], [12, 12, 11]], [[6, 3, 2], [16, 13, 11]]], np.int32)
    maps = {"smoothgrad_max": [], "gradcampp": []}
    crops = []
    for i in range(2):
        sl = tuple(slice(a, b) for a, b in zip(bbox[i, 0], bbox[i, 1]))
        shape = inst[sl].shape
        crops.append(inst[sl].copy())
        m = rng.normal(size=(2, *shape)).astype(np.float32) * 1e-3
        m[:, inst[sl] == i + 1] += 5e-3 * (1 + i)
        maps["smoothgrad_max"].append(m)
        maps["gradcampp"].append(rng.uniform(size=(1, *shape)).astype(np.float32))
    return E.SaliencyStore(shape=(20, 18, 16), zooms=(1.0, 1.0, 1.5), labels=np.array([1, 2], np.int32),
                           classes=np.array([1, 1], np.int32), bbox=bbox, maps=maps, instances=crops,
                           channel_names=["T1w", "FLAIR"], meta={"note": "hand-made"}), inst


def test_store_round_trip(tmp_path):
    from bids_app.errors import BadInputData
    from bids_app.formats.saliency_store import load_store, save_store

    st, _ = _hand_store()
    path = save_store(tmp_path / "sub-01_desc-lesions_saliency.npz", st, affine=np.diag([1, 1, 1.5, 1]))
    back = load_store(path)
    assert back.shape == st.shape and back.zooms == st.zooms and back.channel_names == st.channel_names
    assert np.array_equal(back.bbox, st.bbox) and np.array_equal(back.labels, st.labels)
    assert back.meta["note"] == "hand-made" and back.meta["affine"][2][2] == 1.5
    for i in range(2):
        assert np.array_equal(back.instances[i], st.instances[i])
        for name in st.maps:
            a, b = st.maps[name][i], back.maps[name][i]
            tol = np.abs(a).reshape(a.shape[0], -1).max(1).reshape(-1, 1, 1, 1) * 2.0 ** -11
            assert np.all(np.abs(a - b) <= tol)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(BadInputData, match="Not an msxplain saliency store"):
        load_store(tmp_path / "other.npz")


def test_summary_maps_and_lesion_summaries():
    st, inst = _hand_store()
    before = [m.copy() for m in st.maps["smoothgrad_max"]]
    maps = E.summary_maps(st)
    assert maps["smoothgrad_max"].shape == (2, 20, 18, 16) and maps["gradcampp"].shape == (1, 20, 18, 16)
    for i, lab in enumerate((1, 2)):
        sl = st.slices(i)
        crop = st.maps["smoothgrad_max"][i]
        own = inst[sl] == lab
        np.testing.assert_array_equal(maps["smoothgrad_max"][:, sl[0], sl[1], sl[2]][:, own], crop[:, own])
    # outside lesions: the value of largest |.| among the covering crops
    v = (10, 4, 3)  # covered by both crops, in no lesion
    cands = [st.maps["smoothgrad_max"][i][1][tuple(np.subtract(v, st.bbox[i, 0]))] for i in range(2)]
    assert maps["smoothgrad_max"][1][v] == cands[int(np.argmax(np.abs(cands)))]
    assert np.all(maps["smoothgrad_max"][:, 0, 0, 0] == 0)  # covered by no crop
    cols = E.lesion_summaries(st)
    assert list(cols["label"]) == [1, 2]
    for c in ("T1w", "FLAIR"):
        assert np.all(cols[f"smoothgrad_max_{c}_mass_in"] > 0) and np.all(cols[f"smoothgrad_max_{c}_mass_in"] <= 1)
        assert np.all(cols[f"smoothgrad_max_{c}_rim_ratio"] < 1)  # the lesion is brighter than its rim
        assert np.all(cols[f"smoothgrad_max_{c}_mean_in"] > 0)
    assert "gradcampp_peak_in" in cols and "gradcampp_T1w_peak_in" not in cols
    assert all(np.array_equal(a, b) for a, b in zip(before, st.maps["smoothgrad_max"]))


def test_config_is_checked():
    with pytest.raises(ValueError, match="members"):
        E.ExplainConfig(members="all").checked()
    with pytest.raises(ValueError, match="unknown methods"):
        E.ExplainConfig(methods=("smoothgrad", "occlusion")).checked()
    with pytest.raises(ValueError, match="formulation"):
        E.ExplainConfig(cams={"gradcam": ("decoder.stages[-1]", "scorecam")}).checked()
    cfg = E.ExplainConfig(noise_level=0.0, n_samples=50).checked()
    assert cfg.n_samples == 1 and cfg.cams["gradcam"] == ("decoder.stages[-1]", "gradcam")


def test_receptive_field_and_stride(tiny_model):
    predictor = _predictor(tiny_model, ("0",))
    (net,), _ = E.member_networks(predictor)
    assert E.total_stride(net) == (4, 4, 4)
    assert E.receptive_field(net) == (35, 35, 35)  # 3 stages x 2 convs 3^3, strides 2
    assert E.canonical_layer_name(net, "decoder.stages[-2]") == "decoder.stages.0"
